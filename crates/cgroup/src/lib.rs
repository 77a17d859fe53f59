//! Performance isolation for VMs on a Linux host: each VM's monitor process in a cgroup
//! of its own under a vessel parent (cgroup v2 where the host has the cpu controller
//! there, else v1), CPU shares and a cap written to it, its threads kept to chosen
//! host CPUs, and its CPU time and throttling read back. Files written directly: the
//! v1 hierarchies on these hosts are mounted one controller each (cpu apart from
//! cpuacct), and a VM needs only these few files.

mod affinity;
mod error;
mod group;
mod mounts;
mod policy;

pub use affinity::{pin_current_thread, pin_process};
pub use error::CgroupError;
pub use group::{CpuUsage, VmCgroup};
pub use mounts::Hierarchy;
pub use policy::{CpuPolicy, CpuSet, DEFAULT_SHARES, PERIOD_US, shares_to_weight};

/// The parent cgroup VMs go under unless the host's configuration names another.
pub const DEFAULT_PARENT: &str = "vessel";
