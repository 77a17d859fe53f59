//! COM1: a 16550A UART (vm-superio) whose output goes to a writer (the terminal, a
//! log) and whose input the console thread feeds.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::{Trigger, serial::NoEvents};

use crate::bus::BusDevice;
use crate::interrupt::IrqLine;

/// Adapts an interrupt line to vm-superio's trigger.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, SerialOutput>,
}

/// The UART's registers and receive FIFO as plain data, for snapshots (vm-superio's
/// `SerialState`, which is not serde).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Loads saved registers; the output and the interrupt line stay this serial's.
    pub fn restore(&mut self, s: &SerialState) {
        let irq = self.uart.interrupt_evt().0.clone();
        let placeholder = vm_superio::Serial::new(
            IrqTrigger(irq.clone()),
            Box::new(std::io::sink()) as SerialOutput,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.iter().copied().take(64).collect(),
        };
        match vm_superio::Serial::from_state(&state, IrqTrigger(irq.clone()), NoEvents, out) {
            Ok(uart) => self.uart = uart,
            Err(e) => tracing::warn!("serial state not restored: {e:?}"),
        }
    }

    pub fn new(irq: Arc<dyn IrqLine>, out: SerialOutput) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let take = bytes.len().min(room);
        if take == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Output errors (a closed terminal) must not stop the guest.
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            tracing::debug!("serial output: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::NoIrq;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives() {
        let out = Captured::default();
        let mut s = Serial::new(Arc::new(NoIrq), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.enqueue_input(b"ok"), 2);
        let mut d = [0u8];
        s.read(5, &mut d);
        assert_eq!(d[0] & 1, 1, "line status: data ready");
        s.read(0, &mut d);
        assert_eq!(d[0], b'o');
    }

    #[test]
    fn a_full_fifo_takes_only_what_fits() {
        let mut s = Serial::new(Arc::new(NoIrq), Box::new(io::sink()));
        let big = vec![b'x'; 1000];
        let n = s.enqueue_input(&big);
        assert!(n > 0 && n < 1000);
        assert_eq!(s.enqueue_input(&big), 0);
    }
}
