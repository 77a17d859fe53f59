//! iovec lists: the guest buffers of one request, as the block device hands them over.
//! The caller guarantees every iovec points at memory that stays valid while the
//! image works on it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Reads exactly the iovecs' total length from `file` at `offset`.
pub fn read_all(file: &File, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
    transfer(file, Direction::Read, iov, offset)
}

/// Writes the iovecs' whole length to `file` at `offset`.
pub fn write_all(file: &File, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
    transfer(file, Direction::Write, iov, offset)
}

/// Moves the iovecs' whole length between the buffers and the file at `offset`,
/// resuming after short transfers and signals.
fn transfer(
    file: &File,
    dir: Direction,
    mut iov: &mut [libc::iovec],
    mut offset: u64,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    while !iov.is_empty() {
        let count = iov.len().min(libc::UIO_MAXIOV as usize) as i32;
        let off = offset as libc::off_t;
        let (base, len) = (iov[0].iov_base, iov[0].iov_len);
        // One buffer (the usual 4 KiB request) takes plain pread/pwrite, a little cheaper.
        // SAFETY: the caller guarantees every iovec points at memory that stays valid
        // for the duration of the call (guest RAM checked by the device).
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

/// The iovecs' total length.
pub fn total_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

/// Drops the first `n` bytes from an iovec list (after a short read or write).
pub fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iov.len() && n >= iov[first].iov_len {
        n -= iov[first].iov_len;
        first += 1;
    }
    let rest = &mut iov[first..];
    if let Some(v) = rest.first_mut() {
        // SAFETY: n < iov_len here, so the new base stays inside the same buffer.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
        v.iov_len -= n;
    }
    rest
}

/// Copies the start of the buffers into `out`; returns how many bytes it copied.
pub fn gather(iov: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut n = 0;
    for v in iov {
        let take = v.iov_len.min(out.len() - n);
        // SAFETY: the iovec is valid for iov_len bytes (the caller's guarantee); `out`
        // has room for `take` more bytes; the two never overlap (out is host memory).
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), out[n..].as_mut_ptr(), take)
        };
        n += take;
        if n == out.len() {
            break;
        }
    }
    n
}

/// The iovecs as slices, for the qcow2 driver.
///
/// # Safety
/// Every iovec must point at memory valid for its length for `'a`, not otherwise
/// referenced from Rust while the slices live.
pub unsafe fn slices_mut<'a>(iov: &[libc::iovec]) -> Vec<&'a mut [u8]> {
    iov.iter()
        // SAFETY: the caller's guarantee.
        .map(|v| unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    #[test]
    fn advance_and_gather_walk_the_buffers() {
        let (mut a, mut b) = ([1u8, 2, 3], [4u8, 5]);
        let mut v = [iov(&mut a), iov(&mut b)];
        let mut out = [0u8; 4];
        assert_eq!(gather(&v, &mut out), 4);
        assert_eq!(out, [1, 2, 3, 4]);
        let rest = advance(&mut v, 4);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 1);
        let mut out = [0u8; 8];
        assert_eq!(gather(rest, &mut out), 1);
        assert_eq!(out[0], 5);
    }
}
