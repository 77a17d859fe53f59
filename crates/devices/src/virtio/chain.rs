//! Descriptor chains, checked. `virtio-queue`'s `Queue` keeps the ring state (sizes,
//! addresses, next available and used indices, notification suppression); the chain
//! walk is done here, on `virtio-queue`'s descriptor layout, because a hostile driver
//! must get a precise verdict (the reason is logged when the device needs a reset)
//! where `DescriptorChain` just stops, and because the generic per-access path costs a
//! noticeable part of a 4 KiB request.
//!
//! A walked chain is a list of segments, each entirely inside guest RAM, readable
//! ones first. Every length the devices act on comes from these segments.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, ByteValued, GuestAddress, GuestMemory, Permissions};

use super::guest_io::GuestAccess;

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One buffer of a chain: guest-physical, entirely inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("available ring index jumped by {0} entries (more than the queue size)")]
    AvailIndex(u16),
    #[error("cannot read the available ring: {0}")]
    AvailRing(String),
    #[error("chain head {head} is outside a queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("chain from head {head}: next index {next} is outside a table of {size}")]
    NextOutOfRange { head: u16, next: u16, size: u16 },
    #[error("chain from head {head} loops (more descriptors than its table holds)")]
    Loop { head: u16 },
    #[error("chain from head {head}: descriptor table at {table:#x} is not guest RAM")]
    Unreadable { head: u16, table: u64 },
    #[error("chain from head {head}: an indirect table refers to another indirect table")]
    NestedIndirect { head: u16 },
    #[error("chain from head {head}: a descriptor has both INDIRECT and NEXT")]
    IndirectWithNext { head: u16 },
    #[error(
        "chain from head {head}: indirect table length {len} is not a whole number of descriptors"
    )]
    BadIndirectTable { head: u16, len: u32 },
    #[error("chain from head {head} is longer than 4 GiB")]
    TooLong { head: u16 },
    #[error("buffer {addr:#x}+{len:#x} is not guest RAM")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain from head {0} has a device-readable buffer after a device-writable one")]
    ReadableAfterWritable(u16),
}

/// A walked chain: its head and its buffers, readable ones first. Kept and reused by
/// a queue's handler so walking does not allocate in the steady state.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Chain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Walks the chain starting at `head` in the descriptor table of `queue`.
    pub fn walk<A: GuestAccess + ?Sized>(
        &mut self,
        mem: &A,
        queue: &Queue,
        head: u16,
    ) -> Result<(), ChainError> {
        self.walk_table(mem, GuestAddress(queue.desc_table()), queue.size(), head)
    }

    /// Walks the chain starting at `head` in a descriptor table of `size` entries at
    /// `table`, following at most one indirect table, and checks every buffer against
    /// guest memory. Zero-length buffers are dropped.
    pub fn walk_table<A: GuestAccess + ?Sized>(
        &mut self,
        mem: &A,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Result<(), ChainError> {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        if head >= size {
            return Err(ChainError::HeadOutOfRange { head, size });
        }
        let (mut table, mut size, mut index) = (table, u32::from(size), u32::from(head));
        let mut indirect = false;
        let mut seen = 0u32;
        let mut total = 0u64;
        loop {
            if index >= size {
                return Err(ChainError::NextOutOfRange {
                    head,
                    next: index as u16,
                    size: size as u16,
                });
            }
            seen += 1;
            if seen > size {
                return Err(ChainError::Loop { head });
            }
            let at = table.unchecked_add(u64::from(index) * DESC_SIZE);
            let mut raw = Descriptor::default();
            if !mem.read_into(at, raw.as_mut_slice()) {
                return Err(ChainError::Unreadable {
                    head,
                    table: table.raw_value(),
                });
            }
            let (addr, len, flags) = (raw.addr(), raw.len(), raw.flags());
            if flags & F_INDIRECT != 0 {
                if indirect {
                    return Err(ChainError::NestedIndirect { head });
                }
                if flags & F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext { head });
                }
                let entries = len / DESC_SIZE as u32;
                if len == 0
                    || !len.is_multiple_of(DESC_SIZE as u32)
                    || entries > u32::from(u16::MAX)
                {
                    return Err(ChainError::BadIndirectTable { head, len });
                }
                if !mem.contains(addr, len as usize, Permissions::Read) {
                    return Err(ChainError::Unreadable {
                        head,
                        table: addr.raw_value(),
                    });
                }
                (table, size, index, seen, indirect) = (addr, entries, 0, 0, true);
                continue;
            }
            total += u64::from(len);
            if total > u64::from(u32::MAX) {
                return Err(ChainError::TooLong { head });
            }
            if len > 0 {
                self.push(mem, head, addr, len, flags & F_WRITE != 0)?;
            }
            if flags & F_NEXT == 0 {
                return Ok(());
            }
            index = u32::from(raw.next());
        }
    }

    fn push<A: GuestAccess + ?Sized>(
        &mut self,
        mem: &A,
        head: u16,
        addr: GuestAddress,
        len: u32,
        writable: bool,
    ) -> Result<(), ChainError> {
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.contains(addr, len as usize, access) {
            return Err(ChainError::OutsideMemory {
                addr: addr.raw_value(),
                len,
            });
        }
        let seg = Segment { addr, len };
        if writable {
            self.writable.push(seg);
        } else if !self.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable(head));
        } else {
            self.readable.push(seg);
        }
        Ok(())
    }

    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

