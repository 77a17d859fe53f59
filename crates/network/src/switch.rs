//! vessel's switch: one process per named network joining the VMs on it into one
//! Ethernet segment, without root. VMs connect to its Unix socket and exchange frames in
//! the same length-prefixed framing passt uses. It learns which MAC is behind which
//! port, floods only broadcasts and unknown destinations, bounds every port's queue
//! (a VM that floods, or stops reading, loses frames; the others do not notice), forgets
//! a port the moment its VM goes, hands out addresses by DHCP, and exits once no VM has
//! been on the network for a few seconds. A network created with `--nat` also gives
//! each VM a way out through a passt of its own (see [`crate::uplink`]).
//!
//! ```text
//! <networks>/<name>/switch.sock   the socket VMs connect to
//!                   switch.lock   held by the running switch (one per network)
//!                   leases.json   DHCP leases (MAC -> address), read by `vessel net ls`
//!                   switch.log    what the switch said
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::net::MAX_ETHERNET;

use crate::dhcp::DhcpServer;
use crate::error::NetError;

/// Frames queued for one port; past this, frames to it are dropped.
const PORT_QUEUE: usize = 256;
/// How long the switch stays up with no VM on the network.
const IDLE_EXIT: Duration = Duration::from_secs(5);

pub const SOCKET: &str = "switch.sock";
pub const LEASES: &str = "leases.json";
const LOCK: &str = "switch.lock";
const SPAWN_LOCK: &str = "spawn.lock";

type PortId = u64;

struct Port {
    tx: SyncSender<Vec<u8>>,
}

/// One VM's passt on a NAT network: a port of its own, never flooded to.
struct Uplink {
    port: PortId,
    child: sandbox::launcher::Helper,
}

struct State {
    ports: HashMap<PortId, Port>,
    macs: HashMap<[u8; 6], PortId>,
    dhcp: DhcpServer,
    last_port_left: Instant,
    /// The network has a NAT uplink.
    nat: bool,
    /// By VM port: its passt.
    uplinks: HashMap<PortId, Uplink>,
    /// By passt port: the VM it serves.
    owners: HashMap<PortId, PortId>,
    next_port: PortId,
}

impl State {
    fn new_port(&mut self) -> PortId {
        self.next_port += 1;
        self.next_port
    }

    /// Forgets a VM's port and stops its passt.
    fn remove_port(&mut self, id: PortId) {
        self.ports.remove(&id);
        self.macs.retain(|_, p| *p != id);
        if let Some(mut up) = self.uplinks.remove(&id) {
            self.ports.remove(&up.port);
            self.owners.remove(&up.port);
            std::thread::spawn(move || up.child.kill());
        }
    }
}

/// What the switch must do that it cannot under the state's lock.
enum After {
    Nothing,
    /// Start the VM's passt, then forward the frame to it.
    StartUplink,
}

/// Counters the switch keeps (logged when it exits).
#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    flooded: AtomicU64,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An exclusive flock on `path`; `wait` false returns None when it is held elsewhere.
fn flock(path: &Path, wait: bool) -> Result<Option<File>, NetError> {
    let f = File::create(path).map_err(NetError::io(path.display().to_string()))?;
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock on a descriptor owned by `f`; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(NetError::io(path.display().to_string())(e))
    }
}

