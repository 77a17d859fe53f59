//! Where the host's CPU controller is: a cgroup v2 hierarchy that has `cpu` among its
//! controllers, else a cgroup v1 `cpu` hierarchy (with `cpuacct`, mounted beside it or
//! together with it, for usage).

use std::path::{Path, PathBuf};

use crate::error::CgroupError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    V1 {
        cpu: PathBuf,
        cpuacct: Option<PathBuf>,
    },
    V2 {
        root: PathBuf,
    },
}

impl Hierarchy {
    /// The running host's, from /proc/self/mountinfo.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(CgroupError::io("/proc/self/mountinfo"))?;
        Hierarchy::from_mountinfo(&text, |root| {
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
        })
    }

    /// From mountinfo text; `controllers` reads a cgroup2 mount's cgroup.controllers.
    pub fn from_mountinfo(
        text: &str,
        controllers: impl Fn(&Path) -> String,
    ) -> Result<Hierarchy, CgroupError> {
        let mut cpu = None;
        let mut cpuacct = None;
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut fields = left.split(' ');
            let (Some(root), Some(mount)) = (fields.nth(3), fields.next()) else {
                continue;
            };
            let mount = PathBuf::from(unescape(mount));
            // A mount of part of a hierarchy (a jail binds in its own cgroup): where the
            // hierarchy's root would be, so a process's cgroup path joins onto it.
            let depth = Path::new(&unescape(root))
                .components()
                .count()
                .saturating_sub(1);
            let at_root = |m: &Path| m.ancestors().nth(depth).unwrap_or(m).to_path_buf();
            let mut r = right.split(' ');
            let (Some(fstype), Some(_source), Some(options)) = (r.next(), r.next(), r.next())
            else {
                continue;
            };
            match fstype {
                "cgroup2" if controllers(&mount).split_whitespace().any(|c| c == "cpu") => {
                    return Ok(Hierarchy::V2 {
                        root: at_root(&mount),
                    });
                }
                "cgroup" => {
                    let has = |c: &str| options.split(',').any(|o| o == c);
                    if has("cpu") && cpu.is_none() {
                        cpu = Some(at_root(&mount));
                    }
                    if has("cpuacct") && cpuacct.is_none() {
                        cpuacct = Some(at_root(&mount));
                    }
                }
                _ => {}
            }
        }
        match cpu {
            Some(cpu) => Ok(Hierarchy::V1 { cpu, cpuacct }),
            None => Err(CgroupError::NoCpuController),
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These build hosts: v1 controllers each in its own hierarchy, a cgroup2 mount
    /// with only hugetlb.
    const SPLIT_V1: &str = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_with_cpu_and_cpuacct_apart() {
        let h = Hierarchy::from_mountinfo(SPLIT_V1, |_| "hugetlb\n".into()).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                cpuacct: Some("/sys/fs/cgroup/cpuacct".into()),
            }
        );
    }

    #[test]
    fn v1_comounted_whole_or_a_bound_part() {
        let dir = PathBuf::from("/sys/fs/cgroup/cpu,cpuacct");
        for text in [
            "31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
            // What a jail sees: its own cgroup bound in at the same place; the
            // hierarchy's root is where the whole would be.
            "40 39 0:27 /vessel/a.1 /sys/fs/cgroup/cpu,cpuacct/vessel/a.1 ro - cgroup cgroup rw,cpu,cpuacct\n",
        ] {
            let h = Hierarchy::from_mountinfo(text, |_| String::new()).unwrap();
            let want = Hierarchy::V1 {
                cpu: dir.clone(),
                cpuacct: Some(dir.clone()),
            };
            assert_eq!(h, want, "{text}");
        }
    }

    #[test]
    fn v2_when_it_has_cpu() {
        let text = "29 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = Hierarchy::from_mountinfo(text, |_| "cpuset cpu io memory pids\n".into());
        assert_eq!(
            h.unwrap(),
            Hierarchy::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        // A v2 mount without cpu and no v1: nothing to use.
        let h = Hierarchy::from_mountinfo(text, |_| "memory pids\n".into());
        assert!(matches!(h, Err(CgroupError::NoCpuController)));
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
    }
}
