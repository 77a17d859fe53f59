//! The memory governor: under memory pressure it takes memory back from a VM down to
//! the VM's reservation — its balloon first, then (`--memory-compress=auto`) the
//! compression cache — and gives it back in the reverse order when the pressure has
//! gone. Each monitor runs one for its own VM and reads the same signals, so every VM
//! under pressure gives up memory in proportion to what it holds above its reservation
//! over its memory shares. Signals: the memory cgroup the monitor runs in (usage against
//! the nearest limit, cgroup v1 or v2) and the host's memory PSI.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Memory shares when a VM names none (as cpu_shares).
pub const DEFAULT_SHARES: u64 = 1024;
/// High pressure for this many ticks in a row engages compression even while the
/// balloon can still grow (the guest is not giving fast enough).
const STRAINED_TICKS: u32 = 5;

/// What a governor can act on: the VM's balloon and a compression cache it drives.
#[derive(Clone, Copy, Debug)]
pub struct Levers {
    pub balloon: bool,
    pub compression: bool,
}

/// One decision of a governor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A new balloon target, bytes.
    Balloon(u64),
    /// Engage (true) or disengage the compression cache.
    Compress(bool),
}

/// A VM's governor: the balloon target it keeps and whether it has the compression
/// cache engaged. Under pressure, the balloon first, then compression; when calm,
/// compression stops first, then the balloon deflates.
#[derive(Debug)]
pub struct Governor {
    levers: Levers,
    /// The most the balloon may hold.
    max_take: u64,
    step: u64,
    target: u64,
    compressing: bool,
    calm: u32,
    strained: u32,
}

impl Governor {
    /// For a VM of `memory` bytes guaranteed `memory_min`, weighted by `shares`: the
    /// balloon grows by an eighth of what lies above the guarantee at default shares,
    /// faster with fewer shares and slower with more, so VMs under the same pressure
    /// give in proportion to what they hold above their guarantee over their shares.
    pub fn new(memory: u64, memory_min: u64, shares: u64, levers: Levers) -> Governor {
        let max_take = memory.saturating_sub(memory_min.max(FLOOR));
        let step = (max_take / 8) as u128 * DEFAULT_SHARES as u128 / shares.max(1) as u128;
        Governor {
            levers,
            max_take,
            step: (step as u64).clamp(16 << 20, max_take.max(16 << 20)),
            target: 0,
            compressing: false,
            calm: 0,
            strained: 0,
        }
    }

    /// What to change after one look at `p`, if anything.
    pub fn tick(&mut self, p: &Pressure) -> Option<Decision> {
        let share = p.cgroup.unwrap_or(0.0);
        let psi = p.psi.unwrap_or(0.0);
        if share > HIGH || psi > HIGH_PSI {
            self.calm = 0;
            self.strained = self.strained.saturating_add(1);
            let can_inflate = self.levers.balloon && self.target < self.max_take;
            if self.levers.compression
                && !self.compressing
                && (!can_inflate || self.strained >= STRAINED_TICKS)
            {
                self.compressing = true;
                return Some(Decision::Compress(true));
            }
            if !can_inflate {
                return None;
            }
            let step = if share > VERY_HIGH {
                2 * self.step
            } else {
                self.step
            };
            self.target = (self.target + step).min(self.max_take);
            return Some(Decision::Balloon(self.target));
        }
        self.strained = 0;
        if share >= LOW || psi >= LOW_PSI {
            self.calm = 0;
            return None;
        }
        self.calm += 1;
        if self.calm < CALM_TICKS {
            return None;
        }
        self.calm = 0;
        if self.compressing {
            self.compressing = false;
            return Some(Decision::Compress(false));
        }
        if self.target == 0 {
            return None;
        }
        self.target = self.target.saturating_sub(self.step);
        Some(Decision::Balloon(self.target))
    }
}

