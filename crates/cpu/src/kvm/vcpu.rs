//! One KVM vCPU: set up as Linux expects it, run, and its exits translated.

use arch::cpuid::CpuidEntry;
use arch::entry::EntryState;
use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

use super::{KvmError, ioctl, regs};
use crate::exit::{Exit, FatalExit};
use crate::kick::{self, KickFlag};
use crate::{Location, Vcpu, VcpuError};

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
/// Local APIC register offsets: LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

pub struct KvmVcpu {
    fd: VcpuFd,
    index: u8,
    kick: KickFlag,
    /// For reading instruction bytes in fatal-exit reports.
    mem: Option<GuestMemory>,
    /// The CPUID table given to KVM (the interpreter answers CPUID from it too).
    cpuid: Vec<CpuidEntry>,
    /// The state as last read, so writing back touches only what changed.
    last_read: Option<super::state::KvmState>,
}

impl KvmVcpu {
    pub(super) fn new(fd: VcpuFd, index: u8, cpuid: &[CpuidEntry]) -> Result<Self, KvmError> {
        let entries: Vec<kvm_cpuid_entry2> = cpuid
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let kvm_cpuid = CpuId::from_entries(&entries)
            .map_err(|_| KvmError::MissingCapability("CPUID table size"))?;
        fd.set_cpuid2(&kvm_cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;

        let msrs: Vec<kvm_msr_entry> = arch::msr::boot_msrs()
            .into_iter()
            .map(|(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&msrs).map_err(|_| KvmError::MissingCapability("MSR table size"))?;
        let written = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if written != msrs.as_slice().len() {
            let failed = msrs.as_slice()[written].index;
            tracing::warn!("KVM refused boot MSR {failed:#x}; continuing without it");
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;

        // LINT0 takes the legacy PIC's ExtINT, LINT1 the NMI, as on a PC.
        let mut lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;

        Ok(KvmVcpu {
            fd,
            index,
            kick: KickFlag::default(),
            mem: None,
            cpuid: cpuid.to_vec(),
            last_read: None,
        })
    }

    /// Lets fatal-exit reports read the instruction bytes at RIP.
    pub fn with_memory(mut self, mem: GuestMemory) -> Self {
        self.mem = Some(mem);
        self
    }

    /// Puts the boot vCPU at the kernel's entry point.
    pub fn set_entry_state(&mut self, entry: &EntryState) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        regs::apply_sregs(entry, &mut sregs);
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::regs(entry))
            .map_err(ioctl("KVM_SET_REGS"))
    }

    /// Instruction bytes at linear address `linear` (up to 15, stopping where the
    /// address stops translating).
    fn bytes_at(&self, linear: u64, paging: bool) -> Vec<u8> {
        let Some(mem) = &self.mem else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < 15 {
            let at = linear + out.len() as u64;
            let phys = if paging {
                match self.fd.translate_gva(at) {
                    Ok(t) if t.valid != 0 => t.physical_address,
                    _ => break,
                }
            } else {
                at
            };
            let mut b = [0u8];
            if mem.read_slice(&mut b, GuestAddress(phys)).is_err() {
                break;
            }
            out.push(b[0]);
        }
        out
    }
}

impl Vcpu for KvmVcpu {
    fn index(&self) -> u8 {
        self.index
    }

    fn kick_flag(&self) -> KickFlag {
        self.kick.clone()
    }

