//! Guest memory as queue handling uses it: checked small copies, ring indices, and
//! iovecs over checked segments for host I/O straight into and out of guest buffers.

use std::sync::atomic::{AtomicU16, Ordering};

use vm_memory::bitmap::{BS, Bitmap};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions, VolatileSlice,
};

use super::chain::Segment;

type RegionBitmap<M> =
    <<<M as GuestMemory>::PhysicalMemory as GuestMemoryBackend>::R as GuestMemoryRegion>::B;

/// `[addr, addr + len)` as one slice, when plain guest memory (no IOMMU) holds it in a
/// single region: the common case, served by one region lookup rather than the
/// general, fragment-by-fragment path.
fn region_slice<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, BS<'_, RegionBitmap<M>>>> {
    let region = mem.physical_memory()?.find_region(addr)?;
    let offset = addr.raw_value() - region.start_addr().raw_value();
    region.get_slice(MemoryRegionAddress(offset), len).ok()
}

/// Is `[addr, addr + len)` guest RAM the device may access as `access`?
pub fn in_guest_ram<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    access: Permissions,
) -> bool {
    region_slice(mem, addr, len).is_some() || mem.check_range(addr, len, access)
}

/// Copies guest memory at `addr` into `buf`; false if it is not all guest RAM.
pub fn read_guest<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, buf: &mut [u8]) -> bool {
    match region_slice(mem, addr, buf.len()) {
        Some(s) => s.copy_to(buf) == buf.len(),
        None => mem.read_slice(buf, addr).is_ok(),
    }
}

/// Copies `buf` into guest memory at `addr` (marking it dirty); false if it is not
/// all guest RAM.
pub fn write_guest<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, buf: &[u8]) -> bool {
    match region_slice(mem, addr, buf.len()) {
        Some(s) => {
            s.copy_from(buf);
            true
        }
        None => mem.write_slice(buf, addr).is_ok(),
    }
}

/// The guest memory accesses queue handling needs. Any `GuestMemory` provides them;
/// [`GuestRam`] provides them faster for the hot path of a queue.
pub trait GuestAccess {
    /// Is `[addr, addr + len)` guest RAM the device may access as `access`?
    fn contains(&self, addr: GuestAddress, len: usize, access: Permissions) -> bool;
    /// Copies guest memory into `buf`; false if it is not all guest RAM.
    fn read_into(&self, addr: GuestAddress, buf: &mut [u8]) -> bool;
    /// Copies `buf` into guest memory (marking it dirty); false if it is not all RAM.
    fn write_from(&self, addr: GuestAddress, buf: &[u8]) -> bool;
    /// An acquiring load of a ring index.
    fn load_u16(&self, addr: GuestAddress) -> Option<u16>;
    /// A releasing store of a ring index.
    fn store_u16(&self, addr: GuestAddress, value: u16) -> bool;
}

impl<M: GuestMemory + ?Sized> GuestAccess for M {
    fn contains(&self, addr: GuestAddress, len: usize, access: Permissions) -> bool {
        in_guest_ram(self, addr, len, access)
    }
    fn read_into(&self, addr: GuestAddress, buf: &mut [u8]) -> bool {
        read_guest(self, addr, buf)
    }
    fn write_from(&self, addr: GuestAddress, buf: &[u8]) -> bool {
        write_guest(self, addr, buf)
    }
    fn load_u16(&self, addr: GuestAddress) -> Option<u16> {
        Bytes::load::<u16>(self, addr, Ordering::Acquire)
            .ok()
            .map(u16::from_le)
    }
    fn store_u16(&self, addr: GuestAddress, value: u16) -> bool {
        Bytes::store(self, value.to_le(), addr, Ordering::Release).is_ok()
    }
}

/// The most regions [`GuestRam`] keeps at hand (vessel's guests have one or two).
const FAST_REGIONS: usize = 4;

type Region<M> = <<M as GuestMemory>::PhysicalMemory as GuestMemoryBackend>::R;

/// Guest memory for one pass over a queue. The regions' host addresses are looked up
/// once, and the small accesses a request makes (descriptors, header, status, used
/// ring) are a compare and a copy; anything else takes the general path. Writes made
/// this way are reported to the region's bitmap (vessel's code map), as vm-memory's
/// own writes are.
pub struct GuestRam<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    /// (guest start, length, host address)
    regions: [(u64, u64, usize); FAST_REGIONS],
    /// The regions themselves, for their bitmaps.
    refs: [Option<&'a Region<M>>; FAST_REGIONS],
    count: usize,
    /// The memory keeps a bitmap that must see every write.
    tracked: bool,
}

