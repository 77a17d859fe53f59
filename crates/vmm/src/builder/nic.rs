//! A VM's NICs and what each is attached to: a TAP, passt (user-mode NAT), vessel's
//! switch (a named network), or a TAP on a Linux bridge. Helper processes are started
//! and supervised here; their death takes a NIC's link down, never the VM.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use devices::virtio::VirtioInterrupt;
use devices::virtio::net::{
    Attachment, NetBackend, NetConfig, NetCounters, PortForward, Protocol, StreamBackend, Tap,
    VirtioNet, format_mac, generated_mac,
};
use devices::virtio::rate_limit::RateLimiter;

use crate::error::VmError;

/// One NIC, ready to be wrapped in its PCI transport.
pub(super) struct Nic {
    pub device: VirtioNet,
    /// Set once the transport exists: where link changes are signalled.
    pub interrupt: Arc<OnceLock<Arc<VirtioInterrupt>>>,
    /// Kept alive as long as the VM (passt, the switch connection's keeper).
    pub helper: Option<Box<dyn Any + Send>>,
    /// `net0 user 52:54:...`: what the NIC is, for metrics and logs.
    pub label: String,
    /// What it receives and sends is limited by (rx, tx).
    pub limiters: (RateLimiter, RateLimiter),
    /// The loopback address forwarded to the guest's SSH port (`user,ssh=on`).
    pub ssh: Option<std::net::SocketAddr>,
}

fn dev_err(e: impl std::fmt::Display) -> VmError {
    VmError::Device(e.to_string())
}

/// A MAC for a NIC that names none: stable per TAP name, per process otherwise (a
/// managed VM's vm.toml carries explicit MACs).
fn default_mac(net: &NetConfig, index: usize) -> [u8; 6] {
    let seed = match &net.attach {
        Attachment::Tap(name) => name.clone(),
        _ => format!(
            "{}-{:?}",
            sandbox::jail::host_pid(),
            std::time::SystemTime::now()
        ),
    };
    generated_mac(seed.as_bytes(), index as u32)
}

/// The TAP name vessel makes for NIC `index` on a bridge (IFNAMSIZ allows 15).
fn bridge_tap_name(index: usize) -> String {
    format!("vsl{}n{index}", sandbox::jail::host_pid() % 1_000_000)
}

/// The TAP interfaces [`prepare_taps`] made for this process.
fn prepared() -> std::sync::MutexGuard<'static, Vec<String>> {
    static PREPARED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    PREPARED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes, before a jail (as root), the TAP interfaces that `nets` need and that the
/// jail's user `owner` could not make itself: persistent and owned by it, a bridge's
/// also attached to its bridge and up. Every boot then opens them as they are; a TAP
/// that already exists is left as it is. [`release_taps`] undoes this at the end.
pub fn prepare_taps(nets: &[NetConfig], owner: u32) -> Result<(), VmError> {
    for (index, net) in nets.iter().enumerate() {
        let (name, bridge) = match &net.attach {
            Attachment::Tap(name) => (name.clone(), None),
            Attachment::Bridge(br) => (bridge_tap_name(index), Some(br)),
            _ => continue,
        };
        if Path::new("/sys/class/net").join(&name).exists() {
            continue;
        }
        Tap::make_persistent(&name, owner).map_err(|e| dev_err(format!("TAP {name}: {e}")))?;
        prepared().push(name.clone());
        if let Some(br) = bridge {
            network::bridge::attach(br, &name).map_err(dev_err)?;
        }
    }
    Ok(())
}

/// The TAP interfaces [`prepare_taps`] made, for the process that outlives this one
/// to release them if this one cannot (it was killed): [`release_leftover_taps`].
pub fn prepared_taps() -> Vec<String> {
    prepared().clone()
}

/// Lets go of the TAP interfaces [`prepare_taps`] made: each goes with its last user.
/// (In a jail, which has no /sys to say what is there.)
pub fn release_taps() {
    for name in prepared().drain(..) {
        release_tap(&name);
    }
}

/// Lets go of those of `names` the host still has.
pub fn release_leftover_taps(names: &[String]) {
    for name in names {
        if Path::new("/sys/class/net").join(name).exists() {
            release_tap(name);
        }
    }
}

fn release_tap(name: &str) {
    if let Err(e) = Tap::release(name) {
        tracing::warn!("TAP {name} stays: {e}");
    }
}

