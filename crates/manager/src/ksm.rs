//! The host's kernel same-page merging (`/sys/kernel/mm/ksm`): vessel turns it on and off
//! and reads what it shares. KSM merges only memory marked MADV_MERGEABLE (VMs created
//! with `--memory-merge`), private anonymous memory only.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::ManagerError;

const DIR: &str = "/sys/kernel/mm/ksm";

/// KSM's state and counters.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KsmStatus {
    pub running: bool,
    /// Distinct pages kept for all the merged ones.
    pub pages_shared: u64,
    /// Pages that point at a shared page (the saving, in pages).
    pub pages_sharing: u64,
    pub full_scans: u64,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
}

fn dir() -> PathBuf {
    std::env::var_os("VESSEL_KSM_DIR").map_or_else(|| PathBuf::from(DIR), PathBuf::from)
}

fn read(dir: &Path, name: &str) -> u64 {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What KSM is doing; an error when the host has no KSM.
pub fn status() -> Result<KsmStatus, ManagerError> {
    let dir = dir();
    if !dir.join("run").exists() {
        return Err(ManagerError::Other(format!(
            "this host's kernel has no KSM ({} is missing)",
            dir.display()
        )));
    }
    Ok(KsmStatus {
        running: read(&dir, "run") == 1,
        pages_shared: read(&dir, "pages_shared"),
        pages_sharing: read(&dir, "pages_sharing"),
        full_scans: read(&dir, "full_scans"),
        pages_to_scan: read(&dir, "pages_to_scan"),
        sleep_millisecs: read(&dir, "sleep_millisecs"),
    })
}

/// Starts (or stops, keeping what it merged) the host's KSM; needs root.
pub fn set_running(on: bool) -> Result<(), ManagerError> {
    status()?;
    let path = dir().join("run");
    std::fs::write(&path, if on { "1\n" } else { "0\n" }).map_err(|e| {
        ManagerError::Other(format!(
            "{}: {e}{}",
            path.display(),
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (turning KSM on or off needs root)"
            } else {
                ""
            }
        ))
    })
}
