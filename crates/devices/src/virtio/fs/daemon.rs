//! virtiofsd, the virtio-fs project's file server, as a helper process of the VM: vessel
//! starts it for each share, talks vhost-user to it, and ends it with the VM. Its death
//! degrades the share (the guest's requests fail), never the VM.

use std::io;
use std::path::{Path, PathBuf};

use sandbox::launcher::{Helper, HelperCommand};
use std::time::{Duration, Instant};

use super::ShareConfig;

/// How long virtiofsd gets to open its socket.
/// How long a new virtiofsd is watched for an early exit.
const START_GRACE: Duration = Duration::from_millis(50);
/// The descriptor virtiofsd finds its listening socket on (`--fd`).
const LISTENER_FD: i32 = 3;

/// `$VESSEL_VIRTIOFSD`, else `virtiofsd` in PATH, in the places distributions put it, or
/// where `cargo install` does.
pub fn find_virtiofsd() -> Option<PathBuf> {
    // Found once: a jailed monitor no longer sees the host's programs.
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND.get_or_init(search_virtiofsd).clone()
}

fn search_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VESSEL_VIRTIOFSD").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .chain(
            ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
                .into_iter()
                .map(PathBuf::from),
        )
        .chain(home.map(|h| h.join(".cargo/bin/virtiofsd")))
        .find(|p| p.is_file())
}

/// A running virtiofsd; dropping it ends the process and removes its socket.
pub struct Virtiofsd {
    child: Helper,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd serving `share` on `socket`, which this process makes and
    /// hands over listening (so it is ours: a jailed monitor may connect to it).
    pub fn start(share: &ShareConfig, socket: &Path) -> io::Result<Virtiofsd> {
        let binary = find_virtiofsd().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "virtiofsd not found: cargo install virtiofsd (it needs libseccomp-dev and libcap-ng-dev), or set VESSEL_VIRTIOFSD",
            )
        })?;
        // (A jailed monitor does not see the folder: its launcher's policy and
        // `manager::confine` check it.)
        let _ = std::fs::remove_file(socket);
        let listener = std::os::unix::net::UnixListener::bind(socket)?;
        // Root can give it its own namespaces (its launcher is root even when the
        // monitor is jailed); a user runs it without a sandbox.
        let sandbox = if sandbox::jail::is_root() {
            "namespace"
        } else {
            "none"
        };
        let mut cmd = HelperCommand::new(&binary);
        cmd.arg("--shared-dir")
            .arg(&share.dir)
            .args(["--fd", &LISTENER_FD.to_string()])
            .args(["--sandbox", sandbox, "--cache", "auto"])
            .fd(LISTENER_FD, listener.into());
        // Its complaints go where vessel's do (the monitor's log).
        if let Ok(err) = std::os::fd::AsFd::as_fd(&io::stderr()).try_clone_to_owned() {
            cmd.fd(2, err);
        }
        if share.readonly {
            cmd.arg("--readonly");
        }
        let child = sandbox::launcher::spawn(cmd).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot start {}: {e}", binary.display()))
        })?;
        let mut d = Virtiofsd {
            child,
            socket: socket.to_path_buf(),
        };
        // It fails at once on a bad folder or option: give it that moment.
        let deadline = Instant::now() + START_GRACE;
        while Instant::now() < deadline {
            if d.child.exited() {
                return Err(io::Error::other("virtiofsd exited at start"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the process now (its watchers see it gone).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// A descriptor that becomes readable when the process ends (a pidfd).
    pub fn watch(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.child.pidfd().try_clone_to_owned()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}
