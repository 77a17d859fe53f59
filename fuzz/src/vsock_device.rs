//! The virtio-vsock device's three queues (receive 0, transmit 1, event 2) as a guest
//! driver fills them, served by the device's own queue handler (what its worker runs)
//! in this thread, with its muxer's host side on real Unix sockets: a listener at
//! `<socket>_5000` accepts the guest's connections, host programs connect with
//! `CONNECT <port>`, write, read, shut down and close. (`vsock_packets` feeds packets
//! to the muxer directly; this target reaches it the way a guest does.)
//!
//! Checked after every step, besides where the device writes (see [`crate::driver`]):
//! - transmit: every chain offered since the last step is used, in order, with length
//!   0, up to the first the device must refuse (a walk error, a device-writable
//!   buffer), and the device fails on the transmit queue exactly then;
//! - receive: the used buffers are the offered ones, in order; each was
//!   device-writable only and held at least a header; its used length is the header
//!   and the payload; the header is the host's (CIDs, stream type, an operation, the
//!   buffer vessel announces, a payload within the buffer, within 64 KiB, and for data
//!   within the credit the guest's packets gave);
//! - the bytes each way arrive in order and unaltered: what a host program reads is
//!   what the guest's data packets (on connections the model holds) carried, what the
//!   guest receives is what the host program wrote;
//! - events: a new device owes the driver one TRANSPORT_RESET: the first event buffer
//!   offered gets it (as much of the 4 bytes as fits), and no buffer after it.
//!
//! A step where the device fails, or whose receive buffers overlap each other, the
//! rings or the descriptors, ends with a device reset (the muxer forgets its
//! connections; the model too).
//!
//! Input: the three queue sizes, flags (bit 0 EVENT_IDX), then operations: the
//! driver's (see [`crate::driver`]), 6 notify receive, 7 notify transmit, 8 notify
//! event, 9 the host sockets have news, 10 a packet (see [`packet`]), 11 receive
//! buffers (first u8, count u8 (1-4), size u8 from [`RX_SIZES`]), 12 a host program
//! acts (action u8, who u8, amount u8), 13 device reset.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use devices::interrupt::NoMsi;
use devices::virtio::vsock::muxer::BUF_ALLOC;
use devices::virtio::vsock::packet::{
    EVENT_TRANSPORT_RESET, HEADER_LEN, HOST_CID, Header, MAX_PAYLOAD, SHUTDOWN_SEND, TYPE_STREAM,
    op,
};
use devices::virtio::vsock::{VirtioVsock, VsockConfig, VsockQueues};
use devices::virtio::{
    Chain, DeviceError, QueueHandler, VirtioDevice, VirtioInterrupt, chain::Cursor,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::driver::{DRIVER_OPS, F_NEXT, F_WRITE, GuestDriver, address, queue_size, ranges};
use crate::ops::{Ops, Program};
use crate::sandbox;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const GUEST_CID: u64 = 3;
/// The host port with a listener.
const PORT: u32 = 5000;
const NOTIFY_RX: u8 = DRIVER_OPS;
const NOTIFY_TX: u8 = DRIVER_OPS + 1;
const NOTIFY_EVENT: u8 = DRIVER_OPS + 2;
const HOST_EVENTS: u8 = DRIVER_OPS + 3;
const PACKET: u8 = DRIVER_OPS + 4;
const RX_BUFFERS: u8 = DRIVER_OPS + 5;
const HOST: u8 = DRIVER_OPS + 6;
const OPS: u8 = DRIVER_OPS + 8;
/// Receive buffer sizes: room for a header and some payload, for the header alone, for
/// less than a header, for the largest packet.
pub const RX_SIZES: [u32; 8] = [
    HEADER_LEN as u32 + 64,
    HEADER_LEN as u32 + 512,
    HEADER_LEN as u32 + 4096,
    HEADER_LEN as u32,
    HEADER_LEN as u32 + 1,
    16,
    HEADER_LEN as u32 + MAX_PAYLOAD,
    HEADER_LEN as u32 + 1500,
];

/// What a run did, for the seeds' test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockDeviceStats {
    pub accepted: usize,
    pub host_initiated: usize,
    pub bytes_to_host: usize,
    pub bytes_to_guest: usize,
    pub packets_to_guest: usize,
    pub events: usize,
    pub resets: usize,
}

