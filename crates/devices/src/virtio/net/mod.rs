//! virtio-net over a TAP interface or a stream socket to passt or vessel's switch (any
//! [`NetBackend`]): one receive and one transmit queue, the 12-byte virtio 1.x header
//! passed through to backends that take it (TAP: checksum and TSO offloads), mergeable
//! receive buffers, the link status the backend reports, frame and byte counters.

mod config;
mod stream;
mod tap;

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::EventSet;

pub use config::{
    Attachment, MAX_NETWORK_NAME, NetConfig, PortForward, Protocol, format_mac, generated_mac,
    parse_mac,
};
pub use stream::{MAX_ETHERNET, StreamBackend};
pub use tap::Tap;

use super::chain::{Chain, Cursor, Segment, UsedRing, pop, pop_all};
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, finish, read_config_bytes,
};
use crate::virtio::publish_and_rearm;
use crate::virtio::rate_limit::{QueueThrottle, RateLimiter, Throttling};

/// Feature bits (virtio 1.x, 5.1.3).
pub mod feature_bits {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: u64 = 10;
/// The largest frame with its header: a 64 KiB GSO packet plus Ethernet and VLAN.
pub const MAX_FRAME: usize = HEADER_LEN + 65535 + 14 + 4;
pub const QUEUE_SIZE: u16 = 256;
/// The most a rate-limited NIC holds back for the guest.
const RX_BACKLOG_BYTES: usize = 4 << 20;
const RX: usize = 0;
const TX: usize = 1;
const LINK_UP: u16 = 1;
/// The offloads a backend that takes the virtio header passes through.
const OFFLOADS: u64 = feature_bits::CSUM
    | feature_bits::GUEST_CSUM
    | feature_bits::GUEST_TSO4
    | feature_bits::GUEST_TSO6
    | feature_bits::GUEST_ECN
    | feature_bits::HOST_TSO4
    | feature_bits::HOST_TSO6
    | feature_bits::HOST_ECN;

/// Frames and bytes each way, and frames dropped, for one NIC.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Received frames the guest had no room for, or that did not fit its buffers.
    pub rx_dropped: AtomicU64,
    /// Sent frames the backend could not take (a full queue, no peer).
    pub tx_dropped: AtomicU64,
}

impl NetCounters {
    fn count(frames: &AtomicU64, bytes: &AtomicU64, len: usize) {
        frames.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Where frames go and come from. Every frame starts with the 12-byte header.
pub trait NetBackend: Send + Sync + 'static {
    /// Readable (edge-triggered is fine) when a frame can be received.
    fn as_raw_fd(&self) -> RawFd;
    /// One frame into `buf`; `WouldBlock` when there is none.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// One frame out.
    fn send(&self, frame: &[u8]) -> io::Result<usize>;
    /// The guest accepts what the negotiated GUEST_* bits say; the backend must not
    /// hand it anything else (partial checksums, GSO frames).
    fn set_offloads(&self, guest_features: u64) -> io::Result<()>;
    /// Whether the backend takes and gives partial checksums and GSO frames (else the
    /// device offers the guest no offloads, and frames carry a zero header).
    fn offloads(&self) -> bool {
        true
    }
    /// Whether every frame it delivers has correct checksums already (what a peer that
    /// takes only complete frames, and computes its own, gives): the device then offers
    /// GUEST_CSUM and marks frames DATA_VALID, and the guest skips verifying them.
    fn rx_checksums_valid(&self) -> bool {
        false
    }
    /// The link status the device reports.
    fn link_up(&self) -> bool {
        true
    }
}

pub struct VirtioNet {
    backend: Arc<dyn NetBackend>,
    mac: [u8; 6],
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
    /// Rate limits on what the guest receives and sends, with what they held back.
    limits: [Option<(RateLimiter, Arc<Throttling>)>; 2],
}

impl VirtioNet {
    /// A NIC with MAC `mac` on `backend`, counting into `counters` (shared with the
    /// backend, which counts what it drops).
    pub fn new(backend: Arc<dyn NetBackend>, mac: [u8; 6], counters: Arc<NetCounters>) -> Self {
        VirtioNet {
            backend,
            mac,
            counters,
            worker: None,
            limits: [None, None],
        }
    }

    /// Limits what the guest receives (`rx`) and sends (`tx`).
    pub fn set_rate_limiters(&mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) {
        self.limits = [rx, tx].map(|l| l.map(|l| (l, Arc::default())));
    }

