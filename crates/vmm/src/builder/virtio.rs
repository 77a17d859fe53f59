//! The VM's virtio devices on the PCI root complex: BARs from the 32-bit window,
//! MSI-X through the backend's sink, queue notifications as ioeventfds where the
//! backend has them.

use std::sync::{Arc, Mutex};

use cpu::GuestMemory;
use devices::pci::{BarAllocator, PciDevice, PciRoot};
use devices::reclaim::{Backing, Reclaimer};
use devices::virtio::balloon::{BalloonState, VirtioBalloon};
use devices::virtio::block::{Throttling, VirtioBlock};
use devices::virtio::console::{ConsoleInput, VirtioConsole};
use devices::virtio::fs::{SharedRegion, VirtioFs};
use devices::virtio::net::NetCounters;
use devices::virtio::rate_limit::RateLimiter;
use devices::virtio::rng::VirtioRng;
use devices::virtio::vsock::VirtioVsock;
use devices::virtio::{VirtioDevice, VirtioInterrupt, VirtioPciDevice};
use devices::{Bus, BusDevice};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::Backend;
use crate::config::{Hvc, VmConfig};
use crate::error::VmError;
use crate::io_limits::IoLimits;

/// The config's virtio devices, opened, and the console input when hvc0 is the
/// terminal's console.
pub(super) struct Opened {
    pub devices: Vec<Box<dyn VirtioDevice<GuestMemory>>>,
    pub stdio_hvc: Option<ConsoleInput>,
    /// For each NIC: its device's place in `devices` and where its transport's
    /// interrupt goes once attached (link changes).
    pub link_interrupts: Vec<(usize, Arc<std::sync::OnceLock<Arc<VirtioInterrupt>>>)>,
    /// Each NIC's label and counters.
    pub nic_counters: Vec<(String, Arc<NetCounters>)>,
    /// Each queue under a rate limiter (`disk0`, `net0-rx`...) and its throttling.
    pub throttling: Vec<(String, Arc<Throttling>)>,
    /// The disks' and NICs' limiters, for changing limits live.
    pub io_limits: IoLimits,
    /// Helper processes and threads kept as long as the VM.
    pub helpers: Vec<Box<dyn std::any::Any + Send>>,
    /// Where the host reaches the guest's SSH server, when a NIC forwards it.
    pub ssh: Option<std::net::SocketAddr>,
    /// The balloon's place in `devices` and the VMM's handle on it.
    pub balloon: Option<(usize, Arc<BalloonState>)>,
    /// The reclaim path the balloon gives pages back through.
    pub reclaimer: Option<Arc<Reclaimer>>,
}

/// Opens the config's devices: disk images, TAP interfaces, the entropy source, the
/// console.
pub(super) fn devices(config: &VmConfig, mem: &GuestMemory) -> Result<Opened, VmError> {
    let mut out: Vec<Box<dyn VirtioDevice<GuestMemory>>> = Vec::new();
    let mut groups: HashMap<&str, (usize, RateLimiter)> = HashMap::new();
    let mut throttling = Vec::new();
    let mut io_limits = IoLimits::default();
    for (i, disk) in config.disks.iter().enumerate() {
        let mut dev = VirtioBlock::new(disk).map_err(|e| VmError::Device(format!("disk {e}")))?;
        let limiter = match &disk.group {
            Some(g) => {
                let (first, limiter) = groups
                    .entry(g)
                    .or_insert_with(|| (i, RateLimiter::new(&disk.limits)));
                let theirs = &config.disks[*first].limits;
                if !disk.limits.is_none() && disk.limits != *theirs {
                    return Err(VmError::Device(format!(
                        "disk {}: group {g} has the limits of its first disk ({}); give the others none or the same",
                        disk.path.display(),
                        config.disks[*first].path.display()
                    )));
                }
                limiter.clone()
            }
            // Even without limits: `vessel set` may add some while the VM runs.
            None => RateLimiter::new(&disk.limits),
        };
        dev.set_rate_limiter(limiter.clone());
        io_limits.add_disk(i, limiter);
        throttling.push((format!("disk{i}"), dev.throttling()));
        out.push(Box::new(dev));
    }
    let mut link_interrupts = Vec::new();
    let mut nic_counters = Vec::new();
    let mut helpers = Vec::new();
    let mut ssh = None;
    for (index, net) in config.nets.iter().enumerate() {
        let nic = super::nic::open(net, index, &config.networks)?;
        ssh = ssh.or(nic.ssh);
        tracing::debug!("{}", nic.label);
        link_interrupts.push((out.len(), nic.interrupt));
        nic_counters.push((nic.label, nic.device.counters()));
        io_limits.add_nic(index, nic.limiters.0, nic.limiters.1);
        let [rx, tx] = nic.device.throttling();
        for (dir, t) in [("rx", rx), ("tx", tx)] {
            throttling.extend(t.map(|t| (format!("net{index}-{dir}"), t)));
        }
        helpers.extend(nic.helper);
        out.push(Box::new(nic.device));
    }
    if config.rng {
        out.push(Box::new(VirtioRng::new()));
    }
    if !config.shares.is_empty() {
        let regions = shared_regions(mem);
        for share in &config.shares {
            let socket = config.runtime_dir.join(format!(
                "virtiofs-{}-{}.sock",
                sandbox::jail::host_pid(),
                share.tag
            ));
            let dev = VirtioFs::new(share, &socket, regions.clone())
                .map_err(|e| VmError::Device(format!("share {}: {e}", share.tag)))?;
            out.push(Box::new(dev));
        }
    }
    let mut balloon = None;
    let mut reclaimer = None;
    if config.balloon {
        let backing = match config.memory_is_shared() {
            true => Backing::Shared,
            false => Backing::Private,
        };
        let r = Reclaimer::new(backing);
        reclaimer = Some(r.clone());
        let dev = VirtioBalloon::new(r);
        balloon = Some((out.len(), dev.state()));
        out.push(Box::new(dev));
    }
    if let Some(v) = &config.vsock {
        let dev = VirtioVsock::new(v)
            .map_err(|e| VmError::Device(format!("vsock socket {}: {e}", v.socket.display())))?;
        out.push(Box::new(dev));
    }
    let mut stdio_hvc = None;
    if let Some(hvc) = &config.hvc {
        let io_err = |e: std::io::Error| VmError::Device(format!("virtio console: {e}"));
        match hvc {
            Hvc::Stdio => {
                let dev = VirtioConsole::new(Box::new(std::io::stdout())).map_err(io_err)?;
                stdio_hvc = Some(dev.input());
                out.push(Box::new(dev));
            }
            Hvc::Socket(path) => {
                let client = Arc::new(Mutex::new(None));
                let dev =
                    VirtioConsole::new(Box::new(SocketOutput(client.clone()))).map_err(io_err)?;
                serve_socket(path, client, dev.input())?;
                out.push(Box::new(dev));
            }
        }
    }
    Ok(Opened {
        devices: out,
        stdio_hvc,
        link_interrupts,
        nic_counters,
        throttling,
        io_limits,
        helpers,
        ssh,
        balloon,
        reclaimer,
    })
}

