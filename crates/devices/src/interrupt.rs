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
