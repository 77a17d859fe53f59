//! The whole VM as data, and on disk. A snapshot is a folder:
//!
//! ```text
//! state    "VESSEL-STATE <format>", a CRC-32 line, then JSON: the vCPUs, the interrupt
//!          controllers and timers, every device, the CPUID the guest saw, the memory map
//! memory   guest RAM, its regions one after the other; pages of zeros are holes
//! ```
//!
//! A capture pauses the vCPUs (each saves its own state where it is parked), stops the
//! virtio workers once their requests in flight are done, saves the devices and the
//! backend's interrupt state, then copies memory. A restore builds the same VM around
//! the memory file (mapped privately: pages come in as the guest touches them) and
//! loads the rest before the first instruction. Snapshot, suspend, clone and migration
//! are this capture with different destinations.

pub mod capture;
pub mod convert;
pub mod file;

use arch::cpuid::CpuidEntry;
use cpu::VcpuSnapshot;
use devices::acpi_pm::AcpiPmState;
use devices::irqchip::IrqChipState;
use devices::legacy::cmos::CmosState;
use devices::legacy::pit::PitState;
use devices::legacy::serial::SerialState;
use devices::virtio::VirtioPciState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use capture::Persist;
pub use file::{read_state, write_snapshot};

/// Bumped whenever the state's meaning changes; a state of another format is refused.
pub const FORMAT: u32 = 1;

/// Which CPU backend ran the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotBackend {
    Kvm,
    Emu,
}

impl std::fmt::Display for SnapshotBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotBackend::Kvm => "kvm",
            SnapshotBackend::Emu => "emu",
        })
    }
}

/// One range of guest RAM and where it sits in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub guest: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The interrupt controllers and timers, as the backend keeps them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IrqState {
    /// The software CPU's user-space LAPICs, IOAPIC, PICs and PIT, and its clock.
    Emu(Box<EmuIrqState>),
    /// KVM's in-kernel PICs, IOAPIC and PIT, and its clock.
    Kvm(Box<KvmIrqState>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmuIrqState {
    pub chip: IrqChipState,
    pub pit: PitState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmIrqState {
    pub pic_master: kvm_bindings::kvm_irqchip,
    pub pic_slave: kvm_bindings::kvm_irqchip,
    pub ioapic: kvm_bindings::kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
}

/// The devices every vessel VM has, and its virtio functions in PCI order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialState,
    pub cmos: CmosState,
    pub pm: AcpiPmState,
    pub virtio: Vec<VirtioPciState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub format: u32,
    /// The vessel that wrote it.
    pub vessel_version: String,
    pub backend: SnapshotBackend,
    pub cpus: u16,
    pub memory_bytes: u64,
    /// CPUID as vCPU 0's guest saw it.
    pub cpuid: Vec<CpuidEntry>,
    /// Host wall clock at the capture (nanoseconds since the epoch): a restore moves
    /// the guest's clock on by the time the snapshot sat on disk.
    pub saved_unix_ns: u64,
    /// Guest time at the capture (the software CPU's clock; KVM's is in its state).
    pub guest_ns: u64,
    pub vcpus: Vec<VcpuSnapshot>,
    pub irq: IrqState,
    pub devices: DeviceStates,
    pub memory: Vec<MemoryRange>,
}

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a vessel state file")]
    NotState { path: std::path::PathBuf },
    #[error("{path}: state format {found}, this vessel reads format {FORMAT}")]
    Format {
        path: std::path::PathBuf,
        found: String,
    },
    #[error("{path}: the checksum does not match: the file is damaged or was edited")]
    Checksum { path: std::path::PathBuf },
    #[error("{path}: {reason}")]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{path}: the memory file holds {found} bytes, the state says {want}")]
    MemorySize {
        path: std::path::PathBuf,
        found: u64,
        want: u64,
    },
    #[error("cannot take the snapshot: {0}")]
    Capture(String),
    /// The VM has a part a snapshot cannot hold.
    #[error("{0}")]
    Unsaveable(String),
    #[error("cannot restore: {0}")]
    Restore(String),
}

impl SnapshotError {
    pub fn io(path: impl Into<std::path::PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io { path, source }
    }
}

pub(crate) fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
