//! The launcher's side: `vessel __launcher PROGRAM...` starts what the monitor asks,
//! if it is one of the programs it was given, and keeps what descriptors it is handed,
//! until the monitor stops it or dies (its parent-death signal).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use super::{SOCKET_FD, command, pidfd_open, wire};

/// Serves the monitor on descriptor [`SOCKET_FD`]; returns when it is gone.
pub fn serve(programs: Vec<PathBuf>) -> io::Result<()> {
    // SAFETY: the monitor put the launcher's end of the socket pair at SOCKET_FD for us
    // alone (launcher::start).
    let socket = UnixDatagram::from(unsafe { OwnedFd::from_raw_fd(SOCKET_FD) });
    // Helpers are reaped by the kernel: the monitor learns of their end by pidfd.
    // SAFETY: setting SIGCHLD's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // Descriptors handed over to keep (a KVM VM, whose teardown then happens when the
    // launcher dies with the monitor, not in the monitor's exit).
    let mut held = Vec::new();
    while let Some((message, fds)) = wire::receive(&socket)? {
        if message == [wire::HOLD] {
            held.extend(fds);
            continue;
        }
        match start(&programs, &message, fds) {
            Ok((pid, pidfd)) => wire::started(&socket, pid, &pidfd)?,
            Err(e) => wire::failed(&socket, &e)?,
        }
    }
    Ok(())
}

fn start(programs: &[PathBuf], message: &[u8], fds: Vec<OwnedFd>) -> io::Result<(u32, OwnedFd)> {
    let cmd = wire::decode(message, fds)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a bad request: {e}")))?;
    if !programs.iter().any(|p| p == cmd.program()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a program this launcher starts",
                cmd.program().display()
            ),
        ));
    }
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
