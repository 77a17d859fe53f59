//! The guest's half of split virtqueues, as fuzz input drives it: descriptors, buffers
//! and available-ring entries written into guest memory, for up to four queues of a
//! device the harness runs in the same thread.
//!
//! Layout: guest RAM is [`REGIONS`] (two adjacent regions and one after a hole); queue
//! `q` has its descriptor table at `0x400 * q`, its available ring 0x100 after it and
//! its used ring 0x200 after it (sizes up to 16). Buffers and indirect tables go
//! wherever the input says, rings included.
//!
//! Driver operations (`kind` 0..[`DRIVER_OPS`]), each `kind` then its fields:
//! - 0 descriptor: queue, index, address (u16, see [`address`]), length (u16, see
//!   [`length`]), flags, next;
//! - 1 bytes: address (u16), count (u8, at most 64), then the bytes;
//! - 2 offer: queue, head: the head goes into the available ring, the index moves on;
//! - 3 chain: queue, first index, count (1-4), then per buffer address, length,
//!   device-writable (bit 0): linked descriptors from `first`, offered at once;
//! - 4 available index: queue, u16 (the driver jumps it);
//! - 5 ring flags: queue, available-ring flags (u16), used_event (u16).
//!
//! After each device step the harness calls [`GuestDriver::check_writes`]: every byte
//! the device changed lies in a used ring or in a buffer some descriptor (direct, or
//! in an indirect table one refers to) marked device-writable before the step.

use std::ops::Range;

use devices::virtio::Chain;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ops::Ops;

pub const DRIVER_OPS: u8 = 6;
/// Two adjacent regions (buffers may straddle them) and a third after a hole.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x4000), (0x1_0000, 0x1000)];
/// Where the rings of all queues live.
pub const RINGS: Range<u64> = 0..0x1000;
const QUEUE_STRIDE: u64 = 0x400;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// Descriptors read to find the allowed writes, at most (indirect tables are
/// deduplicated; past this, the check is skipped rather than made slow).
const MAX_DESC_READS: usize = 8192;

/// A guest address from 16 bits of input: mostly RAM, sometimes the hole, the end of
/// a region, or far away.
pub fn address(v: u16) -> u64 {
    let low = u64::from(v & 0x3fff);
    match v >> 14 {
        0 | 1 => u64::from(v & 0x7fff),
        2 => 0xf800 + (low & 0x1fff),
        _ => {
            const FAR: [u64; 8] = [
                0x8000 - 0x200,
                0x1_1000 - 0x200,
                0x4000 - 0x200,
                0x2_0000,
                1 << 32,
                1 << 47,
                u64::MAX - 0x3ff,
                0x7fff_ffff_ffff_fc00,
            ];
            FAR[(low & 7) as usize] + (low >> 3 & 0x3ff)
        }
    }
}

/// A buffer length from 16 bits of input: mostly small, sometimes huge.
pub fn length(v: u16) -> u32 {
    if v < 0xff00 {
        return u32::from(v);
    }
    const HUGE: [u32; 8] = [
        1 << 16,
        1 << 20,
        u32::MAX,
        u32::MAX - 15,
        0x8000_0000,
        16 * 0xffff,
        16 * 0x1_0000,
        0x10_0000 + 12,
    ];
    HUGE[usize::from(v & 7)]
}

/// The inverse of [`address`] for addresses inside RAM (seeds use it).
pub fn address_field(addr: u64) -> u16 {
    assert!(addr < 0x8000, "seed buffers live in the first two regions");
    addr as u16
}

pub struct GuestDriver {
    pub mem: GuestMemoryMmap,
    /// Guest memory as it was before the device's step (for walks the device saw).
    shadow: GuestMemoryMmap,
    sizes: Vec<u16>,
    /// The available index each queue's driver has published.
    avail: Vec<u16>,
}

fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// A queue size of 1 to 16 from input.
pub fn queue_size(b: u8) -> u16 {
    1 << (b % 5)
}

impl GuestDriver {
    pub fn new(sizes: &[u16]) -> Self {
        assert!(sizes.len() <= 4 && sizes.iter().all(|s| (1..=16).contains(s)));
        GuestDriver {
            mem: memory(),
            shadow: memory(),
            sizes: sizes.to_vec(),
            avail: vec![0; sizes.len()],
        }
    }

    pub fn desc_table(q: usize) -> u64 {
        QUEUE_STRIDE * q as u64
    }

    pub fn avail_ring(q: usize) -> u64 {
        Self::desc_table(q) + 0x100
    }

    pub fn used_ring(q: usize) -> u64 {
        Self::desc_table(q) + 0x200
    }

