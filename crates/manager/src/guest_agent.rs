//! What the monitor asks of the guest agent (when the VM has a vsock device and an
//! agent answers in the guest): a clean shutdown, the guest's clock set from the host's
//! after a pause or a restore, and the guest's file systems frozen around a snapshot's
//! disks. Each is a best effort with a short timeout: a guest without an agent gets
//! the ACPI button, a clock left as it was, a crash-consistent snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::host;

use crate::bundle::Bundle;
use crate::spec::{VSOCK_SOCKET, VmSpec};

/// How long the monitor waits for an agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a shutdown waits for an agent before pressing the button instead.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct GuestAgent {
    socket: Option<PathBuf>,
}

impl GuestAgent {
    /// The agent of the VM in `bundle`, reached through its vsock socket (none when the
    /// spec turns vsock off).
    pub fn of(bundle: &Bundle, spec: &VmSpec) -> Self {
        let socket = spec
            .vsock_config(&bundle.dir.join(VSOCK_SOCKET))
            .ok()
            .flatten()
            .map(|c| c.socket);
        GuestAgent { socket }
    }

    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// Asks the guest to power off; false when no agent took the request.
    pub fn shutdown(&self) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        match host::shutdown(socket, false, SHUTDOWN_TIMEOUT) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!("guest agent: {e}; pressing the power button");
                false
            }
        }
    }

    /// Sets the guest's clock from the host's, on a thread of its own, trying for up
    /// to `within` (a restored guest's agent needs a moment to see its connections
    /// reset).
    pub fn sync_time_soon(&self, within: Duration) {
        let Some(socket) = self.socket.clone() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("agent-time".into())
            .spawn(move || {
                let deadline = Instant::now() + within;
                loop {
                    match host::sync_time(&socket, CONNECT_TIMEOUT) {
                        Ok(()) => {
                            tracing::info!("guest agent: clock set from the host's");
                            return;
                        }
                        Err(e) if Instant::now() >= deadline => {
                            tracing::info!("guest agent: clock not set: {e}");
                            return;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("guest agent: cannot start the clock thread: {e}");
        }
    }

    /// Freezes the guest's file systems; None (logged) when there is no agent or it
    /// cannot. They thaw when the result is thawed or dropped.
    pub fn freeze(&self) -> Option<host::Frozen> {
        let socket = self.socket.as_ref()?;
        match host::freeze(socket, CONNECT_TIMEOUT) {
            Ok(f) => {
                tracing::info!("guest agent: froze {}", f.filesystems.join(" "));
                Some(f)
            }
            Err(e) => {
                tracing::info!("guest agent: file systems not frozen: {e}");
                None
            }
        }
    }
}
