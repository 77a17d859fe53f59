//! What confines a vessel monitor: its jail (namespaces, a root holding only its VM's
//! paths, no capabilities), seccomp filters per thread class, the thread factory that
//! starts threads under them, and the launcher that starts helper programs outside
//! them.

pub mod jail;
pub mod launcher;
pub mod seccomp;
pub mod thread;

pub use seccomp::{Mode, ThreadClass};

/// vessel's own program, as found before any jail (which no longer shows it).
pub fn own_exe() -> std::io::Result<std::path::PathBuf> {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    if let Some(e) = EXE.get() {
        return Ok(e.clone());
    }
    let exe = std::env::current_exe()?;
    Ok(EXE.get_or_init(|| exe).clone())
}

/// Confines this process from here on as `mode` says: starts its launcher (allowed
/// what `policy` allows, through `exe __launcher`; it stays outside the jail), enters `jail` if
/// given, confines the calling thread (the main one) to the VMM class and starts the
/// thread factory. With `off`, no filter is installed (so helpers are started the
/// same way in every mode).
pub fn confine(
    mode: Mode,
    exe: &std::path::Path,
    policy: &launcher::Policy,
    jail: Option<&jail::Jail>,
) -> Result<(), String> {
    launcher::start(exe, policy).map_err(|e| format!("cannot start the launcher: {e}"))?;
    if let Some(jail) = jail {
        jail.enter().map_err(|e| e.to_string())?;
    }
    seccomp::configure(mode).map_err(|e| e.to_string())?;
    if mode == Mode::Off {
        return Ok(());
    }
    seccomp::enter(ThreadClass::Vmm).map_err(|e| e.to_string())?;
    thread::start_factory().map_err(|e| format!("cannot start the thread factory: {e}"))
}
