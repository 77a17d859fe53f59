//! One VM's cgroup: `<hierarchy>/<parent>/<name>` (in v1, the same path in the `cpu`
//! hierarchy and in `cpuacct`'s for usage). The monitor process and all its threads
//! go in; the manager writes the policy, live or at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::error::CgroupError;
use crate::mounts::Hierarchy;
use crate::policy::{CpuPolicy, DEFAULT_SHARES, PERIOD_US, quota_us, shares_to_weight};

#[derive(Clone, Debug)]
pub struct VmCgroup {
    version: u8,
    /// Where cpu.* is.
    cpu: PathBuf,
    /// Where usage is read (v1: cpuacct's directory when it is mounted apart).
    acct: Option<PathBuf>,
}

/// What the VM's cgroup has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CpuUsage {
    /// CPU time used by all of the monitor's threads.
    pub used: Duration,
    /// Time the cap held the VM back.
    pub throttled: Duration,
    /// CFS periods with the VM runnable, and those in which it was throttled.
    pub periods: u64,
    pub throttled_periods: u64,
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(CgroupError::io(path))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(CgroupError::io(path))
}

/// `key value` lines (cpu.stat).
fn stat(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

impl VmCgroup {
    fn at(h: &Hierarchy, rel: &Path) -> VmCgroup {
        match h {
            Hierarchy::V1 { cpu, cpuacct } => VmCgroup {
                version: 1,
                cpu: cpu.join(rel),
                acct: cpuacct.as_ref().map(|a| a.join(rel)),
            },
            Hierarchy::V2 { root } => VmCgroup {
                version: 2,
                cpu: root.join(rel),
                acct: None,
            },
        }
    }

    /// Makes (or finds) `<parent>/<name>`; on v2, the cpu controller is enabled down
    /// to it.
    pub fn create(h: &Hierarchy, parent: &Path, name: &str) -> Result<VmCgroup, CgroupError> {
        let rel = parent.join(name);
        let g = VmCgroup::at(h, &rel);
        if let Hierarchy::V2 { root } = h {
            // Each level hands the controller to its children.
            let mut dir = root.clone();
            for part in parent.components() {
                enable_cpu(&dir)?;
                dir.push(part);
                mkdir(&dir)?;
            }
            enable_cpu(&dir)?;
        }
        mkdir_all(&g.cpu)?;
        if let Some(a) = &g.acct
            && *a != g.cpu
        {
            mkdir_all(a)?;
        }
        Ok(g)
    }

    /// The existing cgroup of a running VM.
    pub fn open(h: &Hierarchy, parent: &Path, name: &str) -> Option<VmCgroup> {
        let g = VmCgroup::at(h, &parent.join(name));
        g.cpu.is_dir().then_some(g)
    }

    /// The hierarchy's root cgroup (where a process goes to leave its own).
    pub fn root(h: &Hierarchy) -> VmCgroup {
        VmCgroup::at(h, Path::new(""))
    }

    /// The cgroup process `pid` is in now (from /proc/PID/cgroup).
    pub fn of_process(h: &Hierarchy, pid: u32) -> Option<VmCgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        of_process_text(h, &text)
    }

    pub fn path(&self) -> &Path {
        &self.cpu
    }

    pub fn version(&self) -> u8 {
        self.version
    }

    /// Moves process `pid`, all its threads, into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        write(&self.cpu.join("cgroup.procs"), &pid.to_string())?;
        if let Some(a) = &self.acct
            && *a != self.cpu
        {
            write(&a.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Writes shares and the cap; what the policy leaves unset goes back to the
    /// default (no cap, the default weight).
    pub fn apply(&self, p: &CpuPolicy) -> Result<(), CgroupError> {
        let shares = p.shares.unwrap_or(DEFAULT_SHARES);
        if self.version == 1 {
            write(&self.cpu.join("cpu.shares"), &shares.to_string())?;
            write(&self.cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            let quota = p.limit.map_or(-1, |l| quota_us(l) as i64);
            write(&self.cpu.join("cpu.cfs_quota_us"), &quota.to_string())
        } else {
            write(
                &self.cpu.join("cpu.weight"),
                &shares_to_weight(shares).to_string(),
            )?;
            let quota = p
                .limit
                .map_or_else(|| "max".to_string(), |l| quota_us(l).to_string());
            write(&self.cpu.join("cpu.max"), &format!("{quota} {PERIOD_US}"))
        }
    }

    pub fn usage(&self) -> Result<CpuUsage, CgroupError> {
        let cpu_stat = read(&self.cpu.join("cpu.stat"))?;
        let periods = stat(&cpu_stat, "nr_periods");
        let throttled_periods = stat(&cpu_stat, "nr_throttled");
        if self.version == 2 {
            return Ok(CpuUsage {
                used: Duration::from_micros(stat(&cpu_stat, "usage_usec")),
                throttled: Duration::from_micros(stat(&cpu_stat, "throttled_usec")),
                periods,
                throttled_periods,
            });
        }
        let used = match &self.acct {
            Some(a) => {
                let p = a.join("cpuacct.usage");
                let text = read(&p)?;
                text.trim().parse().map_err(|_| CgroupError::Io {
                    path: p,
                    source: std::io::Error::other(format!("not a number: {text:?}")),
                })?
            }
            None => 0,
        };
        Ok(CpuUsage {
            used: Duration::from_nanos(used),
            throttled: Duration::from_nanos(stat(&cpu_stat, "throttled_time")),
            periods,
            throttled_periods,
        })
    }

    /// Removes the cgroup once no process is left in it (an error while one is).
    pub fn remove(&self) -> Result<(), CgroupError> {
        if let Some(a) = &self.acct
            && *a != self.cpu
        {
            rmdir(a)?;
        }
        rmdir(&self.cpu)
    }
}

fn of_process_text(h: &Hierarchy, text: &str) -> Option<VmCgroup> {
    // `ID:CONTROLLERS:PATH`; v2's line is `0::PATH`.
    let path_of = |want: Option<&str>| {
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let hit = match want {
                Some(c) => controllers.split(',').any(|x| x == c),
                None => controllers.is_empty(),
            };
            hit.then(|| PathBuf::from(path.trim_start_matches('/')))
        })
    };
    match h {
        Hierarchy::V1 { cpu, cpuacct } => Some(VmCgroup {
            version: 1,
            cpu: cpu.join(path_of(Some("cpu"))?),
            acct: cpuacct
                .as_ref()
                .and_then(|a| Some(a.join(path_of(Some("cpuacct"))?))),
        }),
        Hierarchy::V2 { root } => Some(VmCgroup {
            version: 2,
            cpu: root.join(path_of(None)?),
            acct: None,
        }),
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(CgroupError::io(dir)(e)),
        _ => Ok(()),
    }
}

fn mkdir_all(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir).map_err(CgroupError::io(dir))
}

