//! Helper programs (passt, virtiofsd, a network's switch) started outside the monitor's
//! confinement. A filter is inherited across exec, and a confined monitor may not fork
//! or exec at all; so a confined monitor starts, before it confines itself, a launcher:
//! vessel itself (`vessel __launcher`) on one end of a socket pair, which starts only
//! the programs it was given at its own start, with the arguments and descriptors the
//! monitor sends, and answers with a pidfd. Helpers are the launcher's children (it
//! ignores SIGCHLD, so the kernel reaps them); the monitor watches them through their
//! pidfds. A process with no launcher (the CLI, a switch, tests) starts helpers itself.

mod policy;
mod serve;
mod wire;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

pub use policy::Policy;
pub use serve::serve;

/// The descriptor the launcher finds its socket on.
pub const SOCKET_FD: RawFd = 3;

/// A program to start: its arguments, the descriptors it gets (its standard streams
/// are /dev/null unless given), whether it gets a session of its own.
#[derive(Debug)]
pub struct HelperCommand {
    program: PathBuf,
    args: Vec<OsString>,
    fds: Vec<(RawFd, OwnedFd)>,
    new_session: bool,
    /// Killed when its starter dies (what the launcher gives every helper that does not
    /// lead a session of its own: a launcher is single-threaded, so its parent-death
    /// signal is the launcher's death).
    die_with_parent: bool,
}

impl HelperCommand {
    pub fn new(program: impl Into<PathBuf>) -> HelperCommand {
        HelperCommand {
            program: program.into(),
            args: Vec::new(),
            fds: Vec::new(),
            new_session: false,
            die_with_parent: false,
        }
    }

    pub fn arg(&mut self, a: impl Into<OsString>) -> &mut Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = A>, A: Into<OsString>>(&mut self, args: I) -> &mut Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The program finds `fd` as its descriptor `target` (0, 1 and 2 are its standard
    /// streams).
    pub fn fd(&mut self, target: RawFd, fd: OwnedFd) -> &mut Self {
        self.fds.push((target, fd));
        self
    }

    /// The program leads a session of its own (it outlives its starter's session).
    pub fn new_session(&mut self) -> &mut Self {
        self.new_session = true;
        self
    }

    pub fn program(&self) -> &Path {
        &self.program
    }
}

/// A started helper.
pub struct Helper {
    pid: u32,
    pidfd: OwnedFd,
    /// When this process started it itself: the child, to reap.
    child: Option<Child>,
}

impl Helper {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// A descriptor that becomes readable when the helper ends.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the helper has ended (without waiting).
    pub fn exited(&mut self) -> bool {
        if let Some(c) = &mut self.child {
            return !matches!(c.try_wait(), Ok(None));
        }
        poll_readable(self.pidfd.as_raw_fd(), 0)
    }

    /// Waits until the helper has ended.
    pub fn wait(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.wait();
            return;
        }
        while !poll_readable(self.pidfd.as_raw_fd(), -1) {}
    }

    /// Ends the helper (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        // The launcher that started it ends it: a jailed monitor (another user, no
        // capabilities) may not signal it.
        let asked = LAUNCHER.get().is_some_and(|l| {
            let socket = l.socket.lock().unwrap_or_else(|p| p.into_inner());
            wire::kill(&socket, self.pid).is_ok()
        });
        if !asked {
            send_kill(&self.pidfd);
        }
        self.wait();
    }
}

fn send_kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) on a pidfd we own, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && p.revents != 0
}

struct Launcher {
    socket: Mutex<UnixDatagram>,
    process: Mutex<Option<Child>>,
}

static LAUNCHER: OnceLock<Launcher> = OnceLock::new();

/// Starts this process's launcher: `exe __launcher POLICY...`, allowed to start only
/// what `policy` allows. Call before confining the process (it forks and execs).
pub fn start(exe: &Path, policy: &Policy) -> io::Result<()> {
    if LAUNCHER.get().is_some() {
        return Ok(());
    }
    let (ours, theirs) = UnixDatagram::pair()?;
    let theirs: OwnedFd = theirs.into();
    let fd = theirs.as_raw_fd();
    // Its standard streams are ours (it writes nothing unless something is wrong).
    let mut cmd = Command::new(exe);
    cmd.arg("__launcher").args(policy.to_args());
    // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == SOCKET_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, SOCKET_FD)
            };
            if r < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    let _ = LAUNCHER.set(Launcher {
        socket: Mutex::new(ours),
        process: Mutex::new(Some(child)),
    });
    Ok(())
}

/// Ends this process's launcher, if it has one, and waits for it (a monitor leaving its
/// cgroup takes it along this way). Helpers it started run on until their own end.
pub fn stop() {
    let Some(l) = LAUNCHER.get() else { return };
    // An empty message is the end (a datagram socket's peer sees no shutdown).
    let _ = l.socket.lock().unwrap_or_else(|p| p.into_inner()).send(&[]);
    if let Some(mut child) = l.process.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = child.wait();
    }
}

/// Hands `fd` to this process's launcher, which keeps it until this process has ended
/// (false: there is no launcher).
pub fn hold(fd: &OwnedFd) -> bool {
    LAUNCHER.get().is_some_and(|l| {
        let socket = l.socket.lock().unwrap_or_else(|p| p.into_inner());
        wire::hold(&socket, fd).is_ok()
    })
}

/// Starts `cmd` through the launcher if this process has one, else itself.
pub fn spawn(cmd: HelperCommand) -> io::Result<Helper> {
    match LAUNCHER.get() {
        Some(l) => {
            let socket = l.socket.lock().unwrap_or_else(|p| p.into_inner());
            let (pid, pidfd) = wire::request(&socket, &cmd)?;
            Ok(Helper {
                pid,
                pidfd,
                child: None,
            })
        }
        None => spawn_here(cmd),
    }
}

/// Starts `cmd` as a child of this process.
fn spawn_here(cmd: HelperCommand) -> io::Result<Helper> {
    if cmd.fds.len() > 16 {
        return Err(io::Error::other("a helper gets at most 16 descriptors"));
    }
    let child = command(&cmd).spawn()?;
    let pid = child.id();
    let pidfd = pidfd_open(pid)?;
    Ok(Helper {
        pid,
        pidfd,
        child: Some(child),
    })
}

/// `cmd` as a std Command: each descriptor moved to its number between fork and exec
/// (`cmd` must live until the Command is spawned: its descriptors are the sources).
fn command(cmd: &HelperCommand) -> Command {
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let moves: Vec<(RawFd, RawFd)> = cmd.fds.iter().map(|(t, f)| (*t, f.as_raw_fd())).collect();
    let new_session = cmd.new_session;
    let die_with_parent = cmd.die_with_parent && !cmd.new_session;
    // Every source first moves above every target, so no move overwrites a source.
    // SAFETY: only async-signal-safe calls (fcntl, dup2, setsid, prctl, signal) run
    // between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let mut high = [0; 16];
            for (i, (_, from)) in moves.iter().enumerate().take(high.len()) {
                high[i] = libc::fcntl(*from, libc::F_DUPFD, 64);
                if high[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, (target, _)) in moves.iter().enumerate().take(high.len()) {
                if libc::dup2(high[i], *target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if new_session {
                libc::setsid();
            }
            if die_with_parent {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            // A launcher ignores SIGCHLD; its helpers must not inherit that.
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            Ok(())
        });
    }
    c
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with no flags returns a new descriptor or fails.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor pidfd_open just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
