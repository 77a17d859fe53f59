//! The frame stream between a virtio-net device and its network peer (passt, or
//! vessel's switch): Ethernet frames each preceded by its length (4 bytes, big-endian),
//! as [`StreamBackend`] reads and writes it. The harness plays the peer on the other
//! end of a socket pair: it writes frames with hostile length prefixes, cut anywhere
//! (so that the backend reads them in pieces), closes and comes back; the device's side
//! receives frames (with the buffer the device gives, `MAX_FRAME` bytes) and sends the
//! guest's.
//!
//! Checked against a model of the byte stream:
//! - a receive gives the next whole frame the peer wrote, unaltered, behind a virtio
//!   header of zeroes (DATA_VALID once the guest took GUEST_CSUM), or nothing while the
//!   frame is incomplete; a length of 0 or past `MAX_ETHERNET` drops the connection
//!   (the link goes down, nothing more is received), as does the peer's end of stream;
//! - what the peer reads is the guest's frames, each once, in order, unaltered, behind
//!   its length, and every one a frame the peers take (the switch drops a connection
//!   that sends one shorter than an Ethernet header or longer than `MAX_ETHERNET`);
//!   nothing goes out while no peer is connected;
//! - the link is up exactly while a peer is connected (each change announced once),
//!   also once the writer threads of earlier connections have ended; none is left
//!   behind when the backend goes.
//!
//! Input: flags (bit 0 the guest took GUEST_CSUM), then operations: 0 the peer writes
//! a frame (see [`frame`]), 1 the peer writes bytes (count u8, at most 64), 2 the
//! device receives, 3 the guest sends a frame (length u16, fill u8), 4 the peer reads
//! (up to u16 bytes), 5 the peer shuts down its writing, 6 the peer closes, 7 a new
//! peer is connected, 8 the guest's offloads change (u8, bit 0 GUEST_CSUM).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use devices::virtio::net::{HEADER_LEN, MAX_ETHERNET, MAX_FRAME, NetBackend, StreamBackend};

use crate::ops::{Ops, Program};

const GUEST_CSUM: u64 = 1 << 1;
const DATA_VALID: u8 = 2;
/// The shortest frame the switch takes (an Ethernet header).
const MIN_ETHERNET: usize = 14;
const WRITER: &str = "net-stream-tx";

/// What a run did, for the seeds' test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    pub received: usize,
    pub sent: usize,
    pub peer_read: usize,
    pub dropped_connections: usize,
    pub reconnects: usize,
}

struct Frames {
    backend: StreamBackend,
    link_changes: Arc<AtomicUsize>,
    /// The harness's end of the current connection.
    peer: Option<UnixStream>,
    /// The backend's receive side holds a connection.
    connected: bool,
    /// Bytes the peer wrote that the backend has not yet given as frames.
    stream: VecDeque<u8>,
    /// The peer ended its writing (or closed).
    eof: bool,
    /// The peer closed after the guest sent: the writer may take the link down any
    /// time.
    link_unsure: bool,
    link: bool,
    changes: usize,
    data_valid: bool,
    /// What the peer has still to read: the guest's frames as the wire carries them.
    due: VecDeque<u8>,
    /// The frame the peer is reading: its length and how much of it is left.
    reading: Option<(usize, usize)>,
    /// Bytes read of a length prefix.
    prefix: Vec<u8>,
    out: Vec<u8>,
    stats: FrameStats,
}

/// Waits until at most `n` writer threads are left; false after a second.
fn wait_writers(n: usize) -> bool {
    crate::sandbox::wait_threads(WRITER, n)
}

impl Frames {
    fn set_link(&mut self, up: bool) {
        if self.link != up {
            self.link = up;
            self.changes += 1;
        }
    }

    fn check_link(&self, what: &str) {
        if self.link_unsure {
            return;
        }
        assert_eq!(
            self.backend.link_up(),
            self.link,
            "frame stream: the link after {what}"
        );
        assert_eq!(self.backend.is_connected(), self.link);
        assert_eq!(
            self.link_changes.load(Ordering::Relaxed),
            self.changes,
            "frame stream: link changes announced after {what}"
        );
    }

