//! A private directory under /tmp for the socket harnesses' Unix sockets: one per
//! process, removed at exit; those of processes that are gone (killed, or aborted by a
//! crash) are swept when the next one starts. Likewise for files ([`files_dir`]: disk
//! images, snapshot folders), on /dev/shm when there is one.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

const PREFIX: &str = "vessel-fuzz-sock-";

static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The process's directory (short names: a socket path is at most 107 bytes).
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let root = Path::new("/tmp");
        sweep(root);
        let dir = root.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("fuzz socket directory");
        // SAFETY: registers a plain function that touches only the OnceLock, set by the
        // time it can run.
        unsafe { libc::atexit(remove_dir) };
        dir
    })
}

fn sweep(root: &Path) {
    sweep_prefix(root, PREFIX);
}

/// Removes the directories named `prefix<pid>` under `root` whose process is gone.
fn sweep_prefix(root: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A write to a socket whose peer is gone is an error, not the end of the process, as
/// in vessel (Rust's runtime ignores SIGPIPE before `main`, which a libFuzzer binary
/// does not run).
pub fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN for SIGPIPE, no handler code; done once, before any socket.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// The files directories made so far, removed at exit.
static FILE_DIRS: Mutex<Vec<(&str, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn remove_file_dirs() {
    if let Ok(dirs) = FILE_DIRS.lock() {
        for (_, dir) in dirs.iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The process's directory for files of one kind (`prefix` names it, e.g.
/// `vessel-fuzz-blk-`): `<prefix><pid>` on /dev/shm when there is one, else in the
/// temporary directory; made empty on first use, removed at exit.
pub fn files_dir(prefix: &'static str) -> PathBuf {
    let mut dirs = FILE_DIRS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, dir)) = dirs.iter().find(|(p, _)| *p == prefix) {
        return dir.clone();
    }
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    sweep_prefix(&root, prefix);
    let dir = root.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("fuzz files directory");
    if dirs.is_empty() {
        // SAFETY: registers a plain function that touches only the mutex-held list.
        unsafe { libc::atexit(remove_file_dirs) };
    }
    dirs.push((prefix, dir.clone()));
    dir
}

/// This process's threads named `name` now.
pub fn threads_named(name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .count()
}

/// Waits until at most `n` threads named `name` are left (the threads a device leaves
/// to end on their own once it is gone); false after a second.
pub fn wait_threads(name: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while threads_named(name) > n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    true
}
