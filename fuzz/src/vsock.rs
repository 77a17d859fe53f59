//! The host side of virtio-vsock as a guest drives it: packets from the guest's transmit
//! queue go through the header checks into a [`Muxer`] (as the device's worker hands
//! them over), and what the muxer has for the guest is drained between packets into
//! receive buffers of a size the input picks. Host programs play along on real Unix
//! sockets: listeners at `<socket>_5000` and `<socket>_5001` accept the guest's
//! connections, programs connect to the device's socket with `CONNECT <port>`, and
//! both write, read, shut down and close their ends, all without blocking.
//!
//! The input is a sequence of records, each `ctl, who, amount, rx`, then a 44-byte
//! header and up to its `len` bytes of payload (clamped to what is left):
//!
//! - `ctl` bits 0-1, the packet's shape: 0 the header as it is; 1 from the guest to the
//!   host (CIDs, stream type, an operation in range, `len` what follows); 2 as 1, to a
//!   port with a listener from one of four guest ports; 3 as 1, on a connection of the
//!   model's (`who`), so packets reach connections whose host port the muxer chose.
//! - `ctl` bits 2-4, what a host program does first: nothing; write `amount * 32` bytes
//!   on connection `who`; read up to `amount * 256 + 1`; shut down its writing; close;
//!   connect to guest port `1024 + amount % 8`; the device is reset; a program says
//!   something that is not a `CONNECT` line.
//! - `ctl` bit 5 (shapes 1-3): the payload repeated to `amount * 256` bytes (64 KiB at
//!   most), so that a small input can fill the guest's credit and the host's socket.
//! - `rx`: the payload room of the guest's receive buffers while draining.
//!
//! Besides the header of every packet for the guest (addresses, type, length, the
//! buffer announced), a model of the connections checks what the muxer promises: the
//! bytes each way arrive in order and unaltered; data goes to the guest only within
//! the credit the guest's packets announce, and all of it goes once the guest has room
//! (a drain that ends with bytes waiting, room and credit is a stall); an end of stream
//! goes to the guest only after the host program ended it; the muxer holds exactly
//! the model's connections.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use devices::virtio::vsock::Muxer;
use devices::virtio::vsock::muxer::{BUF_ALLOC, MAX_CONNECTIONS};
use devices::virtio::vsock::packet::{
    HEADER_LEN, HOST_CID, Header, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op,
};

use crate::sandbox;

const GUEST_CID: u64 = 3;
/// Host ports with a listener.
pub const PORTS: [u32; 2] = [5000, 5001];
/// Bytes before a record's header.
const PREFIX: usize = 4;
/// Packets one drain takes at most (a 1-byte receive buffer against kilobytes written
/// would take thousands); a drain cut short skips the stall check.
const MAX_DRAIN: usize = 256;
/// Host programs kept connected after saying something that is not a `CONNECT` line.
const MAX_JUNK: usize = 8;
/// What such programs say.
const JUNK: [&[u8]; 8] = [
    b"HELLO\n",
    b"CONNECT\n",
    b"CONNECT -1\n",
    b"CONNECT 99999999999\n",
    b"connect 5\n",
    b"CONNECT 7",
    b"99999999999999999999999999999999999999999",
    b"",
];

/// What a run did, for the corpus test (the seeds must reach the data path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    pub packets: usize,
    pub rejected: usize,
    pub accepted: usize,
    pub host_initiated: usize,
    pub bytes_to_guest: usize,
    pub bytes_to_host: usize,
    pub shutdowns: usize,
    pub resets: usize,
    pub credit_updates: usize,
}

/// A connection as the model sees it: the host program's end and what each side sent.
struct Conn {
    /// None once the host program closed it.
    stream: Option<UnixStream>,
    host_initiated: bool,
    /// The muxer's state is Established (host-initiated: after the guest's RESPONSE).
    established: bool,
    /// Host to guest: written by the host program, not yet in a packet.
    to_guest: VecDeque<u8>,
    written: usize,
    /// The host program shut its writing (or closed).
    host_shut: bool,
    host_closed: bool,
    /// A SHUTDOWN went to the guest.
    eof_sent: bool,
    /// The guest's credit as its packets announced it, and the bytes it was sent.
    buf_alloc: u32,
    fwd_cnt: u32,
    rx_cnt: u32,
    /// Guest to host: the bytes due at the host program (the `OK` line first).
    to_host: VecDeque<u8>,
    ok_left: usize,
    guest_sent: u64,
    host_read: u64,
    guest_done: bool,
}

