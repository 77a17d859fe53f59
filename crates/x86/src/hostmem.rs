//! The only module that holds host pointers into guest RAM: page handles, the software TLB
//! that caches them, and the host atomics that locked guest instructions map to.
//!
//! # Why the pointers stay valid
//! A [`HostPage`] is made by [`HostPage::lookup`], from a `VolatileSlice` of at least one
//! page that vm-memory hands out for a guest-physical page, or by [`HostPage::in_layout`]
//! from the host address and length vm-memory reports for the region holding the page
//! (`platform::Layout`, taken from the platform's current memory, the page entirely inside
//! the region); either way it points into a mapping owned (through `Arc`ed regions) by the
//! platform's `GuestMemory`. The mapping lives as long as that memory object does and never
//! moves. A cached `HostPage` is used only
//! while guest RAM is still mapped where it was when the page was looked up: the
//! interpreter records the memory's layout (each region's guest-physical start, length and
//! host address, `platform::Layout`) and compares it exactly at the start of every
//! `step`/`run`/`deliver` and after every call that hands the platform `&mut` (MMIO, port
//! I/O, MSRs, CPUID, TSC; only with `&mut` could the platform replace its memory, and
//! [`crate::machine::Machine::platform`] is the only way such calls are made). If anything
//! differs, a new TLB generation starts and nothing cached can match. If nothing does,
//! every cached pointer is exactly what a fresh lookup in the current memory would return,
//! and so points into a live mapping of it. Between those points the interpreter holds
//! the only `&mut` to the platform, so the memory object cannot change. `Validate`
//! interpreters (the KVM fallback) also start a new generation at every call.
//!
//! # Why accesses are atomics
//! Guest RAM is shared with other vCPUs (KVM threads now, emu threads later) and devices.
//! Aligned accesses are host atomics: on x86 they compile to plain moves, they are
//! single-copy atomic as the guest expects of aligned accesses, and they keep the Rust side
//! free of data races. Unaligned accesses are composed of aligned loads or byte stores, as
//! the architecture allows. Locked read-modify-writes are host compare-exchanges on the same
//! address, so they are atomic against KVM vCPUs running the guest natively; a locked access
//! that is misaligned takes a process-wide lock instead (a guest split lock).

use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

/// Guest loads are acquire and stores release: on x86 both are plain moves, and together
/// they keep the compiler from reordering guest accesses, so guest code sees the x86
/// (TSO) ordering it was written for. Locked operations are sequentially consistent.
const LOAD: Ordering = Ordering::Acquire;
const STORE: Ordering = Ordering::Release;
const RMW: Ordering = Ordering::SeqCst;

use vm_memory::bitmap::Bitmap;

use crate::platform::Layout;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

pub(crate) const PAGE: usize = 4096;
pub(crate) const PAGE_MASK: u64 = !0xfff;

/// Serialises misaligned locked read-modify-writes (they cannot use one host atomic).
static SPLIT_LOCK: Mutex<()> = Mutex::new(());

/// Taken around a locked access that cannot be one host atomic (split across pages, MMIO).
pub(crate) fn split_lock() -> std::sync::MutexGuard<'static, ()> {
    SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 4 KiB page of guest RAM mapped in this process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostPage(NonNull<u8>);

fn mask(n: usize) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (n * 8)) - 1
    }
}

impl HostPage {
    /// The host mapping of the guest-physical page at `gpa_page` (page aligned), if it is
    /// RAM mapped as one piece. `write` marks the page dirty in vm-memory's dirty bitmap
    /// (writes through the returned handle bypass it, so the whole page is marked up front).
    pub(crate) fn lookup<M: GuestMemory + ?Sized>(
        mem: &M,
        gpa_page: u64,
        write: bool,
    ) -> Option<HostPage> {
        let perm = if write {
            Permissions::ReadWrite
        } else {
            Permissions::Read
        };
        let slice = mem
            .get_slices(GuestAddress(gpa_page), PAGE, perm)
            .ok()?
            .next()?
            .ok()?;
        if slice.len() < PAGE {
            return None;
        }
        if write {
            slice.bitmap().mark_dirty(0, PAGE);
        }
        NonNull::new(slice.ptr_guard_mut().as_ptr()).map(HostPage)
    }

