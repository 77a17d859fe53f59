//! The memory governor: under memory pressure it takes memory back from a VM (its
//! balloon) down to the VM's reservation, and gives it back when the pressure has gone.
//! Each monitor runs one for its own VM and reads the same signals, so every VM under
//! pressure gives up memory in proportion to what it holds above its reservation (the
//! step is an eighth of that). Signals: the memory cgroup the monitor runs in (usage
//! against the nearest limit, cgroup v1 or v2) and the host's memory PSI.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::balloon::BalloonState;

/// Above this share of the cgroup's limit (or this PSI), memory is taken back.
const HIGH: f64 = 0.90;
const VERY_HIGH: f64 = 0.95;
const HIGH_PSI: f64 = 10.0;
/// Below this share (and PSI), for `CALM_TICKS` in a row, memory goes back.
const LOW: f64 = 0.75;
const LOW_PSI: f64 = 1.0;
const CALM_TICKS: u32 = 10;
const TICK: Duration = Duration::from_secs(1);
/// The balloon never leaves the guest less than this.
const FLOOR: u64 = 64 << 20;

/// What the host says about memory now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    /// Usage over the nearest memory cgroup limit (None: no limit).
    pub cgroup: Option<f64>,
    pub limit: Option<u64>,
    /// `some avg10` of /proc/pressure/memory (None: no PSI).
    pub psi: Option<f64>,
}

impl Pressure {
    pub fn read() -> Pressure {
        let (cgroup, limit) = cgroup_usage()
            .map(|(usage, limit)| (Some(usage as f64 / limit as f64), Some(limit)))
            .unwrap_or((None, None));
        Pressure {
            cgroup,
            limit,
            psi: psi_some_avg10(),
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let (Some(f), Some(l)) = (self.cgroup, self.limit) {
            parts.push(format!("cgroup at {:.0}% of {} MiB", f * 100.0, l >> 20));
        }
        if let Some(p) = self.psi {
            parts.push(format!("psi {p:.1}%"));
        }
        parts.join(", ")
    }
}

/// The balloon target a VM's governor keeps.
#[derive(Debug)]
pub struct Governor {
    /// The most the balloon may hold.
    max_take: u64,
    step: u64,
    target: u64,
    calm: u32,
}

impl Governor {
    /// For a VM of `memory` bytes guaranteed `memory_min`.
    pub fn new(memory: u64, memory_min: u64) -> Governor {
        let max_take = memory.saturating_sub(memory_min.max(FLOOR));
        Governor {
            max_take,
            step: (max_take / 8).max(16 << 20),
            target: 0,
            calm: 0,
        }
    }

    /// The new target after one look at `p`, when it changes.
    pub fn tick(&mut self, p: &Pressure) -> Option<u64> {
        let share = p.cgroup.unwrap_or(0.0);
        let psi = p.psi.unwrap_or(0.0);
        let next = if share > HIGH || psi > HIGH_PSI {
            self.calm = 0;
            let step = if share > VERY_HIGH {
                2 * self.step
            } else {
                self.step
            };
            (self.target + step).min(self.max_take)
        } else if share < LOW && psi < LOW_PSI {
            self.calm += 1;
            if self.calm < CALM_TICKS {
                return None;
            }
            self.calm = 0;
            self.target.saturating_sub(self.step)
        } else {
            self.calm = 0;
            return None;
        };
        (next != self.target).then(|| {
            self.target = next;
            next
        })
    }
}

/// Runs `name`'s governor for as long as `alive` says, on the balloon `balloon` gives
/// (the current boot's, if any).
pub fn run(
    name: &str,
    memory: u64,
    memory_min: u64,
    balloon: impl Fn() -> Option<Arc<BalloonState>>,
    alive: impl Fn() -> bool,
) {
    let mut g = Governor::new(memory, memory_min);
    while alive() {
        std::thread::sleep(TICK);
        let p = Pressure::read();
        let Some(b) = balloon() else { continue };
        let before = b.target_bytes();
        if let Some(target) = g.tick(&p) {
            tracing::info!(
                "{name}: memory pressure ({}): balloon {} -> {} MiB",
                p.describe(),
                before >> 20,
                target >> 20
            );
            b.set_target(target);
        }
    }
}

fn psi_some_avg10() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// (usage, limit) of the nearest limited memory cgroup of this process.
fn cgroup_usage() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v1: "N:memory:/path"; v2: "0::/path".
    if let Some(path) = text
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
    {
        let root = Path::new("/sys/fs/cgroup/memory");
        return nearest_limit(
            root,
            &path,
            "memory.usage_in_bytes",
            "memory.limit_in_bytes",
        );
    }
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    nearest_limit(
        Path::new("/sys/fs/cgroup"),
        path,
        "memory.current",
        "memory.max",
    )
}

fn nearest_limit(root: &Path, path: &str, usage: &str, limit: &str) -> Option<(u64, u64)> {
    let read = |d: &PathBuf, f: &str| -> Option<u64> {
        std::fs::read_to_string(d.join(f)).ok()?.trim().parse().ok()
    };
    let mut dir = root.join(path.trim_start_matches('/'));
    let mut best: Option<(u64, u64)> = None;
    loop {
        if let (Some(u), Some(l)) = (read(&dir, usage), read(&dir, limit))
            && l < (1 << 60)
            && best.is_none_or(|(bu, bl)| u as f64 / l as f64 > bu as f64 / bl as f64)
        {
            best = Some((u, l));
        }
        if dir == root || !dir.pop() {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn at(share: f64) -> Pressure {
        Pressure {
            cgroup: Some(share),
            limit: Some(1 << 30),
            psi: None,
        }
    }

    #[test]
    fn pressure_takes_memory_down_to_the_reservation_and_calm_gives_it_back() {
        let mut g = Governor::new(512 * MIB, 128 * MIB);
        assert_eq!(g.tick(&at(0.5)), None);
        assert_eq!(g.tick(&at(0.92)), Some(48 * MIB));
        assert_eq!(g.tick(&at(0.97)), Some(144 * MIB));
        for _ in 0..10 {
            g.tick(&at(0.99));
        }
        assert_eq!(g.target, 384 * MIB, "never below the reservation");
        assert_eq!(g.tick(&at(0.85)), None, "between the marks: nothing");
        for _ in 0..9 {
            assert_eq!(g.tick(&at(0.5)), None);
        }
        assert_eq!(g.tick(&at(0.5)), Some(336 * MIB));
        let psi = Pressure {
            psi: Some(25.0),
            ..Default::default()
        };
        assert_eq!(g.tick(&psi), Some(384 * MIB));
    }
}
