//! The launcher's side: `vessel __launcher POLICY...` starts what the monitor asks, if
//! its policy allows the program with those arguments, and keeps what descriptors it is handed,
//! until the monitor stops it or dies (its parent-death signal).

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use super::{Policy, SOCKET_FD, command, pidfd_open, send_kill, wire};

/// Serves the monitor on descriptor [`SOCKET_FD`]; returns when it is gone.
pub fn serve(policy: Policy) -> io::Result<()> {
    // SAFETY: the monitor put the launcher's end of the socket pair at SOCKET_FD for us
    // alone (launcher::start).
    let socket = UnixDatagram::from(unsafe { OwnedFd::from_raw_fd(SOCKET_FD) });
    // Helpers are reaped by the kernel: the monitor learns of their end by pidfd.
    // SAFETY: setting SIGCHLD's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // Descriptors handed over to keep (a KVM VM, whose teardown then happens when the
    // launcher dies with the monitor, not in the monitor's exit).
    let mut held = Vec::new();
    // What it started, by pid, to end when asked (through the pidfd: a pid that ended
    // and was reused names nobody).
    let mut started: HashMap<u32, OwnedFd> = HashMap::new();
    while let Some((message, fds)) = wire::receive(&socket)? {
        if message == [wire::HOLD] {
            held.extend(fds);
            continue;
        }
        if let Some(pid) = wire::kill_pid(&message) {
            if let Some(pidfd) = started.remove(&pid) {
                send_kill(&pidfd);
            }
            continue;
        }
        match start(&policy, &message, fds) {
            Ok((pid, pidfd)) => {
                wire::started(&socket, pid, &pidfd)?;
                started.insert(pid, pidfd);
            }
            Err(e) => wire::failed(&socket, &e)?,
        }
    }
    Ok(())
}

fn start(policy: &Policy, message: &[u8], fds: Vec<OwnedFd>) -> io::Result<(u32, OwnedFd)> {
    let cmd = wire::decode(message, fds)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a bad request: {e}")))?;
    policy
        .check(&cmd)
        .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?;
    let child = command(&cmd).spawn()?;
    let pid = child.id();
    // Already gone (and reaped) before we could watch it: say so.
    let pidfd = pidfd_open(pid).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{} ended at once", cmd.program().display()),
        )
    })?;
    Ok((pid, pidfd))
}
