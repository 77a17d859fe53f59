//! qcow2 images served through imago (a qcow2 driver by a QEMU block-layer
//! maintainer): vessel opens every layer of the chain itself (its own header checks,
//! locks and backing-file resolution) and hands imago the open files, so nothing is
//! ever opened on a name the image alone chose without these checks.
//!
//! Requests inside one cluster whose data this image holds (the common 4 KiB request)
//! skip imago: the cluster's host offset, learnt from imago's mapping API once, is
//! kept in a small cache and the data moved with pread/pwrite on it, as imago itself
//! would (a writable mapping may be written in place). Discards and zeroing change
//! mappings, so they empty the cache.

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

/// Slots of the cluster mapping cache (direct-mapped by guest cluster number).
const MAPPING_SLOTS: usize = 4096;

/// Guest cluster -> host offset of clusters this image holds and may write in place.
struct Mappings(Vec<(u64, u64)>);

impl Mappings {
    fn new() -> Self {
        // Cluster numbers are stored plus one: 0 marks an empty slot.
        Mappings(vec![(0, 0); MAPPING_SLOTS])
    }

    fn get(&self, cluster: u64) -> Option<u64> {
        let (tag, host) = self.0[cluster as usize % MAPPING_SLOTS];
        (tag == cluster + 1).then_some(host)
    }

    fn put(&mut self, cluster: u64, host: u64) {
        self.0[cluster as usize % MAPPING_SLOTS] = (cluster + 1, host);
    }

    fn clear(&mut self) {
        self.0.fill((0, 0));
    }
}

struct State {
    access: Access,
    mappings: Mappings,
}

pub struct Qcow2Image {
    state: Mutex<State>,
    /// The top layer's file: fast-path I/O, and punching holes where the guest
    /// discarded clusters.
    file: File,
    cluster_bits: u32,
    size: u64,
}

impl Qcow2Image {
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Opens `file` (already locked) and its whole backing chain.
    pub fn open(path: &Path, file: File, writable: bool) -> Result<Self, DiskError> {
        let (header, _) = read_header(path, &file)?;
        let punch = file.try_clone().map_err(DiskError::io(path))?;
        let mut seen = Seen::default();
        seen.enter(path)?;
        let access = open_layer(path, file, writable, &mut seen)?;
        Ok(Qcow2Image {
            state: Mutex::new(State {
                access,
                mappings: Mappings::new(),
            }),
            file: punch,
            cluster_bits: header.cluster_bits,
            size: header.size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The guest cluster a request lies in, when it lies in one.
    fn one_cluster(&self, iov: &[libc::iovec], offset: u64) -> Option<u64> {
        let last = offset + iov::total_len(iov).max(1) - 1;
        let cluster = offset >> self.cluster_bits;
        (last >> self.cluster_bits == cluster).then_some(cluster)
    }

    /// Remembers where `cluster` lives when this image holds it writable.
    fn learn(&self, s: &mut State, cluster: u64) {
        let cs = self.cluster_size();
        if let Ok((
            ShallowMapping::Raw {
                offset,
                writable: true,
                ..
            },
            n,
        )) = s
            .access
            .get_shallow_mapping(cluster << self.cluster_bits, cs)
            && n == cs
        {
            s.mappings.put(cluster, offset);
        }
    }

    pub fn read_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        let mut s = self.state();
        let cluster = self.one_cluster(iov, offset);
        if let Some(host) = cluster.and_then(|c| s.mappings.get(c)) {
            let within = offset & (self.cluster_size() - 1);
            return iov::read_all(&self.file, iov, host + within);
        }
        // SAFETY: the caller's guarantee on the iovecs (see `crate::iov`); the slices
        // live only for this call.
        let slices = unsafe { iov::slices_mut(iov) };
        let mut v = IoVectorMut::with_capacity(slices.len());
        // imago refuses (panics on) empty buffers; they move nothing anyway.
        for sl in slices.into_iter().filter(|sl| !sl.is_empty()) {
            v.push(sl);
        }
        s.access.readv(v, offset)?;
        if let Some(c) = cluster {
            self.learn(&mut s, c);
        }
        Ok(())
    }

    pub fn write_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        let mut s = self.state();
        let cluster = self.one_cluster(iov, offset);
        if let Some(host) = cluster.and_then(|c| s.mappings.get(c)) {
            let within = offset & (self.cluster_size() - 1);
            return iov::write_all(&self.file, iov, host + within);
        }
        // SAFETY: as in `read_at`.
        let slices = unsafe { iov::slices_mut(iov) };
        let mut v = IoVector::with_capacity(slices.len());
        for sl in slices.into_iter().filter(|sl| !sl.is_empty()) {
            v.push(&*sl);
        }
        s.access.writev(v, offset)?;
        if let Some(c) = cluster {
            self.learn(&mut s, c);
        }
        Ok(())
    }

    /// Writes back the metadata caches, then makes everything durable.
    pub fn flush(&self) -> io::Result<()> {
        let s = self.state();
        s.access.flush()?;
        s.access.sync()
    }

    /// Frees the whole clusters in the range and gives their space back to the host
    /// file system; reads of them return zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let cs = self.cluster_size();
        let start = offset.next_multiple_of(cs);
        let end = (offset + len) / cs * cs;
        if start >= end {
            return Ok(());
        }
        let mut s = self.state();
        s.mappings.clear();
        let holes = data_extents(&s.access, start, end)?;
        match s.access.discard_to_zero(start, end - start) {
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
        let mut s = self.state();
        s.mappings.clear();
        s.access.write_zeroes(offset, len)
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