    /// The peer writes `bytes` (as much as its socket takes).
    fn peer_write(&mut self, bytes: &[u8]) {
        let Some(p) = self.peer.as_mut().filter(|_| !self.eof) else {
            return;
        };
        let mut done = 0;
        while done < bytes.len() {
            match p.write(&bytes[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if self.connected {
            self.stream.extend(&bytes[..done]);
        }
    }

    fn recv(&mut self) {
        let got = self.backend.recv(&mut self.out);
        let expected = self.next_frame();
        match (got, expected) {
            (Ok(n), Some(Some(frame))) => {
                assert_eq!(
                    n,
                    HEADER_LEN + frame.len(),
                    "frame stream: a frame's length"
                );
                let flags = if self.data_valid { DATA_VALID } else { 0 };
                assert_eq!(self.out[0], flags, "frame stream: the header's flags");
                assert!(self.out[1..HEADER_LEN].iter().all(|b| *b == 0));
                assert!(
                    self.out[HEADER_LEN..n] == frame[..],
                    "frame stream: a frame altered"
                );
                self.stats.received += 1;
            }
            (Ok(0), Some(None)) => {
                // A length the backend refuses: the connection is dropped.
                self.drop_connection();
            }
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.connected && self.eof && self.stream.len() < 4 + self.stated_len() {
                    // The peer's end, with no whole frame before it.
                    self.drop_connection();
                }
            }
            (got, want) => panic!(
                "frame stream: received {:?}, the model says {:?}",
                got.map_err(|e| e.kind()),
                want.map(|f| f.map(|f| f.len()))
            ),
        }
        self.check_link("a receive");
    }

    /// The length the stream's next prefix states (0 without a whole prefix).
    fn stated_len(&self) -> usize {
        if self.stream.len() < 4 {
            return 0;
        }
        let b: Vec<u8> = self.stream.iter().take(4).copied().collect();
        u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize
    }

    /// What the next receive gives: None nothing (would block), Some(None) the
    /// connection dropped for a bad length, Some(Some(frame)).
    fn next_frame(&mut self) -> Option<Option<Vec<u8>>> {
        if !self.connected || self.stream.len() < 4 {
            return None;
        }
        let n = self.stated_len();
        if n == 0 || n > MAX_ETHERNET {
            return Some(None);
        }
        if self.stream.len() < 4 + n {
            return None;
        }
        self.stream.drain(..4);
        Some(Some(self.stream.drain(..n).collect()))
    }

    fn drop_connection(&mut self) {
        self.connected = false;
        self.stream.clear();
        self.set_link(false);
        self.stats.dropped_connections += 1;
    }

    fn send(&mut self, len: usize, fill: u8) {
        let mut frame = vec![0u8; HEADER_LEN + len];
        for (i, b) in frame[HEADER_LEN..].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(7) ^ fill;
        }
        match self.backend.send(&frame) {
            Ok(n) => {
                assert_eq!(n, frame.len());
                if len < MIN_ETHERNET {
                    // Dropped: no peer takes it.
                    return;
                }
                assert!(
                    self.connected || self.link_unsure,
                    "frame stream: a frame taken with no peer"
                );
                if self.peer.is_some() {
                    self.due.extend((len as u32).to_be_bytes());
                    self.due.extend(&frame[HEADER_LEN..]);
                }
                self.stats.sent += 1;
            }
            Err(e) => {
                // No peer, or a peer slower than the guest (its queue is full).
                assert!(
                    e.kind() == io::ErrorKind::WouldBlock || !self.connected || self.link_unsure,
                    "frame stream: a send refused with a peer: {e}"
                );
            }
        }
    }

    /// The peer reads up to `n` bytes: the guest's frames, in order, each a frame the
    /// peers take.
    fn peer_read(&mut self, n: usize) {
        let Some(p) = self.peer.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; n.max(1)];
        let got = match p.read(&mut buf) {
            Ok(k) => k,
            // Nothing yet; or the backend closed its end with the peer's bytes unread.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("the peer's read: {e}"),
        };
        for &b in &buf[..got] {
            let due = self.due.pop_front();
            assert_eq!(
                Some(b),
                due,
                "frame stream: the peer read a byte nobody sent"
            );
            match &mut self.reading {
                Some((_, left)) => {
                    *left -= 1;
                    if *left == 0 {
                        self.reading = None;
                    }
                }
                None => {
                    self.prefix.push(b);
                    if self.prefix.len() == 4 {
                        let len = u32::from_be_bytes(
                            std::mem::take(&mut self.prefix)
                                .try_into()
                                .expect("4 bytes"),
                        ) as usize;
                        assert!(
                            (MIN_ETHERNET..=MAX_ETHERNET).contains(&len),
                            "frame stream: a {len}-byte frame went to the peer (the switch drops a port that sends one)"
                        );
                        self.reading = Some((len, len));
                    }
                }
            }
        }
        self.stats.peer_read += got;
    }

    /// The peer's end of the current connection goes (what it had to read with it).
    fn close_peer(&mut self) {
        if self.peer.take().is_some() {
            // The writer fails on its next write, and takes the link down then.
            self.link_unsure = true;
            self.eof = true;
            self.due.clear();
            self.reading = None;
            self.prefix.clear();
        }
    }