fn rmdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CgroupError::io(dir)(e)),
        _ => Ok(()),
    }
}

fn enable_cpu(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let now = std::fs::read_to_string(&path).unwrap_or_default();
    if now.split_whitespace().any(|c| c == "cpu") {
        return Ok(());
    }
    write(&path, "+cpu")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files a v1 `cpu` + `cpuacct` pair and a v2 hierarchy get, on plain
    /// directories standing in for the cgroup file systems.
    #[test]
    fn policies_become_the_controllers_files() {
        let t = tempfile::tempdir().unwrap();
        let h = Hierarchy::V1 {
            cpu: t.path().join("cpu"),
            cpuacct: Some(t.path().join("cpuacct")),
        };
        std::fs::create_dir_all(t.path().join("cpu/vessel")).unwrap();
        std::fs::create_dir_all(t.path().join("cpuacct/vessel")).unwrap();
        let g = VmCgroup::create(&h, Path::new("vessel"), "web").unwrap();
        let p = CpuPolicy {
            shares: Some(700),
            limit: Some(0.5),
            ..CpuPolicy::default()
        };
        g.apply(&p).unwrap();
        let f = |n: &str| std::fs::read_to_string(t.path().join("cpu/vessel/web").join(n)).unwrap();
        assert_eq!(
            (f("cpu.shares"), f("cpu.cfs_quota_us")),
            ("700".into(), "50000".into())
        );
        g.apply(&CpuPolicy::default()).unwrap();
        assert_eq!(
            (f("cpu.shares"), f("cpu.cfs_quota_us")),
            ("1024".into(), "-1".into())
        );
        std::fs::write(
            t.path().join("cpu/vessel/web/cpu.stat"),
            "nr_periods 10\nnr_throttled 4\nthrottled_time 2000000\n",
        )
        .unwrap();
        std::fs::write(
            t.path().join("cpuacct/vessel/web/cpuacct.usage"),
            "1500000000\n",
        )
        .unwrap();
        let u = g.usage().unwrap();
        assert_eq!(u.used, Duration::from_millis(1500));
        assert_eq!(u.throttled, Duration::from_millis(2));
        assert_eq!((u.periods, u.throttled_periods), (10, 4));

        let v2 = Hierarchy::V2 {
            root: t.path().join("unified"),
        };
        std::fs::create_dir_all(t.path().join("unified")).unwrap();
        let g = VmCgroup::create(&v2, Path::new("vessel"), "db").unwrap();
        g.apply(&p).unwrap();
        let f = |n: &str| std::fs::read_to_string(t.path().join("unified").join(n)).unwrap();
        assert_eq!(f("cgroup.subtree_control"), "+cpu");
        assert_eq!(f("vessel/cgroup.subtree_control"), "+cpu");
        assert_eq!(f("vessel/db/cpu.weight"), "68");
        assert_eq!(f("vessel/db/cpu.max"), "50000 100000");
    }

    #[test]
    fn a_process_is_found_in_its_cgroups() {
        let text = "4:memory:/x\n2:cpuacct:/vessel/a\n1:cpu:/vessel/a\n0::/\n";
        let h = Hierarchy::V1 {
            cpu: "/cg/cpu".into(),
            cpuacct: Some("/cg/cpuacct".into()),
        };
        let g = of_process_text(&h, text).unwrap();
        assert_eq!(g.cpu, Path::new("/cg/cpu/vessel/a"));
        assert_eq!(g.acct.unwrap(), Path::new("/cg/cpuacct/vessel/a"));
        let v2 = Hierarchy::V2 { root: "/cg".into() };
        assert_eq!(
            of_process_text(&v2, "0::/vessel/b\n").unwrap().cpu,
            Path::new("/cg/vessel/b")
        );
    }
}
