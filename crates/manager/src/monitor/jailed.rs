//! A jailed monitor's process outside its jail: it forks the monitor into the jail's
//! PID namespace, waits for it, and takes down what the jail could not.

use std::io::Read;

use crate::bundle::Bundle;
use crate::error::ManagerError;
use crate::home::Home;
use crate::resources;

/// Once `vessel start` has put this process in its cgroup, forks the monitor into a
/// PID namespace of its own (as its PID 1) and returns there. This process stays
/// outside the jail to wait for it, then takes down what the jail could not (its
/// cgroup, the TAP interfaces a killed monitor did not release) and exits as it did.
pub(super) fn supervise(home: &Home, name: &str) -> Result<(), ManagerError> {
    let mut admitted = [0u8; 1];
    let _ = std::io::stdin().read(&mut admitted);
    let outside =
        sandbox::jail::fork_into_pid_namespace().map_err(|e| ManagerError::Other(e.to_string()))?;
    if let Some(code) = outside {
        if let Ok(bundle) = Bundle::open(home, name) {
            release_made_taps(&bundle);
        }
        resources::leave(home, name);
        std::process::exit(code);
    }
    Ok(())
}

/// Writes down the TAP interfaces made for the jail's user (root's work, before the
/// jail), for [`release_made_taps`].
pub(super) fn record_made_taps(bundle: &Bundle) -> Result<(), ManagerError> {
    let made = vmm::builder::prepared_taps();
    if made.is_empty() {
        return Ok(());
    }
    let record = bundle.made_taps();
    std::fs::write(&record, made.join("\n")).map_err(ManagerError::io(&record))
}

/// Releases those of the recorded TAP interfaces still there once the monitor has
/// gone (it releases them itself unless killed).
fn release_made_taps(bundle: &Bundle) {
    let record = bundle.made_taps();
    if let Ok(text) = std::fs::read_to_string(&record) {
        let names: Vec<String> = text.lines().map(str::to_string).collect();
        vmm::builder::release_leftover_taps(&names);
        let _ = std::fs::remove_file(&record);
    }
}