impl Conn {
    fn new(stream: UnixStream, host_initiated: bool, established: bool) -> Self {
        Conn {
            stream: Some(stream),
            host_initiated,
            established,
            to_guest: VecDeque::new(),
            written: 0,
            host_shut: false,
            host_closed: false,
            eof_sent: false,
            buf_alloc: 0,
            fwd_cnt: 0,
            rx_cnt: 0,
            to_host: VecDeque::new(),
            ok_left: 0,
            guest_sent: 0,
            host_read: 0,
            guest_done: false,
        }
    }

    fn credit(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }
}

/// (host port, guest port), the muxer's key.
type Key = (u32, u32);

struct Run {
    muxer: Muxer,
    path: PathBuf,
    listeners: Vec<(u32, UnixListener)>,
    conns: BTreeMap<Key, Conn>,
    /// Host programs that sent `CONNECT <port>`, waiting for the REQUEST to the guest.
    connecting: VecDeque<(u32, UnixStream)>,
    junk: VecDeque<UnixStream>,
    buf: Vec<u8>,
    stats: VsockStats,
}

static RUNS: AtomicU64 = AtomicU64::new(0);

/// Guest packets into a muxer; see the module's documentation.
pub fn vsock_packets(data: &[u8]) {
    vsock_packets_stats(data);
}

pub fn vsock_packets_stats(data: &[u8]) -> VsockStats {
    sandbox::ignore_sigpipe();
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let path = sandbox::dir().join(format!("v{n}"));
    let listener_path = |port: u32| PathBuf::from(format!("{}_{port}", path.display()));
    let muxer = Muxer::new(GUEST_CID, &path).expect("a muxer on a fresh socket");
    let listeners = PORTS
        .iter()
        .map(|&p| {
            let l = UnixListener::bind(listener_path(p)).expect("a host listener");
            l.set_nonblocking(true).expect("a non-blocking listener");
            (p, l)
        })
        .collect();
    let mut run = Run {
        muxer,
        path: path.clone(),
        listeners,
        conns: BTreeMap::new(),
        connecting: VecDeque::new(),
        junk: VecDeque::new(),
        buf: Vec::new(),
        stats: VsockStats::default(),
    };
    let mut rest = data;
    while rest.len() >= PREFIX + HEADER_LEN {
        let [ctl, who, amount, rx] = [rest[0], rest[1], rest[2], rest[3]];
        let raw: &[u8; HEADER_LEN] = rest[PREFIX..PREFIX + HEADER_LEN]
            .try_into()
            .expect("44 bytes");
        rest = &rest[PREFIX + HEADER_LEN..];
        let mut h = Header::parse(raw);
        assert_eq!(
            h.to_bytes(),
            *raw,
            "a header does not survive parse and back"
        );
        let max_payload = max_payload(rx);

        run.host_action((ctl >> 2) & 7, who, amount);
        run.drain(max_payload);

        let len = rest.len().min(h.len as usize);
        let mut payload = &rest[..len];
        rest = &rest[len..];
        let repeated: Vec<u8>;
        if ctl & 3 != 0 {
            if ctl & 0x20 != 0 && !payload.is_empty() {
                let n = (usize::from(amount) * 256)
                    .min(MAX_PAYLOAD as usize)
                    .max(len);
                repeated = payload.iter().copied().cycle().take(n).collect();
                payload = &repeated;
            }
            h.src_cid = GUEST_CID;
            h.dst_cid = HOST_CID;
            h.kind = TYPE_STREAM;
            h.op = 1 + h.op.wrapping_sub(1) % 7;
            h.len = payload.len() as u32;
            match ctl & 3 {
                3 if !run.conns.is_empty() => {
                    let keys: Vec<Key> = run.conns.keys().copied().collect();
                    (h.dst_port, h.src_port) = keys[usize::from(who) % keys.len()];
                }
                1 => {}
                _ => {
                    h.dst_port = PORTS[(h.dst_port & 1) as usize];
                    h.src_port = 1024 + h.src_port % 4;
                }
            }
        }
        run.stats.packets += 1;
        if h.check_from_guest((HEADER_LEN + payload.len()) as u64, GUEST_CID)
            .is_ok()
        {
            assert_eq!(h.len as usize, payload.len());
            run.guest_packet(&h, payload);
        } else {
            run.stats.rejected += 1;
        }
        let complete = run.drain(max_payload);
        run.check_no_stall(complete && max_payload > 0);
    }
    // The driver resets the device: nothing is left for the guest.
    run.muxer.reset();
    assert_eq!(run.muxer.connections(), 0);
    assert!(!run.muxer.has_rx());
    assert!(run.muxer.next_rx(4096, &mut run.buf).is_none());
    let stats = run.stats;
    drop(run);
    for p in PORTS {
        let _ = std::fs::remove_file(listener_path(p));
    }
    assert!(!path.exists(), "the muxer's socket outlives it");
    stats
}

