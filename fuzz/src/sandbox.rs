//! A private directory under /tmp for the socket harnesses' Unix sockets: one per
//! process, removed at exit; those of processes that are gone (killed, or aborted by a
//! crash) are swept when the next one starts.

use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

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
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
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
