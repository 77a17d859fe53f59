//! A network backend over a Unix stream socket in QEMU's `-netdev stream` framing:
//! every Ethernet frame preceded by its length as a 4-byte big-endian number, no virtio
//! header. passt speaks it, and so does vessel's switch for networks between VMs.
//!
//! The peer is a helper process: supervised, not trusted. Its frames are checked
//! (length), a peer that stops reading costs dropped frames (a bounded queue), never a
//! stuck device, and a peer that goes away takes the link down until a new connection
//! is handed over with [`StreamBackend::connect`]. The device's worker waits on the
//! backend's own epoll descriptor, which follows whichever socket is current.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{HEADER_LEN, MAX_FRAME, NetBackend};

/// The longest Ethernet frame (without the virtio header) either side may send.
pub const MAX_ETHERNET: usize = MAX_FRAME - HEADER_LEN;
/// The shortest: an Ethernet header (the switch drops a connection that sends less).
pub const MIN_ETHERNET: usize = 14;
/// Frames waiting to be written to a slow peer; past this, frames are dropped.
const TX_QUEUE: usize = 512;

struct Rx {
    stream: Option<UnixStream>,
    buf: Vec<u8>,
    /// Bytes of `buf` in use.
    len: usize,
}

/// Called when the link goes up or down (the device then interrupts the driver).
pub type LinkNotifier = Box<dyn Fn() + Send + Sync>;

pub struct StreamBackend {
    /// What the device's worker polls: readable when the current socket is.
    epoll: Epoll,
    rx: Mutex<Rx>,
    tx: Mutex<Option<SyncSender<Vec<u8>>>>,
    link: Arc<AtomicBool>,
    /// The current connection's number: a writer thread takes the link down only for
    /// its own connection, not for one that replaced it.
    connection: Arc<Mutex<u64>>,
    notify: Arc<Mutex<Option<LinkNotifier>>>,
    /// The guest negotiated GUEST_CSUM: frames are marked DATA_VALID.
    data_valid: AtomicBool,
    /// Each connection's writer thread and its socket: a replaced connection's writer
    /// still delivers what was queued for it; when the backend goes, every socket is
    /// shut down (a writer may wait on a peer that stopped reading) and every writer
    /// joined.
    writers: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

/// virtio-net header flag: the frame's checksums have been checked (5.1.6.4).
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;

impl StreamBackend {
    /// A backend with no peer yet (link down).
    pub fn new() -> io::Result<Self> {
        Ok(StreamBackend {
            epoll: Epoll::new()?,
            rx: Mutex::new(Rx {
                stream: None,
                buf: vec![0; 4 + MAX_ETHERNET],
                len: 0,
            }),
            tx: Mutex::new(None),
            link: Arc::new(AtomicBool::new(false)),
            connection: Arc::default(),
            notify: Arc::default(),
            data_valid: AtomicBool::new(false),
            writers: Mutex::default(),
        })
    }

    /// Whether a peer is connected (what the device reports as its link status).
    pub fn is_connected(&self) -> bool {
        self.link.load(Ordering::Acquire)
    }

    /// `f` runs whenever the link goes up or down.
    pub fn on_link_change(&self, f: LinkNotifier) {
        *lock(&self.notify) = Some(f);
    }

    fn set_link(&self, up: bool) {
        set_link(&self.link, &self.notify, up);
    }

    /// Hands over a new connection to the peer (the first, or after the old peer died):
    /// frames now go to and come from `stream`.
    pub fn connect(&self, stream: UnixStream) -> io::Result<()> {
        let writer = stream.try_clone()?;
        stream.set_nonblocking(true)?;
        let (tx, frames) = sync_channel::<Vec<u8>>(TX_QUEUE);
        let (link, notify) = (self.link.clone(), self.notify.clone());
        let current = self.connection.clone();
        let number = {
            let mut n = lock(&self.connection);
            *n += 1;
            *n
        };
        let socket = writer.try_clone()?;
        let handle =
            sandbox::thread::spawn(sandbox::ThreadClass::Net, "net-stream-tx", move || {
                write_frames(writer, frames, &link, &notify, (&current, number))
            })?;
        {
            let mut writers = lock(&self.writers);
            writers.retain(|(_, h)| !h.is_finished());
            writers.push((socket, handle));
        }
        let mut rx = lock(&self.rx);
        if let Some(old) = rx.stream.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        rx.stream = Some(stream);
        rx.len = 0;
        *lock(&self.tx) = Some(tx);
        drop(rx);
        self.set_link(true);
        Ok(())
    }

