//! qcow2 images served through imago (a qcow2 driver by a QEMU block-layer
//! maintainer): vessel opens every layer of the chain itself (its own header checks,
//! locks and backing-file resolution) and hands imago the open files, so nothing is
//! ever opened on a name the image alone chose without these checks.

pub mod header;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, ShallowMapping, StorageOpenOptions};

use crate::chain::{Seen, backing_format, open_locked, read_header, resolve_backing};
use crate::format::Format;
use crate::{DiskError, iov};

type Storage = imago::file::File;
type Access = FormatAccess<Storage>;

pub struct Qcow2Image {
    access: Mutex<Access>,
    /// The top layer's file, for punching holes where the guest discarded clusters.
    file: File,
    cluster_size: u64,
    size: u64,
}

impl Qcow2Image {
    /// Opens `file` (already locked) and its whole backing chain.
    pub fn open(path: &Path, file: File, writable: bool) -> Result<Self, DiskError> {
        let (header, _) = read_header(path, &file)?;
        let punch = file.try_clone().map_err(DiskError::io(path))?;
        let mut seen = Seen::default();
        seen.enter(path)?;
        let access = open_layer(path, file, writable, &mut seen)?;
        Ok(Qcow2Image {
            access: Mutex::new(access),
            file: punch,
            cluster_size: header.cluster_size(),
            size: header.size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn access(&self) -> MutexGuard<'_, Access> {
        self.access.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        // SAFETY: the caller's guarantee on the iovecs (see `crate::iov`); the slices
        // live only for this call.
        let slices = unsafe { iov::slices_mut(iov) };
        let mut v = IoVectorMut::with_capacity(slices.len());
        for s in slices {
            v.push(s);
        }
        self.access().readv(v, offset)
    }

    pub fn write_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        // SAFETY: as in `read_at`.
        let slices = unsafe { iov::slices_mut(iov) };
        let mut v = IoVector::with_capacity(slices.len());
        for s in slices {
            v.push(&*s);
        }
        self.access().writev(v, offset)
    }

    /// Writes back the metadata caches, then makes everything durable.
    pub fn flush(&self) -> io::Result<()> {
        let a = self.access();
        a.flush()?;
        a.sync()
    }

    /// Frees the whole clusters in the range and gives their space back to the host
    /// file system; reads of them return zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let start = offset.next_multiple_of(self.cluster_size);
        let end = (offset + len) / self.cluster_size * self.cluster_size;
        if start >= end {
            return Ok(());
        }
        let mut a = self.access();
        let holes = data_extents(&a, start, end)?;
        match a.discard_to_zero(start, end - start) {
            // Version 2 images cannot mark clusters zero: a discard is only a hint.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(()),
            r => r?,
        }
        // The clusters are free now and nothing else runs while the lock is held, so
        // none of them has been handed out again.
        for (at, n) in holes {
            punch_hole(&self.file, at, n)?;
        }
        Ok(())
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap {
            self.discard(offset, len)?;
        }
        self.access().write_zeroes(offset, len)
    }
}

/// The host ranges holding this layer's own data for guest bytes [start, end).
fn data_extents(a: &Access, mut at: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    while at < end {
        let (mapping, n) = a.get_shallow_mapping(at, end - at)?;
        if n == 0 {
            break;
        }
        if let ShallowMapping::Raw { offset, .. } = mapping {
            match out.last_mut() {
                Some((s, l)) if *s + *l == offset => *l += n,
                _ => out.push((offset, n)),
            }
        }
        at += n;
    }
    Ok(out)
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A file system without holes keeps the space; the clusters are still free.
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

/// Opens one qcow2 layer and, below it, its backing chain.
fn open_layer(
    path: &Path,
    file: File,
    writable: bool,
    seen: &mut Seen,
) -> Result<Access, DiskError> {
    let (header, _) = read_header(path, &file)?;
    if let Some(why) = header.unsupported() {
        return Err(DiskError::unsupported(path, why));
    }
    if writable && header.nb_snapshots > 0 {
        return Err(DiskError::unsupported(
            path,
            format!(
                "the image holds {} internal snapshots; vessel writes only images without them (qemu-img snapshot -l lists them)",
                header.nb_snapshots
            ),
        ));
    }
    let imago_error = |e: io::Error| DiskError::bad_qcow2(path, e.to_string());
    let opts = StorageOpenOptions::new().write(writable).filename(path);
    let storage = Storage::from_open_file(file, opts).map_err(imago_error)?;
    let mut q = Qcow2::<Storage>::open_image(storage, writable).map_err(imago_error)?;
    q.set_data_file(None);
    let backing = match &header.backing_file {
        None => None,
        Some(name) => Some(open_backing(
            path,
            name,
            header.backing_format.as_deref(),
            seen,
        )?),
    };
    q.set_backing(backing);
    Ok(FormatAccess::new(q))
}

fn open_backing(
    overlay: &Path,
    name: &str,
    said: Option<&str>,
    seen: &mut Seen,
) -> Result<Access, DiskError> {
    let path = resolve_backing(overlay, name);
    let wrap = |e: DiskError| DiskError::Backing {
        path: overlay.to_path_buf(),
        backing: name.to_string(),
        why: e.to_string(),
    };
    seen.enter(&path).map_err(wrap)?;
    let file = open_locked(&path, false).map_err(wrap)?;
    match backing_format(overlay, name, said, &file)? {
        Format::Qcow2 => open_layer(&path, file, false, seen),
        Format::Raw => {
            let opts = StorageOpenOptions::new().write(false).filename(&path);
            let storage =
                Storage::from_open_file(file, opts).map_err(|e| wrap(DiskError::io(&path)(e)))?;
            let raw = Raw::open_image(storage, false).map_err(|e| wrap(DiskError::io(&path)(e)))?;
            Ok(FormatAccess::new(raw))
        }
    }
}
