//! The KVM backend: KVM's in-kernel interrupt controllers and PIT, devices' interrupts
//! through irqfd (edge lines, and MSIs through GSI routes) and KVM_IRQ_LINE (level),
//! one KVM vCPU per vCPU.

use std::sync::Arc;

use arch::entry::EntryState;
use arch::layout::ports;
use cpu::GuestMemory;
use cpu::Vcpu;
use cpu::kvm::{Kvm, KvmEdgeIrq, KvmLevelIrq, KvmMsi};
use devices::IrqLine;

use super::Backend;
use crate::config::VmConfig;
use crate::error::VmError;

pub(crate) fn backend(
    config: &VmConfig,
    mem: &GuestMemory,
    entry: &EntryState,
) -> Result<Backend, VmError> {
    let kvm = Kvm::open()?;
    let max = kvm.max_vcpus();
    if usize::from(config.cpus) > max {
        return Err(VmError::TooManyVcpus {
            asked: config.cpus,
            max,
        });
    }
    let vm = kvm.create_vm(mem)?;
    let vm_fd = std::os::fd::AsRawFd::as_raw_fd(vm.fd().as_ref());
    let com1_irq: Arc<dyn IrqLine> = Arc::new(KvmEdgeIrq::new(vm.fd(), ports::COM1_IRQ)?);
    let sci: Arc<dyn IrqLine> = Arc::new(KvmLevelIrq::new(vm.fd().clone(), ports::ACPI_SCI_IRQ));
    let cpus = config.cpus as u8;
    let mut vcpus: Vec<Box<dyn Vcpu>> = Vec::with_capacity(usize::from(cpus));
    for index in 0..cpus {
        let mut vcpu = vm.create_vcpu(index, cpus)?.with_memory(mem.clone());
        if index == 0 {
            vcpu.set_entry_state(entry)?;
        }
        vcpus.push(Box::new(vcpu));
    }
    let notify_vm = vm.fd().clone();
    Ok(Backend {
        com1_irq,
        sci,
        devices: Vec::new(),
        msi: Arc::new(KvmMsi::new(vm.fd().clone())),
        notify: Box::new(move |gpa, event| Ok(cpu::kvm::register_notify(&notify_vm, gpa, event)?)),
        vcpus: Box::new(move |_| Ok(vcpus)),
        backing: Box::new((vm, mem.clone())),
        vm_fd: Some(vm_fd),
    })
}