/// A connection as the model follows it.
struct Conn {
    stream: Option<UnixStream>,
    /// Host-initiated ones once the guest accepted.
    established: bool,
    /// Written by the host program, not yet received by the guest.
    to_guest: VecDeque<u8>,
    written: usize,
    host_shut: bool,
    /// Due at the host program (an `OK` line first, for host-initiated ones).
    to_host: VecDeque<u8>,
    /// The guest's credit as its packets gave it, and the data it was sent.
    buf_alloc: u32,
    fwd_cnt: u32,
    rx_cnt: u32,
}

impl Conn {
    fn new(stream: UnixStream, host_initiated: bool) -> Self {
        Conn {
            stream: Some(stream),
            established: !host_initiated,
            to_guest: VecDeque::new(),
            written: 0,
            host_shut: false,
            to_host: VecDeque::new(),
            buf_alloc: 0,
            fwd_cnt: 0,
            rx_cnt: 0,
        }
    }

    fn credit(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }
}

/// (host port, guest port).
type Key = (u32, u32);

struct Vsock {
    driver: GuestDriver,
    device: VirtioVsock,
    queues: VsockQueues<GuestMemoryMmap>,
    event_idx: bool,
    path: PathBuf,
    listener: UnixListener,
    conns: BTreeMap<Key, Conn>,
    /// Host programs that sent `CONNECT <port>`, waiting for the guest's REQUEST.
    connecting: VecDeque<(u32, UnixStream)>,
    junk: VecDeque<UnixStream>,
    /// The next guest port for a new connection (never reused in a run).
    next_port: u32,
    reset_owed: bool,
    next_avail: [u16; 3],
    next_used: [u16; 3],
    stats: VsockDeviceStats,
}

static RUNS: AtomicU64 = AtomicU64::new(0);

fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new("fuzz-vsock", 3, Arc::new(NoMsi), None))
}

/// The queue an error is about.
fn error_queue(e: &DeviceError) -> usize {
    match e {
        DeviceError::Chain { queue, .. }
        | DeviceError::Request { queue, .. }
        | DeviceError::Ring { queue, .. } => *queue,
    }
}

/// A byte a host program writes: its position in the stream, so that one moved, lost
/// or repeated shows.
fn pattern(key: Key, at: usize) -> u8 {
    (at as u32 ^ key.1.wrapping_mul(31) ^ (at >> 8) as u32) as u8
}

impl Vsock {
    fn queues(&self) -> VsockQueues<GuestMemoryMmap> {
        let q = |i| self.driver.queue(i, self.event_idx);
        self.device.queues(
            self.driver.mem.clone(),
            [q(RX), q(TX), q(EVENT)],
            interrupt(),
        )
    }