fn avail_error<M: GuestMemory>(queue: &Queue, mem: &M, e: virtio_queue::Error) -> ChainError {
    match e {
        virtio_queue::Error::InvalidAvailRingIndex => {
            let idx = queue
                .avail_idx(mem, Ordering::Relaxed)
                .map(|i| i.0)
                .unwrap_or(0);
            ChainError::AvailIndex(idx.wrapping_sub(queue.next_avail()))
        }
        e => ChainError::AvailRing(e.to_string()),
    }
}

/// The head of the next chain the driver made available, if any. A queue the driver
/// has not enabled has nothing to pop.
pub fn pop<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<Option<u16>, ChainError> {
    if !queue.ready() {
        return Ok(None);
    }
    match queue.iter(mem) {
        Ok(mut it) => Ok(it.next().map(|c| c.head_index())),
        Err(e) => Err(avail_error(queue, mem, e)),
    }
}

/// Every head the driver has made available so far: one read of the index, then the
/// ring entries in as few copies as the ring's wrap allows.
pub fn pop_all<A: GuestAccess + ?Sized>(
    queue: &mut Queue,
    mem: &A,
    heads: &mut Vec<u16>,
) -> Result<(), ChainError> {
    heads.clear();
    if !queue.ready() {
        return Ok(());
    }
    let idx = mem
        .load_u16(GuestAddress(queue.avail_ring()).unchecked_add(2))
        .ok_or_else(|| ChainError::AvailRing("available ring is not guest RAM".into()))?;
    let size = queue.size();
    let mut next = queue.next_avail();
    let count = idx.wrapping_sub(next);
    if count > size {
        return Err(ChainError::AvailIndex(count));
    }
    let ring = GuestAddress(queue.avail_ring()).unchecked_add(4);
    let mut left = count;
    let mut raw = [0u8; 512];
    while left > 0 {
        let slot = next % size;
        let run = left.min(size - slot).min(256);
        let bytes = &mut raw[..2 * usize::from(run)];
        if !mem.read_into(ring.unchecked_add(2 * u64::from(slot)), bytes) {
            return Err(ChainError::AvailRing(
                "available ring is not guest RAM".into(),
            ));
        }
        heads.extend(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]])),
        );
        next = next.wrapping_add(run);
        left -= run;
    }
    queue.set_next_avail(idx);
    Ok(())
}

