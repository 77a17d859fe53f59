//! virtio-net's receive (0) and transmit (1) queues as a guest driver fills them, on a
//! backend in memory; the queues' handler runs in this thread. Checked after every
//! step, besides where the device writes:
//! - transmit: the backend got exactly the frames the offered chains hold (length and
//!   CRC-32), in order, those of 12 bytes to [`MAX_FRAME`], up to the first chain the
//!   device must refuse; every chain before it used;
//! - receive: the guest's used buffers hold the backend's frames in order, none
//!   altered but for `num_buffers` (1, or with MRG_RXBUF the number of buffers the
//!   frame took), skipping only frames the device counted as dropped.
//!
//! Input: receive and transmit queue sizes, flags (bit 0 EVENT_IDX, bit 1 MRG_RXBUF,
//! bit 2 the backend refuses frames), then operations: the driver's (see
//! [`crate::driver`]), 6 notify receive, 7 notify transmit, 8 a frame arrives
//! (length u16, up to 64 bytes of content from the input, repeated), 9 the backend
//! starts or stops refusing, 10 device reset.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::interrupt::NoMsi;
use devices::virtio::chain::Cursor;
use devices::virtio::net::{
    HEADER_LEN, MAX_FRAME, NetBackend, NetCounters, NetQueues, feature_bits,
};
use devices::virtio::{Chain, QueueHandler, VirtioInterrupt, features};
use vm_memory::GuestMemoryMmap;

use crate::driver::{DRIVER_OPS, GuestDriver, queue_size, ranges};
use crate::ops::{Ops, Program};

const RX: usize = 0;
const TX: usize = 1;
const NOTIFY_RX: u8 = DRIVER_OPS;
const NOTIFY_TX: u8 = DRIVER_OPS + 1;
const FRAME: u8 = DRIVER_OPS + 2;
const REFUSE: u8 = DRIVER_OPS + 3;
const NUM_BUFFERS: usize = 10;

/// A frame by its length and CRC-32.
type Digest = (usize, u32);

fn digest(frame: &[u8]) -> Digest {
    (frame.len(), crc32fast::hash(frame))
}

/// Frames for the guest waiting in line, and what the device sent.
#[derive(Default)]
pub(crate) struct MemoryBackend {
    incoming: Mutex<VecDeque<Vec<u8>>>,
    sent: Mutex<Vec<Digest>>,
    refuse: AtomicBool,
}

impl NetBackend for MemoryBackend {
    /// Never watched: the harness calls the handler itself.
    fn as_raw_fd(&self) -> RawFd {
        -1
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.incoming.lock().expect("incoming").pop_front();
        let frame = frame.ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.sent.lock().expect("sent").push(digest(frame));
        if self.refuse.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(frame.len())
    }

    fn set_offloads(&self, _guest_features: u64) -> io::Result<()> {
        Ok(())
    }
}

struct Net {
    driver: GuestDriver,
    backend: Arc<MemoryBackend>,
    counters: Arc<NetCounters>,
    queues: NetQueues<GuestMemoryMmap>,
    features: u64,
    /// Frames the device took or will take, not yet seen in the guest's buffers.
    expected: VecDeque<Vec<u8>>,
    next_avail: [u16; 2],
    next_used: [u16; 2],
}

impl Net {
    fn queues(&self) -> NetQueues<GuestMemoryMmap> {
        let interrupt = Arc::new(VirtioInterrupt::new("fuzz-net", 2, Arc::new(NoMsi), None));
        let event_idx = self.features & features::RING_EVENT_IDX != 0;
        let backend: Arc<dyn NetBackend> = self.backend.clone();
        NetQueues::new(
            self.driver.mem.clone(),
            self.driver.queue(RX, event_idx),
            self.driver.queue(TX, event_idx),
            backend,
            interrupt,
            self.features,
        )
        .with_counters(self.counters.clone())
    }

    /// A device reset: the frame the device held is gone with it.
    fn reset(&mut self) {
        self.driver.reset();
        self.queues = self.queues();
        self.next_avail = [0; 2];
        self.next_used = [0; 2];
        let incoming = self.backend.incoming.lock().expect("incoming");
        self.expected = incoming
            .iter()
            .filter(|f| f.len() >= HEADER_LEN)
            .cloned()
            .collect();
    }