/// The payload room of the guest's receive buffers: none, a few bytes, a few pages,
/// or all there is.
fn max_payload(rx: u8) -> usize {
    match rx {
        0 => 0,
        1..=63 => usize::from(rx),
        64..=254 => usize::from(rx - 63) * 512,
        255 => usize::MAX,
    }
}

/// A byte of what a host program writes: its position in the stream, so that a byte
/// moved, lost or repeated shows.
fn pattern(key: Key, at: usize) -> u8 {
    (at as u32 ^ key.1.wrapping_mul(31) ^ (at >> 8) as u32) as u8
}

impl Run {
    fn key_at(&self, who: u8) -> Option<Key> {
        if self.conns.is_empty() {
            return None;
        }
        self.conns
            .keys()
            .nth(usize::from(who) % self.conns.len())
            .copied()
    }

    fn host_action(&mut self, action: u8, who: u8, amount: u8) {
        match action {
            1 => {
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
            2 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                let Some(s) = c.stream.as_mut() else { return };
                let mut got = vec![0u8; usize::from(amount) * 256 + 1];
                let n = match s.read(&mut got) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    // A reset connection.
                    Err(_) => 0,
                };
                for &b in &got[..n] {
                    let due = c.to_host.pop_front();
                    assert_eq!(
                        Some(b),
                        due,
                        "the host program got a byte the guest did not send ({key:?})"
                    );
                    if c.ok_left > 0 {
                        c.ok_left -= 1;
                    } else {
                        c.host_read += 1;
                    }
                }
                self.stats.bytes_to_host += n;
            }
            3 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                if let Some(s) = &c.stream {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    c.host_shut = true;
                }
            }
            4 => {
                let Some(key) = self.key_at(who) else { return };
                let c = self.conns.get_mut(&key).expect("a key of the model");
                if c.stream.take().is_some() {
                    c.host_shut = true;
                    c.host_closed = true;
                }
            }
            5 => {
                let port = 1024 + u32::from(amount % 8);
                let Ok(mut s) = UnixStream::connect(&self.path) else {
                    return;
                };
                s.write_all(format!("CONNECT {port}\n").as_bytes())
                    .expect("a CONNECT line into an empty socket");
                s.set_nonblocking(true).expect("a non-blocking stream");
                // Accepted on the first pass, its line read on the second.
                self.muxer.process_host_events();
                self.connecting.push_back((port, s));
            }
            6 => {
                self.muxer.reset();
                assert_eq!(self.muxer.connections(), 0);
                assert!(!self.muxer.has_rx(), "packets for the guest after a reset");
                self.conns.clear();
                self.connecting.clear();
            }
            7 => {
                let Ok(mut s) = UnixStream::connect(&self.path) else {
                    return;
                };
                let _ = s.write_all(JUNK[usize::from(amount) % JUNK.len()]);
                let _ = s.set_nonblocking(true);
                if self.junk.len() == MAX_JUNK {
                    self.junk.pop_front();
                }
                self.junk.push_back(s);
            }
            _ => {}
        }
    }

    /// A packet that passed the checks, into the muxer and the model.
    fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        // As the muxer does: every packet on a connection carries the guest's credit.
        let state = self.conns.get_mut(&key).map(|c| {
            c.buf_alloc = h.buf_alloc;
            c.fwd_cnt = h.fwd_cnt;
            c.established
        });
        self.muxer.guest_packet(h, payload);
        match (h.op, state) {
            (op::REQUEST, None) => self.accept(key, h),
            (op::RESPONSE, Some(false)) => {
                let c = self.conns.get_mut(&key).expect("a key of the model");
                c.established = true;
                let ok = format!("OK {}\n", key.0);
                c.ok_left += ok.len();
                c.to_host.extend(ok.as_bytes());
            }
            (op::RST, Some(_)) => {
                self.conns.remove(&key);
            }
            (op::RST, None) => {}
            (op::SHUTDOWN, Some(_)) => {
                let c = self.conns.get_mut(&key).expect("a key of the model");
                c.guest_done |= h.flags & SHUTDOWN_SEND != 0;
            }
            (op::RW, Some(true)) => {
                let c = self.conns.get_mut(&key).expect("a key of the model");
                c.to_host.extend(payload);
                c.guest_sent += payload.len() as u64;
            }
            (op::CREDIT_UPDATE | op::CREDIT_REQUEST, Some(_)) => {}
            // The muxer ends the connection (with a reset the drain sees).
            _ => {}
        }
        assert!(self.muxer.connections() <= MAX_CONNECTIONS);
    }

    /// The host program's end of a connection the guest asked for, if the muxer made
    /// one (only ports with a listener have them).
    fn accept(&mut self, key: Key, h: &Header) {
        let Some((_, l)) = self.listeners.iter().find(|(p, _)| *p == key.0) else {
            return;
        };
        let stream = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => panic!("accept: {e}"),
        };
        stream.set_nonblocking(true).expect("a non-blocking stream");
        let mut c = Conn::new(stream, false, true);
        c.buf_alloc = h.buf_alloc;
        c.fwd_cnt = h.fwd_cnt;
        self.conns.insert(key, c);
        self.stats.accepted += 1;
    }

    /// Everything the muxer has for the guest (after the host sockets' news), each
    /// packet checked; false if cut short.
    fn drain(&mut self, max_payload: usize) -> bool {
        self.muxer.process_host_events();
        for _ in 0..MAX_DRAIN {
            let may = self.muxer.has_rx();
            let Some(h) = self.muxer.next_rx(max_payload, &mut self.buf) else {
                self.check_sync();
                return true;
            };
            assert!(may, "a packet for the guest when has_rx() said none");
            self.packet_for_guest(&h, max_payload);
        }
        false
    }

    fn packet_for_guest(&mut self, h: &Header, max_payload: usize) {
        assert_eq!(h.src_cid, HOST_CID, "{h:?}");
        assert_eq!(h.dst_cid, GUEST_CID, "{h:?}");
        assert_eq!(h.kind, TYPE_STREAM, "{h:?}");
        assert_eq!(h.buf_alloc, BUF_ALLOC, "{h:?}");
        assert_eq!(h.len as usize, self.buf.len(), "{h:?}");
        assert!(
            h.len as usize <= max_payload && h.len <= MAX_PAYLOAD,
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
        if h.op == op::REQUEST {
            let pos = self.connecting.iter().position(|(p, _)| *p == h.dst_port);
            let (_, stream) = self
                .connecting
                .remove(pos.expect("a REQUEST no host program asked for"))
                .expect("a position in the queue");
            assert!(
                !self.conns.contains_key(&key),
                "a REQUEST on a connection that exists"
            );
            self.conns.insert(key, Conn::new(stream, true, false));
            self.stats.host_initiated += 1;
            return;
        }
        if h.op == op::RST {
            self.conns.remove(&key);
            self.stats.resets += 1;
            return;
        }
        let c = self
            .conns
            .get_mut(&key)
            .unwrap_or_else(|| panic!("{h:?} on no connection"));
        assert!(
            h.fwd_cnt as u64 >= c.host_read && h.fwd_cnt as u64 <= c.guest_sent,
            "fwd_cnt {} but the guest sent {} and the host program read {}",
            h.fwd_cnt,
            c.guest_sent,
            c.host_read
        );
        match h.op {
            op::RESPONSE => assert!(!c.host_initiated, "{h:?}"),
            op::RW => {
                assert!(c.established && !c.eof_sent, "{h:?}");
                assert!(h.len <= c.credit(), "{h:?} past the credit {}", c.credit());
                c.rx_cnt = c.rx_cnt.wrapping_add(h.len);
                assert!(
                    self.buf.len() <= c.to_guest.len(),
                    "more bytes to the guest than the host program wrote"
                );
                for (i, b) in c.to_guest.drain(..self.buf.len()).enumerate() {
                    assert_eq!(self.buf[i], b, "a byte to the guest altered ({key:?})");
                }
                self.stats.bytes_to_guest += self.buf.len();
            }
            op::SHUTDOWN => {
                assert!(h.flags & SHUTDOWN_SEND != 0, "{h:?}");
                assert!(
                    c.host_shut,
                    "the guest told the host's end is done while the host program is not ({h:?})"
                );
                assert!(c.to_guest.is_empty(), "an end before all the data");
                if h.flags & SHUTDOWN_RCV != 0 {
                    assert!(c.host_closed || c.guest_done, "{h:?}");
                }
                assert!(!c.eof_sent, "two ends");
                c.eof_sent = true;
                self.stats.shutdowns += 1;
            }
            _ => self.stats.credit_updates += 1,
        }
    }

    fn check_sync(&self) {
        assert_eq!(
            self.muxer.connections(),
            self.conns.len(),
            "the muxer's connections are not the model's"
        );
        assert!(self.muxer.connections() <= MAX_CONNECTIONS);
        assert!(
            self.connecting.is_empty(),
            "a CONNECT line never reached the guest"
        );
    }

    /// After a complete drain with room for data, nothing waits that could have gone.
    fn check_no_stall(&self, check: bool) {
        if !check {
            return;
        }
        for (key, c) in &self.conns {
            if !c.established || c.credit() == 0 {
                continue;
            }
            assert!(
                c.to_guest.is_empty(),
                "{} bytes from the host program wait with {} bytes of credit ({key:?})",
                c.to_guest.len(),
                c.credit()
            );
            assert!(
                !c.host_shut || c.eof_sent,
                "the host program's end never reached the guest ({key:?})"
            );
        }
    }
}

