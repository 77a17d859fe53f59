//! The files of an image chain: opening and locking each layer, reading a qcow2
//! header, and finding a backing file from the name its overlay records.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::DiskError;
use crate::format::{Detected, Format, detect};
use crate::qcow2::header::{Header, V3_LEN};

/// How deep a backing chain may go.
pub const MAX_DEPTH: usize = 64;

/// Opens one layer's file and locks it: exclusively when written (two VMs never write
/// one image), shared when only read (a base may back many overlays, but nobody may
/// write it meanwhile).
pub fn open_locked(path: &Path, writable: bool) -> Result<File, DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(DiskError::io(path))?;
    let ft = file.metadata().map_err(DiskError::io(path))?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(DiskError::NotAFile(path.to_path_buf()));
    }
    let op = if writable {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        return Err(DiskError::Locked(path.to_path_buf()));
    }
    Ok(file)
}

/// The file's length (a block device's size).
pub fn file_len(path: &Path, file: &File) -> Result<u64, DiskError> {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(DiskError::io(path)(std::io::Error::last_os_error()));
    }
    Ok(end as u64)
}

/// Reads and checks a qcow2 header; also returns the first cluster's bytes.
pub fn read_header(path: &Path, file: &File) -> Result<(Header, Vec<u8>), DiskError> {
    let len = file_len(path, file)?;
    let mut first = vec![0u8; V3_LEN.min(len as usize)];
    file.read_exact_at(&mut first, 0)
        .map_err(DiskError::io(path))?;
    let cluster = Header::needs_bytes(&first).map_err(|why| DiskError::bad_qcow2(path, why))?;
    first.resize(cluster.min(len as usize), 0);
    file.read_exact_at(&mut first, 0)
        .map_err(DiskError::io(path))?;
    let header = Header::parse(&first, len).map_err(|why| DiskError::bad_qcow2(path, why))?;
    Ok((header, first))
}

/// Where a backing file name points: absolute as written, or relative to the
/// directory of the image that names it (as qemu-img writes and reads them).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image
        .parent()
        .map_or_else(|| name.to_path_buf(), |dir| dir.join(name))
}

/// A backing layer's format: what the overlay's header says, or (when it says
/// nothing, as old images do) what the backing file's content says. Backing files are
/// never written, so a probe cannot be turned by the guest using the overlay.
pub fn backing_format(
    overlay: &Path,
    name: &str,
    said: Option<&str>,
    file: &File,
) -> Result<Format, DiskError> {
    let backing_error = |why: String| DiskError::Backing {
        path: overlay.to_path_buf(),
        backing: name.to_string(),
        why,
    };
    match said {
        Some(s) => Format::parse(s)
            .ok_or_else(|| backing_error(format!("format {s:?} (vessel reads raw and qcow2)"))),
        None => match detect(file).map_err(|e| backing_error(e.to_string()))? {
            Detected::Raw => Ok(Format::Raw),
            Detected::Qcow2 => Ok(Format::Qcow2),
            Detected::Foreign(f) => Err(backing_error(format!("a {} image", f.name()))),
        },
    }
}

/// Guards against backing chains that loop or run too deep.
#[derive(Default)]
pub struct Seen(Vec<PathBuf>);

impl Seen {
    pub fn enter(&mut self, path: &Path) -> Result<(), DiskError> {
        let real = std::fs::canonicalize(path).map_err(DiskError::io(path))?;
        if self.0.contains(&real) {
            return Err(DiskError::unsupported(
                path,
                "the backing chain loops back to this file",
            ));
        }
        if self.0.len() >= MAX_DEPTH {
            return Err(DiskError::unsupported(
                path,
                format!("the backing chain is deeper than {MAX_DEPTH} images"),
            ));
        }
        self.0.push(real);
        Ok(())
    }
}