    /// Throttling of (rx, tx), where limited.
    pub fn throttling(&self) -> [Option<Arc<Throttling>>; 2] {
        self.limits
            .each_ref()
            .map(|l| l.as_ref().map(|(_, t)| t.clone()))
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// mac, status, max_virtqueue_pairs.
    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.backend.link_up() { LINK_UP } else { 0 };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioNet {
    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        use feature_bits::*;
        let offloads = if self.backend.offloads() {
            OFFLOADS
        } else if self.backend.rx_checksums_valid() {
            GUEST_CSUM
        } else {
            0
        };
        features::COMMON | MAC | MRG_RXBUF | STATUS | offloads
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let n = a.queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(a.queues) else {
            return Err(ActivateError::Queues(n));
        };
        self.backend
            .set_offloads(a.features)
            .map_err(|e| ActivateError::Backend(format!("setting offloads: {e}")))?;
        let handler = NetQueues::new(
            a.mem,
            rx,
            tx,
            self.backend.clone(),
            a.interrupt.clone(),
            a.features,
        )
        .with_counters(self.counters.clone());
        let mut handler = handler;
        for (queue, limit) in self.limits.iter().enumerate() {
            if let Some((l, t)) = limit {
                handler.throttle[queue] =
                    Some(QueueThrottle::new(l.clone(), t.clone()).map_err(ActivateError::Worker)?);
            }
        }
        self.worker = Some(
            Worker::spawn(
                "virtio-net",
                sandbox::ThreadClass::Net,
                handler,
                a.queue_events,
                a.interrupt,
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn announce(&mut self) {
        // As QEMU does after a migration: reverse ARP requests from the guest's MAC,
        // which every switch on the way learns from (the guest's IP is not known here),
        // in rounds: a bridge port that has only just come up may drop the first.
        let frame = rarp_announcement(self.mac);
        let backend = self.backend.clone();
        let mac = self.mac;
        let spawned = std::thread::Builder::new()
            .name("nic-announce".into())
            .spawn(move || {
                for wait_ms in ANNOUNCE_ROUNDS_MS {
                    std::thread::sleep(std::time::Duration::from_millis(wait_ms));
                    if let Err(e) = backend.send(&frame) {
                        tracing::debug!("virtio-net: announcing {mac:02x?}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("virtio-net: cannot announce: {e}");
        }
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        if let Err(e) = self.backend.set_offloads(0) {
            tracing::debug!("virtio-net: clearing offloads: {e}");
        }
    }
}

/// When a NIC announces itself after a restore: the waits before each frame.
const ANNOUNCE_ROUNDS_MS: [u64; 5] = [0, 50, 100, 150, 200];

/// A broadcast RARP request (RFC 903) from `mac`, behind a zero virtio-net header,
/// padded to Ethernet's 60-byte minimum.
fn rarp_announcement(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, request reverse
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(HEADER_LEN + 60, 0);
    f
}

/// What became of one received frame.
enum Delivery {
    Delivered,
    /// Not enough receive buffers: keep the frame until the driver adds some.
    NoBuffers,
    Dropped,
}

/// The two queues and the backend: what the worker thread runs.
pub struct NetQueues<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    backend: Arc<dyn NetBackend>,
    interrupt: Arc<VirtioInterrupt>,
    mergeable: bool,
    chain: Chain,
    heads: Vec<u16>,
    rx_used: UsedRing,
    tx_used: UsedRing,
    /// A received frame waiting for buffers.
    pending: Option<usize>,
    /// Frames taken from the backend while the receive rate limit holds the queue, so
    /// that the peer (passt drops what its socket cannot take) is not made to drop
    /// them: the limit shapes, it does not police. Bounded by [`RX_BACKLOG_BYTES`].
    backlog: VecDeque<Vec<u8>>,
    backlog_bytes: usize,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The first receive buffer of the frame being delivered.
    first: Vec<Segment>,
    counters: Arc<NetCounters>,
    /// Rate limits on the receive and transmit queues.
    throttle: [Option<QueueThrottle>; 2],
}

impl<M: GuestMemory> NetQueues<M> {
    pub fn new(
        mem: M,
        rx: Queue,
        tx: Queue,
        backend: Arc<dyn NetBackend>,
        interrupt: Arc<VirtioInterrupt>,
        features: u64,
    ) -> Self {
        NetQueues {
            mem,
            rx_used: UsedRing::new(&rx),
            tx_used: UsedRing::new(&tx),
            rx,
            tx,
            backend,
            interrupt,
            mergeable: features & feature_bits::MRG_RXBUF != 0,
            chain: Chain::new(),
            heads: Vec::new(),
            pending: None,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            first: Vec::new(),
            counters: Arc::default(),
            throttle: [None, None],
        }
    }

    pub fn with_counters(mut self, counters: Arc<NetCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Frames from the backend into receive buffers, while both last.
    pub fn receive(&mut self) -> Result<(), DeviceError> {
        if !self.rx.ready() {
            return Ok(());
        }
        let served = self.serve_rx();
        self.rx_used.clear(); // a frame cut short by an error is not published
        finish(
            &mut self.rx_used,
            &mut self.rx,
            &self.mem,
            &self.interrupt,
            RX,
        )?;
        served
    }

    fn serve_rx(&mut self) -> Result<(), DeviceError> {
        loop {
            let len = match self.pending {
                Some(len) => len,
                None if !self.backlog.is_empty() => {
                    let frame = self.backlog.pop_front().unwrap_or_default();
                    self.backlog_bytes -= frame.len();
                    self.rx_buf[..frame.len()].copy_from_slice(&frame);
                    self.pending = Some(frame.len());
                    frame.len()
                }
                None => match self.backend.recv(&mut self.rx_buf) {
                    // End of file: the backend went away; nothing more will come.
                    Ok(0) => return Ok(()),
                    Ok(len) if len < HEADER_LEN => {
                        tracing::debug!("virtio-net: {len}-byte frame from the backend dropped");
                        continue;
                    }
                    Ok(len) => {
                        self.pending = Some(len);
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: receive from the backend failed: {e}");
                        return Ok(());
                    }
                },
            };
            if let Some(t) = &mut self.throttle[RX]
                && !t.admit((len - HEADER_LEN) as u64)
            {
                // The frame waits in `pending` for the timer, the ones behind it in
                // the backlog.
                self.stash();
                return Ok(());
            }
            match self.deliver(len)? {
                Delivery::NoBuffers => return Ok(()),
                Delivery::Delivered => {
                    self.pending = None;
                    let c = &self.counters;
                    NetCounters::count(&c.rx_frames, &c.rx_bytes, len - HEADER_LEN);
                    self.rx_used
                        .publish(&mut self.rx, &self.mem)
                        .map_err(|reason| DeviceError::Ring { queue: RX, reason })?;
                }
                Delivery::Dropped => {
                    self.pending = None;
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// While the receive limit holds the queue: frames from the backend into the
    /// backlog, while it has room (past it they are dropped and counted).
    fn stash(&mut self) {
        // `rx_buf` holds the pending frame: read into the transmit buffer's room.
        let buf = &mut self.tx_buf;
        buf.resize(MAX_FRAME, 0);
        loop {
            match self.backend.recv(buf) {
                Ok(0) => return,
                Ok(len) if len < HEADER_LEN => {}
                Ok(len) if self.backlog_bytes + len > RX_BACKLOG_BYTES => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(len) => {
                    self.backlog_bytes += len;
                    self.backlog.push_back(buf[..len].to_vec());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn deliver(&mut self, len: usize) -> Result<Delivery, DeviceError> {
        let chain_err = |source| DeviceError::Chain { queue: RX, source };
        let start = self.rx.next_avail();
        let num_buffers: u16 = if self.mergeable { 0 } else { 1 };
        self.rx_buf[NUM_BUFFERS_OFFSET as usize..HEADER_LEN]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut done = 0;
        let mut buffers = 0u16;
        while done < len {
            let Some(head) = pop(&mut self.rx, &self.mem).map_err(chain_err)? else {
                // Out of buffers: ask the driver to tell us when it adds some.
                if self
                    .rx
                    .enable_notification(&self.mem)
                    .map_err(|e| DeviceError::ring(RX, e))?
                {
                    continue;
                }
                self.rx.set_next_avail(start);
                self.rx_used.clear();
                return Ok(Delivery::NoBuffers);
            };
            self.chain
                .walk(&self.mem, &self.rx, head)
                .map_err(chain_err)?;
            if !self.chain.readable.is_empty() {
                return Err(DeviceError::direction(RX, head, "device-readable"));
            }
            if buffers == 0 {
                if self.chain.writable_len() < HEADER_LEN as u64 {
                    return Err(DeviceError::Request {
                        queue: RX,
                        reason: format!(
                            "receive buffer (head {head}) is smaller than the {HEADER_LEN}-byte header"
                        ),
                    });
                }
                self.first.clear();
                self.first.extend_from_slice(&self.chain.writable);
            }
            let n = Cursor::new(&self.chain.writable).write(&self.mem, &self.rx_buf[done..len]);
            self.rx_used.push(head, n as u32);
            buffers += 1;
            done += n;
            if !self.mergeable {
                break;
            }
        }
        if done < len {
            // Without mergeable buffers one buffer must hold the frame; the driver
            // posts big enough ones for what it negotiated, so this frame is not for it.
            tracing::debug!("virtio-net: {len}-byte frame does not fit a receive buffer");
            self.rx.set_next_avail(start);
            self.rx_used.clear();
            return Ok(Delivery::Dropped);
        }
        if self.mergeable {
            let mut c = Cursor::new(&self.first);
            c.skip(NUM_BUFFERS_OFFSET);
            c.write(&self.mem, &buffers.to_le_bytes());
        }
        Ok(Delivery::Delivered)
    }

    /// Frames from the transmit queue to the backend.
    pub fn transmit(&mut self) -> Result<(), DeviceError> {
        if !self.tx.ready() {
            return Ok(());
        }
        let served = self.serve_tx();
        finish(
            &mut self.tx_used,
            &mut self.tx,
            &self.mem,
            &self.interrupt,
            TX,
        )?;
        served
    }

    fn serve_tx(&mut self) -> Result<(), DeviceError> {
        let chain_err = |source| DeviceError::Chain { queue: TX, source };
        loop {
            self.tx
                .disable_notification(&self.mem)
                .map_err(|e| DeviceError::ring(TX, e))?;
            pop_all(&mut self.tx, &self.mem, &mut self.heads).map_err(chain_err)?;
            for i in 0..self.heads.len() {
                let head = self.heads[i];
                self.chain
                    .walk(&self.mem, &self.tx, head)
                    .map_err(chain_err)?;
                if !self.chain.writable.is_empty() {
                    return Err(DeviceError::direction(TX, head, "device-writable"));
                }
                let len = self.chain.readable_len() as usize;
                if let Some(t) = &mut self.throttle[TX]
                    && !t.admit(len.saturating_sub(HEADER_LEN) as u64)
                {
                    // This frame and the ones after it go back to the ring until the
                    // timer fires.
                    let back = (self.heads.len() - i) as u16;
                    self.tx
                        .set_next_avail(self.tx.next_avail().wrapping_sub(back));
                    return Ok(());
                }
                if (HEADER_LEN..=MAX_FRAME).contains(&len) {
                    self.tx_buf.resize(len, 0);
                    if Cursor::new(&self.chain.readable).read(&self.mem, &mut self.tx_buf) {
                        let c = &self.counters;
                        match self.backend.send(&self.tx_buf) {
                            Ok(_) => {
                                NetCounters::count(&c.tx_frames, &c.tx_bytes, len - HEADER_LEN)
                            }
                            Err(e) => {
                                c.tx_dropped.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!("virtio-net: frame not sent: {e}");
                            }
                        }
                    }
                } else {
                    tracing::debug!("virtio-net: {len}-byte transmit buffer dropped");
                }
                self.tx_used.push(head, 0);
            }
            if !publish_and_rearm(&mut self.tx_used, &mut self.tx, &self.mem, &self.mem, TX)? {
                return Ok(());
            }
        }
    }
}

impl<M: GuestMemoryShared> NetQueues<M> {
    /// Whether queue `q` waits for its rate limit's timer (nothing else moves it then).
    fn throttled(&self, q: usize) -> bool {
        self.throttle[q]
            .as_ref()
            .is_some_and(QueueThrottle::waiting)
    }

    fn run_queue(&mut self, q: usize) -> Result<(), DeviceError> {
        match q {
            RX => self.receive(),
            _ => self.transmit(),
        }
    }
}

impl<M: GuestMemoryShared> QueueHandler for NetQueues<M> {
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RX | TX if self.throttled(index) => Ok(()),
            RX | TX => self.run_queue(index),
            _ => Ok(()),
        }
    }

    /// The backend, then each rate-limited queue's timer.
    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        let mut fds = vec![(
            self.backend.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )];
        fds.extend(
            self.throttle
                .iter()
                .flatten()
                .map(|t| (t.timer_fd(), EventSet::IN)),
        );
        fds
    }

    fn fd_ready(&mut self, which: usize, _events: EventSet) -> Result<(), DeviceError> {
        if which == 0 {
            if self.throttled(RX) {
                self.stash();
                return Ok(());
            }
            return self.receive();
        }
        // The n-th timer among the limited queues.
        let q = (0..2)
            .filter(|&q| self.throttle[q].is_some())
            .nth(which - 1)
            .unwrap_or(RX);
        if let Some(t) = &mut self.throttle[q] {
            t.timer_expired();
        }
        self.run_queue(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_is_a_broadcast_rarp_from_the_guests_mac() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_announcement(mac);
        let eth = &f[HEADER_LEN..];
        assert_eq!(eth.len(), 60);
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3], "opcode: request reverse");
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
    }
}
