//! The reset control register (port 0xCF9), also the FADT's ACPI reset register.

use crate::bus::BusDevice;
use crate::request::{GuestRequest, RequestSink};

const RESET_CPU: u8 = 1 << 2;

pub struct ResetControl {
    value: u8,
    requests: RequestSink,
}

impl ResetControl {
    pub fn new(requests: RequestSink) -> Self {
        ResetControl { value: 0, requests }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.value;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.value = data[0] & 0x0e;
        if data[0] & RESET_CPU != 0 {
            (self.requests)(GuestRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn only_the_reset_cpu_bit_resets() {
        let seen = Arc::new(Mutex::new(0));
        let s = seen.clone();
        let mut r = ResetControl::new(Arc::new(move |_| *s.lock().unwrap() += 1));
        r.write(0, &[0x02]);
        assert_eq!(*seen.lock().unwrap(), 0);
        r.write(0, &[0x06]);
        assert_eq!(*seen.lock().unwrap(), 1);
    }
}
