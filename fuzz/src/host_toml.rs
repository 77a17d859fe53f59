//! `$VESSEL_HOME/host.toml`, as every `vessel start` reads it for admission: the TOML,
//! the sizes, the overcommit ratios and the cgroup parent. The input is written to
//! `host.toml` in this process's sandbox directory (removed at exit) and loaded from
//! there, as `Host::load` only reads a home.
//!
//! Checked on what loads: both ratios are positive and finite, the cgroup parent is a
//! non-empty relative path of plain components, an empty host takes nothing, and
//! admission is monotonic (what fits still fits with half the CPUs, memory and
//! guarantees, and with fewer VMs beside it).

use std::path::Component;

use manager::Home;
use manager::host::{Allocation, Host};

use crate::sandbox;

const GIB: u64 = 1 << 30;

fn half(a: &Allocation) -> Allocation {
    Allocation {
        name: a.name.clone(),
        cpus: a.cpus / 2,
        memory: a.memory / 2,
        reservation: a.reservation / 2.0,
        memory_min: a.memory_min / 2,
    }
}

pub fn host_toml(data: &[u8]) {
    let home = Home::at(sandbox::dir().join("home"));
    std::fs::create_dir_all(home.root()).expect("the sandbox home");
    std::fs::write(home.host_config(), data).expect("writing host.toml");
    let Ok(host) = Host::load(&home) else {
        return;
    };
    for ratio in [host.cpu_overcommit, host.memory_overcommit] {
        assert!(ratio.is_finite() && ratio > 0.0, "ratio {ratio}");
    }
    let parent = &host.cgroup_parent;
    assert!(!parent.as_os_str().is_empty());
    assert!(
        parent
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    );
    let vm = |name: &str, cpus, memory, reservation, memory_min| Allocation {
        name: name.into(),
        cpus,
        memory,
        reservation,
        memory_min,
    };
    let empty = vm("empty", 0, 0, 0.0, 0);
    host.admit(&[], &empty)
        .expect("a VM holding nothing always fits");
    let held = [vm("a", 2, 2 * GIB, 0.5, GIB), vm("b", 1, GIB / 2, 0.0, 0)];
    for want in [
        vm("c", 1, GIB / 2, 0.0, 0),
        vm("d", 4, 8 * GIB, 1.5, 4 * GIB),
        vm("e", 64, 512 * GIB, 16.0, 0),
    ] {
        for n in 0..=held.len() {
            if host.admit(&held[..n], &want).is_ok() {
                host.admit(&held[..n], &half(&want))
                    .expect("half of what fits fits");
                if n > 0 {
                    host.admit(&held[..n - 1], &want)
                        .expect("what fits beside more VMs fits beside fewer");
                }
            }
        }
    }
}

/// host.toml as the README describes it: nothing, sizes, ratios, a cgroup parent.
pub fn host_toml_seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("empty", ""),
        ("sizes", "cpus = 4\nmemory = \"8G\"\n"),
        (
            "overcommit",
            "cpus = 16\nmemory = \"64G\"\ncpu_overcommit = 8.0\nmemory_overcommit = 1.5\n",
        ),
        (
            "cgroup",
            "cgroup_parent = \"machine.slice/vessel\"\nmemory = \"512M\"\n",
        ),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.as_bytes().to_vec()))
    .collect()
}
