//! QEMU's isa-debug-exit: a guest ends the VM with an exit status by writing a value
//! to its port (0xf4, four bytes wide), as test kernels and conformance suites do. The
//! status is QEMU's: (value << 1) | 1, so that it never reads as a clean exit. Only
//! present when asked for (`--debug-exit`): a guest must not end a VM this way
//! unless its user wants it to.

use crate::bus::BusDevice;
use crate::request::{GuestRequest, RequestSink};

pub const PORT: u16 = 0xf4;
pub const LEN: u64 = 4;

pub struct DebugExit {
    requests: RequestSink,
}

impl DebugExit {
    pub fn new(requests: RequestSink) -> Self {
        DebugExit { requests }
    }
}

/// The process exit status for a written `value`.
pub fn status(value: u32) -> u8 {
    ((value << 1) | 1) as u8
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        (self.requests)(GuestRequest::DebugExit(status(value)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn a_write_asks_for_qemus_exit_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = DebugExit::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        d.write(0, &[0]);
        d.write(0, &[0x10, 0, 0, 0]);
        d.write(0, &[0x80, 0]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                GuestRequest::DebugExit(1),
                GuestRequest::DebugExit(0x21),
                GuestRequest::DebugExit(1),
            ]
        );
    }
}
