//! The JSON the control API speaks (see docs/api.yaml). Requests reject unknown fields.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// What can be asked of a running VM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pause,
    Resume,
    /// The ACPI power button: the guest shuts down.
    Shutdown,
    /// A hard reset; a managed VM boots again.
    Reboot,
    /// Ends the VM at once.
    Kill,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: Action,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateBody {
    pub state: String,
}

/// GET /v1/vms/{name}
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    pub name: String,
    pub state: String,
    pub pid: u32,
    pub uptime_seconds: f64,
    /// How many times the guest has booted in this monitor (reboots restart it).
    pub boots: u64,
    pub cpus: u16,
    pub memory_mib: u64,
    pub accel: String,
    pub kernel: String,
    pub cmdline: String,
    /// CPU seconds used by each vCPU thread of the current boot.
    pub vcpu_seconds: Vec<f64>,
    /// The monitor process's resident memory.
    pub monitor_rss_kib: u64,
    /// Each NIC's traffic in the current boot.
    #[serde(default)]
    pub nics: Vec<NicInfo>,
    /// Where the host reaches the guest's SSH server (`127.0.0.1:PORT`), when a NIC
    /// forwards it (`user,ssh=on`).
    #[serde(default)]
    pub ssh: Option<String>,
}

/// One NIC: what it is attached to, and its frame and byte counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicInfo {
    /// `net0 user 52:54:00:12:34:56`, `net1 network lab ...`.
    pub nic: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}
