//! A deadline on vhost-user exchanges with virtiofsd. A guest can wedge virtiofsd (a
//! ring whose index runs ahead makes its worker spin), and vhost's connection retries
//! a read that timed out forever, so a socket timeout cannot free a vCPU waiting for
//! a reply. A thread of the device's own watches instead: armed before an exchange
//! and disarmed after it, it shuts the socket down at the deadline, which ends the
//! wait with an error (the device then ends virtiofsd; the share fails, the VM goes
//! on).

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

pub(super) struct Watchdog {
    arm: Sender<bool>,
}

impl Watchdog {
    /// Watches exchanges on `socket` (a clone of the frontend's), each given `limit`.
    pub(super) fn new(socket: UnixStream, limit: Duration, tag: &str) -> std::io::Result<Self> {
        let (arm, armed) = mpsc::channel::<bool>();
        let tag = tag.to_string();
        sandbox::thread::spawn(sandbox::ThreadClass::Fs, "virtio-fs-watch", move || {
            while let Ok(on) = armed.recv() {
                if !on {
                    continue;
                }
                match armed.recv_timeout(limit) {
                    Ok(_) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        crate::guest_warn!(
                            "virtio-fs {tag}: virtiofsd did not answer within {limit:?}; its connection is closed"
                        );
                        let _ = socket.shutdown(Shutdown::Both);
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        })?;
        Ok(Watchdog { arm })
    }

    /// An exchange begins: its deadline runs from now.
    pub(super) fn arm(&self) {
        let _ = self.arm.send(true);
    }

    /// The exchange ended in time.
    pub(super) fn disarm(&self) {
        let _ = self.arm.send(false);
    }
}