    /// The peer is gone: stop using its socket.
    fn disconnect(&self, rx: &mut Rx) {
        if let Some(old) = rx.stream.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        rx.len = 0;
        *lock(&self.tx) = None;
        self.set_link(false);
    }
}

impl Drop for StreamBackend {
    fn drop(&mut self) {
        *lock(&self.tx) = None;
        for (socket, writer) in std::mem::take(&mut *lock(&self.writers)) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            let _ = writer.join();
        }
    }
}

fn set_link(link: &AtomicBool, notify: &Mutex<Option<LinkNotifier>>, up: bool) {
    if link.swap(up, Ordering::AcqRel) != up
        && let Some(f) = lock(notify).as_ref()
    {
        f();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer thread of one connection (`current`: the number of the backend's
/// current connection; `number`: this one's): frames from the queue to the socket,
/// until either side goes away.
fn write_frames(
    mut stream: UnixStream,
    frames: std::sync::mpsc::Receiver<Vec<u8>>,
    link: &AtomicBool,
    notify: &Mutex<Option<LinkNotifier>>,
    (current, number): (&Mutex<u64>, u64),
) {
    let mut batch = VecDeque::new();
    while let Ok(first) = frames.recv() {
        batch.push_back(first);
        while let Ok(more) = frames.try_recv() {
            batch.push_back(more);
        }
        let buf: Vec<u8> = batch.drain(..).flatten().collect();
        if let Err(e) = write_waiting(&mut stream, &buf) {
            tracing::warn!("virtio-net: the network peer stopped taking frames: {e}");
            // A connection handed over since is not this one's to take down.
            let current = lock(current);
            if *current == number {
                set_link(link, notify, false);
            }
            return;
        }
    }
}

/// Writes all of `buf`, waiting while the peer's socket is full. The socket is
/// non-blocking (the flag belongs to the connection, which the reader shares), so a
/// full socket says WouldBlock: that is the peer being slower than the guest, not the
/// peer going away.
fn write_waiting(stream: &mut UnixStream, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match stream.write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for a socket this thread holds open.
                if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl NetBackend for StreamBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn recv(&self, out: &mut [u8]) -> io::Result<usize> {
        let mut guard = lock(&self.rx);
        let rx = &mut *guard;
        loop {
            if rx.len >= 4 {
                let n = u32::from_be_bytes(rx.buf[..4].try_into().expect("4 bytes")) as usize;
                if n == 0 || n > MAX_ETHERNET {
                    tracing::warn!(
                        "virtio-net: the network peer sent a {n}-byte frame; dropping it"
                    );
                    self.disconnect(rx);
                    return Ok(0);
                }
                if rx.len >= 4 + n {
                    let frame = &rx.buf[4..4 + n];
                    let total = HEADER_LEN + n;
                    // A virtio header with no GSO; DATA_VALID when the guest takes it.
                    out[..HEADER_LEN].fill(0);
                    if self.data_valid.load(Ordering::Relaxed) {
                        out[0] = VIRTIO_NET_HDR_F_DATA_VALID;
                    }
                    out[HEADER_LEN..total].copy_from_slice(frame);
                    rx.buf.copy_within(4 + n..rx.len, 0);
                    rx.len -= 4 + n;
                    return Ok(total);
                }
            }
            let Some(stream) = rx.stream.as_mut() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            // Consume the inner readiness before reading: the device's worker waits for
            // this epoll descriptor to become readable again (edge-triggered).
            let mut events = [EpollEvent::default(); 2];
            let _ = self.epoll.wait(0, &mut events);
            let len = rx.len;
            match stream.read(&mut rx.buf[len..]) {
                Ok(0) => {
                    tracing::warn!("virtio-net: the network peer closed the connection");
                    self.disconnect(rx);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(k) => rx.len += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) => {
                    tracing::warn!("virtio-net: reading from the network peer: {e}");
                    self.disconnect(rx);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // A frame the peer would take for a broken stream (the switch disconnects the
        // port) is dropped here, as an empty one is.
        let Some(eth) = frame
            .get(HEADER_LEN..)
            .filter(|e| (MIN_ETHERNET..=MAX_ETHERNET).contains(&e.len()))
        else {
            return Ok(frame.len());
        };
        let mut buf = Vec::with_capacity(4 + eth.len());
        buf.extend_from_slice(&(eth.len() as u32).to_be_bytes());
        buf.extend_from_slice(eth);
        match lock(&self.tx).as_ref().map(|tx| tx.try_send(buf)) {
            Some(Ok(())) => Ok(frame.len()),
            Some(Err(TrySendError::Full(_))) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the network peer's queue is full",
            )),
            Some(Err(TrySendError::Disconnected(_))) | None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no network peer",
            )),
        }
    }

    fn set_offloads(&self, guest_features: u64) -> io::Result<()> {
        // The peer only takes and gives complete frames: no segmentation offloads. Its
        // frames' checksums are complete (passt computes them; a guest behind the
        // switch has no checksum offload either), which a guest that took GUEST_CSUM
        // is told.
        let valid = guest_features & super::feature_bits::GUEST_CSUM != 0;
        self.data_valid.store(valid, Ordering::Relaxed);
        Ok(())
    }

    fn offloads(&self) -> bool {
        false
    }

    fn rx_checksums_valid(&self) -> bool {
        true
    }

    fn link_up(&self) -> bool {
        self.link.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer slower than the guest: more frames than its socket holds wait for it
    /// (the link stays up), and all of them arrive, in order, once it reads.
    #[test]
    fn a_full_peer_socket_is_waited_for_not_taken_for_a_dead_peer() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let backend = StreamBackend::new().unwrap();
        backend.connect(ours).unwrap();
        const FRAMES: usize = 400;
        let mut frame = vec![0u8; HEADER_LEN + 1500];
        for i in 0..FRAMES {
            frame[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(i as u32).to_be_bytes());
            backend.send(&frame).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(backend.link_up(), "a full socket took the link down");
        let mut got = vec![0u8; FRAMES * (4 + 1500)];
        theirs.read_exact(&mut got).unwrap();
        for (i, f) in got.chunks(4 + 1500).enumerate() {
            assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()), 1500);
            assert_eq!(u32::from_be_bytes(f[4..8].try_into().unwrap()), i as u32);
        }
        assert!(backend.link_up());
    }

    /// A guest's frame shorter than an Ethernet header never reaches the peer (the
    /// switch would drop the VM's port for it); the frames around it do.
    #[test]
    fn runt_frames_are_not_sent() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let backend = StreamBackend::new().unwrap();
        backend.connect(ours).unwrap();
        for len in [MIN_ETHERNET, 1, MIN_ETHERNET - 1, 0, 60] {
            let frame = vec![len as u8; HEADER_LEN + len];
            assert_eq!(backend.send(&frame).unwrap(), frame.len());
        }
        let mut got = vec![0u8; 4 + MIN_ETHERNET + 4 + 60];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got[..4], (MIN_ETHERNET as u32).to_be_bytes());
        assert_eq!(got[4 + MIN_ETHERNET..][..4], 60u32.to_be_bytes());
        theirs.set_nonblocking(true).unwrap();
        assert!(
            theirs.read(&mut [0u8; 1]).is_err(),
            "more than the two frames"
        );
    }

    /// A peer replaced while the old connection's writer still had frames for it (the
    /// old passt died with its socket full, a new one was connected): the old writer's
    /// failure leaves the new connection's link up.
    #[test]
    fn an_old_connections_writer_leaves_the_new_link_alone() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = StreamBackend::new().unwrap();
        backend.connect(ours).unwrap();
        let frame = vec![0u8; HEADER_LEN + 60000];
        for _ in 0..16 {
            backend.send(&frame).unwrap();
        }
        // The writer fills the socket and waits for the peer to read.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (ours, mut new_peer) = UnixStream::pair().unwrap();
        backend.connect(ours).unwrap();
        drop(theirs);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(backend.link_up(), "the old writer took the new link down");
        backend.send(&frame[..HEADER_LEN + 60]).unwrap();
        let mut got = [0u8; 64];
        new_peer.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_be_bytes(got[..4].try_into().unwrap()), 60);
    }
}