    /// The page at `gpa_page` through `layout`, the current memory's layout (taken from the
    /// platform's memory in this call, or checked equal to it: see the module doc). No
    /// dirty bitmap is marked: for reads, and for the page-table updates the walk makes.
    #[inline]
    pub(crate) fn in_layout(layout: &Layout, gpa_page: u64) -> Option<HostPage> {
        let host = layout.host_of(gpa_page)?;
        NonNull::new(host as *mut u8).map(HostPage)
    }

    #[inline(always)]
    fn at(self, off: usize, n: usize) -> *mut u8 {
        assert!(off <= PAGE - n, "access beyond the page");
        self.0.as_ptr().wrapping_add(off)
    }

    /// Loads `N` (1, 2, 4 or 8) bytes at `off`, little endian, zero extended.
    #[inline(always)]
    pub(crate) fn load<const N: usize>(self, off: usize) -> u64 {
        let p = self.at(off, N);
        if !off.is_multiple_of(N) {
            return self.load_unaligned(off, N);
        }
        // Guest RAM is only ever accessed through atomics or from outside Rust, so a
        // relaxed atomic load is race free on our side.
        // SAFETY: `p` is in bounds of a live page mapping (module doc) and aligned to N.
        unsafe {
            match N {
                1 => u64::from(AtomicU8::from_ptr(p).load(LOAD)),
                2 => u64::from(AtomicU16::from_ptr(p.cast()).load(LOAD)),
                4 => u64::from(AtomicU32::from_ptr(p.cast()).load(LOAD)),
                _ => AtomicU64::from_ptr(p.cast()).load(LOAD),
            }
        }
    }

    #[inline(never)]
    fn load_unaligned(self, off: usize, n: usize) -> u64 {
        // The aligned words covering an in-page access lie inside the page too.
        let base = off & !7;
        let sh = (off & 7) * 8;
        let lo = self.load::<8>(base);
        if (off & 7) + n <= 8 {
            (lo >> sh) & mask(n)
        } else {
            let hi = self.load::<8>(base + 8);
            ((lo >> sh) | (hi << (64 - sh))) & mask(n)
        }
    }

    /// Stores the low `N` bytes of `v` at `off`.
    #[inline(always)]
    pub(crate) fn store<const N: usize>(self, off: usize, v: u64) {
        let p = self.at(off, N);
        if !off.is_multiple_of(N) {
            for k in 0..N {
                self.store::<1>(off + k, v >> (8 * k));
            }
            return;
        }
        // SAFETY: as in `load`: in bounds, aligned, atomic.
        unsafe {
            match N {
                1 => AtomicU8::from_ptr(p).store(v as u8, STORE),
                2 => AtomicU16::from_ptr(p.cast()).store(v as u16, STORE),
                4 => AtomicU32::from_ptr(p.cast()).store(v as u32, STORE),
                _ => AtomicU64::from_ptr(p.cast()).store(v, STORE),
            }
        }
    }

    /// Atomically replaces the `N` bytes at `off` with `new` if they equal `old`; returns
    /// the value found (Ok when it was `old`).
    pub(crate) fn compare_exchange<const N: usize>(
        self,
        off: usize,
        old: u64,
        new: u64,
    ) -> Result<u64, u64> {
        let p = self.at(off, N);
        if !off.is_multiple_of(N) {
            let _guard = split_lock();
            let cur = self.load::<N>(off);
            if cur != old & mask(N) {
                return Err(cur);
            }
            self.store::<N>(off, new);
            return Ok(cur);
        }
        // SAFETY: in bounds, aligned, atomic (see `load`).
        unsafe {
            match N {
                1 => AtomicU8::from_ptr(p)
                    .compare_exchange(old as u8, new as u8, RMW, LOAD)
                    .map(u64::from)
                    .map_err(u64::from),
                2 => AtomicU16::from_ptr(p.cast())
                    .compare_exchange(old as u16, new as u16, RMW, LOAD)
                    .map(u64::from)
                    .map_err(u64::from),
                4 => AtomicU32::from_ptr(p.cast())
                    .compare_exchange(old as u32, new as u32, RMW, LOAD)
                    .map(u64::from)
                    .map_err(u64::from),
                _ => AtomicU64::from_ptr(p.cast()).compare_exchange(old, new, RMW, LOAD),
            }
        }
    }

