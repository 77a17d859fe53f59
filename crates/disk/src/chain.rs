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

/// Refuses to write an image whose refcounts do not count its header cluster (a corrupt
/// image; qemu-img and vessel never write one). imago allocates whatever the refcounts
/// say is free, so a guest write would land on the header, where the backing file name
/// lies, and with no refcount block for the header's cluster at all imago's allocator
/// recurses until the stack overflows.
pub fn check_header_counted(path: &Path, file: &File, header: &Header) -> Result<(), DiskError> {
    let corrupt = |why: &str| {
        DiskError::bad_qcow2(
            path,
            format!("{why}: repair it with `qemu-img check -r all`"),
        )
    };
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, header.refcount_table_offset)
        .map_err(|_| corrupt("its refcount table is cut short"))?;
    // The low 9 bits are reserved (QEMU's REFT_OFFSET_MASK); offset 0 is no block.
    let block = u64::from_be_bytes(entry) & !0x1ff;
    if block == 0 {
        return Err(corrupt("no refcount block covers its header"));
    }
    // The header cluster's refcount is the block's first entry: the low bits of byte 0
    // for widths under 8 bits, else a big-endian integer.
    let bits = 1usize << header.refcount_order;
    let mut count = [0u8; 8];
    let count = &mut count[..bits.div_ceil(8)];
    file.read_exact_at(count, block)
        .map_err(|_| corrupt("its first refcount block is cut short"))?;
    if bits < 8 {
        count[0] &= (1u8 << bits) - 1;
    }
    if count.iter().all(|b| *b == 0) {
        return Err(corrupt("its refcounts say its header cluster is free"));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Image, OpenOptions, create};

    /// A writable open refuses an image whose refcounts leave its header cluster free
    /// (no refcount block for it, or a zero count); a read-only one still reads it.
    #[test]
    fn a_written_image_counts_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let opts = CreateOptions {
            format: Format::Qcow2,
            size: Some(1 << 20),
            backing: None,
            cluster_size: Some(4096),
        };
        create(&path, &opts).unwrap();
        let (h, _) = read_header(&path, &File::open(&path).unwrap()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let rt = h.refcount_table_offset as usize;
        let rb = u64::from_be_bytes(good[rt..rt + 8].try_into().unwrap()) as usize;
        let open = |readonly| {
            let format = Some(Format::Qcow2);
            Image::open(&path, OpenOptions { format, readonly })
        };
        assert!(open(false).is_ok());
        for (at, len) in [(rt, 8), (rb, 2)] {
            let mut bad = good.clone();
            bad[at..at + len].fill(0);
            std::fs::write(&path, &bad).unwrap();
            let e = open(false).err().unwrap().to_string();
            assert!(e.contains("qemu-img check -r all"), "{e}");
            assert!(open(true).is_ok());
        }
    }
}
