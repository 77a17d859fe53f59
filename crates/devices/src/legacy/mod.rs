//! PC legacy devices: COM1, the keyboard controller's reset line, the CMOS RTC, the
//! reset control port, vessel's boot timer and QEMU's debug exit port.

pub mod boot_timer;
pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod pit;
pub mod reset;
pub mod serial;

pub use boot_timer::BootTimer;
pub use cmos::Cmos;
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use reset::ResetControl;
pub use serial::Serial;
