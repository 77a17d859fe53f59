//! vessel's device model: one set of devices that both CPU backends (KVM and the
//! software CPU) drive through the same buses. Devices see offsets inside their
//! window and raise interrupts through [`interrupt::IrqLine`]; they never see KVM.

pub mod acpi_pm;
pub mod bus;
pub mod guest_warn;
pub mod interrupt;
pub mod irqchip;
pub mod legacy;
pub mod pci;
pub mod reclaim;
pub mod request;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use interrupt::{IrqLine, MsiSink};
pub use request::{GuestRequest, RequestSink};