/// Records for seeds: `(ctl, who, amount, rx)`, a header, a payload.
pub struct Record {
    pub ctl: u8,
    pub who: u8,
    pub amount: u8,
    pub rx: u8,
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Record {
    /// A packet from the guest (src_port, dst_port, op) with `payload`.
    pub fn packet(src_port: u32, dst_port: u32, op: u16, flags: u32, payload: &[u8]) -> Self {
        Record {
            ctl: 0,
            who: 0,
            amount: 0,
            rx: 255,
            header: Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 64 << 10,
                fwd_cnt: 0,
            },
            payload: payload.to_vec(),
        }
    }

    pub fn host(mut self, action: u8, who: u8, amount: u8) -> Self {
        self.ctl = (self.ctl & !0x1c) | action << 2;
        self.who = who;
        self.amount = amount;
        self
    }

    pub fn shape(mut self, shape: u8) -> Self {
        self.ctl = (self.ctl & !3) | shape;
        self
    }

    pub fn rx(mut self, rx: u8) -> Self {
        self.rx = rx;
        self
    }

    /// The payload repeated to `amount * 256` bytes.
    pub fn repeated(mut self, amount: u8) -> Self {
        self.ctl |= 0x20;
        self.amount = amount;
        self
    }
}

pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend([r.ctl, r.who, r.amount, r.rx]);
        out.extend(r.header.to_bytes());
        out.extend(&r.payload);
    }
    out
}

