//! Interrupt lines into KVM's in-kernel irqchip.

use std::io;
use std::sync::Arc;

use devices::IrqLine;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{KvmError, ioctl};

/// An edge-triggered GSI fed through an irqfd: raising it is one eventfd write, with
/// no ioctl and no lock.
pub struct KvmEdgeIrq {
    event: EventFd,
}

impl KvmEdgeIrq {
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self, KvmError> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(|e| KvmError::Ioctl {
            what: "eventfd",
            source: vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        vm.register_irqfd(&event, gsi).map_err(ioctl("KVM_IRQFD"))?;
        Ok(KvmEdgeIrq { event })
    }
}

impl IrqLine for KvmEdgeIrq {
    fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
    fn set_level(&self, high: bool) -> io::Result<()> {
        if high { self.trigger() } else { Ok(()) }
    }
}

/// A level-triggered GSI driven with KVM_IRQ_LINE (the ACPI SCI).
pub struct KvmLevelIrq {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmLevelIrq {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        KvmLevelIrq { vm, gsi }
    }
}

impl IrqLine for KvmLevelIrq {
    fn trigger(&self) -> io::Result<()> {
        self.set_level(true)?;
        self.set_level(false)
    }
    fn set_level(&self, high: bool) -> io::Result<()> {
        self.vm
            .set_irq_line(self.gsi, high)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Lets KVM complete a guest write to `gpa` itself by signalling `event` (a virtio
/// queue notify), without leaving the guest.
pub fn register_notify(vm: &VmFd, gpa: u64, event: &EventFd) -> Result<(), KvmError> {
    vm.register_ioevent(
        event,
        &kvm_ioctls::IoEventAddress::Mmio(gpa),
        kvm_ioctls::NoDatamatch,
    )
    .map_err(ioctl("KVM_IOEVENTFD"))
}
