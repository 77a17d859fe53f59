//! virtiofsd, the virtio-fs project's file server, as a helper process of the VM: vessel
//! starts it for each share, talks vhost-user to it, and ends it with the VM. Its death
//! degrades the share (the guest's requests fail), never the VM.

use std::io;
use std::path::{Path, PathBuf};

use sandbox::launcher::{Helper, HelperCommand};
use std::time::{Duration, Instant};

use super::ShareConfig;

/// How long virtiofsd gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `$VESSEL_VIRTIOFSD`, else `virtiofsd` in PATH, in the places distributions put it, or
/// where `cargo install` does.
pub fn find_virtiofsd() -> Option<PathBuf> {
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
    /// Starts virtiofsd serving `share` on `socket` and waits for the socket.
    pub fn start(share: &ShareConfig, socket: &Path) -> io::Result<Virtiofsd> {
        let binary = find_virtiofsd().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "virtiofsd not found: cargo install virtiofsd (it needs libseccomp-dev and libcap-ng-dev), or set VESSEL_VIRTIOFSD",
            )
        })?;
        if !share.dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", share.dir.display()),
            ));
        }
        let _ = std::fs::remove_file(socket);
        // Root can give it its own namespaces; a user runs it without a sandbox.
        // SAFETY: geteuid has no preconditions.
        let sandbox = if unsafe { libc::geteuid() } == 0 {
            "namespace"
        } else {
            "none"
        };
        let mut cmd = HelperCommand::new(&binary);
        cmd.arg("--shared-dir")
            .arg(&share.dir)
            .arg("--socket-path")
            .arg(socket)
            .args(["--sandbox", sandbox, "--cache", "auto"]);
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
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if d.child.exited() {
                return Err(io::Error::other("virtiofsd exited at start"));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "virtiofsd did not open its socket",
                ));
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