    pub fn size(&self, q: usize) -> u16 {
        self.sizes[q]
    }

    /// Queue `q` as the device gets it from the transport.
    pub fn queue(&self, q: usize, event_idx: bool) -> Queue {
        let mut queue = Queue::new(16).expect("a queue");
        queue.try_set_size(self.sizes[q]).expect("a power of two");
        queue
            .try_set_desc_table_address(GuestAddress(Self::desc_table(q)))
            .expect("aligned");
        queue
            .try_set_avail_ring_address(GuestAddress(Self::avail_ring(q)))
            .expect("aligned");
        queue
            .try_set_used_ring_address(GuestAddress(Self::used_ring(q)))
            .expect("aligned");
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// A device reset as the driver sees it: rings cleared, indices back to zero.
    pub fn reset(&mut self) {
        for q in 0..self.sizes.len() {
            let _ = self
                .mem
                .write_slice(&[0; 0x300], GuestAddress(Self::desc_table(q)));
            self.avail[q] = 0;
        }
    }

    fn queue_index(&self, b: u8) -> usize {
        usize::from(b) % self.sizes.len()
    }

    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = Self::desc_table(q) + 16 * u64::from(index % self.sizes[q]);
        let _ = self.mem.write_slice(&d, GuestAddress(at));
    }