/// Runs `name`'s governor for as long as `alive` says, on the VM `handle` gives (the
/// current boot's, if any).
pub fn run(
    name: &str,
    mut governor: Governor,
    handle: impl Fn() -> Option<vmm::VmHandle>,
    alive: impl Fn() -> bool,
) {
    while alive() {
        std::thread::sleep(TICK);
        let p = Pressure::read();
        let Some(h) = handle() else { continue };
        let Some(decision) = governor.tick(&p) else {
            continue;
        };
        match decision {
            Decision::Balloon(target) => {
                let Some(b) = h.balloon() else { continue };
                tracing::info!(
                    "{name}: memory {} ({}): balloon {} -> {} MiB",
                    if target > b.target_bytes() {
                        "pressure"
                    } else {
                        "calm"
                    },
                    p.describe(),
                    b.target_bytes() >> 20,
                    target >> 20
                );
                b.set_target(target);
            }
            Decision::Compress(on) => {
                let Some(c) = h.metrics().compression() else {
                    continue;
                };
                tracing::info!(
                    "{name}: memory {} ({}): compression {}",
                    if on { "pressure" } else { "calm" },
                    p.describe(),
                    if on { "engaged" } else { "disengaged" }
                );
                c.engaged.store(on, std::sync::atomic::Ordering::Relaxed);
            }
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
    const BALLOON: Levers = Levers {
        balloon: true,
        compression: false,
    };
    const BOTH: Levers = Levers {
        balloon: true,
        compression: true,
    };

    fn at(share: f64) -> Pressure {
        Pressure {
            cgroup: Some(share),
            limit: Some(1 << 30),
            psi: None,
        }
    }

    fn balloon(d: Option<Decision>) -> Option<u64> {
        match d {
            Some(Decision::Balloon(t)) => Some(t / MIB),
            _ => None,
        }
    }

    #[test]
    fn pressure_takes_memory_down_to_the_reservation_and_calm_gives_it_back() {
        let mut g = Governor::new(512 * MIB, 128 * MIB, DEFAULT_SHARES, BALLOON);
        assert_eq!(g.tick(&at(0.5)), None);
        assert_eq!(balloon(g.tick(&at(0.92))), Some(48));
        assert_eq!(balloon(g.tick(&at(0.97))), Some(144));
        for _ in 0..10 {
            g.tick(&at(0.99));
        }
        assert_eq!(g.target, 384 * MIB, "never below the reservation");
        assert_eq!(g.tick(&at(0.85)), None, "between the marks: nothing");
        for _ in 0..9 {
            assert_eq!(g.tick(&at(0.5)), None);
        }
        assert_eq!(balloon(g.tick(&at(0.5))), Some(336));
        let psi = Pressure {
            psi: Some(25.0),
            ..Default::default()
        };
        assert_eq!(balloon(g.tick(&psi)), Some(384));
    }

    #[test]
    fn the_balloon_goes_first_then_compression_and_calm_undoes_them_in_reverse() {
        let mut g = Governor::new(512 * MIB, 128 * MIB, DEFAULT_SHARES, BOTH);
        // Four steps of 96 MiB fill the balloon (384 MiB above the guarantee)...
        for want in [96, 192, 288, 384] {
            assert_eq!(balloon(g.tick(&at(0.97))), Some(want));
        }
        // ...then compression.
        assert_eq!(g.tick(&at(0.97)), Some(Decision::Compress(true)));
        assert_eq!(g.tick(&at(0.97)), None, "nothing left to take");
        for _ in 0..9 {
            g.tick(&at(0.5));
        }
        assert_eq!(g.tick(&at(0.5)), Some(Decision::Compress(false)));
        for _ in 0..9 {
            g.tick(&at(0.5));
        }
        assert_eq!(balloon(g.tick(&at(0.5))), Some(336));
    }

    #[test]
    fn a_balloon_that_does_not_relieve_the_pressure_soon_brings_compression_in() {
        let mut g = Governor::new(4096 * MIB, 0, DEFAULT_SHARES, BOTH);
        for _ in 0..4 {
            assert!(balloon(g.tick(&at(0.92))).is_some());
        }
        assert_eq!(g.tick(&at(0.92)), Some(Decision::Compress(true)));
        assert!(
            balloon(g.tick(&at(0.92))).is_some(),
            "and the balloon goes on"
        );
        // Without a balloon, compression is the first lever.
        let only = Levers {
            balloon: false,
            compression: true,
        };
        let mut g = Governor::new(512 * MIB, 0, DEFAULT_SHARES, only);
        assert_eq!(g.tick(&at(0.92)), Some(Decision::Compress(true)));
    }

    #[test]
    fn fewer_shares_give_memory_faster() {
        let step = |shares| {
            let mut g = Governor::new(1024 * MIB, 0, shares, BALLOON);
            balloon(g.tick(&at(0.92))).unwrap()
        };
        assert_eq!(step(DEFAULT_SHARES), 120);
        assert_eq!(step(2 * DEFAULT_SHARES), 60);
        assert_eq!(step(DEFAULT_SHARES / 4), 480);
        assert_eq!(step(1 << 18), 16, "at least 16 MiB a step");
    }
}
