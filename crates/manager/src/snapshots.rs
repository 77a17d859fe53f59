//! A VM's snapshots, as folders in its bundle, forming a tree:
//!
//! ```text
//! vms/NAME/snapshots/SNAP/   state + memory (taken while running), vm.toml, the disks
//!                            as they were (disk0.raw...), meta.json (parent, date, text)
//! vms/NAME/snapshots/HEAD    the snapshot the VM's present state descends from
//! vms/NAME/suspended/        state + memory of a suspended VM (`vessel start` resumes it)
//! ```
//!
//! Each snapshot holds whole copies of the disks (reflinks where the file system has
//! them, sparse copies otherwise), so deleting one never breaks another.

use std::path::{Path, PathBuf};

use devices::virtio::block::BlockConfig;
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::error::ManagerError;
use crate::spec::VmSpec;

pub const SNAPSHOTS: &str = "snapshots";
pub const SUSPENDED: &str = "suspended";
const HEAD: &str = "HEAD";
const META: &str = "meta.json";
const VM_TOML: &str = "vm.toml";

/// What the tree records about one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub name: String,
    /// The snapshot this one was taken after (None: the root).
    pub parent: Option<String>,
    #[serde(default)]
    pub description: String,
    pub created_unix: u64,
    /// Taken while the VM ran: it holds memory and device state, and restoring it
    /// continues the VM where it was.
    pub live: bool,
    /// The disk copies as written (file, length, modification time): a copy changed
    /// since no longer matches the memory and is refused.
    #[serde(default)]
    pub disks: Vec<DiskCopy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    pub file: String,
    pub len: u64,
    pub mtime_ns: i128,
}

