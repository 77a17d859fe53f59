//! One virtual machine: assembled from a [`VmConfig`] by the builder, run by the
//! dispatcher (one loop per vCPU), ended by the guest or the user.

pub mod builder;
pub mod compress;
pub mod config;
pub mod console;
pub mod control;
pub mod dispatcher;
mod error;
mod fallback;
pub mod io_limits;
pub mod metrics;
pub mod migration;
pub mod snapshot;
mod teardown;
pub mod vm;

use std::sync::OnceLock;
use std::time::Instant;

pub use builder::Console;
pub use config::{
    Accel, ConfigError, CpuModel, Hvc, VmConfig, choose_accel, new_vmgenid, parse_memory_backing,
    parse_size, parse_vmgenid, vmgenid_hex,
};
pub use control::{ControlError, RunState};
pub use error::VmError;
pub use vm::{Vm, VmHandle, VmOutcome};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the process start; call first thing in `main` so the boot timer measures
/// from there.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Builds and runs a VM to its end, for a process that exits right after: the kernel's
/// teardown of the VM is left to a short-lived child.
/// `built` runs once the VM is built, before it starts.
pub fn run(
    config: &VmConfig,
    built: impl FnOnce(),
) -> Result<(VmOutcome, std::sync::Arc<metrics::Metrics>), VmError> {
    let mut vm = builder::build(config, Console::Stdio)?;
    built();
    vm.detach_teardown();
    let metrics = vm.handle().metrics().clone();
    Ok((vm.run()?, metrics))
}
