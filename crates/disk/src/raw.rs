//! A raw image (or block device): guest sector N at byte N*512 of the file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::format::{Detected, PROBE_LEN, detect_bytes};
use crate::iov::{self, gather};

pub struct RawFile {
    file: File,
    /// The format was probed, not given: refuse writes that would make the first
    /// sector look like another format (the next probe would open that instead).
    guard_header: bool,
}

impl RawFile {
    pub fn new(file: File, guard_header: bool) -> Self {
        RawFile { file, guard_header }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn read_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        iov::read_all(&self.file, iov, offset)
    }

    pub fn write_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        if self.guard_header && offset < PROBE_LEN as u64 {
            let mut first = [0u8; PROBE_LEN];
            let skip = offset as usize;
            let n = gather(iov, &mut first[skip..]);
            let mut now = [0u8; PROBE_LEN];
            if skip > 0 {
                self.file.read_exact_at(&mut now[..skip], 0)?;
                first[..skip].copy_from_slice(&now[..skip]);
            }
            if detect_bytes(&first[..skip + n]) != Detected::Raw {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "a write that would make a probed raw disk look like another image format",
                ));
            }
        }
        iov::write_all(&self.file, iov, offset)
    }

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