    fn transmit(&mut self) {
        let before = self.driver.before_step();
        let offered = self.driver.offered_before(TX, self.next_avail[TX]);
        self.backend.sent.lock().expect("sent").clear();
        let result = self.queues.queue_notified(TX);
        self.driver
            .check_writes(&before, &[], "virtio-net transmit");
        let Some(heads) = offered else {
            assert!(result.is_err(), "an available index past the queue size");
            return self.reset();
        };
        let (mut frames, mut used, mut refused) = (Vec::new(), Vec::new(), false);
        let mut read = Vec::new();
        let mut chain = Chain::new();
        for &head in &heads {
            if !self.driver.walk_before(TX, head, &mut chain) || !chain.writable.is_empty() {
                refused = true;
                break;
            }
            read.extend(ranges(&chain.readable));
            let len = chain.readable_len() as usize;
            if (HEADER_LEN..=MAX_FRAME).contains(&len) {
                let mut crc = crc32fast::Hasher::new();
                self.driver
                    .read_before(&chain.readable, &mut |b| crc.update(b));
                frames.push((len, crc.finalize()));
            }
            used.push((head, 0));
        }
        // The device writes the used ring's flags before it reads the chains.
        if self.driver.touches_metadata(&read, &before)
            || !self
                .driver
                .used_ring_trusted(TX, self.next_used[TX], &before)
        {
            return self.reset();
        }
        assert_eq!(result.is_err(), refused, "virtio-net: {result:?}");
        let sent = std::mem::take(&mut *self.backend.sent.lock().expect("sent"));
        assert_eq!(sent, frames, "virtio-net: frames sent (length, CRC-32)");
        let (idx, entries) = self.driver.used_since(TX, self.next_used[TX]);
        assert_eq!(entries, used, "virtio-net: transmit used ring");
        if refused {
            return self.reset();
        }
        self.next_used[TX] = idx;
        self.next_avail[TX] = self.next_avail[TX].wrapping_add(heads.len() as u16);
    }

    fn receive(&mut self, notified: bool) {
        let before = self.driver.before_step();
        // The device takes one available entry per buffer it uses, so it starts where
        // the used ring stands.
        let offered = self.driver.offered_before(RX, self.next_used[RX]);
        let dropped = NetCounters::get(&self.counters.rx_dropped);
        let result = if notified {
            self.queues.queue_notified(RX)
        } else {
            self.queues.fd_ready(0, vmm_sys_util::epoll::EventSet::IN)
        };
        self.driver.check_writes(&before, &[], "virtio-net receive");
        if !self
            .driver
            .used_ring_trusted(RX, self.next_used[RX], &before)
        {
            return self.reset();
        }
        let (idx, entries) = self.driver.used_since(RX, self.next_used[RX]);
        let mut buffers = Vec::new();
        let mut segs = Vec::new();
        let mut aliased = false;
        for &(head, len) in &entries {
            let mut chain = Chain::new();
            aliased |= !self.driver.walk_before(RX, head, &mut chain);
            aliased |= u64::from(len) > chain.writable_len();
            segs.extend(ranges(&chain.writable));
            buffers.push((chain, len));
        }
        // Buffers the device may have filled with a frame it then dropped, or that
        // waits for more buffers, and put back: those offered after the ones it used,
        // and any it used in place of the one the ring held before the step.
        let mut unused = Vec::new();
        for (i, &head) in offered.iter().flatten().enumerate() {
            if entries.get(i).is_some_and(|&(used, _)| used == head) {
                continue;
            }
            let mut chain = Chain::new();
            self.driver.walk_before(RX, head, &mut chain);
            unused.extend(ranges(&chain.writable));
        }
        let under_unused = segs
            .iter()
            .any(|s| unused.iter().any(|u| s.0 < u.1 && u.0 < s.1));
        if aliased
            || self.driver.aliased(&segs, &before)
            || under_unused
            || self.driver.touches_metadata(&unused, &before)
        {
            // Buffers over the rings, descriptors or each other (a used buffer under
            // one the device wrote a dropped frame into after it: the same head
            // offered twice): what the model reads back may not be what the device
            // wrote. Start again in step.
            return self.reset();
        }
        let mut drops = NetCounters::get(&self.counters.rx_dropped) - dropped;
        let mergeable = self.features & feature_bits::MRG_RXBUF != 0;
        let mut at = 0;
        while at < buffers.len() {
            let mut frame = read_back(&self.driver.mem, &buffers[at]);
            assert!(
                frame.len() >= HEADER_LEN,
                "virtio-net: a frame without its header"
            );
            let count = u16::from_le_bytes([frame[NUM_BUFFERS], frame[NUM_BUFFERS + 1]]);
            if mergeable {
                assert!(count >= 1, "virtio-net: num_buffers 0");
                for b in buffers.iter().skip(at + 1).take(usize::from(count) - 1) {
                    frame.extend(read_back(&self.driver.mem, b));
                }
                assert!(
                    at + usize::from(count) <= buffers.len(),
                    "virtio-net: num_buffers {count} past the buffers used"
                );
                at += usize::from(count);
            } else {
                assert_eq!(count, 1, "virtio-net: num_buffers without MRG_RXBUF");
                at += 1;
            }
            let skipped = self.expected.iter().position(|f| same_frame(f, &frame));
            let Some(skipped) = skipped else {
                panic!("virtio-net: the guest received a frame the backend never sent");
            };
            assert!(
                skipped as u64 <= drops,
                "virtio-net: {skipped} frames skipped, {drops} counted as dropped"
            );
            drops -= skipped as u64;
            self.expected.drain(..=skipped);
        }
        self.expected
            .drain(..(drops as usize).min(self.expected.len()));
        self.next_used[RX] = idx;
        if result.is_err() {
            self.reset();
        }
    }
}