/// Seeds from real traffic shapes.
pub fn vsock_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const GP: u32 = 40000;
    let write = 1;
    let read = 2;
    let shut = 3;
    let close = 4;
    let connect = 5;
    // A guest program connects to the host's port 5000, sends a request, the host
    // program answers and closes; the guest closes its end.
    let guest_to_host = vec![
        Record::packet(GP, 5000, op::REQUEST, 0, &[]),
        Record::packet(GP, 5000, op::RW, 0, b"GET / HTTP/1.0\r\n\r\n").host(write, 0, 2),
        Record::packet(GP, 5000, op::CREDIT_UPDATE, 0, &[])
            .host(read, 0, 4)
            .rx(70),
        Record::packet(GP, 5000, op::SHUTDOWN, SHUTDOWN_SEND, &[]).host(close, 0, 0),
        Record::packet(GP, 5000, op::RST, 0, &[]),
    ];
    // A server that speaks first (a banner), read by a guest that never wrote.
    let banner = vec![
        Record::packet(GP + 1, 5001, op::REQUEST, 0, &[]),
        Record::packet(GP + 1, 5001, op::CREDIT_REQUEST, 0, &[]).host(write, 0, 1),
        Record::packet(
            GP + 1,
            5001,
            op::SHUTDOWN,
            SHUTDOWN_SEND | SHUTDOWN_RCV,
            &[],
        )
        .host(shut, 0, 0),
    ];
    // A host program (vessel exec) connects to the agent's port; the guest accepts,
    // both talk (the guest's receive buffers 1 byte, then 512), the host closes.
    let host_to_guest = vec![
        Record::packet(0, 0, op::RST, 0, &[])
            .host(connect, 0, 0)
            .shape(1),
        Record::packet(1024, 0, op::RESPONSE, 0, &[])
            .host(0, 0, 0)
            .shape(3),
        Record::packet(1024, 0, op::RW, 0, b"\x05\x00\x00\x00\x01\x01\x01hi")
            .host(write, 0, 8)
            .shape(3)
            .rx(16),
        Record::packet(1024, 0, op::CREDIT_UPDATE, 0, &[])
            .host(read, 0, 1)
            .shape(3)
            .rx(64),
        Record::packet(1024, 0, op::SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV, &[])
            .host(close, 0, 0)
            .shape(3),
    ];
    // Two connections, a reset device, then a refused port and junk on the socket.
    let reset = vec![
        Record::packet(GP, 5000, op::REQUEST, 0, &[]),
        Record::packet(GP + 2, 5001, op::REQUEST, 0, &[]).host(connect, 0, 1),
        Record::packet(GP, 5000, op::RW, 0, b"ping").host(6, 0, 0),
        Record::packet(GP, 6000, op::REQUEST, 0, &[]).host(7, 0, 3),
    ];
    // A guest sending in bulk (64 KiB packets) to a host program that reads some, then
    // stops reading: the host's socket fills, the muxer holds the rest, tells the guest
    // what went through, and resets the connection once the guest is past its credit.
    let chunk = |r: Record| r.shape(2).repeated(255);
    let bulk = vec![
        Record::packet(GP + 3, 5000, op::REQUEST, 0, &[]).shape(2),
        chunk(Record::packet(GP + 3, 5000, op::RW, 0, b"0123456789abcdef")),
        chunk(Record::packet(GP + 3, 5000, op::RW, 0, b"fedcba9876543210")).host(read, 0, 255),
        chunk(Record::packet(GP + 3, 5000, op::RW, 0, b"0123456789abcdef")).host(read, 0, 255),
    ];
    let mut bulk = bulk;
    for _ in 0..10 {
        bulk.push(chunk(Record::packet(
            GP + 3,
            5000,
            op::RW,
            0,
            b"0123456789abcdef",
        )));
    }
    vec![
        ("guest-to-host", encode(&guest_to_host)),
        ("bulk", encode(&bulk)),
        ("banner", encode(&banner)),
        ("host-to-guest", encode(&host_to_guest)),
        ("reset", encode(&reset)),
    ]
}