    pub fn offer(&mut self, q: usize, head: u16) {
        let size = self.sizes[q];
        let slot = Self::avail_ring(q) + 4 + 2 * u64::from(self.avail[q] % size);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        self.avail[q] = self.avail[q].wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.avail[q], GuestAddress(Self::avail_ring(q) + 2));
    }

    /// Runs driver operation `kind` (below [`DRIVER_OPS`]) with its fields from `ops`.
    pub fn op(&mut self, kind: u8, ops: &mut Ops) {
        match kind {
            0 => {
                let q = self.queue_index(ops.u8());
                let (index, addr, len) = (ops.u8(), address(ops.u16()), length(ops.u16()));
                let (flags, next) = (ops.u8(), ops.u8());
                self.write_desc(
                    q,
                    u16::from(index),
                    addr,
                    len,
                    u16::from(flags),
                    u16::from(next),
                );
            }
            1 => {
                let addr = address(ops.u16());
                let n = usize::from(ops.u8() % 65);
                let _ = self.mem.write_slice(ops.bytes(n), GuestAddress(addr));
            }
            2 => {
                let q = self.queue_index(ops.u8());
                let head = u16::from(ops.u8());
                self.offer(q, head);
            }
            3 => {
                let q = self.queue_index(ops.u8());
                let first = u16::from(ops.u8());
                let count = 1 + u16::from(ops.u8() % 4);
                for i in 0..count {
                    let (addr, len) = (address(ops.u16()), length(ops.u16()));
                    let write = if ops.u8() & 1 != 0 { F_WRITE } else { 0 };
                    let next = (first + i + 1) % self.sizes[q];
                    let flags = write | if i + 1 < count { F_NEXT } else { 0 };
                    self.write_desc(q, first + i, addr, len, flags, next);
                }
                self.offer(q, first % self.sizes[q]);
            }
            4 => {
                let q = self.queue_index(ops.u8());
                self.avail[q] = ops.u16();
                let _ = self
                    .mem
                    .write_obj(self.avail[q], GuestAddress(Self::avail_ring(q) + 2));
            }
            _ => {
                let q = self.queue_index(ops.u8());
                let (flags, used_event) = (ops.u16(), ops.u16());
                let ring = Self::avail_ring(q);
                let _ = self.mem.write_obj(flags, GuestAddress(ring));
                let event_at = ring + 4 + 2 * u64::from(self.sizes[q]);
                let _ = self.mem.write_obj(used_event, GuestAddress(event_at));
            }
        }
    }

    /// Guest RAM's bytes, region after region.
    pub fn image(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(0x9000);
        for (base, len) in REGIONS {
            let at = out.len();
            out.resize(at + len, 0);
            self.mem
                .read_slice(&mut out[at..], GuestAddress(base))
                .expect("guest RAM");
        }
        out
    }

    /// Before a device step: the image to compare with, and the shadow set to it.
    pub fn before_step(&self) -> Vec<u8> {
        let image = self.image();
        let mut at = 0;
        for (base, len) in REGIONS {
            self.shadow
                .write_slice(&image[at..at + len], GuestAddress(base))
                .expect("shadow RAM");
            at += len;
        }
        image
    }

    /// Walks the chain at `head` of queue `q` in memory as it was before the step.
    pub fn walk_before(&self, q: usize, head: u16, chain: &mut Chain) -> bool {
        chain
            .walk_table(
                &self.shadow,
                GuestAddress(Self::desc_table(q)),
                self.sizes[q],
                head,
            )
            .is_ok()
    }

    /// Reads through `segs` as memory was before the step, feeding `out` in pieces (a
    /// chain may describe far more than is worth holding).
    pub fn read_before(&self, segs: &[devices::virtio::Segment], out: &mut impl FnMut(&[u8])) {
        let mut cursor = devices::virtio::chain::Cursor::new(segs);
        let mut buf = [0u8; 4096];
        while cursor.remaining() > 0 {
            let n = cursor.remaining().min(buf.len() as u64) as usize;
            assert!(
                cursor.read(&self.shadow, &mut buf[..n]),
                "a walked chain reads"
            );
            out(&buf[..n]);
        }
    }

    /// The heads queue `q` offered before the step, from the device's position `from`:
    /// None when the index jumped past the queue size (the device must refuse it).
    pub fn offered_before(&self, q: usize, from: u16) -> Option<Vec<u16>> {
        let ring = Self::avail_ring(q);
        let idx: u16 = self.shadow.read_obj(GuestAddress(ring + 2)).ok()?;
        let count = idx.wrapping_sub(from);
        if count > self.sizes[q] {
            return None;
        }
        let heads = (0..count)
            .map(|i| {
                let slot = ring + 4 + 2 * u64::from(from.wrapping_add(i) % self.sizes[q]);
                self.shadow.read_obj(GuestAddress(slot)).unwrap_or(0)
            })
            .collect();
        Some(heads)
    }

    /// Whether the model can read queue `q`'s used ring after the step: its index in
    /// `before` is still `next_used`, what the device last wrote there (a driver may
    /// write over it), and no device-writable buffer lies over a used ring (the device
    /// may write data there).
    pub fn used_ring_trusted(&self, q: usize, next_used: u16, before: &[u8]) -> bool {
        let at = Self::used_ring(q) as usize + 2;
        if u16::from_le_bytes([before[at], before[at + 1]]) != next_used {
            return false;
        }
        let used = self.used_rings();
        self.writable_buffers(before)
            .is_some_and(|buffers| buffers.iter().all(|b| used.iter().all(|u| !overlaps(b, u))))
    }

    /// The used ring's index and entries `from..` (head, length) after the step.
    pub fn used_since(&self, q: usize, from: u16) -> (u16, Vec<(u16, u32)>) {
        let ring = Self::used_ring(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(ring + 2)).unwrap_or(0);
        let n = idx.wrapping_sub(from).min(self.sizes[q]);
        let entries = (0..n)
            .map(|i| {
                let slot = ring + 4 + 8 * u64::from(from.wrapping_add(i) % self.sizes[q]);
                let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap_or(0);
                let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap_or(0);
                (id as u16, len)
            })
            .collect();
        (idx, entries)
    }

    /// Whether `segs` overlap each other, the rings, or an indirect table some
    /// descriptor referred to before the step: then what the device read or wrote
    /// through them cannot be compared with a model after the fact.
    pub fn aliased(&self, segs: &[(u64, u64)], before: &[u8]) -> bool {
        self.touches_metadata(segs, before)
            || segs
                .iter()
                .enumerate()
                .any(|(i, s)| segs[i + 1..].iter().any(|o| overlaps(s, o)))
    }

    /// Whether `segs` overlap the rings or an indirect table some descriptor referred
    /// to before the step.
    pub fn touches_metadata(&self, segs: &[(u64, u64)], before: &[u8]) -> bool {
        let mut tables = vec![(RINGS.start, RINGS.end)];
        for q in 0..self.sizes.len() {
            for i in 0..u64::from(self.sizes[q]) {
                if let Some((addr, len, flags, _)) = desc_at(before, Self::desc_table(q) + 16 * i)
                    && flags & F_INDIRECT != 0
                {
                    tables.push((addr, addr.saturating_add(u64::from(len))));
                }
            }
        }
        segs.iter().any(|s| tables.iter().any(|t| overlaps(s, t)))
    }

    /// Every byte that changed since `before` lies where the device may write, or is
    /// now zero inside `zeroed` (pages the balloon gave back). Unless the driver gave
    /// the device a buffer over its own descriptors or available ring (or put an
    /// indirect table in a used ring): then the device may rewrite descriptors during
    /// the step and later chains go where the rewritten ones say, which no single image
    /// shows, so the step is not checked.
    pub fn check_writes(&self, before: &[u8], zeroed: &[(u64, u64)], what: &str) {
        let after = self.image();
        if after == before {
            return;
        }
        let Some(allowed) = self.allowed(before) else {
            return; // too many indirect descriptors to check cheaply
        };
        let metadata = self.metadata(before);
        if allowed
            .iter()
            .any(|a| metadata.iter().any(|m| overlaps(a, m)))
        {
            return;
        }
        let inside =
            |set: &[(u64, u64)], addr: u64| set.iter().any(|(s, e)| (*s..*e).contains(&addr));
        for (off, (b, a)) in before.iter().zip(&after).enumerate() {
            let addr = image_address(off);
            if b == a || inside(&allowed, addr) || (*a == 0 && inside(zeroed, addr)) {
                continue;
            }
            panic!(
                "{what}: the device wrote {addr:#x} ({b:#x} -> {a:#x}) outside the used rings \
                 and the device-writable buffers"
            );
        }
    }

    /// Descriptor tables, available rings and the indirect tables `image` refers to.
    fn metadata(&self, image: &[u8]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for q in 0..self.sizes.len() {
            let n = u64::from(self.sizes[q]);
            let (desc, avail) = (Self::desc_table(q), Self::avail_ring(q));
            out.push((desc, desc + 16 * n));
            out.push((avail, avail + 6 + 2 * n));
            for i in 0..n {
                if let Some((addr, len, flags, _)) = desc_at(image, desc + 16 * i)
                    && flags & F_INDIRECT != 0
                {
                    out.push((addr, addr.saturating_add(u64::from(len))));
                }
            }
        }
        out
    }

    /// Used rings and writable buffers per `image`'s descriptors and the indirect
    /// tables they refer to; None past [`MAX_DESC_READS`].
    fn allowed(&self, image: &[u8]) -> Option<Vec<(u64, u64)>> {
        let mut out = self.used_rings();
        out.extend(self.writable_buffers(image)?);
        Some(out)
    }

    fn used_rings(&self) -> Vec<(u64, u64)> {
        (0..self.sizes.len())
            .map(|q| {
                let used = Self::used_ring(q);
                (used, used + 6 + 8 * u64::from(self.sizes[q]))
            })
            .collect()
    }

    /// The device-writable buffers `image`'s descriptors (direct, or in an indirect
    /// table one refers to) describe; None past [`MAX_DESC_READS`].
    fn writable_buffers(&self, image: &[u8]) -> Option<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut tables = Vec::new();
        for q in 0..self.sizes.len() {
            for i in 0..u64::from(self.sizes[q]) {
                let Some(d) = desc_at(image, Self::desc_table(q) + 16 * i) else {
                    continue;
                };
                if d.2 & F_INDIRECT != 0 {
                    tables.push((d.0, u64::from(d.1 / 16).min(0xffff)));
                } else {
                    note_writable(&mut out, d);
                }
            }
        }
        tables.sort_unstable();
        tables.dedup();
        let mut reads = 0;
        for (addr, n) in tables {
            for j in 0..n {
                reads += 1;
                if reads > MAX_DESC_READS {
                    return None;
                }
                match desc_at(image, addr.wrapping_add(16 * j)) {
                    Some(d) => note_writable(&mut out, d),
                    None => break,
                }
            }
        }
        Some(out)
    }
}

