//! The jail a monitor runs in (Firecracker's jailer is the model): a PID namespace of
//! its own, which it forks into ([`fork_into_pid_namespace`]); then, in the
//! monitor ([`Jail::enter`]), a mount namespace whose root is an empty tmpfs holding
//! only the paths its VM needs (bind-mounted at the same places, read-only unless the
//! VM writes them), the device nodes it uses and a /proc of its own PID namespace;
//! rlimits; an identity with no capabilities: an unprivileged uid/gid when started as
//! root, the starting user (mapped to root in a user namespace, every capability
//! dropped) otherwise; and Landlock where the kernel has it.

mod identity;
mod landlock;
mod mounts;

use std::io;
use std::path::{Path, PathBuf};

pub use identity::{fork_into_pid_namespace, host_pid, is_root};

/// The uid and gid a jail started by root runs as, unless host.toml says otherwise.
pub const DEFAULT_ID: u32 = 64_280;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail cannot be entered by a process with {0} threads")]
    Threaded(usize),
    #[error("jail: {what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the jail's user (uid {uid}) cannot {access} {path}: give it access (chown {uid} {path}) or set sandbox=off"
    )]
    Access {
        uid: u32,
        access: &'static str,
        path: String,
    },
}

pub(crate) fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Setup { what, source }
}

/// A host path the jail shows at the same place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// What a jail holds and who runs in it.
#[derive(Clone, Debug)]
pub struct Jail {
    /// An empty directory on the host the jail's tmpfs root is mounted on (in the
    /// jail's own mount namespace only: the host sees it empty).
    pub mount_point: PathBuf,
    pub binds: Vec<Bind>,
    /// Device nodes (/dev/kvm, /dev/net/tun...) bound into the jail's /dev.
    pub devices: Vec<PathBuf>,
    /// The uid and gid to run as when started as root.
    pub id: u32,
    /// The most descriptors the monitor may hold.
    pub open_files: u64,
}

impl Jail {
    pub fn new(mount_point: impl Into<PathBuf>, id: u32) -> Jail {
        Jail {
            mount_point: mount_point.into(),
            binds: Vec::new(),
            devices: ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            id,
            open_files: 4096,
        }
    }

    /// Shows `path` in the jail; a path given twice is writable if either says so, and
    /// a path under a directory already bound is covered by it (and the directory made
    /// writable if the path must be).
    pub fn bind(&mut self, path: impl AsRef<Path>, writable: bool) -> &mut Self {
        let path = path.as_ref().to_path_buf();
        if let Some(b) = self.binds.iter_mut().find(|b| path.starts_with(&b.path)) {
            b.writable |= writable;
            return self;
        }
        let writable = writable
            || self
                .binds
                .iter()
                .any(|b| b.path.starts_with(&path) && b.writable);
        self.binds.retain(|b| !b.path.starts_with(&path));
        self.binds.push(Bind { path, writable });
        self
    }

    pub fn device(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        let path = path.into();
        if !self.devices.contains(&path) {
            self.devices.push(path);
        }
        self
    }

    /// Enters the jail: the calling process (single-threaded, in the PID namespace its
    /// starter made, before it touches anything a guest controls) ends up in it for
    /// good. Then checks that every bound path is usable with the access it was bound
    /// for, so a missing permission is one clear line now rather than a failed boot.
    pub fn enter(&self) -> Result<(), JailError> {
        let threads = std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(1);
        if threads > 1 {
            return Err(JailError::Threaded(threads));
        }
        host_pid();
        let root = identity::is_root();
        mounts::build_root(self, root.then_some(self.id))?;
        identity::limit(self.open_files)?;
        identity::drop_to(root.then_some(self.id))?;
        match landlock::restrict(self)? {
            ::landlock::RulesetStatus::FullyEnforced => {}
            other => eprintln!("vessel: jail: Landlock {other:?} by this kernel"),
        }
        self.check_access(root)
    }

    fn check_access(&self, root: bool) -> Result<(), JailError> {
        let uid = if root { self.id } else { identity::outer_uid() };
        for b in &self.binds {
            let (mode, access) = if b.writable {
                (libc::R_OK | libc::W_OK, "write")
            } else {
                (libc::R_OK, "read")
            };
            if !mounts::accessible(&b.path, mode) {
                return Err(JailError::Access {
                    uid,
                    access,
                    path: b.path.display().to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_merge_under_directories_and_keep_the_widest_access() {
        let mut j = Jail::new("/x", DEFAULT_ID);
        j.bind("/vms/a/disk.img", true)
            .bind("/kit/vmlinuz", false)
            .bind("/vms/a", false)
            .bind("/vms/a/serial.log", false)
            .bind("/kit/vmlinuz", false);
        assert_eq!(
            j.binds,
            vec![
                Bind {
                    path: "/kit/vmlinuz".into(),
                    writable: false
                },
                Bind {
                    path: "/vms/a".into(),
                    writable: true
                },
            ]
        );
        j.device("/dev/kvm").device("/dev/kvm");
        assert_eq!(j.devices.iter().filter(|d| d.ends_with("kvm")).count(), 1);
    }
}