    fn reconnect(&mut self) {
        // The old writer may have taken the link down already (how often is not the
        // model's to know); after this connection it must not.
        let unsure = self.link_unsure;
        let (ours, theirs) = UnixStream::pair().expect("a socket pair");
        theirs.set_nonblocking(true).expect("a non-blocking peer");
        self.backend.connect(ours).expect("connecting a peer");
        // The old peer goes once the new one is there: its writer thread fails (if it
        // had anything to write) after the new link is up.
        self.close_peer();
        self.peer = Some(theirs);
        self.eof = false;
        self.connected = true;
        self.stream.clear();
        self.set_link(true);
        self.stats.reconnects += 1;
        // Every earlier connection's writer ends; then the link is the new one's.
        assert!(
            wait_writers(1),
            "frame stream: a writer thread of an earlier connection never ended"
        );
        self.link_unsure = false;
        if unsure {
            // The old connection's writer may have failed before the new one was
            // handed over (a down and an up announced); never after it.
            self.changes = self.link_changes.load(Ordering::Relaxed);
        }
        self.check_link("a new connection");
    }
}

/// Operation 0, a frame from the peer: mode (u8: bits 0-1 the length prefix: the
/// content's length, 0, past `MAX_ETHERNET`, or one from a table by bits 5-7; bit 2 the
/// frame written in two pieces with a receive between them, cut at `cut`; bit 3 the
/// content 18 bytes longer, so that it reaches `MAX_ETHERNET`), length (u16, of the
/// content), cut (u8), then up to 255 bytes of content (count u8), repeated.
fn frame(f: &mut Frames, ops: &mut Ops) {
    let mode = ops.u8();
    let mut len = usize::from(ops.u16());
    if mode & 8 != 0 {
        len += MAX_ETHERNET - usize::from(u16::MAX);
    }
    let cut = usize::from(ops.u8());
    let n = usize::from(ops.u8());
    let pattern = ops.bytes(n);
    let content: Vec<u8> = match pattern.is_empty() {
        true => vec![0x5a; len],
        false => pattern.iter().copied().cycle().take(len).collect(),
    };
    let prefix: u32 = match mode & 3 {
        0 => len as u32,
        1 => 0,
        2 => (MAX_ETHERNET + 1 + len) as u32,
        _ => [
            MAX_ETHERNET as u32,
            MIN_ETHERNET as u32,
            u32::MAX,
            0x8000_0000,
            1,
            (MAX_ETHERNET - 1) as u32,
            0x0100_0000,
            4,
        ][usize::from(mode >> 5)],
    };
    let mut bytes = prefix.to_be_bytes().to_vec();
    bytes.extend(content);
    if mode & 4 != 0 {
        let cut = cut.min(bytes.len());
        f.peer_write(&bytes[..cut]);
        f.recv();
        f.peer_write(&bytes[cut..]);
    } else {
        f.peer_write(&bytes);
    }
}

pub fn frame_stream(data: &[u8]) {
    frame_stream_stats(data);
}

