//! Copying disk images without filling their holes: a reflink where the file system
//! offers one, else only the data extents (SEEK_DATA/SEEK_HOLE), so a copy of an 8 GiB
//! image with 400 MiB in it takes 400 MiB.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::DiskError;

/// Copies `from` to a new file `to` (which must not exist), keeping holes.
pub fn copy(from: &Path, to: &Path) -> Result<(), DiskError> {
    let src = File::open(from).map_err(DiskError::io(from))?;
    let dst = File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(DiskError::io(to))?;
    let result = copy_open(&src, &dst).and_then(|()| dst.sync_all());
    if let Err(e) = result {
        let _ = std::fs::remove_file(to);
        return Err(DiskError::io(to)(e));
    }
    Ok(())
}

fn copy_open(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    // SAFETY: FICLONE takes the source descriptor as its argument and only reads it;
    // both descriptors are open for the duration of the call.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    dst.set_len(len)?;
    let mut pos = 0i64;
    let len = len as i64;
    while pos < len {
        let data = seek(src, pos, libc::SEEK_DATA)?;
        let Some(data) = data else { break };
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len);
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

/// lseek with SEEK_DATA/SEEK_HOLE; None when there is no more data (ENXIO).
fn seek(f: &File, at: i64, whence: i32) -> io::Result<Option<i64>> {
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at, whence) };
    if r >= 0 {
        return Ok(Some(r));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

fn copy_range(src: &File, dst: &File, mut at: i64, mut left: i64) -> io::Result<()> {
    while left > 0 {
        let (mut off_in, mut off_out) = (at, at);
        // SAFETY: both descriptors are open; the offsets are locals the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left as usize,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the source ended early",
            ));
        }
        at += n as i64;
        left -= n as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn holes_stay_holes_and_data_is_identical() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.raw");
        let mut f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        for at in [0u64, 17 << 20, (64 << 20) - 4096] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[0x5a; 4096]).unwrap();
        }
        drop(f);
        let b = dir.path().join("b.raw");
        super::copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let allocated = std::fs::metadata(&b).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "{allocated} bytes allocated");
        assert!(super::copy(&a, &b).is_err(), "never overwrites");
    }
}
