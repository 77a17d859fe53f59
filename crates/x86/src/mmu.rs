//! Linear -> guest-physical translation: the page walk (no paging, 32-bit, PAE, 4-level),
//! permission checks with architectural #PF error codes, accessed/dirty bit updates, TLB
//! fills, and the memory-access slow paths (TLB misses, page-crossing accesses, MMIO,
//! locked read-modify-writes).

use crate::exception::{Ex, Exception, pf};
use crate::hostmem::{Fill, HostPage, PAGE, PAGE_MASK, perm};
use crate::machine::{EXIT_BLOCK, Machine, R, Width};
use crate::state::{ctl, rflags};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
    Exec,
}

/// Where a linear address landed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target {
    /// Guest-physical address (with the page offset).
    pub gpa: u64,
    /// Host mapping of the page when it is RAM.
    pub host: Option<HostPage>,
}

const PTE_P: u64 = 1;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of a paging entry (MAXPHYADDR 52).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

pub(crate) fn canonical(lin: u64) -> bool {
    ((lin as i64) << 16 >> 16) as u64 == lin
}

fn load_dyn(h: HostPage, off: usize, n: usize) -> u64 {
    match n {
        1 => h.load::<1>(off),
        2 => h.load::<2>(off),
        4 => h.load::<4>(off),
        _ => h.load::<8>(off),
    }
}

fn store_dyn(h: HostPage, off: usize, n: usize, v: u64) {
    match n {
        1 => h.store::<1>(off, v),
        2 => h.store::<2>(off, v),
        4 => h.store::<4>(off, v),
        _ => h.store::<8>(off, v),
    }
}