/// The switch process for network `dir` (its folder): serves until idle.
pub fn run(dir: &Path) -> Result<(), NetError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::create_dir_all(dir).map_err(NetError::io(dir.display().to_string()))?;
    let Some(_running) = flock(&dir.join(LOCK), false)? else {
        return Err(NetError::Switch {
            name,
            reason: "a switch is already running".into(),
        });
    };
    let sock = dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(NetError::io(sock.display().to_string()))?;
    // The socket belongs to whoever owns the network's folder: a jailed monitor's user
    // when root starts jailed VMs on it (connecting needs write access to the socket).
    if let Ok(meta) = std::fs::metadata(dir) {
        use std::os::unix::fs::MetadataExt;
        let _ = std::os::unix::fs::chown(&sock, Some(meta.uid()), Some(meta.gid()));
    }
    let leases_path = dir.join(LEASES);
    let dhcp = std::fs::read(&leases_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<DhcpServer>(&b).ok())
        .filter(|d| d.subnet == crate::dhcp::subnet_for(&name))
        .unwrap_or_else(|| DhcpServer::new(&name));
    let nat = crate::uplink::NetworkConfig::load(dir)?.is_some_and(|c| c.nat);
    let mut dhcp = dhcp;
    dhcp.router = nat;
    tracing::info!(
        "switch for network {name}: {} (DHCP {}/24{})",
        sock.display(),
        dhcp.subnet,
        if nat { ", NAT through passt" } else { "" }
    );
    let state = Arc::new(Mutex::new(State {
        ports: HashMap::new(),
        macs: HashMap::new(),
        dhcp,
        last_port_left: Instant::now(),
        nat,
        uplinks: HashMap::new(),
        owners: HashMap::new(),
        next_port: 0,
    }));
    let counters = Arc::new(Counters::default());
    {
        let (state, counters, sock) = (state.clone(), counters.clone(), sock.clone());
        std::thread::spawn(move || idle_watch(&state, &counters, &sock, &leases_path));
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(id) = attach(&state, &conn) else {
            continue;
        };
        tracing::info!("port {id} joined");
        let (state, counters) = (state.clone(), counters.clone());
        std::thread::spawn(move || {
            read_port(id, conn, &state, &counters);
            let mut s = lock(&state);
            s.remove_port(id);
            if s.ports.is_empty() {
                s.last_port_left = Instant::now();
            }
            tracing::info!("port {id} left");
        });
    }
    Ok(())
}

/// Gives a connection a port: an id, a bounded queue and a thread writing it out.
fn attach(state: &Mutex<State>, conn: &UnixStream) -> std::io::Result<PortId> {
    let writer = conn.try_clone()?;
    let (tx, rx) = sync_channel(PORT_QUEUE);
    let id = {
        let mut s = lock(state);
        let id = s.new_port();
        s.ports.insert(id, Port { tx });
        id
    };
    std::thread::spawn(move || write_port(writer, rx));
    Ok(id)
}

/// Starts VM `vm`'s passt and joins it to the switch as its uplink port.
fn start_uplink(vm: PortId, state: &Arc<Mutex<State>>, counters: &Arc<Counters>) {
    let (gateway, guest) = {
        let s = lock(state);
        if s.uplinks.contains_key(&vm) || !s.ports.contains_key(&vm) {
            return;
        }
        let mac = s.macs.iter().find(|(_, p)| **p == vm).map(|(m, _)| *m);
        (s.dhcp.server_ip(), mac.and_then(|m| s.dhcp.lease_of(&m)))
    };
    let (child, conn) = match crate::uplink::start(gateway, guest) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("port {vm}: no NAT uplink: {e}");
            return;
        }
    };
    let Ok(port) = attach(state, &conn) else {
        return;
    };
    {
        let mut s = lock(state);
        s.owners.insert(port, vm);
        s.uplinks.insert(vm, Uplink { port, child });
    }
    tracing::info!("port {vm}: NAT uplink started (port {port})");
    let (state, counters) = (state.clone(), counters.clone());
    std::thread::spawn(move || {
        read_port(port, conn, &state, &counters);
        // passt went away: forget it (the next frame for the gateway starts another).
        let mut s = lock(&state);
        if s.owners.remove(&port).is_some() {
            s.ports.remove(&port);
            if let Some(mut up) = s.uplinks.remove(&vm) {
                std::thread::spawn(move || up.child.kill());
            }
            tracing::warn!("port {vm}: its NAT uplink stopped");
        }
    });
}

