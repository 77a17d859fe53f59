//! The vsock listener and the program's entry point.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use super::{Connection, io_text, log, serve_connection};
use crate::protocol;

/// How often, and how many times, a missing vsock is tried again (its driver may load
/// after the agent starts).
const RETRY_EVERY: Duration = Duration::from_secs(1);
const RETRIES: u32 = 300;

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream(File);

impl From<OwnedFd> for VsockStream {
    fn from(fd: OwnedFd) -> Self {
        VsockStream(File::from(fd))
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(VsockStream)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeout.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |t| libc::timeval {
                tv_sec: t.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_usec: t.subsec_micros().max(u32::from(t.is_zero())).into(),
            },
        );
        // SAFETY: SO_RCVTIMEO reads one timeval of the size given, which lives across
        // the call.
        let r = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        check(r)
    }

    fn shutdown(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on a descriptor this stream owns.
        check(unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) })
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listening vsock socket (any CID, one port).
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        // SAFETY: socket(2) takes integers only.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        check(fd)?;
        // SAFETY: socket(2) returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain integers; all zeroes is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: bind(2) reads a sockaddr_vm of the size given, which lives across the
        // call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        check(r)?;
        // SAFETY: listen(2) takes integers only.
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(VsockListener(fd))
    }

    /// The next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: accept4(2) may take null address pointers.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                return Ok(VsockStream::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

const USAGE: &str = "\
usage: vessel-agent [--port N]

vessel's guest agent: serves the host's requests (exec, cp, shutdown, time, freeze,
facts) on vsock port N (default 1024). Runs as root inside the VM.";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Args {
    Serve { port: u32 },
    Help,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut port = protocol::PORT;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(Args::Help),
            "--port" => args.next().ok_or("--port needs a value")?.as_str(),
            other => match other.strip_prefix("--port=") {
                Some(value) => value,
                None => return Err(format!("unknown argument {other:?}")),
            },
        };
        port = value.parse().map_err(|_| format!("bad port {value:?}"))?;
    }
    Ok(Args::Serve { port })
}

/// `vessel-agent [--port N]`: serves until killed.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&args) {
        Ok(Args::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Args::Serve { port }) => serve(port),
        Err(e) => {
            eprintln!("vessel-agent: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn serve(port: u32) -> ExitCode {
    let Some(listener) = listen(port) else {
        return ExitCode::FAILURE;
    };
    log(format!("listening on vsock port {port}"));
    loop {
        match listener.accept() {
            Ok(conn) => spawn_connection(conn),
            Err(e) => {
                // Out of descriptors or memory, most likely: wait for some to free up.
                log(format!("accept: {}", io_text(&e)));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Binds the port, trying again for a while if vsock is not there (yet).
fn listen(port: u32) -> Option<VsockListener> {
    let mut logged = false;
    for _ in 0..RETRIES {
        match VsockListener::bind(port) {
            Ok(listener) => return Some(listener),
            Err(e) if !logged => {
                log(format!(
                    "cannot listen on vsock port {port} ({}); trying again every second",
                    io_text(&e)
                ));
                logged = true;
            }
            Err(_) => {}
        }
        thread::sleep(RETRY_EVERY);
    }
    log(format!(
        "no vsock port {port} after {RETRIES} tries; giving up"
    ));
    None
}

fn spawn_connection(conn: VsockStream) {
    let spawned = thread::Builder::new()
        .name("connection".into())
        .spawn(move || {
            if let Err(e) = serve_connection(conn) {
                log(e);
            }
        });
    if let Err(e) = spawned {
        log(format!("cannot start a thread: {}", io_text(&e)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse(&[]),
            Ok(Args::Serve {
                port: protocol::PORT
            })
        );
        assert_eq!(parse(&["--port", "5000"]), Ok(Args::Serve { port: 5000 }));
        assert_eq!(parse(&["--port=7"]), Ok(Args::Serve { port: 7 }));
        assert_eq!(parse(&["--help"]), Ok(Args::Help));
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--port", "x"]).is_err());
        assert!(parse(&["serve"]).is_err());
    }
}
