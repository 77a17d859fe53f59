//! Code coherence across interpreters and devices: which guest-physical pages hold decoded
//! code, and a write generation per page that decoded blocks are checked against.
//!
//! One [`CodeMap`] serves a whole VM: every vCPU's interpreter and every device that writes
//! guest RAM through vm-memory (via [`CodeBitmap`]). Per 4 KiB page of RAM it holds one
//! `AtomicU32`: bit 0 says "some interpreter decoded code from this page", the other bits
//! count writes to the page while it held code.
//!
//! - Decoding sets bit 0 (a locked `fetch_or`, before the bytes are read) and records the
//!   resulting value in the block; a block is used only while the page's value is still
//!   the recorded one (one relaxed load at block entry).
//! - A write by an interpreter (store first, then a full fence, then the check) to a page
//!   with bit 0 set adds 1, which bumps the generation and clears bit 0: every block
//!   decoded from the page is stale, and later writes find a plain data page again.
//! - A write by anyone else (devices through vm-memory, the VMM) adds 2: the generation
//!   moves, bit 0 stays set (the interpreter's own next write clears it, see `cpu_wrote`).
//! - Interpreters never take the TLB fast path for writes to pages with bit 0 set. A page
//!   becomes code while another interpreter may hold a fast write entry for it, so every
//!   0 -> 1 transition bumps [`CodeMap`]'s epoch, and interpreters drop their fast write
//!   entries when they see a new epoch (checked once per block).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Bit 0 of a page state: decoded code exists (or existed) for the page.
const CODE: u32 = 1;

#[derive(Clone, Copy, Debug)]
struct Range {
    /// First guest-physical page number.
    first_page: u64,
    pages: u64,
    /// Index of the range's first page in `states`.
    base: usize,
}

/// Per-page code state for a VM's RAM, shared by all its interpreters (see the module
/// documentation).
pub struct CodeMap {
    ranges: Vec<Range>,
    states: Box<[AtomicU32]>,
    epoch: AtomicU64,
    /// Bumped after every write to a page holding code (a generation moved), so that an
    /// interpreter can tell in one load whether any decoded block may have gone stale.
    writes: AtomicU64,
    /// Dirty logging (for a migration): one bit per page, set by every write to it
    /// while `logging` is on, whoever makes it.
    dirty: Box<[AtomicU64]>,
    logging: AtomicBool,
    /// Bumped (with the epoch) when every interpreter must empty its TLB: a dirty log
    /// round began, and a write through a cached host handle would go unseen.
    flushes: AtomicU64,
}

impl std::fmt::Debug for CodeMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeMap")
            .field("ranges", &self.ranges)
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// `n` page states, all zero, from zeroed memory: pages of the map stay untouched (and
/// cost no RSS) until their guest page first holds code; a 512 MiB guest's map is
/// 512 KiB.
fn zeroed_states(n: usize) -> Box<[AtomicU32]> {
    let states = Box::<[AtomicU32]>::new_zeroed_slice(n);
    // SAFETY: all-zero bytes are a valid AtomicU32 (it has u32's representation).
    unsafe { states.assume_init() }
}

