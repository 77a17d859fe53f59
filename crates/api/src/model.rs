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
    /// A clean shutdown: through the guest agent when one answers, else the ACPI power
    /// button.
    Shutdown,
    /// The ACPI power button only.
    #[serde(rename = "power-button")]
    PowerButton,
    /// A hard reset; a managed VM boots again.
    Reboot,
    /// Ends the VM at once.
    Kill,
    /// Saves the whole VM as a snapshot (named by `name`, else `snapN`) and runs on.
    Snapshot,
    /// Saves the whole VM and stops it; the next start continues it.
    Suspend,
}

/// Settings to change on a running VM (`POST .../settings`), as `vessel set` takes
/// them: `cpu_shares=700`, `disk0.bw=10M`, `net0.rx_bw=none`...
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SettingsRequest {
    pub settings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: Action,
    /// The snapshot's name (`snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the snapshot is for (`snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl ActionRequest {
    pub fn new(action: Action) -> Self {
        ActionRequest {
            action,
            name: None,
            description: None,
        }
    }
}

/// What a snapshot or suspend did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotBody {
    pub snapshot: String,
    /// How long the VM was paused for it.
    pub seconds: f64,
    /// Bytes of guest memory written (pages of zeros are not).
    pub memory_bytes: u64,
}

/// POST /v1/vms/{name}/migrate: move the running VM to a `vessel receive`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// The longest the guest may stand still (default 300 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// At most this many bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// LZ4-compress the pages.
    #[serde(default)]
    pub compress: bool,
    /// Never slow the guest down to converge.
    #[serde(default)]
    pub no_auto_converge: bool,
    /// Copy the disks too (no shared storage).
    #[serde(default)]
    pub copy_disks: bool,
    /// Finish a post-copy whose link failed (the destination listens again).
    #[serde(default)]
    pub recover: bool,
    /// Post-copy after this many rounds that did not converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after: Option<u32>,
}

/// POST /v1/vms/{name}/migrate/recover at the destination of a post-copy whose link
/// failed: listen there for the source's new connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// `tcp:ADDR:PORT` (port 0: any) or `unix:PATH`.
    pub listen: String,
}

/// Where the destination listens for the source's new connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecoverBody {
    pub listening: String,
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrateBody {
    pub to: String,
    pub rounds: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub seconds: f64,
    pub downtime_ms: f64,
    pub throttle_percent: u8,
    /// Pages sent after the destination took over (post-copy), and how many of them it
    /// asked for first.
    #[serde(default)]
    pub postcopy_pages: u64,
    #[serde(default)]
    pub postcopy_requests: u64,
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
    /// What the rate limits held back, per queue (`disk0`, `net0-rx`, `net0-tx`).
    #[serde(default)]
    pub throttled: Vec<ThrottleInfo>,
    /// Where the guest's memory stands on the host: balloon, merged pages.
    #[serde(default)]
    pub memory: MemoryInfo,
}

/// A VM's memory as the host sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryInfo {
    /// The monitor's resident memory (guest RAM the guest has touched, plus vessel).
    pub rss_bytes: u64,
    /// Pages of this VM KSM has merged (with its own or other VMs' pages).
    #[serde(default)]
    pub ksm_merging_pages: Option<u64>,
    #[serde(default)]
    pub balloon: Option<BalloonInfo>,
    #[serde(default)]
    pub compression: Option<CompressionInfo>,
}

/// The compression cache of a VM's cold pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompressionInfo {
    /// Pages held compressed now, and their compressed size.
    pub pages: u64,
    pub bytes: u64,
    /// Pages brought back because something touched them (total).
    pub faults: u64,
    /// Pages compressed, and pages left alone because they did not compress (totals).
    pub compressed: u64,
    pub incompressible: u64,
    /// Whether the cache takes pages now (with `auto`, only once the governor engages it).
    #[serde(default)]
    pub engaged: bool,
}

/// The balloon: what the host asks for, what the guest gave, what went back to the host,
/// and the guest's own figures (its last statistics).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BalloonInfo {
    pub target_bytes: u64,
    pub actual_bytes: u64,
    /// Given back to the host by inflation, and by free page reporting (totals).
    pub inflated_bytes: u64,
    pub reported_bytes: u64,
    #[serde(default)]
    pub guest_total_bytes: Option<u64>,
    #[serde(default)]
    pub guest_free_bytes: Option<u64>,
    #[serde(default)]
    pub guest_available_bytes: Option<u64>,
    #[serde(default)]
    pub swap_in_bytes: Option<u64>,
    #[serde(default)]
    pub swap_out_bytes: Option<u64>,
    #[serde(default)]
    pub major_faults: Option<u64>,
    #[serde(default)]
    pub minor_faults: Option<u64>,
}

/// One rate-limited queue's waits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThrottleInfo {
    pub queue: String,
    pub requests: u64,
    pub seconds: f64,
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
