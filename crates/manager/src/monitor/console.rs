//! The monitor's serial console: output to `serial.log` and the attached client,
//! input from the client to the guest.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Monitor, lock};

/// Serial output: everything to `serial.log`, and to the attached console client
/// without ever blocking the vCPU (a slow client loses output; the log keeps it all).
pub(super) struct ConsoleHub {
    pub(super) log: Mutex<File>,
    pub(super) client: Mutex<Option<UnixStream>>,
}

pub(super) struct HubWriter(pub(super) Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0.log).write_all(buf)?;
        let mut client = lock(&self.0.client);
        if let Some(c) = client.as_ref() {
            // SAFETY: a non-blocking send of `buf` on a socket we own; no SIGPIPE.
            let sent = unsafe {
                libc::send(
                    c.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if sent < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
            {
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Accepts console clients one at a time (a new one takes over) and forwards their
/// input to the guest.
pub(super) fn serve_console(listener: UnixListener, hub: Arc<ConsoleHub>, monitor: Arc<Monitor>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { return };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        if let Some(old) = lock(&hub.client).replace(stream) {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        let monitor = monitor.clone();
        let _ = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || forward_input(reader, &monitor));
    }
}

fn forward_input(mut client: UnixStream, monitor: &Monitor) {
    let mut buf = [0u8; 256];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = lock(&monitor.handle)
                .as_ref()
                .map_or(0, |h| h.console_input(pending));
            pending = &pending[taken..];
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