    fn reset(&mut self) {
        <VirtioVsock as VirtioDevice<GuestMemoryMmap>>::reset(&mut self.device);
        self.driver.reset();
        self.queues = self.queues();
        self.conns.clear();
        // Host programs whose line the muxer had read lost their connection with the
        // others; those it had not still wait for the guest.
        self.connecting.retain(|(_, s)| {
            let mut s: &UnixStream = s;
            matches!(s.read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        });
        self.next_avail = [0; 3];
        self.next_used = [0; 3];
        self.stats.resets += 1;
    }

    /// A notification (or the host sockets' news) handled, then checked.
    fn step(&mut self, what: u8) {
        let before = self.driver.before_step();
        let offered_tx = self.driver.offered_before(TX, self.next_avail[TX]);
        let offered_rx = self.driver.offered_before(RX, self.next_avail[RX]);
        let offered_event = self.driver.offered_before(EVENT, self.next_avail[EVENT]);
        let result = match what {
            NOTIFY_RX => self.queues.queue_notified(RX),
            NOTIFY_TX => self.queues.queue_notified(TX),
            NOTIFY_EVENT => self.queues.queue_notified(EVENT),
            _ => self.host_events(),
        };
        self.driver.check_writes(&before, &[], "virtio-vsock");
        let failed = result.as_ref().err().map(error_queue);
        if what == NOTIFY_TX && !self.transmitted(offered_tx, failed, &before) {
            return self.reset();
        }
        if what == NOTIFY_EVENT && !self.event(offered_event, failed, &before) {
            return self.reset();
        }
        if !self.received(offered_rx, &before) || failed.is_some() {
            return self.reset();
        }
        // The receive queue was served to the end: nothing may wait that could go.
        if what != NOTIFY_EVENT {
            self.check_stall();
        }
    }

    /// What the worker does while the muxer's descriptor is readable (a host program
    /// accepted on one pass has its `CONNECT` line read on the next).
    fn host_events(&mut self) -> Result<(), DeviceError> {
        let fds = self.queues.watched_fds();
        for _ in 0..4 {
            self.queues.fd_ready(0, EventSet::IN)?;
            let mut pfd = libc::pollfd {
                fd: fds[0].0,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the muxer's epoll descriptor, which the
            // handler holds open; no waiting.
            if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
                break;
            }
        }
        Ok(())
    }

    /// The transmit queue after a step: false when the model lost step (a refused
    /// chain, buffers over the rings).
    fn transmitted(
        &mut self,
        offered: Option<Vec<u16>>,
        failed: Option<usize>,
        before: &[u8],
    ) -> bool {
        let Some(heads) = offered else {
            assert_eq!(failed, Some(TX), "an available index past the queue size");
            return false;
        };
        let mut chain = Chain::new();
        let (mut used, mut packets, mut read, mut refused) =
            (Vec::new(), Vec::new(), Vec::new(), false);
        for &head in &heads {
            if !self.driver.walk_before(TX, head, &mut chain) || !chain.writable.is_empty() {
                refused = true;
                break;
            }
            used.push((head, 0));
            read.extend(ranges(&chain.readable));
            let mut cursor = Cursor::new(&chain.readable);
            let mut segs = Vec::new();
            cursor.take(HEADER_LEN as u64, &mut segs);
            let mut raw = Vec::new();
            self.driver
                .read_before(&segs, &mut |b| raw.extend_from_slice(b));
            let Ok(raw) = <[u8; HEADER_LEN]>::try_from(raw) else {
                continue; // shorter than a header: dropped
            };
            let h = Header::parse(&raw);
            if h.check_from_guest(chain.readable_len(), GUEST_CID).is_err() {
                continue;
            }
            let mut segs = Vec::new();
            cursor.take(u64::from(h.len), &mut segs);
            let mut payload = Vec::new();
            self.driver
                .read_before(&segs, &mut |b| payload.extend_from_slice(b));
            packets.push((h, payload));
        }
        if self.driver.touches_metadata(&read, before)
            || !self
                .driver
                .used_ring_trusted(TX, self.next_used[TX], before)
        {
            return false;
        }
        assert_eq!(
            failed == Some(TX),
            refused,
            "virtio-vsock transmit: {failed:?}"
        );
        let (idx, entries) = self.driver.used_since(TX, self.next_used[TX]);
        assert_eq!(entries, used, "virtio-vsock: transmit used ring");
        if refused {
            return false;
        }
        self.next_used[TX] = idx;
        self.next_avail[TX] = self.next_avail[TX].wrapping_add(heads.len() as u16);
        for (h, payload) in packets {
            self.guest_packet(&h, &payload);
        }
        true
    }

    /// A packet the device handed the muxer, into the model.
    fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.buf_alloc = h.buf_alloc;
            c.fwd_cnt = h.fwd_cnt;
        }
        let state = self.conns.get(&key).map(|c| c.established);
        match (h.op, state) {
            (op::REQUEST, None) if key.0 == PORT => {
                let stream = match self.listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => panic!("accept: {e}"),
                };
                stream.set_nonblocking(true).expect("a non-blocking stream");
                let mut c = Conn::new(stream, false);
                c.buf_alloc = h.buf_alloc;
                c.fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, c);
                self.stats.accepted += 1;
            }
            (op::RESPONSE, Some(false)) => {
                let c = self.conns.get_mut(&key).expect("a key of the model");
                c.established = true;
                c.to_host.extend(format!("OK {}\n", key.0).as_bytes());
            }
            (op::RW, Some(true)) => {
                let c = self.conns.get_mut(&key).expect("a key of the model");
                c.to_host.extend(payload);
            }
            (op::RST, Some(_)) => {
                self.conns.remove(&key);
            }
            _ => {}
        }
    }

    /// The receive queue after a step: false when the model lost step.
    fn received(&mut self, offered: Option<Vec<u16>>, before: &[u8]) -> bool {
        if !self
            .driver
            .used_ring_trusted(RX, self.next_used[RX], before)
        {
            return false;
        }
        let (idx, entries) = self.driver.used_since(RX, self.next_used[RX]);
        if entries.is_empty() {
            return true;
        }
        let offered = offered.expect("receive buffers used from a ring the driver broke");
        assert!(
            entries.len() <= offered.len(),
            "virtio-vsock: {} receive buffers used, {} offered",
            entries.len(),
            offered.len()
        );
        let mut chains = Vec::new();
        let mut segs = Vec::new();
        for (i, &(head, len)) in entries.iter().enumerate() {
            assert_eq!(
                head, offered[i],
                "virtio-vsock: receive buffers out of order"
            );
            let mut chain = Chain::new();
            assert!(
                self.driver.walk_before(RX, head, &mut chain),
                "virtio-vsock: a receive chain that does not walk was used"
            );
            assert!(
                chain.readable.is_empty(),
                "virtio-vsock: a device-readable receive buffer was used"
            );
            assert!(
                chain.writable_len() >= HEADER_LEN as u64 && u64::from(len) <= chain.writable_len(),
                "virtio-vsock: {len} bytes used of a {}-byte receive buffer",
                chain.writable_len()
            );
            segs.extend(ranges(&chain.writable));
            chains.push((chain, len));
        }
        if self.driver.aliased(&segs, before) {
            return false;
        }
        for (chain, len) in &chains {
            let mut bytes = vec![0u8; *len as usize];
            assert!(Cursor::new(&chain.writable).read(&self.driver.mem, &mut bytes));
            self.packet_for_guest(&bytes, chain.writable_len());
        }
        self.next_used[RX] = idx;
        self.next_avail[RX] = self.next_avail[RX].wrapping_add(entries.len() as u16);
        true
    }

    fn packet_for_guest(&mut self, bytes: &[u8], room: u64) {
        let raw: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("a header");
        let h = Header::parse(raw);
        let payload = &bytes[HEADER_LEN..];
        self.stats.packets_to_guest += 1;
        assert_eq!(
            (h.src_cid, h.dst_cid, h.kind),
            (HOST_CID, GUEST_CID, TYPE_STREAM),
            "{h:?}"
        );
        assert_eq!(h.buf_alloc, BUF_ALLOC, "{h:?}");
        assert_eq!(
            h.len as usize,
            payload.len(),
            "virtio-vsock: used length {h:?}"
        );
        assert!(
            u64::from(h.len) + HEADER_LEN as u64 <= room && h.len <= MAX_PAYLOAD,
            "{h:?}"
        );
        assert!(
            matches!(
                h.op,
                op::REQUEST | op::RESPONSE | op::RST | op::SHUTDOWN | op::RW | op::CREDIT_UPDATE
            ),
            "{h:?}"
        );
        assert_eq!(h.op == op::RW, h.len > 0, "{h:?}");
        let key = (h.src_port, h.dst_port);
        match h.op {
            op::REQUEST => {
                let pos = self.connecting.iter().position(|(p, _)| *p == h.dst_port);
                let (_, stream) = self
                    .connecting
                    .remove(pos.expect("a REQUEST no host program asked for"))
                    .expect("a position in the queue");
                assert!(
                    !self.conns.contains_key(&key),
                    "a REQUEST on a connection that exists"
                );
                self.conns.insert(key, Conn::new(stream, true));
                self.stats.host_initiated += 1;
            }
            op::RST => {
                self.conns.remove(&key);
            }
            op::RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    panic!("{h:?} on a connection the model does not hold");
                };
                assert!(
                    c.established,
                    "data before the connection was accepted: {h:?}"
                );
                assert!(h.len <= c.credit(), "{h:?} past the credit {}", c.credit());
                c.rx_cnt = c.rx_cnt.wrapping_add(h.len);
                assert!(
                    payload.len() <= c.to_guest.len(),
                    "more bytes to the guest than the host program wrote"
                );
                for (i, b) in c.to_guest.drain(..payload.len()).enumerate() {
                    assert_eq!(payload[i], b, "a byte to the guest altered ({key:?})");
                }
                self.stats.bytes_to_guest += payload.len();
            }
            op::SHUTDOWN => {
                assert!(h.flags & SHUTDOWN_SEND != 0, "{h:?}");
                if let Some(c) = self.conns.get(&key) {
                    assert!(c.host_shut, "an end before the host program's ({h:?})");
                    assert!(c.to_guest.is_empty(), "an end before all the data ({h:?})");
                }
            }
            _ => {}
        }
    }

    /// The event queue after a step: false when the model lost step.
    fn event(&mut self, offered: Option<Vec<u16>>, failed: Option<usize>, before: &[u8]) -> bool {
        if !self.reset_owed {
            if self
                .driver
                .used_ring_trusted(EVENT, self.next_used[EVENT], before)
            {
                let (_, entries) = self.driver.used_since(EVENT, self.next_used[EVENT]);
                assert!(entries.is_empty(), "virtio-vsock: an event nobody owed");
            }
            return failed != Some(EVENT);
        }
        let Some(heads) = offered else {
            assert_eq!(
                failed,
                Some(EVENT),
                "an available index past the queue size"
            );
            return false;
        };
        let Some(&head) = heads.first() else {
            return failed != Some(EVENT);
        };
        let mut chain = Chain::new();
        if !self.driver.walk_before(EVENT, head, &mut chain) {
            assert_eq!(
                failed,
                Some(EVENT),
                "an event chain that does not walk was used"
            );
            return false;
        }
        // Sent, whatever the model can check of it.
        self.reset_owed = false;
        let segs: Vec<(u64, u64)> = ranges(&chain.writable).collect();
        if self.driver.aliased(&segs, before)
            || !self
                .driver
                .used_ring_trusted(EVENT, self.next_used[EVENT], before)
        {
            return false;
        }
        let n = chain.writable_len().min(4);
        let (idx, entries) = self.driver.used_since(EVENT, self.next_used[EVENT]);
        assert_eq!(entries, [(head, n as u32)], "virtio-vsock: event used ring");
        let mut id = vec![0u8; n as usize];
        assert!(Cursor::new(&chain.writable).read(&self.driver.mem, &mut id));
        assert_eq!(
            id,
            EVENT_TRANSPORT_RESET.to_le_bytes()[..n as usize],
            "virtio-vsock: the event"
        );
        self.stats.events += 1;
        self.next_used[EVENT] = idx;
        self.next_avail[EVENT] = self.next_avail[EVENT].wrapping_add(1);
        failed.is_none()
    }

    /// Nothing the host program wrote waits while the guest has a receive buffer with
    /// room for it (and credit): the device filled buffers while there was data.
    fn check_stall(&self) {
        let Some(offered) = self.driver.offered_before(RX, self.next_avail[RX]) else {
            return;
        };
        if offered.is_empty() {
            return;
        }
        // Only when every offered buffer is plainly usable: walks, writable, room for data.
        let mut chain = Chain::new();
        for &head in &offered {
            let usable = self.driver.walk_before(RX, head, &mut chain)
                && chain.readable.is_empty()
                && chain.writable_len() > HEADER_LEN as u64;
            if !usable {
                return;
            }
        }
        for (key, c) in &self.conns {
            if c.established && c.credit() > 0 && c.stream.is_some() {
                assert!(
                    c.to_guest.is_empty(),
                    "{} bytes from the host program wait with {} receive buffers and {} bytes of credit ({key:?})",
                    c.to_guest.len(),
                    offered.len(),
                    c.credit()
                );
            }
        }
    }

    fn key_at(&self, who: u8) -> Option<Key> {
        (!self.conns.is_empty()).then(|| {
            *self
                .conns
                .keys()
                .nth(usize::from(who) % self.conns.len())
                .expect("a key")
        })
    }

    /// A host program acts: 0 writes `amount * 32` bytes on connection `who`, 1 reads
    /// up to `amount * 256 + 1`, 2 shuts down its writing, 3 closes, 4 connects to guest
    /// port `1024 + amount % 8`, 5 says something that is not a `CONNECT` line.
    fn host(&mut self, action: u8, who: u8, amount: u8) {
        match action % 6 {
            0 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                let Some(s) = c.stream.as_mut().filter(|_| !c.host_shut) else {
                    return;
                };
                let bytes: Vec<u8> = (c.written..c.written + usize::from(amount) * 32)
                    .map(|i| pattern(key, i))
                    .collect();
                if let Ok(n) = s.write(&bytes) {
                    c.written += n;
                    c.to_guest.extend(&bytes[..n]);
                }
            }
            1 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                let Some(s) = c.stream.as_mut() else { return };
                let mut got = vec![0u8; usize::from(amount) * 256 + 1];
                let n = s.read(&mut got).unwrap_or(0);
                for &b in &got[..n] {
                    let due = c.to_host.pop_front();
                    assert_eq!(
                        Some(b),
                        due,
                        "the host program got a byte the guest did not send ({key:?})"
                    );
                }
                self.stats.bytes_to_host += n;
            }
            2 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                if let Some(s) = &c.stream {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    c.host_shut = true;
                }
            }
            3 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                if c.stream.take().is_some() {
                    c.host_shut = true;
                }
            }
            4 => {
                let port = 1024 + u32::from(amount % 8);
                let Ok(mut s) = UnixStream::connect(&self.path) else {
                    return;
                };
                s.write_all(format!("CONNECT {port}\n").as_bytes())
                    .expect("a CONNECT line into an empty socket");
                s.set_nonblocking(true).expect("a non-blocking stream");
                self.connecting.push_back((port, s));
            }
            _ => {
                let Ok(mut s) = UnixStream::connect(&self.path) else {
                    return;
                };
                let junk: [&[u8]; 4] = [b"HELLO\n", b"CONNECT -1\n", b"CONNECT 99999999999\n", b""];
                let _ = s.write_all(junk[usize::from(amount) % junk.len()]);
                if self.junk.len() == 8 {
                    self.junk.pop_front();
                }
                self.junk.push_back(s);
            }
        }
    }
}

