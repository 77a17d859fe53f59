//! What an instruction needs from the machine around the CPU.

use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::hostmem::HostPage;

/// Where guest RAM is mapped in this process: (guest-physical start, length, host
/// address) of each region. Host pointers cached from one platform call stay valid and
/// correct in a later one exactly when the layout is unchanged (see `hostmem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Number of regions; `None` when the memory could not be described (no physical
    /// memory behind it, too many regions): such a layout matches nothing.
    n: Option<u8>,
    regions: [(u64, u64, usize); 8],
}

impl Layout {
    pub(crate) const UNKNOWN: Layout = Layout {
        n: None,
        regions: [(0, 0, 0); 8],
    };

    pub(crate) fn of<M: GuestMemory>(mem: &M) -> Layout {
        let Some(phys) = mem.physical_memory() else {
            return Layout::UNKNOWN;
        };
        let mut l = Layout {
            n: Some(0),
            regions: [(0, 0, 0); 8],
        };
        for (k, r) in phys.iter().enumerate() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                return Layout::UNKNOWN;
            };
            if k == l.regions.len() {
                return Layout::UNKNOWN;
            }
            l.regions[k] = (r.start_addr().0, r.len(), host as usize);
            l.n = Some(k as u8 + 1);
        }
        l
    }

    /// Both layouts are known and equal.
    pub(crate) fn same(&self, other: &Layout) -> bool {
        self.n.is_some() && self == other
    }

    /// The host address of the guest-physical page `gpa_page` if a region maps all of it.
    #[inline]
    pub(crate) fn host_of(&self, gpa_page: u64) -> Option<usize> {
        let n = usize::from(self.n?);
        self.regions[..n].iter().find_map(|&(start, len, host)| {
            let off = gpa_page.wrapping_sub(start);
            (off < len && len - off >= crate::hostmem::PAGE as u64).then(|| host + off as usize)
        })
    }
}

/// Implemented by the VMM: the KVM fallback now, the software CPU later.
///
/// Guest-physical accesses that hit RAM in [`Platform::memory`] are done by the interpreter
/// directly on the host mapping; everything else goes to the MMIO callbacks.
pub trait Platform {
    type Memory: vm_memory::GuestMemory;
    fn memory(&self) -> &Self::Memory;
    /// Guest-physical accesses outside RAM go to devices.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    fn io_in(&mut self, port: u16, data: &mut [u8]);
    fn io_out(&mut self, port: u16, data: &[u8]);
    /// CPUID leaf/subleaf as the guest should see it: [eax, ebx, ecx, edx].
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// MSRs [`CpuState`](crate::CpuState) does not own; `None` raises #GP(0).
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
    /// `false` raises #GP(0).
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool;
    /// The guest's time-stamp counter now.
    fn tsc(&mut self) -> u64;
    /// Asked between blocks, after the first one and then every 256 instructions or so (a
    /// relaxed load is enough): true makes `run` return
    /// [`RunExit::Attention`](crate::RunExit::Attention), e.g. because an interrupt arrived
    /// or the VMM wants the vCPU. At least one block runs per call.
    fn attention(&self) -> bool {
        false
    }
    /// The flag behind `attention`, if it is one: translated loops watch it directly
    /// (otherwise they return every few hundred instructions for `attention` to be
    /// asked).
    fn attention_flag(&self) -> Option<&std::sync::atomic::AtomicBool> {
        None
    }
}

/// The platform behind a trait object, so that the decoded-instruction handlers are plain
/// (non-generic) function pointers the cache can store whatever the platform type is. Only
/// slow paths (TLB misses, devices, CPUID, MSRs) call through it.
pub(crate) trait Bus {
    fn ram_page(&self, gpa_page: u64, write: bool) -> Option<HostPage>;
    fn layout(&self) -> Layout;
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    fn io_in(&mut self, port: u16, data: &mut [u8]);
    fn io_out(&mut self, port: u16, data: &[u8]);
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool;
    fn tsc(&mut self) -> u64;
    fn attention(&self) -> bool;
    fn attention_flag(&self) -> Option<&std::sync::atomic::AtomicBool>;
}

impl<P: Platform> Bus for P {
    fn ram_page(&self, gpa_page: u64, write: bool) -> Option<HostPage> {
        HostPage::lookup(self.memory(), gpa_page, write)
    }
    fn layout(&self) -> Layout {
        Layout::of(self.memory())
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        Platform::mmio_read(self, gpa, data)
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        Platform::mmio_write(self, gpa, data)
    }
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        Platform::io_in(self, port, data)
    }
    fn io_out(&mut self, port: u16, data: &[u8]) {
        Platform::io_out(self, port, data)
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        Platform::cpuid(self, leaf, subleaf)
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        Platform::rdmsr(self, msr)
    }
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        Platform::wrmsr(self, msr, value)
    }
    fn tsc(&mut self) -> u64 {
        Platform::tsc(self)
    }
    fn attention(&self) -> bool {
        Platform::attention(self)
    }
    fn attention_flag(&self) -> Option<&std::sync::atomic::AtomicBool> {
        Platform::attention_flag(self)
    }
}