    /// Atomic read-modify-write: applies `f` until it wins the race; returns the old value.
    #[inline]
    pub(crate) fn update<const N: usize>(self, off: usize, mut f: impl FnMut(u64) -> u64) -> u64 {
        let mut cur = self.load::<N>(off);
        loop {
            match self.compare_exchange::<N>(off, cur, f(cur)) {
                Ok(old) => return old,
                Err(seen) => cur = seen,
            }
        }
    }

    /// `lock cmpxchg16b` on the 16-byte aligned location at `off`.
    pub(crate) fn compare_exchange16(self, off: usize, old: u128, new: u128) -> Result<u128, u128> {
        assert!(off.is_multiple_of(16), "cmpxchg16b needs 16-byte alignment");
        let p = self.at(off, 16);
        let mut lo = old as u64;
        let mut hi = (old >> 64) as u64;
        let ok: u8;
        // SAFETY: `p` is 16-byte aligned and in bounds of a live page mapping (module doc).
        // RBX cannot be an asm operand, so the new low half is swapped into it and back.
        unsafe {
            std::arch::asm!(
                "xchg rbx, {nlo}",
                "lock cmpxchg16b xmmword ptr [{p}]",
                "sete {ok}",
                "xchg rbx, {nlo}",
                p = in(reg) p,
                nlo = inout(reg) new as u64 => _,
                ok = out(reg_byte) ok,
                in("rcx") (new >> 64) as u64,
                inout("rax") lo,
                inout("rdx") hi,
                options(nostack),
            );
        }
        let found = u128::from(lo) | (u128::from(hi) << 64);
        if ok != 0 { Ok(found) } else { Err(found) }
    }

    /// Atomically ORs `bits` into the 8-byte word at `off` (page-table A/D updates).
    pub(crate) fn fetch_or64(self, off: usize, bits: u64) -> u64 {
        assert!(off.is_multiple_of(8));
        let p = self.at(off, 8);
        // SAFETY: aligned, in bounds, atomic (see `load`).
        unsafe { AtomicU64::from_ptr(p.cast()).fetch_or(bits, RMW) }
    }

    /// Atomically ORs `bits` into the 4-byte word at `off` (32-bit page tables).
    pub(crate) fn fetch_or32(self, off: usize, bits: u32) -> u32 {
        assert!(off.is_multiple_of(4));
        let p = self.at(off, 4);
        // SAFETY: aligned, in bounds, atomic (see `load`).
        unsafe { AtomicU32::from_ptr(p.cast()).fetch_or(bits, RMW) }
    }

    pub(crate) fn read_bytes(self, off: usize, out: &mut [u8]) {
        for (k, b) in out.iter_mut().enumerate() {
            *b = self.load::<1>(off + k) as u8;
        }
    }

    pub(crate) fn write_bytes(self, off: usize, data: &[u8]) {
        for (k, b) in data.iter().enumerate() {
            self.store::<1>(off + k, u64::from(*b));
        }
    }

    /// The bytes `count` elements of `size` bytes occupy when the first is at `off` and
    /// they go up (`down` false) or down, checked to lie inside the page.
    fn string_span(off: usize, size: usize, count: usize, down: bool) -> (usize, usize) {
        let len = size * count;
        let lo = if down {
            (off + size).checked_sub(len)
        } else {
            Some(off)
        };
        match lo {
            Some(lo) if count > 0 && lo + len <= PAGE => (lo, len),
            _ => panic!("string operation beyond the page"),
        }
    }