/// Operation 10, a packet from the guest on the transmit queue: first (u8, its first
/// descriptor), address (u16, see [`address`]: the header there, the payload right
/// after), shape (u8: bit 0 header and payload in one buffer, bit 1 the header in two,
/// bit 2 the payload device-writable, bit 3 the payload one byte short, bits 4-5 the
/// CIDs: right, the source wrong, the destination wrong, the header's type and
/// operation as the input says), op (u8: 1-7, or at 0xf0 and above that many), conn
/// (u8: bit 7 clear and a connection held, that one; else a new guest port to host
/// port 5000, or with bit 6 to 5001, which has no listener), len (u16: at most 64
/// bytes come from the input, repeated), flags (u8: SHUTDOWN bits, bit 7 a high bit),
/// buf_alloc (u8: 0, 4 KiB, 64 KiB, 256 KiB, 4 GiB - 1, as the input says), fwd_cnt
/// (u8: 0 the data received so far, else a value from the input), then the payload's
/// bytes (count u8, at most 64).
fn packet(v: &mut Vsock, ops: &mut Ops) {
    let first = u16::from(ops.u8());
    let at = address(ops.u16());
    let shape = ops.u8();
    let op_byte = ops.u8();
    let conn = ops.u8();
    let len = u32::from(ops.u16());
    let flags = ops.u8();
    let buf_alloc = ops.u8();
    let fwd = ops.u8();
    let n = usize::from(ops.u8() % 65);
    let pattern = ops.bytes(n);
    let payload: Vec<u8> = if pattern.is_empty() {
        vec![0; len as usize]
    } else {
        pattern.iter().copied().cycle().take(len as usize).collect()
    };
    let key = match v.key_at(conn).filter(|_| conn & 0x80 == 0) {
        Some(k) => k,
        None => {
            v.next_port += 1;
            (if conn & 0x40 != 0 { PORT + 1 } else { PORT }, v.next_port)
        }
    };
    let mut h = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: key.1,
        dst_port: key.0,
        len,
        kind: TYPE_STREAM,
        op: if op_byte >= 0xf0 {
            u16::from(op_byte)
        } else {
            1 + u16::from(op_byte % 7)
        },
        flags: u32::from(flags & 3) | if flags & 0x80 != 0 { 1 << 31 } else { 0 },
        buf_alloc: [0, 4096, 64 << 10, BUF_ALLOC, u32::MAX][usize::from(buf_alloc % 5)],
        fwd_cnt: match fwd {
            0 => v.conns.get(&key).map_or(0, |c| c.rx_cnt),
            f => u32::from(f) << (f % 24),
        },
    };
    match shape >> 4 & 3 {
        1 => h.src_cid = GUEST_CID + 1,
        2 => h.dst_cid = GUEST_CID,
        3 => (h.kind, h.op) = (u16::from(op_byte), u16::from(conn)),
        _ => {}
    }
    let mem = &v.driver.mem;
    let _ = mem.write_slice(&h.to_bytes(), GuestAddress(at));
    let payload_at = at.wrapping_add(HEADER_LEN as u64);
    let _ = mem.write_slice(&payload, GuestAddress(payload_at));
    let mut plen = len;
    if shape & 8 != 0 {
        plen = plen.saturating_sub(1);
    }
    // (address, length, device-writable)
    let mut bufs: Vec<(u64, u32, bool)> = Vec::new();
    if shape & 1 != 0 {
        bufs.push((at, HEADER_LEN as u32 + plen, false));
    } else {
        if shape & 2 != 0 {
            bufs.push((at, 20, false));
            bufs.push((at.wrapping_add(20), HEADER_LEN as u32 - 20, false));
        } else {
            bufs.push((at, HEADER_LEN as u32, false));
        }
        if plen > 0 {
            bufs.push((payload_at, plen, shape & 4 != 0));
        }
    }
    chain(&mut v.driver, TX, first, &bufs);
}