impl CodeMap {
    /// A map for guest RAM made of `ranges` (guest-physical start, length in bytes).
    /// Pages outside the ranges are not tracked: blocks decoded from them are checked
    /// byte by byte before each use instead.
    pub fn new(ranges: &[(GuestAddress, usize)]) -> Self {
        let mut out = Vec::with_capacity(ranges.len());
        let mut total = 0usize;
        for &(start, len) in ranges {
            let first_page = start.0 >> 12;
            let last = (start.0 + len as u64).div_ceil(4096);
            let pages = last.saturating_sub(first_page);
            out.push(Range {
                first_page,
                pages,
                base: total,
            });
            total += pages as usize;
        }
        out.sort_by_key(|r| r.first_page);
        CodeMap {
            ranges: out,
            states: zeroed_states(total),
            epoch: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            dirty: (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        }
    }

    /// Index of the page holding `gpa`, if the map covers it.
    #[inline]
    pub(crate) fn index(&self, gpa: u64) -> Option<usize> {
        let page = gpa >> 12;
        self.ranges
            .iter()
            .find(|r| page.wrapping_sub(r.first_page) < r.pages)
            .map(|r| r.base + (page - r.first_page) as usize)
    }

    /// The page's current state (relaxed: a block-entry check).
    #[inline(always)]
    pub(crate) fn state(&self, idx: usize) -> u32 {
        self.states[idx].load(Ordering::Relaxed)
    }

    /// Marks the page as holding code before its bytes are read for decoding; returns the
    /// state the decoded block must find to be valid.
    pub(crate) fn mark_code(&self, idx: usize) -> u32 {
        // A locked operation: the bytes read afterwards are at least as new as any store
        // whose writer did not see this bit (it fences between its store and its check).
        let old = self.states[idx].fetch_or(CODE, Ordering::SeqCst);
        if old & CODE == 0 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        old | CODE
    }

    /// Whether the page holding `gpa` holds code (writes to it must take the slow path).
    #[inline]
    pub(crate) fn is_code(&self, gpa: u64) -> bool {
        self.index(gpa)
            .is_some_and(|i| self.states[i].load(Ordering::Relaxed) & CODE != 0)
    }

    /// An interpreter stored to the page (the store is done): if it held code, bump the
    /// generation and clear the code bit. Returns whether it held code.
    #[inline]
    pub(crate) fn cpu_wrote(&self, gpa: u64) -> bool {
        let Some(i) = self.index(gpa) else {
            return false;
        };
        self.log_write(i);
        let s = &self.states[i];
        // Order the guest store before the check (x86 may pass a load ahead of a store).
        fence(Ordering::SeqCst);
        let wrote_code = s
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |v| {
                (v & CODE != 0).then_some(v.wrapping_add(1))
            })
            .is_ok();
        if wrote_code {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        wrote_code
    }

    /// Someone other than an interpreter wrote `len` bytes at `gpa` (a device, the VMM):
    /// every decoded block from those pages becomes stale.
    pub fn wrote(&self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        fence(Ordering::SeqCst);
        let first = gpa >> 12;
        let last = (gpa + len as u64 - 1) >> 12;
        for page in first..=last {
            if let Some(i) = self.index(page << 12) {
                self.log_write(i);
                let s = &self.states[i];
                if s.load(Ordering::Relaxed) & CODE != 0
                    && s.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |v| {
                        (v & CODE != 0).then_some(v.wrapping_add(2))
                    })
                    .is_ok()
                {
                    self.writes.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Bumped after every write that made decoded code stale (anywhere). Read before a
    /// block's page state is checked, so a later write shows as a different value.
    #[inline(always)]
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// The counters behind `writes` and `epoch`, for translated code to watch.
    pub(crate) fn writes_counter(&self) -> *const AtomicU64 {
        &self.writes
    }
    pub(crate) fn epoch_counter(&self) -> *const AtomicU64 {
        &self.epoch
    }

    /// Bumped whenever a page becomes code (see the module documentation).
    #[inline(always)]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// How many times every interpreter was asked to empty its TLB.
    pub(crate) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    #[inline]
    fn log_write(&self, idx: usize) {
        if self.logging.load(Ordering::Relaxed) {
            self.dirty[idx / 64].fetch_or(1 << (idx % 64), Ordering::Relaxed);
        }
    }

    /// Starts (or stops) dirty logging, with every page clean. Interpreters empty their
    /// TLBs at their next block, so writes through host handles they cached before are
    /// seen again: the caller has every vCPU parked while it calls this, or takes the
    /// writes of the block each one is in as unlogged.
    pub fn set_dirty_logging(&self, on: bool) {
        for w in self.dirty.iter() {
            w.store(0, Ordering::Relaxed);
        }
        self.logging.store(on, Ordering::SeqCst);
        self.flush_interpreters();
    }

    /// The guest-physical pages written since logging started or since the last call,
    /// each once; the log starts clean again. As with [`Self::set_dirty_logging`], the
    /// vCPUs are parked during the call (their TLBs are emptied before they go on).
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (j, word) in self.dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::Relaxed);
            while bits != 0 {
                let idx = j * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(r) = self
                    .ranges
                    .iter()
                    .find(|r| idx >= r.base && idx - r.base < r.pages as usize)
                {
                    out.push((r.first_page + (idx - r.base) as u64) << 12);
                }
            }
        }
        self.flush_interpreters();
        out
    }

    fn flush_interpreters(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// A vm-memory [`Bitmap`] that reports every write through vm-memory (devices' DMA, the
/// VMM loading a kernel) to a [`CodeMap`], so decoded code that the write touched is
/// dropped. Regions built without a map (`Default`, [`NewBitmap::with_len`]) track
/// nothing; build guest RAM with [`guest_memory`] to attach the VM's map.
#[derive(Clone, Debug, Default)]
pub struct CodeBitmap {
    map: Option<Arc<CodeMap>>,
    /// Guest-physical address of the region's first byte.
    base: u64,
}

impl CodeBitmap {
    /// The bitmap of the RAM region starting at `start`.
    pub fn new(map: Arc<CodeMap>, start: GuestAddress) -> Self {
        CodeBitmap {
            map: Some(map),
            base: start.0,
        }
    }
}

impl<'a> WithBitmapSlice<'a> for CodeBitmap {
    type S = RefSlice<'a, CodeBitmap>;
}

impl Bitmap for CodeBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(map) = &self.map {
            map.wrote(self.base.wrapping_add(offset as u64), len);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, CodeBitmap> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for CodeBitmap {
    fn with_len(_len: usize) -> Self {
        CodeBitmap::default()
    }
}

/// Allocates guest RAM (anonymous private memory, as `GuestMemoryMmap::from_ranges` does)
/// whose writes through vm-memory are reported to `code`.
pub fn guest_memory(
    ranges: &[(GuestAddress, usize)],
    code: &Arc<CodeMap>,
) -> Result<GuestMemoryMmap<CodeBitmap>, FromRangesError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let bitmap = CodeBitmap::new(Arc::clone(code), start);
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()?;
        regions
            .push(GuestRegionMmap::new(mapping, start).ok_or(FromRangesError::InvalidGuestRegion)?);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Guest RAM in one memfd, mapped shared: another process (virtiofsd over vhost-user)
/// can map the same pages. The ranges lie one after the other in the file.
pub fn guest_memory_shared(
    ranges: &[(GuestAddress, usize)],
    code: &Arc<CodeMap>,
) -> Result<GuestMemoryMmap<CodeBitmap>, FromRangesError> {
    let mmap_err = |e| FromRangesError::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(e));
    let total: usize = ranges.iter().map(|r| r.1).sum();
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"vessel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(mmap_err(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor memfd_create just returned, owned by nobody else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(total as u64).map_err(mmap_err)?;
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let bitmap = CodeBitmap::new(Arc::clone(code), start);
        let f = file.try_clone().map_err(mmap_err)?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_file_offset(vm_memory::FileOffset::new(f, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_SHARED)
            .build()?;
        regions
            .push(GuestRegionMmap::new(mapping, start).ok_or(FromRangesError::InvalidGuestRegion)?);
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Guest RAM mapped privately from `file` (the ranges one after the other in it): pages
/// are read in as the guest touches them and writes stay in this process. A restored
/// VM starts without reading its memory first.
pub fn guest_memory_from_file(
    ranges: &[(GuestAddress, usize)],
    code: &Arc<CodeMap>,
    file: &std::fs::File,
) -> Result<GuestMemoryMmap<CodeBitmap>, FromRangesError> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let bitmap = CodeBitmap::new(Arc::clone(code), start);
        let f = file
            .try_clone()
            .map_err(|e| FromRangesError::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(e)))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_file_offset(vm_memory::FileOffset::new(f, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()?;
        regions
            .push(GuestRegionMmap::new(mapping, start).ok_or(FromRangesError::InvalidGuestRegion)?);
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dirty_log_holds_every_write_while_on_and_starts_clean_each_time() {
        let map = CodeMap::new(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x1_0000_0000), 0x2000),
        ]);
        map.wrote(0x1000, 8);
        map.set_dirty_logging(true);
        assert!(
            map.take_dirty().is_empty(),
            "writes before logging do not count"
        );
        let epoch = map.epoch();
        map.wrote(0x2ffc, 8); // across two pages
        assert!(!map.cpu_wrote(0x9000)); // an interpreter's store to a data page
        map.wrote(0x1_0000_1000, 1);
        assert_eq!(map.take_dirty(), [0x2000, 0x3000, 0x9000, 0x1_0000_1000]);
        assert!(map.epoch() > epoch, "interpreters must drop their TLBs");
        assert!(map.take_dirty().is_empty());
        map.set_dirty_logging(false);
        map.wrote(0x5000, 1);
        assert!(map.take_dirty().is_empty());
    }
}