    /// `rep stos`: `count` elements of `size` (1, 2, 4, 8) bytes with value `v`, the first
    /// at `off`, going up or (`down`) down, all inside the page.
    pub(crate) fn rep_stos(self, off: usize, size: usize, count: usize, v: u64, down: bool) {
        Self::string_span(off, size, count, down);
        let p = self.0.as_ptr().wrapping_add(off);
        macro_rules! stos {
            ($insn:literal) => {
                // These are the stores the guest's own rep stos makes, in the same order
                // and sizes; other threads only access guest RAM through atomics or
                // hardware instructions. DF is restored to clear.
                // SAFETY: `string_span` checked every element lies in this live page.
                unsafe {
                    if down {
                        std::arch::asm!("std", $insn, "cld", inout("rdi") p => _,
                            inout("rcx") count => _, in("rax") v, options(nostack));
                    } else {
                        std::arch::asm!($insn, inout("rdi") p => _, inout("rcx") count => _,
                            in("rax") v, options(nostack));
                    }
                }
            };
        }
        match size {
            1 => stos!("rep stosb"),
            2 => stos!("rep stosw"),
            4 => stos!("rep stosd"),
            _ => stos!("rep stosq"),
        }
    }

    /// `rep movs`: `count` elements of `size` bytes from `src` at `src_off` to this page
    /// at `off`, going up or (`down`) down, with the instruction's own overlap semantics.
    pub(crate) fn rep_movs(
        self,
        off: usize,
        src: HostPage,
        src_off: usize,
        size: usize,
        count: usize,
        down: bool,
    ) {
        Self::string_span(off, size, count, down);
        Self::string_span(src_off, size, count, down);
        let d = self.0.as_ptr().wrapping_add(off);
        let s = src.0.as_ptr().wrapping_add(src_off);
        macro_rules! movs {
            ($insn:literal) => {
                // The host instruction copies element by element in the guest's
                // direction, so overlapping ranges end as the guest's rep movs leaves them.
                // SAFETY: as in `rep_stos`, for both pages.
                unsafe {
                    if down {
                        std::arch::asm!("std", $insn, "cld", inout("rdi") d => _,
                            inout("rsi") s => _, inout("rcx") count => _, options(nostack));
                    } else {
                        std::arch::asm!($insn, inout("rdi") d => _, inout("rsi") s => _,
                            inout("rcx") count => _, options(nostack));
                    }
                }
            };
        }
        match size {
            1 => movs!("rep movsb"),
            2 => movs!("rep movsw"),
            4 => movs!("rep movsd"),
            _ => movs!("rep movsq"),
        }
    }
}

pub(crate) const TLB_SIZE: usize = 1024;

/// Permission bits of a cached translation (effective over all paging levels).
pub(crate) mod perm {
    pub const WRITE: u8 = 1;
    pub const USER: u8 = 2;
    pub const EXEC: u8 = 4;
    /// The final entry's dirty bit is already set: writes need no walk.
    pub const DIRTY: u8 = 8;
    /// The host handle was looked up for writing (marked dirty in vm-memory's bitmap).
    pub const HOST_WRITE: u8 = 16;
    /// A global translation (G set, CR4.PGE on): kept across CR3 writes.
    pub const GLOBAL: u8 = 32;
}

/// One cached translation. Tags are `linear page | epoch`; a tag matches only in the
/// epoch it was written in, so bumping an epoch empties the TLB in O(1). Write tags have
/// their own epoch so that fast writes can be revoked alone (a page became code).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
pub(crate) struct TlbEntry {
    /// Set when a read in this entry's privilege context may use `host` directly.
    read_tag: u64,
    /// Set when a write may use `host` directly (writable, dirty, RAM, holds no cached code).
    write_tag: u64,
    /// Set when code may be fetched from the page in this privilege context (what the
    /// code cache's jump entries are validated against).
    exec_tag: u64,
    /// Set whenever the entry holds a translation (checked on the slower path).
    page_tag: u64,
    pub(crate) gpa: u64,
    host: Option<HostPage>,
    pub(crate) perm: u8,
}