impl Machine<'_> {
    /// The CR4 bits CPUID reserves, asked of it the first time.
    pub(crate) fn cr4_reserved(&mut self) -> u64 {
        if let Some(r) = self.reserved.cr4 {
            return r;
        }
        let r = crate::reserved::cr4_reserved(|l, s| self.platform(|p| p.cpuid(l, s)));
        self.reserved.cr4 = Some(r);
        r
    }

    /// The page-table entry address bits CPUID reserves, asked of it the first time.
    fn pte_reserved(&mut self) -> u64 {
        if let Some(r) = self.reserved.pte {
            return r;
        }
        let bits = crate::reserved::phys_bits(|l, s| self.platform(|p| p.cpuid(l, s)));
        let r = crate::reserved::pte_reserved(bits);
        self.reserved.pte = Some(r);
        r
    }

    fn user(&self) -> bool {
        self.tlb_set == 1
    }

    /// Whether a cached translation with effective permissions `p` allows `acc` now.
    /// `ac` is the current RFLAGS.AC, or false when deciding what the fast path may skip.
    fn permits(&self, p: u8, acc: Access, ac: bool) -> bool {
        let user = self.user();
        let upage = p & perm::USER != 0;
        let smap = self.cpu.cr4 & ctl::CR4_SMAP != 0 && !ac;
        match acc {
            Access::Read => {
                if user {
                    upage
                } else {
                    !(upage && smap)
                }
            }
            Access::Write => {
                let rw = p & perm::WRITE != 0;
                if user {
                    upage && rw
                } else {
                    !(upage && smap) && (rw || self.cpu.cr0 & ctl::CR0_WP == 0)
                }
            }
            Access::Exec => {
                let x = p & perm::EXEC != 0;
                if user {
                    upage && x
                } else {
                    x && !(upage && self.cpu.cr4 & ctl::CR4_SMEP != 0)
                }
            }
        }
    }

    /// Translates `lin` for `acc`, through the TLB or a walk (which fills the TLB).
    pub(crate) fn translate(&mut self, lin: u64, acc: Access) -> R<Target> {
        if self.long_mode() && !canonical(lin) {
            return Err(Exception::GeneralProtection(0).into());
        }
        let off = lin & 0xfff;
        let ac = self.cpu.rflags & rflags::AC != 0;
        if let Some((gpa, p, host)) = self.tlb.lookup(self.tlb_set, lin) {
            // A write also needs the dirty bit already set (else the walk sets it) and, for
            // RAM, a host handle looked up for writing (dirty logging).
            let write_ready = p & perm::DIRTY != 0 && (host.is_none() || p & perm::HOST_WRITE != 0);
            if self.permits(p, acc, ac) && (acc != Access::Write || write_ready) {
                if acc == Access::Write
                    && host.is_some()
                    && self.permits(p, Access::Write, false)
                    && !self.code.is_some_and(|c| c.is_code(gpa))
                {
                    // Fast writes were dropped (a page somewhere became code) and this one
                    // holds none: let the next writes go straight to it again.
                    self.tlb.arm_write(self.tlb_set, lin);
                }
                return Ok(Target {
                    gpa: gpa | off,
                    host,
                });
            }
        }
        let (gpa, mut p, page_size) = self.walk(lin, acc)?;
        let write = acc == Access::Write;
        let host = self.ram_page(gpa, write);
        if write {
            p |= perm::HOST_WRITE;
        }
        let fast_read = self.permits(p, Access::Read, false);
        let fast_exec = self.permits(p, Access::Exec, false);
        let fast_write = self.permits(p, Access::Write, false)
            && p & perm::DIRTY != 0
            && write
            && !self.code.is_some_and(|c| c.is_code(gpa));
        self.tlb.fill(
            self.tlb_set,
            Fill {
                lin_page: lin & PAGE_MASK,
                gpa,
                perm: p,
                host,
                fast_read,
                fast_write,
                fast_exec,
                page_size,
            },
        );
        Ok(Target {
            gpa: gpa | off,
            host,
        })
    }

    fn phys_read(&mut self, gpa: u64, n: usize) -> u64 {
        match self.ram_page(gpa & PAGE_MASK, false) {
            Some(h) => load_dyn(h, (gpa & 0xfff) as usize, n),
            None => {
                let mut b = [0u8; 8];
                self.platform(|p| p.mmio_read(gpa, &mut b[..n]));
                u64::from_le_bytes(b)
            }
        }
    }

    /// Sets accessed/dirty bits in a paging entry, atomically (other vCPUs share it).
    fn set_pte_bits(&mut self, gpa: u64, wide: bool, bits: u64) {
        // The layout's mapping (the same pages): an interpreter with a code map logs
        // the write in `note_write`; one without (the KVM fallback's) marks the page
        // through vm-memory, so a migration's dirty log sees it.
        let page = gpa & PAGE_MASK;
        let host = match self.code {
            Some(_) => HostPage::in_layout(&self.layout, page),
            None => None,
        }
        .or_else(|| self.bus.ram_page(page, true));
        if let Some(h) = host {
            let off = (gpa & 0xfff) as usize;
            if wide {
                h.fetch_or64(off, bits);
            } else {
                h.fetch_or32(off, bits as u32);
            }
            self.note_write(gpa);
        }
    }

    /// Walks the guest page tables. Returns the guest-physical page and the effective
    /// permissions (plus DIRTY when the final entry is dirty), or the #PF to raise.
    /// Also returns the size of the page that maps `lin` (4 KiB, 2/4 MiB, 1 GiB).
    pub(crate) fn walk(&mut self, lin: u64, acc: Access) -> R<(u64, u8, u64)> {
        self.tlb.walks += 1;
        let (cr0, cr3, cr4, efer) = (self.cpu.cr0, self.cpu.cr3, self.cpu.cr4, self.cpu.efer);
        let all = perm::WRITE | perm::USER | perm::EXEC | perm::DIRTY;
        if cr0 & ctl::CR0_PG == 0 {
            let a = if efer & ctl::EFER_LMA != 0 {
                lin
            } else {
                lin & 0xffff_ffff
            };
            return Ok((a & PAGE_MASK, all, PAGE as u64));
        }
        let user = self.user();
        let write = acc == Access::Write;
        let fetch = acc == Access::Exec;
        let nxe = efer & ctl::EFER_NXE != 0;
        let mut ec = if write { pf::WRITE } else { 0 } | if user { pf::USER } else { 0 };
        if fetch && (nxe || cr4 & ctl::CR4_SMEP != 0) {
            ec |= pf::FETCH;
        }
        let fault = |code: u32| -> Ex {
            Exception::PageFault {
                address: lin,
                error_code: code,
            }
            .into()
        };

        // (entry address, 8-byte entry?) of every level used, for the A/D updates.
        let mut used: [(u64, bool, u64); 4] = [(0, true, 0); 4];
        let mut nused = 0;
        let mut p = perm::WRITE | perm::USER | perm::EXEC;
        let (mut table, wide, shifts): (u64, bool, &[u32]) = if efer & ctl::EFER_LMA != 0 {
            (cr3 & ADDR_MASK, true, &[39, 30, 21, 12])
        } else if cr4 & ctl::CR4_PAE != 0 {
            // PAE: the PDPTE selected by bits 31:30 has only P (and address) bits.
            let pdpte_addr = (cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
            let pdpte = self.phys_read(pdpte_addr, 8);
            if pdpte & PTE_P == 0 {
                return Err(fault(ec));
            }
            (pdpte & ADDR_MASK, true, &[21, 12])
        } else {
            (cr3 & 0xffff_f000, false, &[22, 12])
        };
        let addr_reserved = if wide { self.pte_reserved() } else { 0 };
        let (bits_per, esize) = if wide { (9, 8) } else { (10, 4) };
        let mut frame = 0;
        let mut last = 0;
        let mut page_size = PAGE as u64;
        for (level, &shift) in shifts.iter().enumerate() {
            let idx = (lin >> shift) & ((1 << bits_per) - 1);
            let addr = table + idx * esize;
            let e = self.phys_read(addr, esize as usize);
            if e & PTE_P == 0 {
                return Err(fault(ec));
            }
            let leaf_level = shift == 12;
            let large = !leaf_level && e & PTE_PS != 0;
            let mut rsvd = wide && !nxe && e & PTE_NX != 0 || e & addr_reserved != 0;
            if large && shift == 39 {
                rsvd = true;
            }
            // A large page's frame is aligned: the bits between PAT (bit 12) and it.
            if large && wide && e & ((1 << shift) - 1) & !((1 << 13) - 1) != 0 {
                rsvd = true;
            }
            if large && !wide && cr4 & ctl::CR4_PSE == 0 {
                // Without PSE the bit is ignored: treat the entry as a table pointer.
            }
            if rsvd {
                return Err(fault(ec | pf::PRESENT | pf::RSVD));
            }
            if e & PTE_W == 0 {
                p &= !perm::WRITE;
            }
            if e & PTE_U == 0 {
                p &= !perm::USER;
            }
            if wide && nxe && e & PTE_NX != 0 {
                p &= !perm::EXEC;
            }
            used[nused] = (addr, wide, e);
            nused += 1;
            last = e;
            let is_large = large && (wide || cr4 & ctl::CR4_PSE != 0);
            if leaf_level || is_large {
                let size = 1u64 << shift;
                page_size = size;
                frame = if wide {
                    (e & ADDR_MASK & !(size - 1)) | (lin & (size - 1) & PAGE_MASK)
                } else if is_large {
                    // PSE-36: bits 20:13 of a 4 MiB PDE are physical bits 39:32.
                    let hi = ((e >> 13) & 0xff) << 32;
                    (e & 0xffc0_0000) | hi | (lin & 0x3f_f000)
                } else {
                    e & 0xffff_f000
                };
                let _ = level;
                break;
            }
            table = if wide { e & ADDR_MASK } else { e & 0xffff_f000 };
        }

        if !self.permits(p, acc, self.cpu.rflags & rflags::AC != 0) {
            return Err(fault(ec | pf::PRESENT));
        }
        // Entries read with A clear get it set (atomically, so racing walkers agree).
        for &(addr, w, e) in &used[..nused] {
            if e & PTE_A == 0 {
                self.set_pte_bits(addr, w, PTE_A);
            }
        }
        let mut dirty = last & PTE_D != 0;
        if write && !dirty {
            let (addr, w, _) = used[nused - 1];
            self.set_pte_bits(addr, w, PTE_D);
            dirty = true;
        }
        if dirty {
            p |= perm::DIRTY;
        }
        if cr4 & ctl::CR4_PGE != 0 && last & PTE_G != 0 {
            p |= perm::GLOBAL;
        }
        Ok((frame, p, page_size))
    }

    /// Records a completed write to guest-physical `gpa` (RAM): if the page held decoded
    /// code, its blocks become stale everywhere and the current block ends (it may be one
    /// of them).
    #[inline]
    pub(crate) fn note_write(&mut self, gpa: u64) {
        if let Some(c) = self.code
            && c.cpu_wrote(gpa)
        {
            self.smc.push(gpa & PAGE_MASK);
            self.exit |= EXIT_BLOCK;
        }
    }

    #[inline(never)]
    pub(crate) fn read_slow(&mut self, lin: u64, n: usize) -> R<u64> {
        if (lin & 0xfff) as usize + n <= PAGE {
            let t = self.translate(lin, Access::Read)?;
            return Ok(match t.host {
                Some(h) => load_dyn(h, (lin & 0xfff) as usize, n),
                None => {
                    let mut b = [0u8; 8];
                    self.platform(|p| p.mmio_read(t.gpa, &mut b[..n]));
                    u64::from_le_bytes(b)
                }
            });
        }
        let mut b = [0u8; 8];
        self.read_bytes(lin, &mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }

    #[inline(never)]
    pub(crate) fn write_slow(&mut self, lin: u64, n: usize, v: u64) -> R {
        if (lin & 0xfff) as usize + n <= PAGE {
            let t = self.translate(lin, Access::Write)?;
            match t.host {
                Some(h) => {
                    store_dyn(h, (lin & 0xfff) as usize, n, v);
                    self.note_write(t.gpa);
                }
                None => {
                    let b = v.to_le_bytes();
                    self.platform(|p| p.mmio_write(t.gpa, &b[..n]));
                }
            }
            return Ok(());
        }
        self.write_bytes(lin, &v.to_le_bytes()[..n])
    }

    /// Splits `[lin, lin + len)` at page boundaries (at most two pieces for len <= 4096).
    fn pieces(lin: u64, len: usize) -> [(u64, usize); 2] {
        let first = (PAGE - (lin & 0xfff) as usize).min(len);
        [(lin, first), (lin.wrapping_add(first as u64), len - first)]
    }

    /// Reads any number of bytes (up to a page) through translation.
    pub(crate) fn read_bytes(&mut self, lin: u64, out: &mut [u8]) -> R {
        let [(a, n1), (b, n2)] = Self::pieces(lin, out.len());
        let ta = self.translate(a, Access::Read)?;
        let tb = if n2 > 0 {
            Some(self.translate(b, Access::Read)?)
        } else {
            None
        };
        self.copy_out(ta, &mut out[..n1]);
        if let Some(tb) = tb {
            self.copy_out(tb, &mut out[n1..]);
        }
        Ok(())
    }

    fn copy_out(&mut self, t: Target, out: &mut [u8]) {
        match t.host {
            Some(h) => h.read_bytes((t.gpa & 0xfff) as usize, out),
            None => self.platform(|p| p.mmio_read(t.gpa, out)),
        }
    }

    /// Writes bytes (up to a page) through translation; both pages are translated before
    /// anything is written, so a fault on the second leaves memory unchanged.
    pub(crate) fn write_bytes(&mut self, lin: u64, data: &[u8]) -> R {
        let [(a, n1), (b, n2)] = Self::pieces(lin, data.len());
        let ta = self.translate(a, Access::Write)?;
        let tb = if n2 > 0 {
            Some(self.translate(b, Access::Write)?)
        } else {
            None
        };
        self.copy_in(ta, &data[..n1]);
        if let Some(tb) = tb {
            self.copy_in(tb, &data[n1..]);
        }
        Ok(())
    }

    fn copy_in(&mut self, t: Target, data: &[u8]) {
        match t.host {
            Some(h) => {
                h.write_bytes((t.gpa & 0xfff) as usize, data);
                self.note_write(t.gpa);
            }
            None => self.platform(|p| p.mmio_write(t.gpa, data)),
        }
    }

    /// Checks that `len` bytes at `lin` are writable without writing them.
    pub(crate) fn probe_write(&mut self, lin: u64, len: usize) -> R {
        let [(a, _), (b, n2)] = Self::pieces(lin, len);
        self.translate(a, Access::Write)?;
        if n2 > 0 {
            self.translate(b, Access::Write)?;
        }
        Ok(())
    }

    /// Checks that `len` bytes at `lin` are readable.
    pub(crate) fn probe_read(&mut self, lin: u64, len: usize) -> R {
        let [(a, _), (b, n2)] = Self::pieces(lin, len);
        self.translate(a, Access::Read)?;
        if n2 > 0 {
            self.translate(b, Access::Read)?;
        }
        Ok(())
    }

    /// Atomic read-modify-write of a W-sized location (LOCK prefix, xchg with memory):
    /// `f` maps the old value to the new one; returns the old value. On RAM this is a
    /// host compare-exchange loop on the same bytes the guest sees.
    pub(crate) fn locked_update<W: Width>(
        &mut self,
        lin: u64,
        mut f: impl FnMut(u64) -> u64,
    ) -> R<u64> {
        let n = W::BYTES;
        if (lin & 0xfff) as usize + n <= PAGE {
            let t = self.translate(lin, Access::Write)?;
            if let Some(h) = t.host {
                let off = (lin & 0xfff) as usize;
                let old = match n {
                    1 => h.update::<1>(off, f),
                    2 => h.update::<2>(off, f),
                    4 => h.update::<4>(off, f),
                    _ => h.update::<8>(off, f),
                };
                self.note_write(t.gpa);
                return Ok(old);
            }
        }
        // A split-page or MMIO locked access: serialise against other split locks.
        let _guard = crate::hostmem::split_lock();
        self.probe_write(lin, n)?;
        let mut b = [0u8; 8];
        self.read_bytes(lin, &mut b[..n])?;
        let old = u64::from_le_bytes(b);
        let new = f(old);
        self.write_bytes(lin, &new.to_le_bytes()[..n])?;
        Ok(old)
    }

    /// Fetches up to `out.len()` instruction bytes at `lin` (stops early at a page that
    /// cannot be fetched, if at least one byte was read). Returns the count.
    pub(crate) fn fetch(&mut self, lin: u64, out: &mut [u8]) -> R<usize> {
        let [(a, n1), (b, n2)] = Self::pieces(lin, out.len());
        let ta = self.translate(a, Access::Exec)?;
        self.copy_out(ta, &mut out[..n1]);
        if n2 > 0 {
            match self.translate(b, Access::Exec) {
                Ok(tb) => self.copy_out(tb, &mut out[n1..]),
                Err(_) => return Ok(n1),
            }
        }
        Ok(out.len())
    }
}
