//! A VM's lifecycle state, as its monitor last wrote it (`status.json`), checked
//! against the living process: a monitor that died leaves "crashed".

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ManagerError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
    /// Saved to its folder and stopped; the next start continues it.
    Suspended,
    /// The monitor process died without stopping the VM.
    Crashed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Suspended => "suspended",
            VmState::Crashed => "crashed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: VmState,
    /// The monitor process, while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The monitor's start time (from /proc/PID/stat), so a reused PID is not mistaken for it.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// When the monitor started (seconds since the epoch).
    #[serde(default)]
    pub started_unix: Option<u64>,
    /// Boots in the current (or last) run.
    #[serde(default)]
    pub boots: u64,
    /// How the last run ended.
    #[serde(default)]
    pub last_exit: Option<String>,
}

impl Status {
    pub fn created() -> Self {
        Status {
            state: VmState::Created,
            pid: None,
            pid_start: None,
            started_unix: None,
            boots: 0,
            last_exit: None,
        }
    }

    pub fn read(path: &Path) -> Result<Self, ManagerError> {
        let text = std::fs::read_to_string(path).map_err(ManagerError::io(path))?;
        serde_json::from_str(&text).map_err(|e| ManagerError::BadConfig {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Written atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), ManagerError> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(ManagerError::io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(ManagerError::io(path))
    }

    /// Running or paused according to the file, with a monitor that is still alive.
    pub fn effective(mut self) -> Self {
        if matches!(self.state, VmState::Running | VmState::Paused) {
            let alive = match (self.pid, self.pid_start) {
                (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
                _ => false,
            };
            if !alive {
                self.state = VmState::Crashed;
            }
        }
        self
    }
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
/// None for a process that is gone or a zombie (dead, not yet reaped: a monitor
/// killed after its parent exited may stay one if init does not reap it).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after its ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_monitor_reads_as_crashed() {
        let me = std::process::id();
        let mut s = Status::created();
        s.state = VmState::Running;
        s.pid = Some(me);
        s.pid_start = process_start_time(me);
        assert_eq!(s.clone().effective().state, VmState::Running);
        s.pid_start = Some(1); // a different process that had our PID
        assert_eq!(s.clone().effective().state, VmState::Crashed);
        s.pid = Some(u32::MAX);
        assert_eq!(s.effective().state, VmState::Crashed);
    }

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status.json");
        let mut s = Status::created();
        s.boots = 3;
        s.write(&p).unwrap();
        assert_eq!(Status::read(&p).unwrap(), s);
        assert!(!p.with_extension("json.tmp").exists());
    }
}