pub fn frame_stream_stats(data: &[u8]) -> FrameStats {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    crate::sandbox::ignore_sigpipe();
    let mut ops = Ops::new(data);
    let flags = ops.u8();
    let backend = StreamBackend::new().expect("a stream backend");
    let link_changes = Arc::new(AtomicUsize::new(0));
    let counter = link_changes.clone();
    backend.on_link_change(Box::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let csum = flags & 1 != 0;
    backend
        .set_offloads(if csum { GUEST_CSUM } else { 0 })
        .expect("offloads");
    assert!(!backend.offloads() && backend.rx_checksums_valid());
    let mut f = Frames {
        backend,
        link_changes,
        peer: None,
        connected: false,
        stream: VecDeque::new(),
        eof: false,
        link_unsure: false,
        link: false,
        changes: 0,
        data_valid: csum,
        due: VecDeque::new(),
        reading: None,
        prefix: Vec::new(),
        out: vec![0u8; MAX_FRAME],
        stats: FrameStats::default(),
    };
    f.check_link("the start");
    f.recv();
    f.reconnect();
    while ops.next_op() {
        match ops.u8() % 9 {
            0 => frame(&mut f, &mut ops),
            1 => {
                let n = usize::from(ops.u8() % 65);
                let bytes = ops.bytes(n).to_vec();
                f.peer_write(&bytes);
            }
            2 => f.recv(),
            3 => {
                let mut len = usize::from(ops.u16());
                let fill = ops.u8();
                if fill & 0x80 != 0 {
                    len += MAX_ETHERNET - usize::from(u16::MAX);
                }
                f.send(len, fill);
            }
            4 => {
                let n = usize::from(ops.u16());
                f.peer_read(n);
            }
            5 => {
                if let Some(p) = &f.peer
                    && !f.eof
                {
                    p.shutdown(std::net::Shutdown::Write).expect("shutdown");
                    f.eof = true;
                }
            }
            6 => f.close_peer(),
            7 => f.reconnect(),
            _ => {
                let csum = ops.u8() & 1 != 0;
                f.backend
                    .set_offloads(if csum { GUEST_CSUM } else { 0 })
                    .expect("offloads");
                f.data_valid = csum;
            }
        }
    }
    // What the guest sent reaches the peer (the writer thread may still be at it): a
    // stream that moves nothing for 10 s has lost it. A deadline for the whole drain
    // would blame the backend for a writer thread the host did not schedule (a fuzzer
    // at the lowest priority beside busy cores waited more than 2 s for it).
    let mut deadline = Instant::now() + Duration::from_secs(10);
    while !f.due.is_empty() && f.peer.is_some() && Instant::now() < deadline {
        let before = f.due.len();
        f.peer_read(1 << 16);
        if f.due.len() == before {
            std::thread::sleep(Duration::from_micros(100));
        } else {
            deadline = Instant::now() + Duration::from_secs(10);
        }
    }
    assert!(
        f.due.is_empty() || f.peer.is_none(),
        "frame stream: {} bytes the guest sent never reached the peer",
        f.due.len()
    );
    let stats = f.stats;
    drop(f);
    assert!(
        wait_writers(0),
        "frame stream: a writer thread outlives its backend"
    );
    stats
}

/// Operations for seeds.
#[derive(Default)]
pub struct Seed(pub Program);

impl Seed {
    /// A frame of `content` (at most 255 bytes; its length prefix right), written
    /// whole or cut at `cut`.
    pub fn frame(&mut self, content: &[u8], cut: Option<u8>) -> &mut Self {
        let mode = if cut.is_some() { 4 } else { 0 };
        self.0
            .u8(0)
            .u8(mode)
            .u16(content.len() as u16)
            .u8(cut.unwrap_or(0))
            .u8(content.len() as u8)
            .bytes(content);
        self
    }

    pub fn op(&mut self, op: u8) -> &mut Self {
        self.0.u8(op);
        self
    }

    pub fn send(&mut self, len: u16, fill: u8) -> &mut Self {
        self.0.u8(3).u16(len).u8(fill);
        self
    }

    pub fn read(&mut self, n: u16) -> &mut Self {
        self.0.u8(4).u16(n);
        self
    }
}

/// What passt and the switch say: an ARP request and a DHCP reply, frames cut in the
/// middle of their length and of their content, a full-size frame; the guest's frames
/// back; the peer going away and a new one (passt restarted) while the old socket was
/// full; a length of zero, one past the largest, and the end of the stream mid-frame.
pub fn frame_stream_seeds(dhcp: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut arp = vec![0xffu8; 6];
    arp.extend([0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x06]);
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.resize(42, 0);
    let dhcp = &dhcp[..dhcp.len().min(255)];
    let mut s = Seed::default();
    s.0.u8(1);
    s.frame(&arp, None)
        .op(2)
        .frame(dhcp, Some(2))
        .op(2)
        .frame(dhcp, Some(100))
        .op(2);
    // The largest frame the backend takes: 65535 + 18 bytes of a pattern.
    s.0.u8(0)
        .u8(8)
        .u16(u16::MAX)
        .u8(0)
        .u8(4)
        .bytes(&[1, 2, 3, 4]);
    s.op(2).send(42, 1).send(1500, 2).read(4096).read(4096);
    let mut restart = Seed::default();
    restart.0.u8(0);
    restart.frame(&arp, None).op(2);
    for i in 0..16 {
        restart.send(65000, i);
    }
    restart.op(7).frame(&arp, None).op(2).send(60, 9).read(100);
    let mut bad = Seed::default();
    bad.0.u8(0);
    bad.frame(&arp, None)
        .op(2)
        .0
        .u8(0)
        .u8(1)
        .u16(20)
        .u8(0)
        .u8(0);
    bad.op(2).op(2).send(60, 1).op(7);
    bad.0.u8(0).u8(2).u16(20).u8(0).u8(0);
    bad.op(2).op(7).frame(&arp, Some(30)).op(5).op(2).op(2);
    vec![
        ("passt-traffic", s.0.0.clone()),
        ("passt-restarted-socket-full", restart.0.0.clone()),
        ("bad-lengths-and-eof", bad.0.0.clone()),
    ]
}