/// Buffers from `first` on, linked, offered on queue `q`.
fn chain(driver: &mut GuestDriver, q: usize, first: u16, bufs: &[(u64, u32, bool)]) {
    let size = driver.size(q);
    for (i, &(addr, len, write)) in bufs.iter().enumerate() {
        let index = first + i as u16;
        let mut flags = if write { F_WRITE } else { 0 };
        if i + 1 < bufs.len() {
            flags |= F_NEXT;
        }
        driver.write_desc(q, index, addr, len, flags, (index + 1) % size);
    }
    driver.offer(q, first % size);
}

/// Operation 11: `count` receive buffers of one size, each its own chain, from
/// descriptor `first` on, in slots of 0x300 bytes (0x1800 for larger buffers) between
/// 0x1000 and 0x4000 by descriptor index.
fn rx_buffers(v: &mut Vsock, ops: &mut Ops) {
    let first = u16::from(ops.u8());
    let count = 1 + u16::from(ops.u8() % 4);
    let size = RX_SIZES[usize::from(ops.u8() % 8)];
    let stride: u16 = if size <= 0x300 { 0x300 } else { 0x1800 };
    for i in 0..count {
        let slot = (first + i) % (0x3000 / stride);
        let at = 0x1000 + u64::from(slot * stride);
        chain(&mut v.driver, RX, first + i, &[(at, size, true)]);
    }
}

