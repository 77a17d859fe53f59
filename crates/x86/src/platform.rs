//! What an instruction needs from the machine around the CPU.

use crate::hostmem::HostPage;

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
}

/// The platform behind a trait object, so that the decoded-instruction handlers are plain
/// (non-generic) function pointers the cache can store whatever the platform type is. Only
/// slow paths (TLB misses, devices, CPUID, MSRs) call through it.
pub(crate) trait Bus {
    fn ram_page(&self, gpa_page: u64, write: bool) -> Option<HostPage>;
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    fn io_in(&mut self, port: u16, data: &mut [u8]);
    fn io_out(&mut self, port: u16, data: &[u8]);
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool;
    fn tsc(&mut self) -> u64;
}

impl<P: Platform> Bus for P {
    fn ram_page(&self, gpa_page: u64, write: bool) -> Option<HostPage> {
        HostPage::lookup(self.memory(), gpa_page, write)
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
}
