//! File locks (flock): the admission lock every start takes, and the lock a monitor
//! holds for as long as any of its processes lives, so "stopped" can mean "gone".

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::ManagerError;

/// Holds `path` locked (flock) until dropped. The descriptor is close-on-exec, so
/// the programs a monitor starts (passt, virtiofsd) do not hold it; a forked child
/// does, until it ends.
pub(crate) struct FileLock {
    _held: File,
}

impl FileLock {
    /// Waits until `path` is ours.
    pub(crate) fn acquire(path: &Path) -> Result<Self, ManagerError> {
        let file = open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ManagerError::io(path)(std::io::Error::last_os_error()));
        }
        Ok(FileLock { _held: file })
    }
}

fn open(path: &Path) -> Result<File, ManagerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(ManagerError::io(dir))?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(ManagerError::io(path))
}

/// Whether nobody holds `path` (a missing file is held by nobody).
fn free(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().write(true).open(path) else {
        return true;
    };
    // SAFETY: flock on a descriptor we own; released when `file` closes.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Waits up to `timeout` until nobody holds `path`; whether that happened.
pub fn wait_free(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if free(path) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