pub fn vsock_device(data: &[u8]) {
    vsock_device_stats(data);
}

pub fn vsock_device_stats(data: &[u8]) -> VsockDeviceStats {
    sandbox::ignore_sigpipe();
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let path = sandbox::dir().join(format!("d{n}"));
    let listener_path = PathBuf::from(format!("{}_{PORT}", path.display()));
    let mut ops = Ops::new(data);
    let sizes = [
        queue_size(ops.u8()),
        queue_size(ops.u8()),
        queue_size(ops.u8()),
    ];
    let event_idx = ops.u8() & 1 != 0;
    let driver = GuestDriver::new(&sizes);
    let config = VsockConfig {
        cid: GUEST_CID,
        socket: path.clone(),
    };
    let device = VirtioVsock::new(&config).expect("a vsock device on a fresh socket");
    let mut cid = [0u8; 8];
    <VirtioVsock as VirtioDevice<GuestMemoryMmap>>::read_config(&device, 0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let listener = UnixListener::bind(&listener_path).expect("a host listener");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let q = |i| driver.queue(i, event_idx);
    let queues = device.queues(driver.mem.clone(), [q(RX), q(TX), q(EVENT)], interrupt());
    let mut v = Vsock {
        driver,
        device,
        queues,
        event_idx,
        path: path.clone(),
        listener,
        conns: BTreeMap::new(),
        connecting: VecDeque::new(),
        junk: VecDeque::new(),
        next_port: 1023 + 16,
        reset_owed: true,
        next_avail: [0; 3],
        next_used: [0; 3],
        stats: VsockDeviceStats::default(),
    };
    while ops.next_op() {
        match ops.u8() % OPS {
            k if k < DRIVER_OPS => v.driver.op(k, &mut ops),
            k @ (NOTIFY_RX | NOTIFY_TX | NOTIFY_EVENT | HOST_EVENTS) => v.step(k),
            PACKET => packet(&mut v, &mut ops),
            RX_BUFFERS => rx_buffers(&mut v, &mut ops),
            HOST => {
                let (action, who, amount) = (ops.u8(), ops.u8(), ops.u8());
                v.host(action, who, amount);
            }
            _ => v.reset(),
        }
    }
    let stats = v.stats;
    drop(v);
    let _ = std::fs::remove_file(&listener_path);
    assert!(!path.exists(), "the device's socket outlives it");
    stats
}

/// Operations for seeds.
pub struct Seed(Program);

impl Seed {
    /// Queue sizes of 16, EVENT_IDX as given.
    pub fn new(event_idx: bool) -> Self {
        let mut p = Program::default();
        p.u8(4).u8(4).u8(4).u8(u8::from(event_idx));
        Seed(p)
    }

    pub fn notify(&mut self, what: u8) -> &mut Self {
        self.0.u8(what);
        self
    }

    pub fn rx(&mut self, first: u8, count: u8, size: u8) -> &mut Self {
        self.0.u8(RX_BUFFERS).u8(first).u8(count - 1).u8(size);
        self
    }

    pub fn host(&mut self, action: u8, who: u8, amount: u8) -> &mut Self {
        self.0.u8(HOST).u8(action).u8(who).u8(amount);
        self
    }

    /// A well-formed packet on connection `conn` (see [`packet`]).
    pub fn packet(&mut self, first: u8, op: u16, conn: u8, payload: &[u8]) -> &mut Self {
        self.0
            .u8(PACKET)
            .u8(first)
            .u16(0x4000 + 0x200 * u16::from(first % 16))
            .u8(0)
            .u8((op - 1) as u8)
            .u8(conn)
            .u16(payload.len() as u16)
            .u8(if op == op::SHUTDOWN { 3 } else { 0 })
            .u8(3)
            .u8(0)
            .u8(payload.len().min(64) as u8)
            .bytes(&payload[..payload.len().min(64)]);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.0.clone()
    }
}

/// A Linux guest's traffic: event and receive buffers posted at probe (the event
/// answered with TRANSPORT_RESET), a guest program connecting to the host's port 5000,
/// both sides talking, closing; a host program connecting to the guest (as `vessel
/// exec` does), the guest answering, data both ways with the guest's buffers of
/// several sizes; then a device reset with a connection open.
pub fn vsock_device_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const NEW: u8 = 0x80;
    let mut g = Seed::new(true);
    g.0.u8(3)
        .u8(EVENT as u8)
        .u8(0)
        .u8(0)
        .u16(0x3000)
        .u16(8)
        .u8(1); // an event buffer
    g.notify(NOTIFY_EVENT)
        .rx(0, 4, 1)
        .notify(NOTIFY_RX)
        .packet(0, op::REQUEST, NEW, &[])
        .notify(NOTIFY_TX)
        .packet(1, op::RW, 0, b"GET / HTTP/1.0\r\n\r\n")
        .notify(NOTIFY_TX)
        .host(1, 0, 4)
        .host(0, 0, 8)
        .notify(HOST_EVENTS)
        .packet(2, op::CREDIT_UPDATE, 0, &[])
        .notify(NOTIFY_TX)
        .host(3, 0, 0)
        .notify(HOST_EVENTS)
        .packet(3, op::SHUTDOWN, 0, &[])
        .notify(NOTIFY_TX);
    let mut h = Seed::new(false);
    h.rx(0, 2, 0)
        .notify(NOTIFY_RX)
        .host(4, 0, 0)
        .notify(HOST_EVENTS)
        .packet(0, op::RESPONSE, 0, &[])
        .notify(NOTIFY_TX)
        .host(1, 0, 1)
        .packet(1, op::RW, 0, b"\x05\x00\x00\x00\x01\x01\x01hi")
        .notify(NOTIFY_TX)
        .host(1, 0, 1)
        .host(0, 0, 40)
        .rx(2, 4, 4)
        .notify(NOTIFY_RX)
        .rx(6, 2, 2)
        .notify(NOTIFY_RX)
        .packet(3, op::RST, 0, &[])
        .notify(NOTIFY_TX)
        .host(5, 0, 1)
        .notify(HOST_EVENTS);
    let mut r = Seed::new(true);
    r.rx(0, 2, 0)
        .notify(NOTIFY_RX)
        .packet(0, op::REQUEST, NEW, &[])
        .packet(1, op::REQUEST, NEW | 0x40, &[])
        .notify(NOTIFY_TX)
        .host(0, 0, 4)
        .notify(HOST_EVENTS)
        .notify(DRIVER_OPS + 7)
        .rx(0, 1, 0)
        .notify(NOTIFY_RX)
        .packet(0, op::RW, NEW, b"after the reset")
        .notify(NOTIFY_TX)
        .notify(NOTIFY_RX);
    vec![
        ("linux-guest-connects", g.bytes()),
        ("linux-host-connects", h.bytes()),
        ("device-reset", r.bytes()),
    ]
}
