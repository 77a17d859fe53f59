//! An open disk image, whatever its format: what the virtio-blk device reads and
//! writes.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::DiskError;
use crate::chain::{check_header_counted, file_len, open_locked, read_header};
use crate::format::{Detected, Format, detect};
use crate::qcow2::Qcow2Image;
use crate::raw::RawFile;

pub const SECTOR_SIZE: u64 = 512;

#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// None: told by the content (a raw disk probed so refuses header-like writes).
    pub format: Option<Format>,
    pub readonly: bool,
}

enum Backend {
    Raw(RawFile),
    Qcow2(Qcow2Image),
}

pub struct Image {
    path: PathBuf,
    format: Format,
    /// Whole sectors only: a trailing partial sector is not part of the disk.
    size: u64,
    readonly: bool,
    backend: Backend,
}

impl Image {
    /// Opens the image at `path` and its backing chain, locking each file.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Image, DiskError> {
        let file = open_locked(path, !opts.readonly)?;
        let detected = detect(&file).map_err(DiskError::io(path))?;
        let format = match (detected, opts.format) {
            (Detected::Foreign(format), None) => {
                return Err(DiskError::Foreign {
                    path: path.to_path_buf(),
                    format,
                });
            }
            (Detected::Qcow2, Some(Format::Qcow2)) | (Detected::Qcow2, None) => Format::Qcow2,
            (Detected::Raw, Some(Format::Qcow2)) | (Detected::Foreign(_), Some(Format::Qcow2)) => {
                return Err(DiskError::FormatMismatch {
                    path: path.to_path_buf(),
                    said: "not qcow2",
                    given: "qcow2",
                });
            }
            (_, Some(Format::Raw)) | (Detected::Raw, None) => Format::Raw,
        };
        let backend = match format {
            Format::Raw => Backend::Raw(RawFile::new(file, opts.format.is_none())),
            Format::Qcow2 => {
                if !opts.readonly {
                    let (header, _) = read_header(path, &file)?;
                    check_header_counted(path, &file, &header)?;
                }
                Backend::Qcow2(Qcow2Image::open(path, file, !opts.readonly)?)
            }
        };
        Self::with_backend(path, format, opts.readonly, backend)
    }

    /// A raw image over an already open file (tests and benchmarks).
    pub fn raw(file: File, readonly: bool) -> Result<Image, DiskError> {
        Self::with_backend(
            Path::new(""),
            Format::Raw,
            readonly,
            Backend::Raw(RawFile::new(file, false)),
        )
    }

    fn with_backend(
        path: &Path,
        format: Format,
        readonly: bool,
        backend: Backend,
    ) -> Result<Image, DiskError> {
        let bytes = match &backend {
            Backend::Raw(r) => file_len(path, r.file())?,
            Backend::Qcow2(q) => q.size(),
        };
        let size = bytes / SECTOR_SIZE * SECTOR_SIZE;
        if size == 0 {
            return Err(DiskError::TooSmall(path.to_path_buf()));
        }
        Ok(Image {
            path: path.to_path_buf(),
            format,
            size,
            readonly,
            backend,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The virtual size in bytes (whole sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Reads exactly the iovecs' total length at `offset`. The iovecs must point at
    /// memory valid for their lengths for the whole call.
    pub fn read_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(r) => r.read_at(iov, offset),
            Backend::Qcow2(q) => q.read_at(iov, offset),
        }
    }

    /// Writes the iovecs' contents at `offset` (the same guarantee as `read_at`).
    pub fn write_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(r) => r.write_at(iov, offset),
            Backend::Qcow2(q) => q.write_at(iov, offset),
        }
    }

    /// Reads into one host buffer.
    pub fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        self.read_at(&mut iov, offset)
    }

    /// Writes one host buffer.
    pub fn write_from(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // The buffer is only read: the iovec's mutability is the C type's, not a use.
        let mut iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }];
        self.write_at(&mut iov, offset)
    }

    /// Everything written so far, data and metadata, reaches stable storage.
    pub fn flush(&self) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(r) => r.flush(),
            Backend::Qcow2(q) => q.flush(),
        }
    }

    /// Lets another process take the image over (a migration on shared storage):
    /// everything is flushed and the top file's lock released. `false` takes the lock
    /// back (refused when the other process holds it).
    pub fn hand_over(&self, give: bool) -> io::Result<()> {
        let file = match &self.backend {
            Backend::Raw(r) => r.file(),
            Backend::Qcow2(q) => q.file(),
        };
        let op = match (give, self.readonly) {
            (true, _) => {
                self.flush()?;
                libc::LOCK_UN
            }
            (false, false) => libc::LOCK_EX | libc::LOCK_NB,
            (false, true) => libc::LOCK_SH | libc::LOCK_NB,
        };
        // SAFETY: flock on a descriptor the image owns; no memory is involved.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(file), op) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives a range's space back to the host (a hint: it may do nothing). The range
    /// reads back as zeroes where space was given back.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(r) => r.punch_hole(offset, len),
            Backend::Qcow2(q) => q.discard(offset, len),
        }
    }

    /// Makes a range read as zeroes; `may_unmap` lets it give the space back.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(r) if may_unmap => r
                .punch_hole(offset, len)
                .or_else(|_| r.write_zeroes(offset, len)),
            Backend::Raw(r) => r.write_zeroes(offset, len),
            Backend::Qcow2(q) => q.write_zeroes(offset, len, may_unmap),
        }
    }
}
