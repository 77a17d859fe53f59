//! Performance isolation, the host layer's part: each managed VM's monitor goes into a
//! cgroup of its own (`<cgroup_parent>/<name>.<home>`, default `vessel/NAME.1a2b3c4d`:
//! the suffix tells apart VMs of one name in different vessel homes) where the VM's
//! CPU policy is written, at start and live; its threads are pinned to the host CPUs
//! asked for. A monitor never writes its own limits; when it ends, it leaves its cgroup
//! and removes it.

use std::path::Path;

use cgroup::{CpuPolicy, CpuUsage, Hierarchy, VmCgroup};

use crate::error::ManagerError;
use crate::home::Home;
use crate::host::{self, Allocation, Host};

/// Where a VM's monitor was placed.
pub enum Placement {
    Cgroup(VmCgroup),
    /// No cgroup (and the VM asked for nothing that needs one): why.
    Without(String),
}

fn group_error(name: &str, e: impl std::fmt::Display) -> ManagerError {
    ManagerError::Cgroup {
        name: name.into(),
        reason: e.to_string(),
    }
}

/// The VM's cgroup's name under the parent.
fn leaf(home: &Home, name: &str) -> String {
    // FNV-1a of the home's path: stable, short, and the same from every process.
    let root = std::path::absolute(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    let hash = root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
    format!("{name}.{hash:08x}")
}

/// Makes the VM's cgroup and writes its policy, before the monitor starts. Without
/// cgroups (no controller, no rights) a VM that asked for shares or a cap is refused;
/// one that did not starts without, and [`Placement::Without`] says why.
pub fn prepare(
    home: &Home,
    host: &Host,
    name: &str,
    policy: &CpuPolicy,
) -> Result<Placement, ManagerError> {
    let made = Hierarchy::detect().and_then(|h| {
        let g = VmCgroup::create(&h, &host.cgroup_parent, &leaf(home, name))?;
        g.apply(policy)?;
        Ok(g)
    });
    match made {
        Ok(g) => Ok(Placement::Cgroup(g)),
        Err(e) if policy.needs_cgroup() => Err(group_error(name, e)),
        Err(e) => Ok(Placement::Without(e.to_string())),
    }
}

impl Placement {
    /// Moves the monitor (every thread it has or will have) in.
    pub fn admit(&self, name: &str, pid: u32) -> Result<(), ManagerError> {
        match self {
            Placement::Cgroup(g) => g.add_process(pid).map_err(|e| group_error(name, e)),
            Placement::Without(_) => Ok(()),
        }
    }
}

/// CPU settings `vessel set` changes while the VM runs.
pub const LIVE_KEYS: [&str; 4] = ["cpu_shares", "cpu_limit", "cpu_reservation", "cpu_affinity"];

/// Whether `key` may change while the VM runs: the CPU policy, and disks' and NICs'
/// rate limits (`disk0.bw`, `net0.rx_bw`).
pub fn is_live_key(key: &str) -> bool {
    LIVE_KEYS.contains(&key)
        || (key.starts_with("disk") || key.starts_with("net")) && key.contains('.')
}

/// The devices (`disk0`, `net1`) that `key=value` settings name, each once.
pub fn devices_named(settings: &[String]) -> Vec<&str> {
    let mut devices: Vec<&str> = settings
        .iter()
        .filter_map(|kv| kv.split_once('=').and_then(|(k, _)| k.split_once('.')))
        .map(|(d, _)| d)
        .collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

/// A running VM's CPU policy changed: a larger reservation passes admission again (with
/// the admission lock held), then the policy is applied.
pub fn set_live(home: &Home, name: &str, pid: u32, policy: &CpuPolicy) -> Result<(), ManagerError> {
    let _admission = crate::lock::FileLock::acquire(&home.admission_lock())?;
    let host = Host::load(home)?;
    let others: Vec<Allocation> = host::allocations(home)?
        .into_iter()
        .filter(|a| a.name != name)
        .collect();
    let want = Allocation {
        name: name.into(),
        reservation: policy.reservation.unwrap_or(0.0),
        ..Allocation::default()
    };
    host.admit(&others, &want)
        .map_err(|missing| ManagerError::Admission {
            name: name.into(),
            missing,
        })?;
    apply_live(home, &host, name, pid, policy)
}

/// The running VM's cgroup, if it has one.
pub fn cgroup_of(home: &Home, host: &Host, name: &str) -> Option<VmCgroup> {
    let h = Hierarchy::detect().ok()?;
    VmCgroup::open(&h, &host.cgroup_parent, &leaf(home, name))
}

/// A running VM's new policy: written to its cgroup, its threads re-pinned.
fn apply_live(
    home: &Home,
    host: &Host,
    name: &str,
    pid: u32,
    policy: &CpuPolicy,
) -> Result<(), ManagerError> {
    match cgroup_of(home, host, name) {
        Some(g) => g.apply(policy).map_err(|e| group_error(name, e))?,
        None if policy.needs_cgroup() => {
            return Err(group_error(
                name,
                "the VM runs without a cgroup (it was started without cgroup controls); restart it to apply shares or a limit",
            ));
        }
        None => {}
    }
    if let Some(set) = &policy.affinity {
        cgroup::pin_process(pid, set).map_err(|e| group_error(name, e))?;
    }
    Ok(())
}

pub fn usage(home: &Home, host: &Host, name: &str) -> Option<(VmCgroup, CpuUsage)> {
    let g = cgroup_of(home, host, name)?;
    let u = g.usage().ok()?;
    Some((g, u))
}

/// Removes a stopped VM's cgroup (`vessel rm`); best effort.
pub fn remove(home: &Home, host: &Host, name: &str) {
    if let Some(g) = cgroup_of(home, host, name)
        && let Err(e) = g.remove()
    {
        tracing::warn!("{name}: {e}");
    }
}

/// The monitor of `name`, ending: leaves its cgroup for the hierarchy's root and
/// removes it, so nothing is left behind (a monitor killed outright leaves an empty
/// cgroup, reused at the next start and removed by `vessel rm`).
pub fn leave(home: &Home, name: &str) {
    let Ok(host) = Host::load(home) else { return };
    let (Ok(h), Some(g)) = (Hierarchy::detect(), cgroup_of(home, &host, name)) else {
        return;
    };
    let pid = std::process::id();
    let mine = VmCgroup::of_process(&h, pid).is_some_and(|m| m.path() == g.path());
    if mine && VmCgroup::root(&h).add_process(pid).is_ok() {
        let _ = g.remove();
    }
}

/// Pins the calling process's future threads: run between fork and exec.
pub fn pin_before_exec(policy: &CpuPolicy) -> std::io::Result<()> {
    match &policy.affinity {
        Some(set) => cgroup::pin_current_thread(set),
        None => Ok(()),
    }
}

/// For `vessel run`: the foreground process's own cgroup (`<parent>/run-<pid>`),
/// left and removed when dropped.
pub struct OwnCgroup {
    group: VmCgroup,
    back: Option<VmCgroup>,
}

impl OwnCgroup {
    /// Joins a new cgroup with `policy`, when the policy needs one.
    pub fn join(parent: &Path, policy: &CpuPolicy) -> Result<Option<OwnCgroup>, String> {
        if !policy.needs_cgroup() {
            return Ok(None);
        }
        let pid = std::process::id();
        let h = Hierarchy::detect().map_err(|e| format!("cgroup controls: {e}"))?;
        let back = VmCgroup::of_process(&h, pid);
        let group = VmCgroup::create(&h, parent, &format!("run-{pid}"))
            .and_then(|g| {
                g.apply(policy)?;
                g.add_process(pid)?;
                Ok(g)
            })
            .map_err(|e| format!("cgroup controls: {e}"))?;
        Ok(Some(OwnCgroup { group, back }))
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        if let Some(back) = &self.back {
            let _ = back.add_process(std::process::id());
        }
        let _ = self.group.remove();
    }
}

/// This process's cgroup CPU time and throttling, in Prometheus' text format (what a
/// monitor reads of itself; nothing without a cgroup).
pub fn prometheus(vm: &str) -> String {
    let Some(u) = Hierarchy::detect()
        .ok()
        .and_then(|h| VmCgroup::of_process(&h, std::process::id()))
        .and_then(|g| g.usage().ok())
    else {
        return String::new();
    };
    let vm = vm.replace(['\\', '"', '\n'], "_");
    let mut s = String::new();
    for (name, help, kind, value) in [
        (
            "vessel_cgroup_cpu_seconds_total",
            "CPU time of all the monitor's threads (its cgroup's).",
            "counter",
            u.used.as_secs_f64(),
        ),
        (
            "vessel_cgroup_throttled_seconds_total",
            "Time the CPU limit held the VM back.",
            "counter",
            u.throttled.as_secs_f64(),
        ),
        (
            "vessel_cgroup_throttled_periods_total",
            "CFS periods in which the VM was throttled.",
            "counter",
            u.throttled_periods as f64,
        ),
    ] {
        s +=
            &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{vm=\"{vm}\"}} {value}\n");
    }
    s
}
