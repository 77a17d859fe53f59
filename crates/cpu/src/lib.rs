//! CPU backends behind one [`Vcpu`] trait: `kvm` (hardware-assisted, or KVM's own
//! emulator on hosts without VT-x/AMD-V) and, later, `emu` (vessel's software CPU).
//! The dispatcher sees an [`Exit`], never a `kvm_run`.

pub mod emu;
mod exit;
pub mod kick;
pub mod kvm;
mod snapshot;

pub use exit::{Exit, FatalExit};
pub use kick::KickFlag;
pub use snapshot::{BackendVcpu, VcpuSnapshot};

/// Guest RAM as vessel allocates it: writes through vm-memory (devices, loaders) reach
/// the interpreters' decoded-code map.
pub type GuestMemory = vm_memory::GuestMemoryMmap<x86::CodeBitmap>;

/// One virtual CPU, run by one thread.
pub trait Vcpu: Send {
    /// Index in the VM (also its APIC ID).
    fn index(&self) -> u8;
    /// Runs guest code until something needs the VMM.
    fn run(&mut self) -> Result<Exit<'_>, VcpuError>;
    /// Where the vCPU is and the bytes it is executing, for fatal-exit reports.
    fn location(&mut self) -> Location;
    /// The flag other threads set (with a signal) to make `run` return `Interrupted`.
    fn kick_flag(&self) -> KickFlag;

    /// The full architectural state (for the interpreter, later for snapshots).
    fn state(&mut self) -> Result<x86::CpuState, VcpuError>;
    /// Replaces the architectural state.
    fn set_state(&mut self, state: &x86::CpuState) -> Result<(), VcpuError>;
    /// Delivers `exception` to the guest before its next instruction.
    fn inject(&mut self, exception: x86::Exception) -> Result<(), VcpuError>;
    /// CPUID as this vCPU's guest sees it: [eax, ebx, ecx, edx].
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// An MSR the architectural state does not hold; None if the guest may not read it.
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool;
    /// What the software CPU's interpreter did (the emu backend only).
    fn software_cpu_stats(&self) -> Option<x86::Stats> {
        None
    }
    /// Everything this vCPU holds, for a snapshot (called while it is parked).
    fn save(&mut self) -> Result<VcpuSnapshot, VcpuError>;
    /// Loads a snapshot (before the vCPU first runs).
    fn restore(&mut self, s: &VcpuSnapshot) -> Result<(), VcpuError>;
}

/// A vCPU's position, as best the backend can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub rip: u64,
    /// Up to 15 instruction bytes at RIP (empty when RIP does not translate).
    pub bytes: Vec<u8>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RIP {:#x}, bytes [", self.rip)?;
        for (i, b) in self.bytes.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{b:02x}")?;
        }
        write!(f, "]")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_RUN failed on vCPU {index}: {source}")]
    Run {
        index: u8,
        source: vmm_sys_util::errno::Error,
    },
    #[error("vCPU {index}: {source}")]
    Kvm { index: u8, source: kvm::KvmError },
    #[error("vCPU {index}: {reason}")]
    Emu { index: u8, reason: String },
}

/// Looks `leaf`/`subleaf` up in a CPUID table (the subleaf only matters for leaves
/// that have them).
pub fn cpuid_lookup(table: &[arch::cpuid::CpuidEntry], leaf: u32, subleaf: u32) -> [u32; 4] {
    const SIGNIFICANT_INDEX: u32 = 1;
    table
        .iter()
        .find(|e| e.function == leaf && (e.flags & SIGNIFICANT_INDEX == 0 || e.index == subleaf))
        .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
}