/// Completions for one queue, published to the used ring in batches: every element
/// is written, then the used index moves once (so a driver never sees part of a
/// merged receive, and a batch costs one index update). Interrupt suppression
/// (EVENT_IDX's `used_event`) is decided here too, across batches.
#[derive(Debug, Default)]
pub struct UsedRing {
    pending: Vec<(u16, u32)>,
    /// The used index when the driver was last considered for an interrupt.
    signalled: Wrapping<u16>,
}

impl UsedRing {
    /// For a queue whose used index starts where `queue` says.
    pub fn new(queue: &Queue) -> Self {
        UsedRing {
            pending: Vec::new(),
            signalled: Wrapping(queue.next_used()),
        }
    }

    pub fn push(&mut self, head: u16, len: u32) {
        self.pending.push((head, len));
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// Writes the pending elements and moves the used index past them.
    pub fn publish<A: GuestAccess + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &A,
    ) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let size = queue.size();
        let ring = GuestAddress(queue.used_ring());
        let next = queue.next_used();
        for (i, (head, len)) in self.pending.iter().enumerate() {
            let slot = u64::from(next.wrapping_add(i as u16) % size);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(*head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            if !mem.write_from(ring.unchecked_add(4 + slot * 8), &elem) {
                return Err("used ring is not guest RAM".into());
            }
        }
        let idx = next.wrapping_add(self.pending.len() as u16);
        if !mem.store_u16(ring.unchecked_add(2), idx) {
            return Err("used ring is not guest RAM".into());
        }
        queue.set_next_used(idx);
        self.pending.clear();
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was published since the last
    /// call: always without EVENT_IDX, else when the used index crossed `used_event`.
    pub fn needs_interrupt<A: GuestAccess + ?Sized>(
        &mut self,
        queue: &Queue,
        mem: &A,
    ) -> Result<bool, String> {
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.signalled, new);
        if new == old {
            return Ok(false);
        }
        if !queue.event_idx_enabled() {
            return Ok(true);
        }
        // Our used index store must be visible before we read the driver's wish.
        fence(Ordering::SeqCst);
        let at = GuestAddress(queue.avail_ring()).unchecked_add(4 + 2 * u64::from(queue.size()));
        let used_event = mem
            .load_u16(at)
            .ok_or_else(|| "available ring is not guest RAM".to_string())?;
        let used_event = Wrapping(used_event);
        Ok(new - used_event - Wrapping(1) < new - old)
    }
}

/// A position in a list of segments, for reading or writing a byte stream that the
/// driver may have split over buffers however it liked.
#[derive(Clone, Debug)]
pub struct Cursor<'s> {
    segs: &'s [Segment],
    index: usize,
    offset: u32,
}

