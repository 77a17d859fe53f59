//! The management layer: a VM is a folder (a *bundle*) under vessel's home holding its
//! `vm.toml`, its disks, its serial log and, while it runs, its sockets. A running VM is
//! one monitor process serving a control API on its own socket; the CLI talks only to
//! that API. Starting a VM goes through host admission control.

pub mod bundle;
pub mod clone;
pub mod confine;
mod error;
pub mod governor;
pub mod guest_agent;
pub mod home;
pub mod host;
pub mod ksm;
pub mod lock;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod resources;
pub mod snapshots;
pub mod spec;
pub mod ssh;
pub mod status;

pub use bundle::Bundle;
pub use error::ManagerError;
pub use home::Home;
pub use spec::VmSpec;
pub use status::{Status, VmState};