/// Where translated code finds an entry's fields (`jit`): entries are 64 bytes, tags
/// are `linear page | epoch`, and `host` is a pointer (0 for none).
pub(crate) mod entry_off {
    use super::TlbEntry;
    use std::mem::offset_of;
    pub const SHIFT: u32 = 6;
    pub const READ_TAG: i32 = offset_of!(TlbEntry, read_tag) as i32;
    pub const WRITE_TAG: i32 = offset_of!(TlbEntry, write_tag) as i32;
    pub const EXEC_TAG: i32 = offset_of!(TlbEntry, exec_tag) as i32;
    pub const GPA: i32 = offset_of!(TlbEntry, gpa) as i32;
    pub const HOST: i32 = offset_of!(TlbEntry, host) as i32;
    const _: () = assert!(size_of::<TlbEntry>() == 1 << SHIFT);
    const _: () = assert!(size_of::<Option<super::HostPage>>() == 8);
}

/// What a walk produced, to be cached.
pub(crate) struct Fill {
    pub lin_page: u64,
    pub gpa: u64,
    pub perm: u8,
    pub host: Option<HostPage>,
    pub fast_read: bool,
    pub fast_write: bool,
    pub fast_exec: bool,
    /// Size of the guest page the translation came from.
    pub page_size: u64,
}

/// Software TLB: one direct-mapped array per privilege context (user, supervisor), so
/// that a CPL change does not flush.
pub(crate) struct Tlb {
    /// Inline (the owner boxes the whole Tlb) so an access costs one pointer chase.
    sets: [[TlbEntry; TLB_SIZE]; 2],
    /// Epoch of read and page tags (below 4096: it shares the tag with a page address).
    epoch: u64,
    /// Epoch of write tags.
    wepoch: u64,
    /// Slots holding a non-global translation (what a CR3 write must clear).
    nonglobal: [[u64; TLB_SIZE / 64]; 2],
    /// Counters for [`crate::Stats`].
    pub(crate) walks: u64,
    pub(crate) flushes: u64,
    /// Guest large pages (base, size) some entry was filled from, so that invlpg of any
    /// address in one forgets all of it; `None` once too many to list (invlpg then
    /// flushes everything).
    large: Option<([(u64, u64); 8], usize)>,
}

// SAFETY: a host pointer in a Tlb is dereferenced only after the memory layout it was
// taken from has been found unchanged in the current call (see the module doc), whichever
// thread makes the call; the Tlb holds no reference to thread-local state.
unsafe impl Send for Tlb {}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            sets: [[TlbEntry::default(); TLB_SIZE]; 2],
            epoch: 1,
            wepoch: 1,
            nonglobal: [[0; TLB_SIZE / 64]; 2],
            walks: 0,
            flushes: 0,
            large: Some(([(0, 0); 8], 0)),
        }
    }
}

#[inline(always)]
fn slot(lin: u64) -> usize {
    (lin >> 12) as usize & (TLB_SIZE - 1)
}

impl Tlb {
    /// Forgets every translation and host pointer.
    pub(crate) fn flush(&mut self) {
        self.flushes += 1;
        self.epoch += 1;
        self.wepoch += 1;
        self.large = Some(([(0, 0); 8], 0));
        self.wrap();
    }

    /// Forgets the translations of the linear page holding `lin` (invlpg). Decoded-code
    /// lookups by linear address are revalidated too.
    pub(crate) fn flush_page(&mut self, lin: u64) {
        let in_large = match &self.large {
            Some((list, n)) => list[..*n].iter().any(|&(b, sz)| lin.wrapping_sub(b) < sz),
            None => true,
        };
        if in_large {
            self.flush();
            return;
        }
        let page = lin & PAGE_MASK;
        for set in self.sets.iter_mut() {
            let e = &mut set[slot(page)];
            if e.page_tag & PAGE_MASK == page {
                *e = TlbEntry::default();
            }
        }
    }

    /// Forgets every translation that is not global (a CR3 write with CR4.PGE set).
    pub(crate) fn flush_nonglobal(&mut self) {
        for (set, bits) in self.sets.iter_mut().zip(self.nonglobal.iter_mut()) {
            for (w, word) in bits.iter_mut().enumerate() {
                while *word != 0 {
                    let k = word.trailing_zeros() as usize;
                    *word &= *word - 1;
                    set[w * 64 + k] = TlbEntry::default();
                }
            }
        }
        // Large pages are listed whatever their G bit; keeping the list is conservative.
    }