/// Exits the process once no port has been connected for [`IDLE_EXIT`]; writes the
/// leases file every second.
fn idle_watch(state: &Mutex<State>, counters: &Counters, sock: &Path, leases: &Path) {
    let mut written = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let s = lock(state);
        let json = serde_json::to_string_pretty(&s.dhcp).unwrap_or_default();
        if json != written {
            let tmp = leases.with_extension("json.tmp");
            if std::fs::write(&tmp, &json).is_ok() && std::fs::rename(&tmp, leases).is_ok() {
                written = json;
            }
        }
        if s.ports.is_empty() && s.last_port_left.elapsed() > IDLE_EXIT {
            let _ = std::fs::remove_file(sock);
            tracing::info!(
                "no VM left: exiting (frames forwarded {}, flooded {}, dropped {})",
                counters.forwarded.load(Ordering::Relaxed),
                counters.flooded.load(Ordering::Relaxed),
                counters.dropped.load(Ordering::Relaxed)
            );
            std::process::exit(0);
        }
    }
}

fn write_port(mut conn: UnixStream, frames: Receiver<Vec<u8>>) {
    while let Ok(f) = frames.recv() {
        let mut buf = Vec::with_capacity(4 + f.len());
        buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
        buf.extend_from_slice(&f);
        if conn.write_all(&buf).is_err() {
            return;
        }
    }
}

/// Frames from one port, until it goes away or breaks the framing.
fn read_port(
    id: PortId,
    mut conn: UnixStream,
    state: &Arc<Mutex<State>>,
    counters: &Arc<Counters>,
) {
    let mut len = [0u8; 4];
    let mut frame = vec![0u8; MAX_ETHERNET];
    loop {
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        if !(14..=MAX_ETHERNET).contains(&n) {
            tracing::warn!("port {id}: a {n}-byte frame; disconnecting it");
            return;
        }
        if conn.read_exact(&mut frame[..n]).is_err() {
            return;
        }
        let after = forward(id, &frame[..n], &mut lock(state), counters);
        if let After::StartUplink = after {
            start_uplink(id, state, counters);
            forward(id, &frame[..n], &mut lock(state), counters);
        }
    }
}

fn is_multicast(mac: &[u8]) -> bool {
    mac[0] & 1 != 0
}

/// Where one frame goes: from a passt, to its VM; a DHCP reply back; on a NAT network,
/// frames for the gateway to the sender's passt; else the port behind its destination,
/// or every other VM's port.
fn forward(from: PortId, frame: &[u8], s: &mut State, counters: &Counters) -> After {
    if let Some(&vm) = s.owners.get(&from) {
        send(s, vm, frame.to_vec(), counters);
        return After::Nothing;
    }
    let (dst, src): ([u8; 6], [u8; 6]) = match (frame[..6].try_into(), frame[6..12].try_into()) {
        (Ok(d), Ok(s)) => (d, s),
        _ => return After::Nothing,
    };
    if !is_multicast(&src) && src != crate::dhcp::SERVER_MAC {
        s.macs.insert(src, from);
    }
    if let Some(reply) = s.dhcp.handle(frame) {
        send(s, from, reply, counters);
        return After::Nothing;
    }
    if s.nat && crate::uplink::for_gateway(frame, s.dhcp.server_ip()) {
        return match s.uplinks.get(&from) {
            Some(up) => {
                send(s, up.port, frame.to_vec(), counters);
                After::Nothing
            }
            None => After::StartUplink,
        };
    }
    match s.macs.get(&dst) {
        Some(&to) if !is_multicast(&dst) => {
            if to != from {
                counters.forwarded.fetch_add(1, Ordering::Relaxed);
                send(s, to, frame.to_vec(), counters);
            }
        }
        _ => {
            counters.flooded.fetch_add(1, Ordering::Relaxed);
            let others: Vec<PortId> = s
                .ports
                .keys()
                .copied()
                .filter(|p| *p != from && !s.owners.contains_key(p))
                .collect();
            for to in others {
                send(s, to, frame.to_vec(), counters);
            }
        }
    }
    After::Nothing
}

