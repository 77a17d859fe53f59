//! PCI: a root complex with configuration space reached through the legacy 0xCF8/0xCFC
//! mechanism and through ECAM (memory-mapped, announced in the ACPI MCFG table).

mod config;
mod root;

pub use config::ConfigSpace;
pub use root::{ConfigAddressPort, Ecam, HostBridge, PciDevice, PciRoot};