    /// The guest-physical page code at `lin` is fetched from in privilege context `set`,
    /// if the TLB holds a translation that allows fetching.
    #[inline(always)]
    pub(crate) fn exec_page(&self, set: usize, lin: u64) -> Option<u64> {
        let e = &self.sets[set & 1][slot(lin)];
        (e.exec_tag == (lin & PAGE_MASK) | self.epoch).then_some(e.gpa)
    }

    /// For translated code: the entries of privilege context `set`, and the read and
    /// write epochs their tags carry now.
    pub(crate) fn for_jit(&self, set: usize) -> (*const TlbEntry, u64, u64) {
        (self.sets[set & 1].as_ptr(), self.epoch, self.wepoch)
    }

    /// Forgets which pages may be written directly (reads and translations stay).
    pub(crate) fn drop_fast_writes(&mut self) {
        self.wepoch += 1;
        self.wrap();
    }

    fn wrap(&mut self) {
        if self.epoch > 0xfff || self.wepoch > 0xfff {
            for set in self.sets.iter_mut() {
                set.fill(TlbEntry::default());
            }
            self.epoch = 1;
            self.wepoch = 1;
        }
    }

    #[inline(always)]
    pub(crate) fn read_fast<const N: usize>(&self, set: usize, lin: u64) -> Option<u64> {
        let e = &self.sets[set & 1][slot(lin)];
        let off = (lin & 0xfff) as usize;
        if e.read_tag == (lin & PAGE_MASK) | self.epoch && off <= PAGE - N {
            Some(e.host?.load::<N>(off))
        } else {
            None
        }
    }

    #[inline(always)]
    pub(crate) fn write_fast<const N: usize>(&self, set: usize, lin: u64, v: u64) -> bool {
        let e = &self.sets[set & 1][slot(lin)];
        let off = (lin & 0xfff) as usize;
        if e.write_tag == (lin & PAGE_MASK) | self.wepoch
            && off <= PAGE - N
            && let Some(h) = e.host
        {
            h.store::<N>(off, v);
            return true;
        }
        false
    }

    /// Lets writes to `lin`'s page (which has a current translation) take the fast path.
    #[inline]
    pub(crate) fn arm_write(&mut self, set: usize, lin: u64) {
        let page = lin & PAGE_MASK;
        let e = &mut self.sets[set & 1][slot(page)];
        if e.page_tag == page | self.epoch {
            e.write_tag = page | self.wepoch;
        }
    }

    /// The cached translation of `lin`'s page, if any: (gpa page, perm, host).
    #[inline]
    pub(crate) fn lookup(&self, set: usize, lin: u64) -> Option<(u64, u8, Option<HostPage>)> {
        let e = &self.sets[set & 1][slot(lin)];
        (e.page_tag == (lin & PAGE_MASK) | self.epoch).then_some((e.gpa, e.perm, e.host))
    }

    pub(crate) fn fill(&mut self, set: usize, f: Fill) {
        if f.page_size > PAGE as u64 {
            let base = f.lin_page & !(f.page_size - 1);
            if let Some((list, n)) = &mut self.large
                && !list[..*n].contains(&(base, f.page_size))
            {
                if *n == list.len() {
                    self.large = None;
                } else {
                    list[*n] = (base, f.page_size);
                    *n += 1;
                }
            }
        }
        let tag = f.lin_page | self.epoch;
        let ram = f.host.is_some();
        let k = slot(f.lin_page);
        let word = &mut self.nonglobal[set & 1][k / 64];
        if f.perm & perm::GLOBAL == 0 {
            *word |= 1 << (k % 64);
        } else {
            *word &= !(1 << (k % 64));
        }
        self.sets[set & 1][k] = TlbEntry {
            read_tag: if f.fast_read && ram { tag } else { 0 },
            write_tag: if f.fast_write && ram {
                f.lin_page | self.wepoch
            } else {
                0
            },
            exec_tag: if f.fast_exec { tag } else { 0 },
            page_tag: tag,
            gpa: f.gpa,
            perm: f.perm,
            host: f.host,
        };
    }
}