impl<'s> Cursor<'s> {
    pub fn new(segs: &'s [Segment]) -> Self {
        Cursor {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// Bytes left from here to the end.
    pub fn remaining(&self) -> u64 {
        let rest: u64 = self.segs[self.index.min(self.segs.len())..]
            .iter()
            .map(|s| u64::from(s.len))
            .sum();
        rest - u64::from(self.offset)
    }

    /// Moves `n` bytes on, appending the segments covering them to `out`. Returns how
    /// many bytes were covered (less than `n` at the end).
    pub fn take(&mut self, mut n: u64, out: &mut Vec<Segment>) -> u64 {
        let mut done = 0;
        while n > 0 && self.index < self.segs.len() {
            let s = self.segs[self.index];
            let left = s.len - self.offset;
            let chunk = u64::from(left).min(n) as u32;
            out.push(Segment {
                addr: s.addr.unchecked_add(u64::from(self.offset)),
                len: chunk,
            });
            self.advance(chunk);
            n -= u64::from(chunk);
            done += u64::from(chunk);
        }
        done
    }

    /// Moves `n` bytes on without recording them.
    pub fn skip(&mut self, mut n: u64) {
        while n > 0 && self.index < self.segs.len() {
            let left = self.segs[self.index].len - self.offset;
            let chunk = u64::from(left).min(n) as u32;
            self.advance(chunk);
            n -= u64::from(chunk);
        }
    }

    fn advance(&mut self, n: u32) {
        self.offset += n;
        if self.index < self.segs.len() && self.offset == self.segs[self.index].len {
            self.index += 1;
            self.offset = 0;
        }
    }

    /// Copies the next `buf.len()` bytes out of guest memory. False (and the cursor
    /// moved to the end) when the segments run out first.
    pub fn read<A: GuestAccess + ?Sized>(&mut self, mem: &A, buf: &mut [u8]) -> bool {
        let mut at = 0;
        while at < buf.len() && self.index < self.segs.len() {
            let s = self.segs[self.index];
            let chunk = ((s.len - self.offset) as usize).min(buf.len() - at);
            let addr = s.addr.unchecked_add(u64::from(self.offset));
            if !mem.read_into(addr, &mut buf[at..at + chunk]) {
                return false;
            }
            self.advance(chunk as u32);
            at += chunk;
        }
        at == buf.len()
    }

    /// Copies `buf` into guest memory (as much as fits); returns the bytes written.
    pub fn write<A: GuestAccess + ?Sized>(&mut self, mem: &A, buf: &[u8]) -> usize {
        let mut at = 0;
        while at < buf.len() && self.index < self.segs.len() {
            let s = self.segs[self.index];
            let chunk = ((s.len - self.offset) as usize).min(buf.len() - at);
            let addr = s.addr.unchecked_add(u64::from(self.offset));
            if !mem.write_from(addr, &buf[at..at + chunk]) {
                break;
            }
            self.advance(chunk as u32);
            at += chunk;
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    fn desc(mem: &GuestMemoryMmap, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(table + 16 * i)).unwrap();
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        desc(&mem, 0, 0, 0x1000, 16, F_NEXT, 3);
        desc(&mem, 0, 3, 0x2000, 0, F_NEXT, 5); // zero length: dropped
        desc(&mem, 0, 5, 0x3000, 512, F_WRITE, 0);
        desc(&mem, 0, 6, 0x8000, 32, F_INDIRECT, 0);
        desc(&mem, 0x8000, 0, 0x4000, 8, F_NEXT, 1);
        desc(&mem, 0x8000, 1, 0x5000, 1, F_WRITE, 0);
        let mut c = Chain::new();
        c.walk_table(&mem, GuestAddress(0), 8, 0).unwrap();
        assert_eq!(
            c.readable,
            vec![Segment {
                addr: GuestAddress(0x1000),
                len: 16
            }]
        );
        assert_eq!(
            c.writable,
            vec![Segment {
                addr: GuestAddress(0x3000),
                len: 512
            }]
        );
        c.walk_table(&mem, GuestAddress(0), 8, 6).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (8, 1));
        // A loop, and a next index outside the table.
        desc(&mem, 0, 7, 0x1000, 16, F_NEXT, 7);
        assert_eq!(
            c.walk_table(&mem, GuestAddress(0), 8, 7),
            Err(ChainError::Loop { head: 7 })
        );
        desc(&mem, 0, 7, 0x1000, 16, F_NEXT, 8);
        assert!(matches!(
            c.walk_table(&mem, GuestAddress(0), 8, 7),
            Err(ChainError::NextOutOfRange { .. })
        ));
    }

    #[test]
    fn cursor_reads_across_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x100)).unwrap();
        mem.write_slice(b" world", GuestAddress(0x200)).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 5,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 6,
            },
        ];
        let mut c = Cursor::new(&segs);
        let mut b = [0u8; 7];
        assert!(c.read(&mem, &mut b));
        assert_eq!(&b, b"hello w");
        assert_eq!(c.remaining(), 4);
        let mut out = Vec::new();
        assert_eq!(c.take(10, &mut out), 4);
        assert_eq!(
            out,
            vec![Segment {
                addr: GuestAddress(0x202),
                len: 4
            }]
        );
        assert!(!c.read(&mem, &mut b));
    }
}
