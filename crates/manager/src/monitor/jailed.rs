//! A jailed monitor's process outside its jail: it forks the monitor into the jail's
//! PID namespace, waits for it, and takes down what the jail could not.

use std::io::{PipeWriter, Read, Write};
use std::sync::Mutex;

use crate::error::ManagerError;
use crate::home::Home;
use crate::resources;

/// The monitor's end of the pipe on which it tells the process outside its jail which
/// TAP interfaces it made; written and closed before the jail, so a confined monitor
/// has no way to name others.
static TAP_REPORT: Mutex<Option<PipeWriter>> = Mutex::new(None);

/// Once `vessel start` has put this process in its cgroup, forks the monitor into a
/// PID namespace of its own (as its PID 1) and returns there. This process stays
/// outside the jail to wait for it, then takes down what the jail could not (its
/// cgroup, the TAP interfaces a killed monitor did not release) and exits as it did.
pub(super) fn supervise(home: &Home, name: &str) -> Result<(), ManagerError> {
    let mut admitted = [0u8; 1];
    let _ = std::io::stdin().read(&mut admitted);
    let (mut report, writer) = std::io::pipe().map_err(|e| ManagerError::Other(e.to_string()))?;
    let outside =
        sandbox::jail::fork_into_pid_namespace().map_err(|e| ManagerError::Other(e.to_string()))?;
    if let Some(code) = outside {
        drop(writer);
        let mut made = String::new();
        let _ = report.read_to_string(&mut made);
        release_made_taps(&made);
        resources::leave(home, name);
        std::process::exit(code);
    }
    drop(report);
    *TAP_REPORT.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
    Ok(())
}

/// Tells the process outside the jail the TAP interfaces made for the jail's user
/// (root's work, before the jail), and closes the pipe.
pub(super) fn report_made_taps() {
    let writer = TAP_REPORT.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mut w) = writer {
        let _ = w.write_all(vmm::builder::prepared_taps().join("\n").as_bytes());
    }
}

/// Releases those of the TAP interfaces the monitor made that are still there, still
/// the jail's user's, once the monitor has gone (it releases them itself unless
/// killed).
fn release_made_taps(made: &str) {
    let jail_user = sandbox::jail::DEFAULT_ID.to_string();
    let names: Vec<String> = made
        .lines()
        .filter(|n| {
            let owner = std::path::Path::new("/sys/class/net").join(n).join("owner");
            std::fs::read_to_string(owner).is_ok_and(|o| o.trim() == jail_user)
        })
        .map(str::to_string)
        .collect();
    vmm::builder::release_leftover_taps(&names);
}
