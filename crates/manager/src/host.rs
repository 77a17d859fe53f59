//! Partitioning the host: what it has (detected, or set in `host.toml`), what running
//! VMs hold, and admission control: a VM starts only if its CPUs and memory fit under
//! the overcommit ratios (defaults: CPU 4.0, memory 1.0, as OpenStack's).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::error::ManagerError;
use crate::home::Home;
use crate::status::VmState;

pub const DEFAULT_CPU_OVERCOMMIT: f64 = 4.0;
pub const DEFAULT_MEMORY_OVERCOMMIT: f64 = 1.0;

/// `host.toml`; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostToml {
    cpus: Option<u32>,
    memory: Option<String>,
    cpu_overcommit: Option<f64>,
    memory_overcommit: Option<f64>,
    /// Where VMs' cgroups go, relative to the cgroup hierarchy (default "vessel").
    cgroup_parent: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Host {
    pub cpus: u32,
    pub memory: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub cgroup_parent: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Allocation {
    pub name: String,
    pub cpus: u32,
    pub memory: u64,
    /// Host CPUs guaranteed (`cpu_reservation`): never overcommitted.
    pub reservation: f64,
    /// Memory guaranteed (`memory_min`, none by default): never overcommitted. What
    /// lies above it may be taken back under memory pressure.
    #[serde(default)]
    pub memory_min: u64,
}

impl Allocation {
    /// What the VM `name` of `spec` holds while it runs.
    pub fn of(name: &str, spec: &crate::VmSpec) -> Allocation {
        Allocation {
            name: name.into(),
            cpus: u32::from(spec.cpus),
            memory: spec.memory_bytes(),
            reservation: spec.cpu.reservation.unwrap_or(0.0),
            memory_min: spec.memory_min_bytes(),
        }
    }
}

/// The host's online CPUs. Not `available_parallelism`: inside a VM's monitor that
/// counts what its cgroup cap and affinity leave it, and a VM capped at 1.5 CPUs would
/// find its own cap "more than the host has".
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

impl Host {
    pub fn load(home: &Home) -> Result<Self, ManagerError> {
        let path = home.host_config();
        let config: HostToml = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ManagerError::BadConfig {
                path: path.clone(),
                reason: e.message().to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HostToml::default(),
            Err(e) => return Err(ManagerError::io(&path)(e)),
        };
        let bad = |reason: String| ManagerError::BadConfig {
            path: path.clone(),
            reason,
        };
        let memory = match config.memory {
            Some(m) => vmm::parse_size(&m).map_err(|e| bad(e.to_string()))?,
            None => vmm::config::host_memory_bytes().unwrap_or(0),
        };
        let host = Host {
            cpus: config.cpus.unwrap_or_else(online_cpus),
            memory,
            cpu_overcommit: config.cpu_overcommit.unwrap_or(DEFAULT_CPU_OVERCOMMIT),
            memory_overcommit: config
                .memory_overcommit
                .unwrap_or(DEFAULT_MEMORY_OVERCOMMIT),
            cgroup_parent: PathBuf::from(
                config
                    .cgroup_parent
                    .as_deref()
                    .unwrap_or(cgroup::DEFAULT_PARENT),
            ),
        };
        let p = &host.cgroup_parent;
        if p.as_os_str().is_empty()
            || !p
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(format!(
                "cgroup_parent {:?} must be a relative path inside the cgroup hierarchy",
                p.display()
            )));
        }
        for (name, ratio) in [
            ("cpu_overcommit", host.cpu_overcommit),
            ("memory_overcommit", host.memory_overcommit),
        ] {
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err(bad(format!(
                    "{name} must be a positive number, got {ratio}"
                )));
            }
        }
        Ok(host)
    }

    pub fn cpu_capacity(&self) -> f64 {
        f64::from(self.cpus) * self.cpu_overcommit
    }

    pub fn memory_capacity(&self) -> f64 {
        self.memory as f64 * self.memory_overcommit
    }

    /// Refuses `want` when it does not fit beside `held`; the error says what is missing.
    pub fn admit(&self, held: &[Allocation], want: &Allocation) -> Result<(), String> {
        let cpus: u32 = held.iter().map(|a| a.cpus).sum();
        let memory: u64 = held.iter().map(|a| a.memory).sum();
        let mut missing = Vec::new();
        let cpu_free = self.cpu_capacity() - f64::from(cpus);
        if f64::from(want.cpus) > cpu_free + 1e-9 {
            missing.push(format!(
                "it needs {} vCPUs but only {} of {} are free (host {} CPUs, overcommit {})",
                want.cpus,
                cpu_free.max(0.0),
                self.cpu_capacity(),
                self.cpus,
                self.cpu_overcommit
            ));
        }
        let mem_free = self.memory_capacity() - memory as f64;
        if want.memory as f64 > mem_free + 0.5 {
            missing.push(format!(
                "it needs {} of memory but only {} of {} are free (host {}, overcommit {})",
                human(want.memory as f64),
                human(mem_free.max(0.0)),
                human(self.memory_capacity()),
                human(self.memory as f64),
                self.memory_overcommit
            ));
        }
        let guaranteed: u64 = held.iter().map(|a| a.memory_min).sum();
        if want.memory_min + guaranteed > self.memory {
            missing.push(format!(
                "it guarantees {} of memory but only {} of the host's {} are not guaranteed to other VMs",
                human(want.memory_min as f64),
                human(self.memory.saturating_sub(guaranteed) as f64),
                human(self.memory as f64)
            ));
        }
        let reserved: f64 = held.iter().map(|a| a.reservation).sum();
        let unreserved = f64::from(self.cpus) - reserved;
        if want.reservation > unreserved + 1e-9 {
            missing.push(format!(
                "it reserves {} CPUs but only {} of the host's {} are not reserved",
                want.reservation,
                (unreserved.max(0.0) * 100.0).round() / 100.0,
                self.cpus
            ));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }
}

