//! User-mode NAT through passt (Debian package `passt`): one passt per NIC, handed one
//! end of a socket pair (`passt -F FD`), so no socket path and no root are needed.
//! vessel supervises it: if it dies, the NIC's link goes down, passt is started again
//! and the link comes back; passt exits by itself when vessel's end closes.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::net::{PortForward, Protocol, StreamBackend};
use sandbox::launcher::{Helper, HelperCommand};

use crate::error::NetError;

/// The fd number passt finds its end of the socket pair at.
pub(crate) const PASST_FD: i32 = 3;

/// passt from PATH.
pub fn find_passt() -> Result<PathBuf, NetError> {
    // Found once: a jailed monitor no longer sees the host's programs.
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/bin")])
                .map(|d| d.join("passt"))
                .find(|p| p.is_file())
        })
        .clone()
        .ok_or(NetError::NoPasst)
}

/// passt's arguments for these forwards and DNS server.
fn arguments(forwards: &[PortForward], dns: Option<IpAddr>) -> Vec<String> {
    let mut args: Vec<String> = ["-f", "-q", "-F"].map(String::from).to_vec();
    args.push(PASST_FD.to_string());
    for f in forwards {
        args.push(match f.protocol {
            Protocol::Tcp => "-t".into(),
            Protocol::Udp => "-u".into(),
        });
        let addr = f.host_addr.map(|a| format!("{a}/")).unwrap_or_default();
        args.push(format!("{addr}{}:{}", f.host_port, f.guest_port));
    }
    if let Some(d) = dns {
        args.push("-D".into());
        args.push(d.to_string());
    }
    args
}

/// Fails at once, with the port named, when a forward's host port is taken.
fn check_ports(forwards: &[PortForward]) -> Result<(), NetError> {
    for f in forwards {
        let ip = f.host_addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let at = SocketAddr::new(ip, f.host_port);
        let (taken, proto) = match f.protocol {
            Protocol::Tcp => (TcpListener::bind(at).err(), "tcp"),
            Protocol::Udp => (UdpSocket::bind(at).err(), "udp"),
        };
        if let Some(e) = taken {
            return Err(NetError::PortInUse {
                port: f.host_port,
                proto,
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

struct Inner {
    passt: PathBuf,
    args: Vec<String>,
    backend: Arc<StreamBackend>,
    child: Mutex<Option<Helper>>,
    stopping: AtomicBool,
}

/// A running, supervised passt for one NIC; dropping it stops passt.
pub struct Passt {
    inner: Arc<Inner>,
}

impl Passt {
    /// Starts passt for `backend` (which is connected to it) and keeps it running.
    pub fn start(
        forwards: &[PortForward],
        dns: Option<IpAddr>,
        backend: Arc<StreamBackend>,
    ) -> Result<Passt, NetError> {
        let passt = find_passt()?;
        check_ports(forwards)?;
        let inner = Arc::new(Inner {
            passt,
            args: arguments(forwards, dns),
            backend,
            child: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        inner.spawn()?;
        let watcher = inner.clone();
        std::thread::Builder::new()
            .name("passt-watch".into())
            .spawn(move || watcher.supervise())
            .map_err(NetError::io("starting the passt supervisor"))?;
        Ok(Passt { inner })
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::Release);
        if let Some(c) = lock(&self.inner.child).as_mut() {
            c.kill();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Starts one passt and connects the backend to it (its port forwards were checked
    /// free just before; if it dies anyway, the supervisor says why and starts it again).
    fn spawn(&self) -> Result<(), NetError> {
        let (child, ours) = spawn(&self.passt, &self.args)?;
        self.backend
            .connect(ours)
            .map_err(NetError::io("connecting to passt"))?;
        *lock(&self.child) = Some(child);
        Ok(())
    }

    /// Waits for passt to exit; unless vessel is stopping it, starts it again.
    fn supervise(&self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let exited = lock(&self.child).as_mut().is_none_or(Helper::exited);
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if !exited {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            tracing::warn!("passt exited; the NIC's link is down, starting it again");
            match self.spawn() {
                Ok(()) => {
                    tracing::info!("passt is back; the NIC's link is up");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!("passt did not start again ({e}); retrying in {backoff:?}");
                    *lock(&self.child) = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Starts `passt ARGS` (whose `-F` must name [`PASST_FD`]) on one end of a new socket
/// pair; returns the helper and vessel's end. passt's stderr goes to the log, less what
/// it says at every start as root.
pub(crate) fn spawn(passt: &Path, args: &[String]) -> Result<(Helper, UnixStream), NetError> {
    let (ours, theirs) = UnixStream::pair().map_err(NetError::io("socket pair for passt"))?;
    let (err_reader, err_writer) = std::io::pipe().map_err(NetError::io("a pipe for passt"))?;
    let mut cmd = HelperCommand::new(passt);
    cmd.args(args)
        .fd(PASST_FD, OwnedFd::from(theirs))
        .fd(2, OwnedFd::from(err_writer));
    let child = sandbox::launcher::spawn(cmd).map_err(NetError::io("starting passt"))?;
    std::thread::spawn(move || {
        for line in BufReader::new(err_reader).lines().map_while(Result::ok) {
            // What passt says at every start as root, and its complaints that there is no
            // syslog to tell.
            if !line.starts_with("Don't run as root") && !line.starts_with("Failed to send") {
                tracing::warn!("passt: {line}");
            }
        }
    });
    Ok((child, ours))
}

impl Passt {
    /// The process ID of the current passt.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.inner.child).as_ref().map(Helper::id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_become_passt_options() {
        let f = |s| PortForward::parse(s).unwrap();
        let args = arguments(
            &[f("tcp::2222-:22"), f("udp:127.0.0.1:5353-:53")],
            Some("10.0.0.1".parse().unwrap()),
        );
        assert_eq!(
            args,
            [
                "-f",
                "-q",
                "-F",
                "3",
                "-t",
                "2222:22",
                "-u",
                "127.0.0.1/5353:53",
                "-D",
                "10.0.0.1"
            ]
        );
    }

    #[test]
    fn a_taken_port_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f = PortForward::parse(&format!("tcp:127.0.0.1:{port}-:80")).unwrap();
        let e = check_ports(&[f]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("host port {port}/tcp cannot be forwarded: ")),
            "{e}"
        );
    }
}
