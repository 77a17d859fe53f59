//! PCI: a root complex with configuration space reached through the legacy 0xCF8/0xCFC
//! mechanism and through ECAM (memory-mapped, announced in the ACPI MCFG table); BARs
//! placed by vessel in the host bridge windows; MSI-X.

mod bar;
mod config;
pub mod msix;
mod root;

use thiserror::Error;

pub use bar::{BarAllocator, MIN_BAR_SIZE};
pub use config::{Bar, BarKind, ConfigSpace};
pub use msix::{MsixDelivery, MsixTable};
pub use root::{ConfigAddressPort, Ecam, HostBridge, PciDevice, PciRoot};

/// Register offsets of the type-0 header.
pub mod regs {
    pub use super::config::{
        BAR_COUNT, BAR0, CAPABILITIES_POINTER, CLASS_REVISION, COMMAND, DEVICE_ID, INTERRUPT_LINE,
        INTERRUPT_PIN, SIZE, STATUS, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
    };
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    #[error("no room left in the PCI window for a {size:#x}-byte BAR")]
    WindowFull { size: u64 },
    #[error("BAR{index} is taken or does not exist")]
    BadBar { index: usize },
    #[error(
        "BAR{index}: size {size:#x} is not a power of two of at least 16 bytes, or the address is not aligned to it"
    )]
    BadBarSize { index: usize, size: u64 },
    #[error("no room left in configuration space for a capability")]
    ConfigSpaceFull,
    #[error("no free slot left on PCI bus 0")]
    BusFull,
}
