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
use crate::config::{CpuModel, VmConfig};
use crate::error::VmError;
use crate::snapshot::capture::IrqPersist;
use crate::snapshot::{IrqState, KvmIrqState, SnapshotBackend};

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
    let cpuid = guest_cpuid(vm.supported_cpuid(), config.cpu_model, cpus);
    let mut vcpus: Vec<Box<dyn Vcpu>> = Vec::with_capacity(usize::from(cpus));
    for index in 0..cpus {
        let mut vcpu = vm
            .create_vcpu(index, cpus, &cpuid)?
            .with_memory(mem.clone());
        if index == 0 {
            vcpu.set_entry_state(entry)?;
        }
        vcpus.push(Box::new(vcpu));
    }
    let notify_vm = vm.fd().clone();
    let mut cpuid = cpuid;
    arch::cpuid::set_topology(&mut cpuid, 0, cpus);
    let irq = Box::new(KvmIrq(vm.fd().clone()));
    let dirty_log = vm.dirty_log();
    Ok(Backend {
        com1_irq,
        sci,
        devices: Vec::new(),
        msi: Arc::new(KvmMsi::new(vm.fd().clone())),
        notify: Box::new(move |gpa, event| Ok(cpu::kvm::register_notify(&notify_vm, gpa, event)?)),
        vcpus: Box::new(move |_| Ok(vcpus)),
        backing: Box::new((vm, mem.clone())),
        vm_fd: Some(vm_fd),
        kind: SnapshotBackend::Kvm,
        cpuid,
        irq,
        dirty_log: Some(dirty_log),
    })
}

/// The CPUID a KVM VM of `config` would show its guest.
pub(crate) fn cpuid_offered(config: &VmConfig) -> Result<Vec<arch::cpuid::CpuidEntry>, VmError> {
    let kvm = Kvm::open()?;
    let cpus = config.cpus as u8;
    let mut cpuid = guest_cpuid(kvm.supported_cpuid()?, config.cpu_model, cpus);
    arch::cpuid::set_topology(&mut cpuid, 0, cpus);
    Ok(cpuid)
}

/// The CPUID KVM's vCPUs get: what KVM supports and, where KVM has no hardware behind
/// it and vessel's interpreter runs what its emulator cannot, what the interpreter
/// implements; `portable` keeps only what the software CPU gives too.
fn guest_cpuid(
    supported: Vec<arch::cpuid::CpuidEntry>,
    model: CpuModel,
    cpus: u8,
) -> Vec<arch::cpuid::CpuidEntry> {
    let mut cpuid = supported;
    let software = cpu::emu::cpuid(0, cpus, None);
    let emulated = !cpu::kvm::host_has_hardware_virtualization();
    if emulated {
        arch::cpuid::add_features(&mut cpuid, &software);
    }
    if model == CpuModel::Portable {
        arch::cpuid::keep_features(&mut cpuid, &software);
    }
    if let Some(level) = model.isa_level() {
        // Without hardware, v2's instructions are the interpreter's to run.
        arch::cpuid::limit_isa(&mut cpuid, level, emulated);
    }
    cpuid
}

/// KVM's in-kernel PICs, IOAPIC, PIT and clock, saved and loaded.
struct KvmIrq(Arc<kvm_ioctls::VmFd>);

const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

impl KvmIrq {
    fn chip(&self, id: u32) -> Result<kvm_bindings::kvm_irqchip, String> {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        self.0
            .get_irqchip(&mut c)
            .map_err(|e| format!("KVM_GET_IRQCHIP {id}: {e}"))?;
        Ok(c)
    }
}

impl IrqPersist for KvmIrq {
    fn save(&self) -> Result<IrqState, String> {
        Ok(IrqState::Kvm(Box::new(KvmIrqState {
            pic_master: self.chip(IRQCHIP_PIC_MASTER)?,
            pic_slave: self.chip(IRQCHIP_PIC_SLAVE)?,
            ioapic: self.chip(IRQCHIP_IOAPIC)?,
            pit: self
                .0
                .get_pit2()
                .map_err(|e| format!("KVM_GET_PIT2: {e}"))?,
            clock: self
                .0
                .get_clock()
                .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?,
        })))
    }

    fn restore(&self, s: &IrqState, elapsed_ns: u64) -> Result<(), String> {
        let IrqState::Kvm(k) = s else {
            return Err("the software CPU's interrupt state on KVM".into());
        };
        for c in [&k.pic_master, &k.pic_slave, &k.ioapic] {
            self.0
                .set_irqchip(c)
                .map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", c.chip_id))?;
        }
        self.0
            .set_pit2(&k.pit)
            .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
        let clock = kvm_bindings::kvm_clock_data {
            clock: k.clock.clock + elapsed_ns,
            ..Default::default()
        };
        self.0
            .set_clock(&clock)
            .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
    }

    fn guest_ns(&self) -> u64 {
        self.0.get_clock().map_or(0, |c| c.clock)
    }
}
