//! External snapshots and moving images: the image becomes a read-only base and a new
//! qcow2 overlay takes its name (so whatever refers to the image now writes the
//! overlay); copies keep their backing files reachable.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::DiskError;
use crate::chain::{backing_format, open_locked, read_header, resolve_backing};
use crate::create::{Backing, CreateOptions, create};
use crate::format::{Detected, Format, detect};

/// Freezes `path` into a base file beside it (`NAME.TAG.EXT`, the tag given or the
/// next free `snap-N`) and puts a new overlay at `path`. Returns the base's path.
pub fn snapshot(path: &Path, tag: Option<&str>) -> Result<PathBuf, DiskError> {
    if let Some(t) = tag
        && (t.is_empty()
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(DiskError::Usage(format!(
            "snapshot name {t:?}: use letters, digits, '-', '_' or '.'"
        )));
    }
    let file = open_locked(path, true)?;
    let format = match detect(&file).map_err(DiskError::io(path))? {
        Detected::Raw => Format::Raw,
        Detected::Qcow2 => Format::Qcow2,
        Detected::Foreign(format) => {
            return Err(DiskError::Foreign {
                path: path.to_path_buf(),
                format,
            });
        }
    };
    let cluster_size = match format {
        Format::Qcow2 => Some(read_header(path, &file)?.0.cluster_size().max(4096)),
        Format::Raw => None,
    };
    let base = base_path(path, tag)?;
    std::fs::rename(path, &base).map_err(DiskError::io(path))?;
    // Keep others out while the overlay is made, but let this process read the base.
    // SAFETY: flock on a descriptor we own; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) };
    let made = create(
        path,
        &CreateOptions {
            format: Format::Qcow2,
            size: None,
            backing: Some(Backing {
                path: base.clone(),
                format: Some(format),
            }),
            cluster_size,
        },
    );
    if let Err(e) = made {
        let _ = std::fs::rename(&base, path);
        return Err(e);
    }
    let mut perms = file.metadata().map_err(DiskError::io(&base))?.permissions();
    perms.set_mode(perms.mode() & 0o444);
    std::fs::set_permissions(&base, perms).map_err(DiskError::io(&base))?;
    Ok(base)
}

fn base_path(path: &Path, tag: Option<&str>) -> Result<PathBuf, DiskError> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let named = |t: &str| path.with_file_name(format!("{stem}.{t}{ext}"));
    match tag {
        Some(t) => {
            let p = named(t);
            if p.exists() {
                return Err(DiskError::Usage(format!("{} exists", p.display())));
            }
            Ok(p)
        }
        None => Ok((1..)
            .map(|n| named(&format!("snap-{n}")))
            .find(|p| !p.exists())
            .expect("a free name")),
    }
}

/// Records a new backing file name (and format) in a qcow2 image's header, or none:
/// what `qemu-img rebase -u` does.
pub fn set_backing_name(path: &Path, backing: Option<(&str, Format)>) -> Result<(), DiskError> {
    let file = open_locked(path, true)?;
    let (header, first) = read_header(path, &file)?;
    let bytes = header
        .with_backing(&first, backing.map(|(n, f)| (n, f.name())))
        .map_err(|why| DiskError::unsupported(path, why))?;
    file.write_all_at(&bytes, 0).map_err(DiskError::io(path))?;
    file.sync_all().map_err(DiskError::io(path))
}

/// Copies an image file (holes kept); a qcow2 copy in another directory whose
/// backing name is relative gets the backing file's absolute path, so the copy still
/// finds it.
pub fn copy_image(from: &Path, to: &Path) -> Result<(), DiskError> {
    crate::sparse_copy(from, to)?;
    let fixed = (|| {
        let file = std::fs::File::open(to).map_err(DiskError::io(to))?;
        if detect(&file).map_err(DiskError::io(to))? != Detected::Qcow2 {
            return Ok(());
        }
        let (h, _) = read_header(to, &file)?;
        let Some(name) = h.backing_file.as_deref() else {
            return Ok(());
        };
        if Path::new(name).is_absolute() || from.parent() == to.parent() {
            return Ok(());
        }
        let below = resolve_backing(from, name);
        let below_file = std::fs::File::open(&below).map_err(DiskError::io(&below))?;
        let format = backing_format(from, name, h.backing_format.as_deref(), &below_file)?;
        let real = std::fs::canonicalize(&below).map_err(DiskError::io(&below))?;
        drop(file);
        set_backing_name(to, Some((&real.to_string_lossy(), format)))
    })();
    if fixed.is_err() {
        let _ = std::fs::remove_file(to);
    }
    fixed
}