fn send(s: &State, to: PortId, frame: Vec<u8>, counters: &Counters) {
    if let Some(p) = s.ports.get(&to) {
        match p.tx.try_send(frame) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Connects to network `name`'s switch under `networks`, starting one (`exe __switch
/// DIR`) when none runs. Two VMs joining at once start one switch between them.
pub fn connect(networks: &Path, name: &str, exe: &Path) -> Result<UnixStream, NetError> {
    let dir = networks.join(name);
    std::fs::create_dir_all(&dir).map_err(NetError::io(dir.display().to_string()))?;
    let sock = dir.join(SOCKET);
    if let Ok(s) = UnixStream::connect(&sock) {
        return Ok(s);
    }
    let _spawning = flock(&dir.join(SPAWN_LOCK), true)?;
    if let Ok(s) = UnixStream::connect(&sock) {
        return Ok(s);
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("switch.log"))
        .map_err(NetError::io("switch.log"))?;
    let log2 = log.try_clone().map_err(NetError::io("switch.log"))?;
    // In a session of its own: the switch outlives the monitor that started it.
    let mut cmd = sandbox::launcher::HelperCommand::new(exe);
    cmd.arg("__switch")
        .arg(&dir)
        .fd(1, log.into())
        .fd(2, log2.into())
        .new_session();
    let mut child = sandbox::launcher::spawn(cmd).map_err(NetError::io("starting the switch"))?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Ok(s) = UnixStream::connect(&sock) {
            // Reaped by a thread so it leaves no zombie; it runs on after we exit.
            std::thread::spawn(move || child.wait());
            return Ok(s);
        }
        if child.exited() {
            return Err(NetError::Switch {
                name: name.to_string(),
                reason: format!(
                    "the switch exited; see {}",
                    dir.join("switch.log").display()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill();
    Err(NetError::Switch {
        name: name.to_string(),
        reason: "the switch did not start".into(),
    })
}

/// The networks folder under a vessel home.
pub fn networks_dir(home: &Path) -> PathBuf {
    home.join("networks")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0u8; 46]);
        f
    }

    #[test]
    fn learns_floods_unknowns_and_keeps_unicast_private() {
        let (tx1, rx1) = sync_channel(4);
        let (tx2, rx2) = sync_channel(4);
        let (tx3, rx3) = sync_channel(4);
        let mut s = State {
            ports: HashMap::from([
                (1, Port { tx: tx1 }),
                (2, Port { tx: tx2 }),
                (3, Port { tx: tx3 }),
            ]),
            macs: HashMap::new(),
            dhcp: DhcpServer::new("t"),
            last_port_left: Instant::now(),
            nat: false,
            uplinks: HashMap::new(),
            owners: HashMap::new(),
            next_port: 3,
        };
        let c = Counters::default();
        let (a, b) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        // Unknown destination: flooded to the other two.
        forward(1, &frame(b, a), &mut s, &c);
        assert!(rx2.try_recv().is_ok() && rx3.try_recv().is_ok() && rx1.try_recv().is_err());
        // b answers: a is known, so only port 1 hears it.
        forward(2, &frame(a, b), &mut s, &c);
        assert!(rx1.try_recv().is_ok());
        assert!(rx3.try_recv().is_err(), "a unicast reached a bystander");
        // A full queue drops, and counts.
        for _ in 0..10 {
            forward(2, &frame(a, b), &mut s, &c);
        }
        assert_eq!(c.dropped.load(Ordering::Relaxed), 6);
        // DHCP is answered by the switch, to the asker only.
        for rx in [&rx1, &rx2, &rx3] {
            while rx.try_recv().is_ok() {}
        }
        let c3 = [2, 0, 0, 0, 0, 0xc];
        forward(3, &crate::dhcp::tests::request(c3, 1, &[]), &mut s, &c);
        let reply = rx3.try_recv().expect("a DHCP offer");
        assert_eq!(reply[6..12], crate::dhcp::SERVER_MAC);
        assert!(rx1.try_recv().is_err() && rx2.try_recv().is_err());
    }
}
