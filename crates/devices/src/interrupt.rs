//! How devices raise interrupts, whatever delivers them: KVM (irqfd / KVM_IRQ_LINE) or
//! the software CPU's user-space interrupt controllers.

use std::io;

/// One interrupt line (a GSI) of the platform.
pub trait IrqLine: Send + Sync {
    /// An edge: the line pulses once.
    fn trigger(&self) -> io::Result<()>;
    /// A level-triggered line held high or low.
    fn set_level(&self, high: bool) -> io::Result<()>;
}

/// A line wired to nothing: for devices whose interrupt the guest never enables.
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_level(&self, _high: bool) -> io::Result<()> {
        Ok(())
    }
}

/// Where message-signalled interrupts go: KVM (KVM_SIGNAL_MSI or an MSI route) or the
/// software CPU's local APICs. Devices keep their MSI-X tables and send the messages.
pub trait MsiSink: Send + Sync {
    /// Delivers one message: `data` written to `address`, as the device would on the bus.
    fn send(&self, address: u64, data: u32) -> io::Result<()>;
}

/// A sink that drops every message: for devices built before the VMM wires MSI.
pub struct NoMsi;

impl MsiSink for NoMsi {
    fn send(&self, _address: u64, _data: u32) -> io::Result<()> {
        Ok(())
    }
}