/// What running and paused VMs hold.
pub fn allocations(home: &Home) -> Result<Vec<Allocation>, ManagerError> {
    let mut held = Vec::new();
    for (bundle, spec) in Bundle::list(home)? {
        let Ok(spec) = spec else { continue };
        if matches!(bundle.status().state, VmState::Running | VmState::Paused) {
            held.push(Allocation::of(&bundle.name, &spec));
        }
    }
    Ok(held)
}

/// 2 GiB, 512 MiB, 1.5 GiB.
pub fn human(bytes: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes >= GIB {
        format!("{} GiB", (bytes / GIB * 100.0).round() / 100.0)
    } else {
        format!("{} MiB", (bytes / MIB).round())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host() -> Host {
        Host {
            cpus: 4,
            memory: 8 * GIB,
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            cgroup_parent: "vessel".into(),
        }
    }

    fn vm(name: &str, cpus: u32, gib: u64) -> Allocation {
        Allocation {
            name: name.into(),
            cpus,
            memory: gib * GIB,
            reservation: 0.0,
            memory_min: 0,
        }
    }

    /// The classic example: 4 CPUs, 8 GB; 1/2, 2/2, 1/4 fit, a fourth of 2 GB does not.
    #[test]
    fn the_classic_partitioning_example() {
        let h = host();
        let mut held = Vec::new();
        for want in [vm("a", 1, 2), vm("b", 2, 2), vm("c", 1, 4)] {
            h.admit(&held, &want).unwrap();
            held.push(want);
        }
        let err = h.admit(&held, &vm("d", 1, 2)).unwrap_err();
        assert!(
            err.contains("needs 2 GiB of memory but only 0 MiB of 8 GiB are free"),
            "{err}"
        );
        assert!(
            err.contains("needs 1 vCPUs but only 0 of 4 are free"),
            "{err}"
        );
    }

    #[test]
    fn memory_guarantees_are_never_overcommitted() {
        let h = Host {
            memory_overcommit: 2.0,
            ..host()
        };
        let guaranteed = |name, gib, min_gib| Allocation {
            memory_min: min_gib * GIB,
            ..vm(name, 1, gib)
        };
        let held = vec![guaranteed("a", 8, 6)];
        h.admit(&held, &guaranteed("b", 4, 2)).unwrap();
        let err = h.admit(&held, &guaranteed("b", 4, 3)).unwrap_err();
        assert!(err.contains("guarantees 3"), "{err}");
    }

    #[test]
    fn overcommit_ratios_stretch_capacity() {
        let h = Host {
            memory_overcommit: 1.5,
            cpu_overcommit: 4.0,
            ..host()
        };
        let held = vec![vm("a", 4, 8)];
        h.admit(&held, &vm("b", 8, 4)).unwrap();
        assert!(
            h.admit(&held, &vm("b", 13, 1))
                .unwrap_err()
                .contains("vCPUs")
        );
    }

    #[test]
    fn host_toml_overrides_detection() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        std::fs::write(
            home.host_config(),
            "cpus = 4\nmemory = \"8G\"\ncpu_overcommit = 1.0\n",
        )
        .unwrap();
        let h = Host::load(&home).unwrap();
        assert_eq!(
            (h.cpus, h.memory, h.cpu_overcommit, h.memory_overcommit),
            (4, 8 * GIB, 1.0, 1.0)
        );
        std::fs::write(home.host_config(), "cpus = 4\nmemory_overcommit = -1.0\n").unwrap();
        assert!(
            Host::load(&home)
                .unwrap_err()
                .to_string()
                .contains("positive")
        );
        std::fs::write(home.host_config(), "gpus = 4\n").unwrap();
        assert!(Host::load(&home).is_err());
    }

    /// Reservations are guarantees: counted against the host's real CPUs, never
    /// overcommitted, whatever the vCPU overcommit ratio.
    #[test]
    fn reservations_never_exceed_the_host() {
        let h = Host {
            cpu_overcommit: 4.0,
            ..host()
        };
        let reserving = |name: &str, r: f64| Allocation {
            reservation: r,
            memory_min: 0,
            ..vm(name, 1, 1)
        };
        let held = vec![reserving("a", 2.5), reserving("b", 1.0)];
        h.admit(&held, &reserving("c", 0.5)).unwrap();
        let err = h.admit(&held, &reserving("c", 0.75)).unwrap_err();
        assert_eq!(
            err,
            "it reserves 0.75 CPUs but only 0.5 of the host's 4 are not reserved"
        );
    }
}