impl DiskCopy {
    fn of(dir: &Path, file: &str) -> Result<Self, ManagerError> {
        use std::os::unix::fs::MetadataExt;
        let path = dir.join(file);
        let m = std::fs::metadata(&path).map_err(ManagerError::io(&path))?;
        Ok(DiskCopy {
            file: file.to_string(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Checks that a snapshot folder's disk copies are as its meta recorded them.
pub fn check_disks(dir: &Path) -> Result<(), ManagerError> {
    let meta = read_meta(dir)?;
    for d in &meta.disks {
        let now = DiskCopy::of(dir, &d.file)?;
        if now != *d {
            return Err(ManagerError::Other(format!(
                "{}: changed since the snapshot was taken",
                dir.join(&d.file).display()
            )));
        }
    }
    Ok(())
}

pub fn check_name(name: &str) -> Result<(), ManagerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != HEAD
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then_some(()).ok_or_else(|| {
        ManagerError::Other(format!(
            "invalid snapshot name {name:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    })
}

impl Bundle {
    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOTS)
    }

    pub fn suspended_dir(&self) -> PathBuf {
        self.dir.join(SUSPENDED)
    }

    /// The snapshot the VM's present state descends from.
    pub fn head(&self) -> Option<String> {
        std::fs::read_to_string(self.snapshots_dir().join(HEAD))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    pub fn set_head(&self, name: Option<&str>) -> Result<(), ManagerError> {
        let dir = self.snapshots_dir();
        std::fs::create_dir_all(&dir).map_err(ManagerError::io(&dir))?;
        let path = dir.join(HEAD);
        std::fs::write(&path, name.unwrap_or_default()).map_err(ManagerError::io(&path))
    }

    /// A new snapshot's folder, refused if the name is taken.
    pub fn new_snapshot_dir(&self, name: &str) -> Result<PathBuf, ManagerError> {
        check_name(name)?;
        let dir = self.snapshots_dir().join(name);
        if dir.exists() {
            return Err(ManagerError::Other(format!(
                "VM {} has a snapshot named {name} already",
                self.name
            )));
        }
        Ok(dir)
    }

    /// A name for a snapshot the user did not name: `snap1`, `snap2`...
    pub fn next_snapshot_name(&self) -> String {
        (1..)
            .map(|n| format!("snap{n}"))
            .find(|n| !self.snapshots_dir().join(n).exists())
            .unwrap_or_default()
    }
}

/// The disks of `spec` (paths resolved against the bundle).
fn disks(bundle: &Bundle, spec: &VmSpec) -> Result<Vec<BlockConfig>, ManagerError> {
    spec.disks
        .iter()
        .map(|d| {
            let mut c = BlockConfig::parse(d)
                .map_err(|e| ManagerError::Other(format!("disk {d:?}: {e}")))?;
            if c.path.is_relative() {
                c.path = bundle.dir.join(&c.path);
            }
            Ok(c)
        })
        .collect()
}

fn copy_name(i: usize, from: &Path) -> String {
    match from.extension() {
        Some(ext) => format!("disk{i}.{}", ext.to_string_lossy()),
        None => format!("disk{i}"),
    }
}

/// Fills a snapshot folder being written (`into`): the disks copied as they are now,
/// a vm.toml that names the copies (with the serials the guest saw), and the meta.
/// For a live snapshot this runs while the VM is paused.
pub fn fill(
    bundle: &Bundle,
    spec: &VmSpec,
    meta: &SnapshotMeta,
    into: &Path,
) -> Result<(), ManagerError> {
    let mut copy = spec.clone();
    let mut meta = meta.clone();
    copy.disks.clear();
    for (i, mut d) in disks(bundle, spec)?.into_iter().enumerate() {
        let name = copy_name(i, &d.path);
        disk::copy_image(&d.path, &into.join(&name))
            .map_err(|e| ManagerError::Other(e.to_string()))?;
        meta.disks.push(DiskCopy::of(into, &name)?);
        d.id = Some(d.serial());
        d.path = name.into();
        copy.disks.push(d.to_spec());
    }
    write(into.join(VM_TOML), copy.to_toml().as_bytes())?;
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| ManagerError::Other(e.to_string()))?;
    write(into.join(META), &text)
}

fn write(path: PathBuf, bytes: &[u8]) -> Result<(), ManagerError> {
    std::fs::write(&path, bytes).map_err(ManagerError::io(&path))
}

/// A snapshot of a stopped VM: its disks and config (no memory; restoring it boots).
pub fn take_stopped(bundle: &Bundle, meta: &SnapshotMeta) -> Result<(), ManagerError> {
    let dest = bundle.new_snapshot_dir(&meta.name)?;
    let spec = bundle.spec()?;
    let tmp = bundle
        .snapshots_dir()
        .join(format!(".{}.tmp-{}", meta.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp)
        .map_err(ManagerError::io(&tmp))
        .and_then(|()| fill(bundle, &spec, meta, &tmp))
        .and_then(|()| std::fs::rename(&tmp, &dest).map_err(ManagerError::io(&dest)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    bundle.set_head(Some(&meta.name))
}

/// Every snapshot, oldest first.
pub fn list(bundle: &Bundle) -> Result<Vec<SnapshotMeta>, ManagerError> {
    let dir = bundle.snapshots_dir();
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = e.path().join(META);
        if let Ok(bytes) = std::fs::read(&path) {
            let meta: SnapshotMeta =
                serde_json::from_slice(&bytes).map_err(|err| ManagerError::BadConfig {
                    path: path.clone(),
                    reason: err.to_string(),
                })?;
            out.push(meta);
        }
    }
    out.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
    Ok(out)
}

/// Bytes a snapshot takes on the host.
pub fn size(bundle: &Bundle, name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(bundle.snapshots_dir().join(name))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn find(bundle: &Bundle, name: &str) -> Result<PathBuf, ManagerError> {
    check_name(name)?;
    let dir = bundle.snapshots_dir().join(name);
    if dir.join(META).is_file() {
        Ok(dir)
    } else {
        Err(ManagerError::Other(format!(
            "VM {} has no snapshot named {name} (see vessel snapshot ls {})",
            bundle.name, bundle.name
        )))
    }
}

/// Puts a stopped VM back where snapshot `name` was: its disks replaced by the
/// snapshot's copies and, for a live snapshot, its memory and devices waiting in
/// `suspended/` for the next start. Running on from there and snapshotting again
/// makes a branch.
pub fn restore(bundle: &Bundle, name: &str) -> Result<SnapshotMeta, ManagerError> {
    let dir = find(bundle, name)?;
    let meta: SnapshotMeta = read_meta(&dir)?;
    check_disks(&dir)?;
    let spec = bundle.spec()?;
    let saved = VmSpec::from_toml(
        &dir.join(VM_TOML),
        &std::fs::read_to_string(dir.join(VM_TOML)).map_err(ManagerError::io(dir.join(VM_TOML)))?,
    )?;
    let live = disks(bundle, &spec)?;
    let copies = saved.disks.len();
    if copies != live.len() {
        return Err(ManagerError::Other(format!(
            "snapshot {name} has {copies} disks, VM {} has {} now",
            bundle.name,
            live.len()
        )));
    }
    // Everything is checked and copied aside first; then swapped in.
    let suspended = bundle.suspended_dir();
    let staging = bundle.dir.join(format!(".restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(ManagerError::io(&staging))?;
    let result = (|| {
        for (i, d) in live.iter().enumerate() {
            let from = dir.join(copy_name(i, &d.path));
            disk::copy_image(&from, &staging.join(format!("disk{i}")))
                .map_err(|e| ManagerError::Other(e.to_string()))?;
        }
        if meta.live {
            let state = staging.join(SUSPENDED);
            std::fs::create_dir(&state).map_err(ManagerError::io(&state))?;
            for f in [vmm::snapshot::file::STATE, vmm::snapshot::file::MEMORY] {
                disk::copy_image(&dir.join(f), &state.join(f))
                    .map_err(|e| ManagerError::Other(e.to_string()))?;
            }
            vmm::snapshot::read_state(&state).map_err(|e| ManagerError::Other(e.to_string()))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    for (i, d) in live.iter().enumerate() {
        std::fs::rename(staging.join(format!("disk{i}")), &d.path)
            .map_err(ManagerError::io(&d.path))?;
    }
    let _ = std::fs::remove_dir_all(&suspended);
    if meta.live {
        std::fs::rename(staging.join(SUSPENDED), &suspended)
            .map_err(ManagerError::io(&suspended))?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    bundle.set_head(Some(name))?;
    Ok(meta)
}

fn read_meta(dir: &Path) -> Result<SnapshotMeta, ManagerError> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).map_err(ManagerError::io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| ManagerError::BadConfig {
        path,
        reason: e.to_string(),
    })
}

/// Deletes snapshot `name`; its children hang from its parent from now on.
/// Notes that VM `clone`'s disks are overlays on the snapshot in `dir`.
pub fn add_linked_clone(dir: &Path, clone: &str) -> Result<(), ManagerError> {
    let list = dir.join(crate::clone::LINKED_CLONES);
    std::fs::create_dir_all(&list).map_err(ManagerError::io(&list))?;
    write(list.join(clone), b"")
}

/// The VMs (still there) whose disks are overlays on the snapshot in `dir`.
fn linked_clones(bundle: &Bundle, dir: &Path) -> Vec<String> {
    let list = dir.join(crate::clone::LINKED_CLONES);
    let Some(home) = bundle.dir.parent() else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(list)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| home.join(n).join("vm.toml").is_file())
        .collect();
    names.sort();
    names
}

pub fn remove(bundle: &Bundle, name: &str) -> Result<(), ManagerError> {
    let dir = find(bundle, name)?;
    let clones = linked_clones(bundle, &dir);
    if !clones.is_empty() {
        return Err(ManagerError::Other(format!(
            "snapshot {name} of {} holds the disks of its linked clones ({}): remove them first",
            bundle.name,
            clones.join(", ")
        )));
    }
    let meta = read_meta(&dir)?;
    for child in list(bundle)?
        .into_iter()
        .filter(|m| m.parent.as_deref() == Some(name))
    {
        let mut c = child.clone();
        c.parent = meta.parent.clone();
        let text = serde_json::to_vec_pretty(&c).map_err(|e| ManagerError::Other(e.to_string()))?;
        write(bundle.snapshots_dir().join(&c.name).join(META), &text)?;
    }
    if bundle.head().as_deref() == Some(name) {
        bundle.set_head(meta.parent.as_deref())?;
    }
    std::fs::remove_dir_all(&dir).map_err(ManagerError::io(&dir))
}
