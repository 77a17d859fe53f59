//! The x86 platform vessel presents to a guest: the guest-physical map, the e820
//! map, kernel boot protocols (bzImage 64-bit entry, PVH), ACPI tables, CPUID
//! topology and boot MSRs. Nothing here knows which CPU backend will run the guest.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod entry;
pub mod layout;
pub mod msr;