fn overlaps(a: &(u64, u64), b: &(u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn note_writable(out: &mut Vec<(u64, u64)>, d: (u64, u32, u16, u16)) {
    if d.2 & F_WRITE != 0 && d.2 & F_INDIRECT == 0 && d.1 > 0 {
        out.push((d.0, d.0.saturating_add(u64::from(d.1))));
    }
}

/// Where guest address `addr` (`len` bytes) sits in an image, if all of it is RAM.
fn image_offset(addr: u64, len: u64) -> Option<usize> {
    let end = addr.checked_add(len)?;
    if end <= 0x8000 {
        return Some(addr as usize);
    }
    (addr >= 0x1_0000 && end <= 0x1_1000).then(|| (addr - 0x8000) as usize)
}

fn image_address(off: usize) -> u64 {
    if off < 0x8000 {
        off as u64
    } else {
        off as u64 + 0x8000
    }
}

/// The descriptor at `addr` in an image: (address, length, flags, next).
fn desc_at(image: &[u8], addr: u64) -> Option<(u64, u32, u16, u16)> {
    let b = &image[image_offset(addr, 16)?..][..16];
    Some((
        u64::from_le_bytes(b[0..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    ))
}

/// Segments as (start, end) ranges.
pub fn ranges(segs: &[devices::virtio::Segment]) -> impl Iterator<Item = (u64, u64)> + '_ {
    segs.iter().map(|s| (s.addr.0, s.addr.0 + u64::from(s.len)))
}