/// The bytes a used receive buffer holds.
fn read_back(mem: &GuestMemoryMmap, (chain, len): &(Chain, u32)) -> Vec<u8> {
    let mut bytes = vec![0u8; *len as usize];
    assert!(Cursor::new(&chain.writable).read(mem, &mut bytes));
    bytes
}

/// The same frame but for `num_buffers`, which the device fills in.
fn same_frame(sent: &[u8], got: &[u8]) -> bool {
    let field = NUM_BUFFERS..HEADER_LEN;
    sent.len() == got.len()
        && sent[..field.start] == got[..field.start]
        && sent[field.end..] == got[field.end..]
}

pub fn virtio_net(data: &[u8]) {
    let mut ops = Ops::new(data);
    let driver = GuestDriver::new(&[queue_size(ops.u8()), queue_size(ops.u8())]);
    let flags = ops.u8();
    let mut features = features::VERSION_1;
    if flags & 1 != 0 {
        features |= features::RING_EVENT_IDX;
    }
    if flags & 2 != 0 {
        features |= feature_bits::MRG_RXBUF;
    }
    let backend = Arc::new(MemoryBackend::default());
    backend.refuse.store(flags & 4 != 0, Ordering::Relaxed);
    let counters = Arc::new(NetCounters::default());
    let backend_dyn: Arc<dyn NetBackend> = backend.clone();
    let interrupt = Arc::new(VirtioInterrupt::new("fuzz-net", 2, Arc::new(NoMsi), None));
    let event_idx = features & features::RING_EVENT_IDX != 0;
    let queues = NetQueues::new(
        driver.mem.clone(),
        driver.queue(RX, event_idx),
        driver.queue(TX, event_idx),
        backend_dyn,
        interrupt,
        features,
    )
    .with_counters(counters.clone());
    let mut net = Net {
        driver,
        backend,
        counters,
        queues,
        features,
        expected: VecDeque::new(),
        next_avail: [0; 2],
        next_used: [0; 2],
    };
    while ops.next_op() {
        match ops.u8() % (DRIVER_OPS + 5) {
            k if k < DRIVER_OPS => net.driver.op(k, &mut ops),
            NOTIFY_RX => net.receive(true),
            NOTIFY_TX => net.transmit(),
            FRAME => {
                let len = usize::from(ops.u16());
                let pattern = ops.bytes(len.min(64));
                let frame: Vec<u8> = match pattern.is_empty() {
                    true => vec![0; len],
                    false => pattern.iter().copied().cycle().take(len).collect(),
                };
                if frame.len() >= HEADER_LEN {
                    net.expected.push_back(frame.clone());
                }
                net.backend
                    .incoming
                    .lock()
                    .expect("incoming")
                    .push_back(frame);
                net.receive(false);
            }
            REFUSE => {
                let refuse = net.backend.refuse.load(Ordering::Relaxed);
                net.backend.refuse.store(!refuse, Ordering::Relaxed);
            }
            _ => net.reset(),
        }
    }
}

/// What the Linux driver does with mergeable buffers: receive buffers of 1536 bytes
/// posted at probe, the DHCP DISCOVER from `corpus/dhcp` sent with its 12-byte
/// header, and the server's reply (the same frame back) received; then a frame
/// larger than one buffer, which takes two.
pub fn virtio_net_seeds(discover: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut p = Program::default();
    p.u8(3).u8(3).u8(2); // 8 entries each, MRG_RXBUF
    for i in 0..4u16 {
        chain(
            &mut p,
            RX as u8,
            i as u8,
            &[(0x1000 + 0x600 * i, 1536, true)],
        );
    }
    p.u8(NOTIFY_RX);
    let mut frame = vec![0u8; HEADER_LEN];
    frame.extend_from_slice(discover);
    let at = 0x4000;
    for (i, piece) in frame.chunks(64).enumerate() {
        p.u8(1)
            .u16(at + 64 * i as u16)
            .u8(piece.len() as u8)
            .bytes(piece);
    }
    chain(&mut p, TX as u8, 0, &[(at, frame.len() as u16, false)]);
    p.u8(NOTIFY_TX);
    p.u8(FRAME).u16(frame.len() as u16).bytes(&frame[..64]);
    p.u8(FRAME).u16(2000).bytes(&frame[..64]);
    vec![("linux-dhcp", p.0)]
}

fn chain(p: &mut Program, q: u8, first: u8, bufs: &[(u16, u16, bool)]) {
    p.u8(3).u8(q).u8(first).u8(bufs.len() as u8 - 1);
    for &(addr, len, write) in bufs {
        p.u16(addr).u16(len).u8(u8::from(write));
    }
}
