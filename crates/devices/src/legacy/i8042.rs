//! The keyboard controller, as far as a VMM needs it: command 0xFE (pulse the CPU
//! reset line) ends or restarts the VM (vm-superio's i8042).

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use crate::bus::{BusDevice, lock};
use crate::request::{GuestRequest, RequestSink};

/// The reset line of the keyboard controller.
pub struct ResetLine(RequestSink);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(GuestRequest::Reset);
        Ok(())
    }
}

/// One of the controller's two ports (0x60 data, 0x64 command/status) on the bus.
pub struct I8042 {
    controller: Arc<Mutex<I8042Device<ResetLine>>>,
    /// vm-superio addresses registers by offset from port 0x60.
    register: u8,
}

impl I8042 {
    /// The data and command ports, sharing one controller.
    pub fn ports(requests: RequestSink) -> (I8042, I8042) {
        let controller = Arc::new(Mutex::new(I8042Device::new(ResetLine(requests))));
        (
            I8042 {
                controller: controller.clone(),
                register: 0,
            },
            I8042 {
                controller,
                register: 4,
            },
        )
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = lock(&self.controller).read(self.register);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Ok(()) = lock(&self.controller).write(self.register, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_fe_requests_a_reset() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let (mut data, mut cmd) = I8042::ports(Arc::new(move |r| s.lock().unwrap().push(r)));
        data.write(0, &[0xfe]);
        cmd.write(0, &[0xaa]);
        assert!(seen.lock().unwrap().is_empty());
        cmd.write(0, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestRequest::Reset]);
        let mut status = [0xffu8];
        cmd.read(0, &mut status);
        assert_eq!(
            status[0] & 2,
            0,
            "input buffer empty: kernels poll this before 0xFE"
        );
    }
}
