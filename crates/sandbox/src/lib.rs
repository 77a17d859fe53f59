//! What confines a vessel monitor: seccomp filters per thread class, the thread
//! factory that starts threads under them, and the launcher that starts helper
//! programs outside them.

pub mod launcher;
pub mod seccomp;
pub mod thread;

pub use seccomp::{Mode, ThreadClass};

/// Confines this process from here on as `mode` says: starts its launcher (allowed
/// `programs`, through `exe __launcher`), confines the calling thread (the main one)
/// to the VMM class and starts the thread factory. With `off`, only the launcher
/// starts (so helpers are started the same way in every mode).
pub fn confine(
    mode: Mode,
    exe: &std::path::Path,
    programs: &[std::path::PathBuf],
) -> Result<(), String> {
    launcher::start(exe, programs).map_err(|e| format!("cannot start the launcher: {e}"))?;
    seccomp::configure(mode).map_err(|e| e.to_string())?;
    if mode == Mode::Off {
        return Ok(());
    }
    seccomp::enter(ThreadClass::Vmm).map_err(|e| e.to_string())?;
    thread::start_factory().map_err(|e| format!("cannot start the thread factory: {e}"))
}