impl<'a, M: GuestMemory + ?Sized> GuestRam<'a, M> {
    pub fn new(mem: &'a M) -> Self {
        let mut ram = GuestRam {
            mem,
            regions: [(0, 0, 0); FAST_REGIONS],
            refs: [None; FAST_REGIONS],
            count: 0,
            tracked: size_of::<M::Bitmap>() != 0 || size_of::<RegionBitmap<M>>() != 0,
        };
        let Some(pm) = mem.physical_memory() else {
            return ram;
        };
        for region in pm.iter() {
            let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
                ram.count = 0;
                return ram;
            };
            if ram.count == FAST_REGIONS {
                ram.count = 0;
                return ram;
            }
            ram.regions[ram.count] = (region.start_addr().raw_value(), region.len(), host as usize);
            ram.refs[ram.count] = Some(region);
            ram.count += 1;
        }
        ram
    }

    /// The region index and host address of `[addr, addr + len)` if one region holds
    /// all of it.
    fn find(&self, addr: GuestAddress, len: usize) -> Option<(usize, *mut u8)> {
        let addr = addr.raw_value();
        self.regions[..self.count]
            .iter()
            .position(|(start, size, _)| {
                addr >= *start && (len as u64) <= *size && addr - start <= size - len as u64
            })
            .map(|i| {
                let (start, _, host) = self.regions[i];
                (i, (host + (addr - start) as usize) as *mut u8)
            })
    }

    /// Tells region `i`'s bitmap about a write done through its host address.
    fn wrote(&self, i: usize, addr: GuestAddress, len: usize) {
        if self.tracked
            && let Some(region) = self.refs[i]
        {
            let offset = (addr.raw_value() - self.regions[i].0) as usize;
            region.bitmap().mark_dirty(offset, len);
        }
    }

    pub fn memory(&self) -> &'a M {
        self.mem
    }

    /// The host address of `[addr, addr + len)` if one region holds all of it.
    pub fn host_range(&self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
        self.find(addr, len).map(|(_, p)| p)
    }

    /// Reports host I/O into `segs` (through their host addresses) to the bitmap.
    pub fn mark_written(&self, segs: &[Segment]) {
        if !self.tracked {
            return;
        }
        for seg in segs {
            match self.find(seg.addr, seg.len as usize) {
                Some((i, _)) => self.wrote(i, seg.addr, seg.len as usize),
                None => mark_dirty(self.mem, std::slice::from_ref(seg)),
            }
        }
    }
}

impl<M: GuestMemory + ?Sized> GuestAccess for GuestRam<'_, M> {
    fn contains(&self, addr: GuestAddress, len: usize, access: Permissions) -> bool {
        self.host_range(addr, len).is_some() || in_guest_ram(self.mem, addr, len, access)
    }

    fn read_into(&self, addr: GuestAddress, buf: &mut [u8]) -> bool {
        match self.host_range(addr, buf.len()) {
            // The guest may write the range concurrently, which volatile copies allow.
            // SAFETY: the range lies inside a region of `self.mem`, mapped while borrowed.
            Some(p) => unsafe { VolatileSlice::new(p, buf.len()) }.copy_to(buf) == buf.len(),
            None => read_guest(self.mem, addr, buf),
        }
    }

    fn write_from(&self, addr: GuestAddress, buf: &[u8]) -> bool {
        match self.find(addr, buf.len()) {
            Some((i, p)) => {
                // SAFETY: as for `read_into`; the bitmap is told right after.
                unsafe { VolatileSlice::new(p, buf.len()) }.copy_from(buf);
                self.wrote(i, addr, buf.len());
                true
            }
            None => write_guest(self.mem, addr, buf),
        }
    }

    fn load_u16(&self, addr: GuestAddress) -> Option<u16> {
        match self.host_range(addr, 2) {
            Some(p) if p.align_offset(2) == 0 => {
                // SAFETY: an aligned u16 inside mapped guest RAM (see `read_into`); the
                // guest updates ring indices atomically too.
                let v = unsafe { AtomicU16::from_ptr(p.cast()) }.load(Ordering::Acquire);
                Some(u16::from_le(v))
            }
            _ => self.mem.load_u16(addr),
        }
    }

    fn store_u16(&self, addr: GuestAddress, value: u16) -> bool {
        match self.find(addr, 2) {
            Some((i, p)) if p.align_offset(2) == 0 => {
                // SAFETY: as for `load_u16`.
                unsafe { AtomicU16::from_ptr(p.cast()) }.store(value.to_le(), Ordering::Release);
                self.wrote(i, addr, 2);
                true
            }
            _ => self.mem.store_u16(addr, value),
        }
    }
}

/// iovecs for a request, reused between requests. The pointers are only valid while
/// the guest memory they came from is borrowed; callers clear the list before
/// letting go of that borrow.
#[derive(Default)]
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: the list only holds pointers between `fill` and `clear` within one request,
// on the thread that owns it; in between requests it is empty, so moving it to
// another thread moves no live pointer.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// iovecs covering `segs` in `mem`; false if some segment is not guest RAM
    /// (segments from a walked chain always are).
    pub fn fill<M: GuestMemory + ?Sized>(
        &mut self,
        ram: &GuestRam<'_, M>,
        segs: &[Segment],
        device_writes: bool,
    ) -> bool {
        let mem = ram.memory();
        self.0.clear();
        let access = if device_writes {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for seg in segs {
            if let Some(p) = ram.host_range(seg.addr, seg.len as usize) {
                self.0.push(libc::iovec {
                    iov_base: p.cast(),
                    iov_len: seg.len as usize,
                });
                continue;
            }
            if let Some(slice) = region_slice(mem, seg.addr, seg.len as usize) {
                let ptr = if device_writes {
                    slice.ptr_guard_mut().as_ptr()
                } else {
                    slice.ptr_guard().as_ptr() as *mut u8
                };
                self.0.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
                continue;
            }
            let Ok(slices) = mem.get_slices(seg.addr, seg.len as usize, access) else {
                return false;
            };
            for slice in slices {
                let Ok(slice) = slice else {
                    return false;
                };
                let ptr = if device_writes {
                    slice.ptr_guard_mut().as_ptr()
                } else {
                    slice.ptr_guard().as_ptr() as *mut u8
                };
                self.0.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
            }
        }
        true
    }

    pub fn as_mut_slice(&mut self) -> &mut [libc::iovec] {
        &mut self.0
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// Tells the memory's dirty bitmap (if it keeps one) that the device wrote `segs`.
pub fn mark_dirty<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment]) {
    if std::mem::size_of::<M::Bitmap>() == 0 {
        return; // no bitmap to update
    }
    for seg in segs {
        if let Ok(slices) = mem.get_slices(seg.addr, seg.len as usize, Permissions::Write)
            && let Ok(slices) = slices.stop_on_error()
        {
            for s in slices {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
    }
}