/// Guest RAM as virtiofsd maps it: each region's memfd and offset (none for private
/// memory, which the device then refuses).
fn shared_regions(mem: &GuestMemory) -> Vec<SharedRegion> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    mem.iter()
        .map(|r| SharedRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
            host_addr: r
                .get_host_address(MemoryRegionAddress(0))
                .map_or(0, |p| p as u64),
            fd: r.file_offset().map_or(-1, |f| f.file().as_raw_fd()),
            offset: r.file_offset().map_or(0, |f| f.start()),
        })
        .collect()
}

/// hvc0's output to the socket's client, never blocking the device (a slow or absent
/// client loses output).
struct SocketOutput(Arc<Mutex<Option<UnixStream>>>);

impl std::io::Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = devices::bus::lock(&self.0);
        if let Some(c) = client.as_ref() {
            // SAFETY: a non-blocking send of `buf` on a socket we own; no SIGPIPE.
            let sent = unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(c),
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

/// Listens on `path`; each client (the latest wins) is hvc0's other end.
fn serve_socket(
    path: &Path,
    client: Arc<Mutex<Option<UnixStream>>>,
    input: ConsoleInput,
) -> Result<(), VmError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| VmError::Device(format!("virtio console socket {}: {e}", path.display())))?;
    sandbox::thread::spawn(sandbox::ThreadClass::Console, "hvc-socket", move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let Ok(mut reader) = stream.try_clone() else {
                continue;
            };
            *devices::bus::lock(&client) = Some(stream);
            let input = input.clone();
            let _ = sandbox::thread::spawn(sandbox::ThreadClass::Console, "hvc-in", move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let mut pending = &buf[..n];
                    while !pending.is_empty() {
                        let taken = input.push(pending);
                        pending = &pending[taken..];
                        if taken == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                    }
                }
            });
        }
    })
    .map_err(|e| VmError::Device(format!("virtio console: {e}")))?;
    Ok(())
}

/// The virtio functions as attached, and each one's interrupt.
type Attached = (
    Vec<Arc<Mutex<VirtioPciDevice<GuestMemory>>>>,
    Vec<Arc<VirtioInterrupt>>,
);

/// Puts `devices` on the root complex and the MMIO bus.
pub(super) fn attach(
    devices: Vec<Box<dyn VirtioDevice<GuestMemory>>>,
    mem: &GuestMemory,
    root: &Mutex<PciRoot>,
    mmio: &mut Bus,
    backend: &Backend,
) -> Result<Attached, VmError> {
    let mut bars = BarAllocator::mmio32();
    let mut interrupts = Vec::new();
    let mut functions = Vec::new();
    for device in devices {
        let pci = VirtioPciDevice::new(device, mem.clone(), &mut bars, backend.msi.clone(), None)
            .map_err(|e| VmError::Device(e.to_string()))?;
        let (base, len) = pci.bar_window();
        for (gpa, event) in pci.notify_events() {
            (backend.notify)(gpa, event)?;
        }
        interrupts.push(pci.interrupt().clone());
        let pci = Arc::new(Mutex::new(pci));
        functions.push(pci.clone());
        devices::bus::lock(root)
            .add_next(pci.clone() as Arc<Mutex<dyn PciDevice>>)
            .map_err(|e| VmError::Device(e.to_string()))?;
        mmio.insert(base, len, pci as Arc<Mutex<dyn BusDevice>>)?;
    }
    Ok((functions, interrupts))
}
