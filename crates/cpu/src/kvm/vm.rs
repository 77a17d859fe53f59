//! /dev/kvm and one VM: guest memory slots, the in-kernel irqchip and PIT.

use std::sync::Arc;

use arch::cpuid::CpuidEntry;
use arch::layout;
use kvm_bindings::{CpuId, kvm_userspace_memory_region};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

use super::vcpu::KvmVcpu;
use super::{KvmError, ioctl};

/// The host's KVM.
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
}

impl Kvm {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => KvmError::NoDevice,
            libc::EACCES | libc::EPERM => KvmError::NoPermission,
            _ => KvmError::Open(e),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Pit2, "PIT2"),
            (Cap::ImmediateExit, "immediate_exit"),
            (Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        Ok(Kvm { kvm })
    }

    /// The CPUID leaves KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, KvmError> {
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(entries(&c))
    }

    /// The most vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// A VM over `mem`, with KVM's interrupt controllers and PIT.
    pub fn create_vm(&self, mem: &GuestMemory) -> Result<KvmVm, KvmError> {
        let fd = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| KvmError::MissingCapability("host address of guest memory"))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region maps memory owned by `mem`, which the VMM keeps alive
            // for as long as the VM exists.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let supported_cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let slots = mem
            .iter()
            .enumerate()
            .filter_map(|(slot, r)| {
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
                Some(kvm_userspace_memory_region {
                    slot: slot as u32,
                    guest_phys_addr: r.start_addr().raw_value(),
                    memory_size: r.len(),
                    userspace_addr: host as u64,
                    flags: 0,
                })
            })
            .collect();
        Ok(KvmVm {
            fd: Arc::new(fd),
            supported_cpuid,
            slots,
        })
    }
}

fn entries(c: &CpuId) -> Vec<CpuidEntry> {
    c.as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

pub struct KvmVm {
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
    slots: Vec<kvm_userspace_memory_region>,
}

/// KVM's log of the pages its vCPUs wrote, slot by slot (for a migration).
pub struct KvmDirtyLog {
    fd: Arc<VmFd>,
    slots: Vec<kvm_userspace_memory_region>,
}

impl KvmDirtyLog {
    /// Turns logging on or off on every memory slot (on: every page starts clean).
    pub fn set(&self, on: bool) -> Result<(), KvmError> {
        for slot in &self.slots {
            let mut region = *slot;
            region.flags = if on {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            // SAFETY: the same mapping the slot was made with, still owned by the VM's
            // guest memory, which outlives the VM.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The guest-physical pages KVM's vCPUs wrote since the last call (or since
    /// logging began); KVM starts each slot's log clean again.
    pub fn take(&self) -> Result<Vec<u64>, KvmError> {
        let mut out = Vec::new();
        for slot in &self.slots {
            let bitmap = self
                .fd
                .get_dirty_log(slot.slot, slot.memory_size as usize)
                .map_err(ioctl("KVM_GET_DIRTY_LOG"))?;
            for (j, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let page = (j * 64) as u64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    out.push(slot.guest_phys_addr + (page << 12));
                }
            }
        }
        Ok(out)
    }
}

impl KvmVm {
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The VM's dirty page log (off until [`KvmDirtyLog::set`] turns it on).
    pub fn dirty_log(&self) -> KvmDirtyLog {
        KvmDirtyLog {
            fd: self.fd.clone(),
            slots: self.slots.clone(),
        }
    }

    /// The host's supported CPUID leaves, as plain entries.
    pub fn supported_cpuid(&self) -> Vec<CpuidEntry> {
        entries(&self.supported_cpuid)
    }

    /// Creates vCPU `index` of `count` with its CPUID (`cpuid`, with this vCPU's
    /// topology), MSRs, FPU and local APIC set up.
    pub fn create_vcpu(
        &self,
        index: u8,
        count: u8,
        cpuid: &[CpuidEntry],
    ) -> Result<KvmVcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = cpuid.to_vec();
        arch::cpuid::set_topology(&mut cpuid, index, count);
        KvmVcpu::new(fd, index, &cpuid)
    }
}