pub(super) fn open(net: &NetConfig, index: usize, networks: &Path) -> Result<Nic, VmError> {
    let mac = net.mac.unwrap_or_else(|| default_mac(net, index));
    let counters = Arc::new(NetCounters::default());
    let interrupt: Arc<OnceLock<Arc<VirtioInterrupt>>> = Arc::default();
    let mut helper: Option<Box<dyn Any + Send>> = None;
    let mut ssh_at = None;
    let (kind, backend): (String, Arc<dyn NetBackend>) = match &net.attach {
        Attachment::Tap(name) => {
            let tap = Tap::open(name).map_err(|e| dev_err(format!("TAP {name}: {e}")))?;
            (format!("tap {name}"), Arc::new(tap))
        }
        Attachment::Bridge(br) => {
            let name = bridge_tap_name(index);
            // Made before the jail (see prepare_taps): open it as it is.
            let tap = if prepared().contains(&name) {
                Tap::open(&name).map_err(|e| dev_err(format!("TAP {name}: {e}")))?
            } else {
                network::bridge::attach(br, &name).map_err(dev_err)?
            };
            (format!("bridge {br} ({})", tap.name()), Arc::new(tap))
        }
        Attachment::User { forwards, dns, ssh } => {
            let backend = stream_backend(&interrupt)?;
            let mut forwards = forwards.clone();
            if *ssh {
                let at = free_loopback_port()?;
                ssh_at = Some(at);
                forwards.push(PortForward {
                    protocol: Protocol::Tcp,
                    host_addr: Some(at.ip()),
                    host_port: at.port(),
                    guest_port: 22,
                });
            }
            let passt =
                network::passt::Passt::start(&forwards, *dns, backend.clone()).map_err(dev_err)?;
            helper = Some(Box::new(passt));
            ("user".to_string(), backend)
        }
        Attachment::Network(name) => {
            let backend = stream_backend(&interrupt)?;
            let keeper = NetworkLink::join(networks, name, backend.clone())?;
            helper = Some(Box::new(keeper));
            (format!("network {name}"), backend)
        }
    };
    let mut device = VirtioNet::new(backend, mac, counters);
    // Limiters even without limits: `vessel set` may add some while the VM runs.
    let limiters = (RateLimiter::new(&net.rx), RateLimiter::new(&net.tx));
    device.set_rate_limiters(Some(limiters.0.clone()), Some(limiters.1.clone()));
    Ok(Nic {
        device,
        limiters,
        interrupt,
        helper,
        label: format!("net{index} {kind} {}", format_mac(&mac)),
        ssh: ssh_at,
    })
}

/// A loopback port nothing listens on now (passt takes it a moment later).
fn free_loopback_port() -> Result<std::net::SocketAddr, VmError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| dev_err(format!("choosing a port for SSH: {e}")))
}

/// A stream backend whose link changes interrupt the driver once the transport exists.
fn stream_backend(
    interrupt: &Arc<OnceLock<Arc<VirtioInterrupt>>>,
) -> Result<Arc<StreamBackend>, VmError> {
    let backend = Arc::new(StreamBackend::new().map_err(dev_err)?);
    let cell = interrupt.clone();
    backend.on_link_change(Box::new(move || {
        if let Some(i) = cell.get() {
            i.signal_config();
        }
    }));
    Ok(backend)
}

/// A NIC's membership of a named network: connected to the network's switch, and
/// connected again (starting a switch if none runs) whenever the link drops.
struct NetworkLink {
    stop: Arc<AtomicBool>,
}

impl NetworkLink {
    fn join(networks: &Path, name: &str, backend: Arc<StreamBackend>) -> Result<Self, VmError> {
        let exe = sandbox::own_exe().map_err(dev_err)?;
        let conn = network::switch::connect(networks, name, &exe).map_err(dev_err)?;
        backend.connect(conn).map_err(dev_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (networks, name, flag): (PathBuf, String, _) =
            (networks.to_path_buf(), name.to_string(), stop.clone());
        std::thread::Builder::new()
            .name("net-link".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    if backend.is_connected() || flag.load(Ordering::Acquire) {
                        continue;
                    }
                    tracing::warn!("network {name}: the switch went away; joining again");
                    match network::switch::connect(&networks, &name, &exe) {
                        Ok(c) => {
                            if let Err(e) = backend.connect(c) {
                                tracing::warn!("network {name}: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("network {name}: {e}"),
                    }
                }
            })
            .map_err(dev_err)?;
        Ok(NetworkLink { stop })
    }
}

impl Drop for NetworkLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
