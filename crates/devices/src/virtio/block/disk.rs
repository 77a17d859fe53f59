//! The host side of a virtio disk: a raw image file (or block device).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use thiserror::Error;

use super::config::{BlockConfig, ID_BYTES};
use super::request::SECTOR_SIZE;
use crate::virtio::guest_io::advance;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("disk {0}: not a regular file or block device")]
    NotAFile(String),
    #[error("disk {0}: in use by another process (it holds a lock on the image)")]
    Locked(String),
    #[error("disk {0}: smaller than one 512-byte sector")]
    TooSmall(String),
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

pub struct Disk {
    file: File,
    /// Whole sectors only: a trailing partial sector is not part of the disk.
    size: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens the image `config` names, locking it (shared when read-only) so two VMs
    /// do not write one image.
    pub fn open(config: &BlockConfig) -> Result<Self, DiskError> {
        let path = config.path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(&config.path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?;
        let ft = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?
            .file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DiskError::NotAFile(path));
        }
        let op = if config.readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked(path));
        }
        Self::from_file(file, config.readonly, config.id_bytes()).map_err(|e| match e {
            DiskError::Open { source, .. } => DiskError::Open { path, source },
            DiskError::TooSmall(_) => DiskError::TooSmall(path),
            e => e,
        })
    }

    /// A disk over an already open file (tests and benchmarks).
    pub fn from_file(file: File, readonly: bool, id: [u8; ID_BYTES]) -> Result<Self, DiskError> {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(DiskError::Open {
                path: String::new(),
                source: io::Error::last_os_error(),
            });
        }
        let size = (end as u64) / SECTOR_SIZE * SECTOR_SIZE;
        if size == 0 {
            return Err(DiskError::TooSmall(String::new()));
        }
        Ok(Disk {
            file,
            size,
            readonly,
            id,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads exactly the iovecs' total length at `offset`.
    pub fn read_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.transfer(Direction::Read, iov, offset)
    }

    /// Writes the iovecs' contents at `offset`.
    pub fn write_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.transfer(Direction::Write, iov, offset)
    }

    /// Moves the iovecs' whole length between guest buffers and the file at `offset`,
    /// resuming after short transfers and signals.
    fn transfer(
        &self,
        dir: Direction,
        mut iov: &mut [libc::iovec],
        mut offset: u64,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        while !iov.is_empty() {
            let count = iov.len().min(libc::UIO_MAXIOV as usize) as i32;
            let off = offset as libc::off_t;
            let (base, len) = (iov[0].iov_base, iov[0].iov_len);
            // One buffer (the usual 4 KiB request) takes plain pread/pwrite, a little cheaper.
            // SAFETY: every iovec points at a guest buffer checked to be guest RAM, which
            // stays mapped while the caller borrows guest memory.
            let n = unsafe {
                match (dir, count) {
                    (Direction::Read, 1) => libc::pread(fd, base, len, off),
                    (Direction::Read, _) => libc::preadv(fd, iov.as_ptr(), count, off),
                    (Direction::Write, 1) => libc::pwrite(fd, base, len, off),
                    (Direction::Write, _) => libc::pwritev(fd, iov.as_ptr(), count, off),
                }
            };
            match n {
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                0 => {
                    return Err(match dir {
                        Direction::Read => io::ErrorKind::UnexpectedEof,
                        Direction::Write => io::ErrorKind::WriteZero,
                    }
                    .into());
                }
                n => {
                    offset += n as u64;
                    iov = advance(iov, n as usize);
                }
            }
        }
        Ok(())
    }

    /// Data written so far reaches the disk.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a range; it reads back as zeroes and the file stays sparse.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes a range and keeps it allocated; falls back to writing zeroes where the
    /// filesystem cannot.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len)
            }
            r => r,
        }
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let zeroes = vec![0u8; 1 << 16];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        loop {
            // SAFETY: fallocate on a descriptor we own; no memory is involved.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
