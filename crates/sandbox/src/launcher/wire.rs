//! The launcher's messages, one datagram each way. A request: flags (u8: 1 = a new
//! session, 2 = only hold the descriptors until this process ends, 3 = end the helper
//! whose pid (u32) follows), the descriptors'
//! target numbers (u32 count, then i32 each; the descriptors
//! themselves ride as SCM_RIGHTS, in order), the program and its arguments (u32 count,
//! then u32 length and bytes each). An answer: 0 and the pid (u32) with the pidfd as
//! SCM_RIGHTS, or an errno (i32, not 0) and a message.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::HelperCommand;

/// The most descriptors one request carries, and the largest message.
pub const MAX_FDS: usize = 16;
pub const MAX_MESSAGE: usize = 64 << 10;

/// The flag of a request that only hands over descriptors to keep.
pub const HOLD: u8 = 2;
/// The flag of a request to end a helper (its pid follows, u32): a jailed monitor may
/// not signal what its launcher started.
pub const KILL: u8 = 3;

pub fn encode(cmd: &HelperCommand) -> Vec<u8> {
    let mut m = vec![u8::from(cmd.new_session)];
    m.extend_from_slice(&(cmd.fds.len() as u32).to_le_bytes());
    for (target, _) in &cmd.fds {
        m.extend_from_slice(&target.to_le_bytes());
    }
    let words: Vec<&[u8]> = std::iter::once(cmd.program.as_os_str().as_bytes())
        .chain(cmd.args.iter().map(|a| a.as_bytes()))
        .collect();
    m.extend_from_slice(&(words.len() as u32).to_le_bytes());
    for w in words {
        m.extend_from_slice(&(w.len() as u32).to_le_bytes());
        m.extend_from_slice(w);
    }
    m
}

/// A request read back, with the descriptors that came with it.
pub fn decode(m: &[u8], mut fds: Vec<OwnedFd>) -> Result<HelperCommand, String> {
    let mut at = 0;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = m.get(at..at + n).ok_or("a short request")?;
        at += n;
        Ok(s)
    };
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
    let new_session = take(1)?[0] == 1;
    let nfds = u32_of(take(4)?) as usize;
    if nfds != fds.len() || nfds > MAX_FDS {
        return Err(format!("{nfds} descriptors named, {} sent", fds.len()));
    }
    let mut targets = Vec::with_capacity(nfds);
    for _ in 0..nfds {
        let t = u32_of(take(4)?) as i32;
        if !(0..1024).contains(&t) {
            return Err(format!("descriptor number {t}"));
        }
        targets.push(t);
    }
    let nwords = u32_of(take(4)?) as usize;
    if nwords == 0 || nwords > 256 {
        return Err(format!("{nwords} words"));
    }
    let mut words = Vec::with_capacity(nwords);
    for _ in 0..nwords {
        let len = u32_of(take(4)?) as usize;
        words.push(OsString::from_vec(take(len)?.to_vec()));
    }
    let mut words = words.into_iter();
    let program = PathBuf::from(words.next().unwrap_or_default());
    Ok(HelperCommand {
        program,
        args: words.collect(),
        fds: targets.into_iter().zip(fds.drain(..)).collect(),
        new_session,
        die_with_parent: true,
    })
}

/// Hands `fd` to the launcher to keep until this process has ended.
pub fn hold(socket: &UnixDatagram, fd: &OwnedFd) -> io::Result<()> {
    socket
        .send_with_fds(&[&[HOLD][..]], &[fd.as_raw_fd()])
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Asks the launcher to end the helper it started as `pid` (no answer).
pub fn kill(socket: &UnixDatagram, pid: u32) -> io::Result<()> {
    let mut m = vec![KILL];
    m.extend_from_slice(&pid.to_le_bytes());
    socket.send(&m).map(|_| ())
}

/// The pid in a kill request.
pub fn kill_pid(message: &[u8]) -> Option<u32> {
    match message {
        [KILL, pid @ ..] => Some(u32::from_le_bytes(pid.try_into().ok()?)),
        _ => None,
    }
}

/// Sends `cmd` to the launcher and reads its answer.
pub fn request(socket: &UnixDatagram, cmd: &HelperCommand) -> io::Result<(u32, OwnedFd)> {
    let fds: Vec<RawFd> = cmd.fds.iter().map(|(_, f)| f.as_raw_fd()).collect();
    socket
        .send_with_fds(&[&encode(cmd)[..]], &fds)
        .map_err(io::Error::from)?;
    let mut buf = vec![0u8; 4096];
    let (n, pidfd) = socket.recv_with_fd(&mut buf).map_err(io::Error::from)?;
    let answer = &buf[..n];
    let code = answer
        .get(..4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
        .ok_or_else(|| io::Error::other("the launcher is gone"))?;
    if code != 0 {
        let why = String::from_utf8_lossy(&answer[4..]).into_owned();
        return Err(io::Error::new(
            io::Error::from_raw_os_error(code).kind(),
            why,
        ));
    }
    let pid = answer
        .get(4..8)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
        .ok_or_else(|| io::Error::other("a short answer from the launcher"))?;
    let pidfd = pidfd.ok_or_else(|| io::Error::other("the launcher sent no pidfd"))?;
    Ok((pid, pidfd.into()))
}

/// The launcher's answer for a started helper.
pub fn started(socket: &UnixDatagram, pid: u32, pidfd: &OwnedFd) -> io::Result<()> {
    let mut m = 0i32.to_le_bytes().to_vec();
    m.extend_from_slice(&pid.to_le_bytes());
    socket
        .send_with_fd(&m[..], pidfd.as_raw_fd())
        .map(|_| ())
        .map_err(io::Error::from)
}

/// The launcher's answer for a refused or failed request.
pub fn failed(socket: &UnixDatagram, e: &io::Error) -> io::Result<()> {
    let code = e.raw_os_error().filter(|&c| c != 0).unwrap_or(libc::EPERM);
    let mut m = code.to_le_bytes().to_vec();
    m.extend_from_slice(e.to_string().as_bytes());
    socket.send(&m).map(|_| ())
}

/// Receives one request and its descriptors (None when the monitor is gone).
pub fn receive(socket: &UnixDatagram) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, which outlives the call; received descriptors are
    // written to `raw` and owned by us from here.
    let (n, nfds) = unsafe { socket.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    let fds = raw[..nfds]
        .iter()
        .map(|&fd| {
            // SAFETY: each of the first `nfds` entries is a descriptor the kernel just
            // gave us.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    if n == 0 && nfds == 0 {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_as_sent() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let mut cmd = HelperCommand::new("/usr/bin/passt");
        cmd.args(["-f", "--fd", "3"]).new_session();
        cmd.fd(3, a.into());
        let m = encode(&cmd);
        let (c, _d) = UnixDatagram::pair().unwrap();
        let back = decode(&m, vec![c.into()]).unwrap();
        assert_eq!(back.program, cmd.program);
        assert_eq!(back.args, cmd.args);
        assert!(back.new_session);
        assert_eq!(back.fds.len(), 1);
        assert_eq!(back.fds[0].0, 3);
        // Short, inconsistent or oversized requests are refused, never a panic.
        for cut in 0..m.len() {
            assert!(decode(&m[..cut], Vec::new()).is_err());
        }
        assert!(decode(&m, Vec::new()).unwrap_err().contains("descriptors"));
    }
}