    fn run(&mut self) -> Result<Exit<'_>, VcpuError> {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` points at this vCPU's live kvm_run mapping.
        kick::set_current(unsafe { &raw mut (*run).immediate_exit });
        if self.kick.take() {
            return Ok(Exit::Interrupted);
        }
        let index = self.index;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the mapping is live and no exit data borrows it on this path.
                unsafe { (&raw mut (*run).immediate_exit).write_volatile(0) };
                return Ok(Exit::Interrupted);
            }
            Err(source) => return Err(VcpuError::Run { index, source }),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => Exit::IoIn { port, data },
            VcpuExit::IoOut(port, data) => Exit::IoOut { port, data },
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
            VcpuExit::Hlt => Exit::Halt,
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::Shutdown => Exit::Fatal(FatalExit::TripleFault),
            VcpuExit::FailEntry(reason, _) => Exit::Fatal(FatalExit::EntryFailure { reason }),
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Exit::SystemReset,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Exit::SystemPowerOff,
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
            // `internal` member of the union; this exit borrows no kvm_run data.
            VcpuExit::InternalError => match unsafe { (*run).__bindgen_anon_1.internal.suberror } {
                KVM_INTERNAL_ERROR_EMULATION => Exit::EmulationFailure,
                suberror => Exit::Fatal(FatalExit::InternalError { suberror }),
            },
            other => Exit::Fatal(FatalExit::Unhandled(format!("{other:?}"))),
        })
    }

    fn state(&mut self) -> Result<x86::CpuState, VcpuError> {
        let index = self.index;
        let (state, read) = super::state::read(&self.fd, &self.cpuid)
            .map_err(|source| VcpuError::Kvm { index, source })?;
        self.last_read = Some(read);
        Ok(state)
    }

    fn set_state(&mut self, state: &x86::CpuState) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |source| VcpuError::Kvm { index, source };
        let mut old = match self.last_read.take() {
            Some(old) => old,
            None => super::state::read(&self.fd, &self.cpuid).map_err(err)?.1,
        };
        super::state::write(&self.fd, &self.cpuid, state, &mut old).map_err(err)?;
        self.last_read = Some(old);
        Ok(())
    }

    fn save(&mut self) -> Result<crate::VcpuSnapshot, VcpuError> {
        let index = self.index;
        let err = |source| VcpuError::Kvm { index, source };
        let cpu = self.state()?;
        let extra = KvmVcpuExtra::read(&self.fd).map_err(err)?;
        Ok(crate::VcpuSnapshot {
            index,
            cpu,
            halted: extra.mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED,
            backend: crate::BackendVcpu::Kvm(Box::new(extra)),
        })
    }

    fn restore(&mut self, s: &crate::VcpuSnapshot) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |source| VcpuError::Kvm { index, source };
        self.set_state(&s.cpu)?;
        match &s.backend {
            crate::BackendVcpu::Kvm(extra) => extra.write(&self.fd).map_err(err)?,
            crate::BackendVcpu::Emu => {
                // From the software CPU: its local APIC comes separately (the VM's
                // interrupt state); here only whether the vCPU waits in HLT.
                let mp_state = kvm_bindings::kvm_mp_state {
                    mp_state: if s.halted {
                        kvm_bindings::KVM_MP_STATE_HALTED
                    } else {
                        kvm_bindings::KVM_MP_STATE_RUNNABLE
                    },
                };
                self.fd
                    .set_mp_state(mp_state)
                    .map_err(ioctl("KVM_SET_MP_STATE"))
                    .map_err(err)?;
            }
        }
        Ok(())
    }

    fn inject(&mut self, exception: x86::Exception) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |source| VcpuError::Kvm { index, source };
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(super::ioctl("KVM_GET_VCPU_EVENTS"))
            .map_err(err)?;
        if let x86::Exception::SoftwareInterrupt(vector) = exception {
            // INT n: a software interrupt, delivered with RIP already past the instruction.
            events.interrupt.injected = 1;
            events.interrupt.nr = vector;
            events.interrupt.soft = 1;
        } else {
            if let x86::Exception::PageFault { address, .. } = exception {
                let mut sregs = self
                    .fd
                    .get_sregs()
                    .map_err(super::ioctl("KVM_GET_SREGS"))
                    .map_err(err)?;
                sregs.cr2 = address;
                self.fd
                    .set_sregs(&sregs)
                    .map_err(super::ioctl("KVM_SET_SREGS"))
                    .map_err(err)?;
                self.last_read = None;
            }
            events.exception.injected = 1;
            events.exception.nr = exception.vector();
            events.exception.has_error_code = u8::from(exception.error_code().is_some());
            events.exception.error_code = exception.error_code().unwrap_or(0);
        }
        self.fd
            .set_vcpu_events(&events)
            .map_err(super::ioctl("KVM_SET_VCPU_EVENTS"))
            .map_err(err)
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        crate::cpuid_lookup(&self.cpuid, leaf, subleaf)
    }

    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index: msr,
            ..Default::default()
        }])
        .ok()?;
        match self.fd.get_msrs(&mut one) {
            Ok(1) => Some(one.as_slice()[0].data),
            _ => None,
        }
    }

    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        let Ok(one) = Msrs::from_entries(&[kvm_msr_entry {
            index: msr,
            data: value,
            ..Default::default()
        }]) else {
            return false;
        };
        matches!(self.fd.set_msrs(&one), Ok(1))
    }

    fn location(&mut self) -> Location {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return Location::default();
        };
        let paging = s.cr0 & (1 << 31) != 0;
        let linear = s.cs.base.wrapping_add(r.rip);
        Location {
            rip: r.rip,
            bytes: self.bytes_at(linear, paging),
        }
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // The kick handler must never write into an unmapped kvm_run.
        kick::set_current(std::ptr::null_mut());
    }
}

/// What a KVM vCPU holds beyond the architectural state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KvmVcpuExtra {
    pub lapic: kvm_bindings::kvm_lapic_state,
    pub events: kvm_bindings::kvm_vcpu_events,
    pub mp_state: kvm_bindings::kvm_mp_state,
    pub tsc: u64,
}

const MSR_IA32_TSC: u32 = 0x10;

impl KvmVcpuExtra {
    fn read(fd: &VcpuFd) -> Result<Self, KvmError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| KvmError::MissingCapability("MSR table size"))?;
        fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        Ok(KvmVcpuExtra {
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            tsc: msrs.as_slice()[0].data,
        })
    }

    fn write(&self, fd: &VcpuFd) -> Result<(), KvmError> {
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: self.tsc,
            ..Default::default()
        }])
        .map_err(|_| KvmError::MissingCapability("MSR table size"))?;
        fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))
    }
}
