//! The execution context handlers run against: a working copy of the registers, the lazy
//! flags, the CPU state, the TLB and the platform; operand access helpers.

use crate::code::CodeMap;
use crate::decode::{Cx, Insn};
use crate::flags::Flags;
use crate::hostmem::{HostPage, Tlb};
use crate::platform::{Bus, Layout};
use crate::state::{CpuMode, CpuState, SegReg, ctl, rflags};

pub(crate) type R<T = ()> = Result<T, crate::exception::Ex>;

/// Index of RIP in [`Machine::regs`]; while an instruction executes it holds the address of
/// the *next* instruction (what RIP-relative addressing and relative branches add to).
pub(crate) const RIP: u8 = 16;
/// Index of a register that always reads zero (absent base/index).
pub(crate) const ZERO: u8 = 17;
/// Segment index whose base is always zero (64-bit mode ignores ES/CS/SS/DS bases).
pub(crate) const SEG_NONE: u8 = 6;

/// Set in [`Machine::exit`]: end the current block after this instruction (code or mode
/// changed under it).
pub(crate) const EXIT_BLOCK: u8 = 1;
/// Set in [`Machine::exit`]: return from `run` after this instruction.
pub(crate) const EXIT_RUN: u8 = 2;

/// Set in [`Machine::exit`] by the placeholder handler of an instruction the interpreter
/// does not implement (nothing was changed).
pub(crate) const EXIT_UNSUPPORTED: u8 = 4;

/// Why an instruction asked `run` to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StopReason {
    Halt,
    PauseLoop,
}

/// PAUSEs in one run that make it a spin loop worth leaving (hardware's pause-loop
/// exiting uses a window of about 4096 cycles; this is about a thousand instructions
/// of a typical spin).
pub(crate) const PAUSE_LOOP: u32 = 256;

pub(crate) struct Machine<'a> {
    /// GPRs 0-15, RIP (16), zero (17); sized 32 so that masked indices need no bounds check.
    pub regs: [u64; 32],
    pub flags: Flags,
    /// Segment bases as addressing uses them (ES, CS, SS, DS, FS, GS, zero, zero).
    pub seg_base: [u64; 8],
    pub cpu: &'a mut CpuState,
    pub tlb: &'a mut Tlb,
    pub bus: &'a mut dyn Bus,
    /// Which guest-physical pages hold decoded code (None: the caller validates blocks
    /// by their bytes instead).
    pub code: Option<&'a CodeMap>,
    /// The code map's epoch the TLB's fast write entries are valid for.
    pub code_epoch: u64,
    /// The code map's count of TLB flushes this TLB has done.
    pub code_flushes: u64,
    /// TLB context: 1 at CPL 3, else 0.
    pub tlb_set: usize,
    /// Mode the code decodes in, derived from CR0/EFER/CS.
    pub mode: CpuMode,
    /// `mode` as the code cache tags blocks with it (0: 16-bit, 1: 32-bit, 2: 64-bit).
    pub mode_tag: u64,
    /// Instruction-pointer width mask of `mode`.
    pub ip_mask: u64,
    /// Stack address size mask (RSP, ESP or SP), from the mode and SS.B.
    pub stack_mask: u64,
    pub exit: u8,
    pub stop: Option<StopReason>,
    /// PAUSEs executed in this run (a spin loop is left at every [`PAUSE_LOOP`]th).
    pub pauses: u32,
    /// Code pages this interpreter wrote during the current block, for its cache to drop
    /// (other interpreters notice through the code map).
    pub smc: Vec<u64>,
    /// Guest RAM's host mappings the TLB's host pointers were taken from.
    pub layout: Layout,
    /// The bits CPUID reserves in CR4 and in page-table entries (asked at the first
    /// page walk or CR4 write).
    pub reserved: crate::reserved::Reserved,
}

impl<'a> Machine<'a> {
    pub(crate) fn new(
        cpu: &'a mut CpuState,
        tlb: &'a mut Tlb,
        bus: &'a mut dyn Bus,
        code: Option<&'a CodeMap>,
    ) -> Self {
        let mut regs = [0; 32];
        regs[..16].copy_from_slice(&cpu.gpr);
        regs[RIP as usize] = cpu.rip;
        let flags = Flags::from_bits(cpu.rflags);
        let mut m = Machine {
            regs,
            flags,
            seg_base: [0; 8],
            cpu,
            tlb,
            bus,
            code,
            code_epoch: 0,
            code_flushes: 0,
            tlb_set: 0,
            mode: CpuMode::Real,
            mode_tag: 0,
            ip_mask: 0xffff,
            stack_mask: u64::MAX,
            exit: 0,
            stop: None,
            pauses: 0,
            smc: Vec::new(),
            layout: Layout::UNKNOWN,
            reserved: Default::default(),
        };
        m.reload_segments();
        m
    }

    /// Writes the working registers and flags back into the CPU state.
    pub(crate) fn sync(&mut self) {
        self.cpu.gpr.copy_from_slice(&self.regs[..16]);
        self.cpu.rip = self.regs[RIP as usize];
        self.cpu.rflags = self.rflags();
    }

    /// Full RFLAGS with the lazy status flags materialised.
    pub(crate) fn rflags(&self) -> u64 {
        (self.cpu.rflags & !rflags::ARITH) | self.flags.bits() | rflags::FIXED
    }

    /// Re-derives what addressing caches from the segment registers and the privilege
    /// level; called after anything that loads a segment or changes CPL/mode.
    pub(crate) fn reload_segments(&mut self) {
        self.mode = self.cpu.mode();
        (self.mode_tag, self.ip_mask) = match self.mode.bitness() {
            16 => (0, 0xffff),
            32 => (1, 0xffff_ffff),
            _ => (2, u64::MAX),
        };
        let long = self.mode == CpuMode::Long64;
        self.stack_mask = if long {
            u64::MAX
        } else if self.cpu.seg[SegReg::Ss as usize].db() {
            0xffff_ffff
        } else {
            0xffff
        };
        for (k, s) in self.cpu.seg.iter().enumerate() {
            self.seg_base[k] = if long && k < SegReg::Fs as usize {
                0
            } else {
                s.base
            };
        }
        self.tlb_set = usize::from(self.cpu.cpl() == 3);
    }

    /// Decoding context for the current mode.
    pub(crate) fn cx(&self) -> Cx {
        Cx {
            bitness: self.mode.bitness(),
        }
    }

    /// Linear address of code at offset `rip` in CS.
    #[inline(always)]
    pub(crate) fn code_linear(&self, rip: u64) -> u64 {
        if self.mode == CpuMode::Long64 {
            rip
        } else {
            rip.wrapping_add(self.seg_base[SegReg::Cs as usize]) & 0xffff_ffff
        }
    }

    pub(crate) fn long_mode(&self) -> bool {
        self.cpu.efer & ctl::EFER_LMA != 0
    }

    #[inline(always)]
    pub(crate) fn rip(&self) -> u64 {
        self.regs[RIP as usize]
    }

    #[inline(always)]
    pub(crate) fn set_rip(&mut self, v: u64) {
        self.regs[RIP as usize] = v;
    }

    /// Reads register `r` at width W (for bytes, bit 4 of `r` selects AH..BH).
    #[inline(always)]
    pub(crate) fn reg<W: Width>(&self, r: u8) -> u64 {
        let v = self.regs[(r & 15) as usize];
        if W::BYTES == 1 {
            (v >> (u32::from((r >> 4) & 1) * 8)) & 0xff
        } else {
            v & W::MASK
        }
    }

    /// Writes register `r` at width W with the architectural merge rules: 8/16-bit writes
    /// keep the other bits, 32-bit writes zero the upper half.
    #[inline(always)]
    pub(crate) fn set_reg<W: Width>(&mut self, r: u8, v: u64) {
        let x = &mut self.regs[(r & 15) as usize];
        match W::BYTES {
            1 => {
                let sh = u32::from((r >> 4) & 1) * 8;
                *x = (*x & !(0xff << sh)) | ((v & 0xff) << sh);
            }
            2 => *x = (*x & !0xffff) | (v & 0xffff),
            4 => *x = v & 0xffff_ffff,
            _ => *x = v,
        }
    }

    /// Effective linear address of the instruction's memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, i: &Insn) -> u64 {
        let off = i
            .disp
            .wrapping_add(self.regs[(i.base & 31) as usize])
            .wrapping_add(self.regs[(i.index & 31) as usize] << (i.scale & 3));
        if i.flat {
            return off;
        }
        self.linear(i, off & i.amask)
    }

    /// Segment offset -> linear address for the instruction's segment.
    #[inline(always)]
    pub(crate) fn linear(&self, i: &Insn, off: u64) -> u64 {
        let lin = off.wrapping_add(self.seg_base[(i.seg & 7) as usize]);
        if i.wrap32 { lin & 0xffff_ffff } else { lin }
    }

    #[inline(always)]
    pub(crate) fn read<const N: usize>(&mut self, lin: u64) -> R<u64> {
        match self.tlb.read_fast::<N>(self.tlb_set, lin) {
            Some(v) => Ok(v),
            None => self.read_slow(lin, N),
        }
    }

    #[inline(always)]
    pub(crate) fn write<const N: usize>(&mut self, lin: u64, v: u64) -> R {
        if self.tlb.write_fast::<N>(self.tlb_set, lin, v) {
            Ok(())
        } else {
            self.write_slow(lin, N, v)
        }
    }

    pub(crate) fn read128(&mut self, lin: u64) -> R<u128> {
        if lin & 0xfff <= 0xff0 {
            // Both halves are in one page: translate once via the first read.
            let lo = self.read::<8>(lin)?;
            let hi = self.read::<8>(lin + 8)?;
            return Ok(u128::from(lo) | (u128::from(hi) << 64));
        }
        let mut b = [0u8; 16];
        self.read_bytes(lin, &mut b)?;
        Ok(u128::from_le_bytes(b))
    }

    pub(crate) fn write128(&mut self, lin: u64, v: u128) -> R {
        // Probe both ends first so a fault leaves memory untouched.
        self.probe_write(lin, 16)?;
        self.write::<8>(lin, v as u64)?;
        self.write::<8>(lin.wrapping_add(8), (v >> 64) as u64)
    }

    /// Runs a platform callback. The callback gets `&mut` to the platform, which could
    /// change its guest memory: cached host pointers are dropped afterwards unless guest
    /// RAM is still mapped where it was (see `hostmem`).
    pub(crate) fn platform<T>(&mut self, f: impl FnOnce(&mut dyn Bus) -> T) -> T {
        let r = f(self.bus);
        let now = self.bus.layout();
        if !now.same(&self.layout) {
            self.tlb.flush();
            self.layout = now;
        }
        r
    }

    /// The host mapping of a guest-physical RAM page. Reads use the cached layout of guest
    /// RAM (no region search); writes ask vm-memory, which marks the page dirty.
    #[inline]
    pub(crate) fn ram_page(&self, gpa_page: u64, write: bool) -> Option<HostPage> {
        if !write && let Some(h) = HostPage::in_layout(&self.layout, gpa_page) {
            return Some(h);
        }
        self.bus.ram_page(gpa_page, write)
    }

    /// Ends the current block after this instruction.
    pub(crate) fn end_block(&mut self) {
        self.exit |= EXIT_BLOCK;
    }

    /// Drops the TLB's fast write entries if a page became code since they were made
    /// (possibly in another interpreter): writes to code pages must take the slow path.
    #[inline(always)]
    pub(crate) fn check_code_epoch(&mut self) {
        if let Some(map) = self.code {
            let e = map.epoch();
            if e != self.code_epoch {
                self.code_epoch = e;
                let f = map.flushes();
                if f != self.code_flushes {
                    // A dirty log round began: every cached host handle goes.
                    self.code_flushes = f;
                    self.tlb.flush();
                } else {
                    self.tlb.drop_fast_writes();
                }
            }
        }
    }
}

/// An operand width. Values are carried in u64s; the width decides masking, sign bit and
/// the memory access size.
pub(crate) trait Width: 'static {
    const BYTES: usize;
    const BITS: u32;
    const MASK: u64;
    fn read(m: &mut Machine, lin: u64) -> R<u64>;
    fn write(m: &mut Machine, lin: u64, v: u64) -> R;
    #[inline(always)]
    fn sext(v: u64) -> u64 {
        (((v << (64 - Self::BITS)) as i64) >> (64 - Self::BITS)) as u64
    }
    #[inline(always)]
    fn sign(v: u64) -> bool {
        (v >> (Self::BITS - 1)) & 1 != 0
    }
}

macro_rules! width {
    ($name:ident, $n:literal) => {
        pub(crate) struct $name;
        impl Width for $name {
            const BYTES: usize = $n;
            const BITS: u32 = $n * 8;
            const MASK: u64 = if $n == 8 {
                u64::MAX
            } else {
                (1u64 << ($n * 8)) - 1
            };
            #[inline(always)]
            fn read(m: &mut Machine, lin: u64) -> R<u64> {
                m.read::<$n>(lin)
            }
            #[inline(always)]
            fn write(m: &mut Machine, lin: u64, v: u64) -> R {
                m.write::<$n>(lin, v)
            }
        }
    };
}
width!(W8, 1);
width!(W16, 2);
width!(W32, 4);
width!(W64, 8);

/// Where an operand lives, chosen at decode time so handlers are monomorphised per form.
pub(crate) trait Loc: 'static {
    const IS_MEM: bool = false;
    const IS_IMM: bool = false;
    /// Resolves the address once so a read-modify-write reads and writes the same place.
    #[inline(always)]
    fn addr(_m: &Machine, _i: &Insn) -> u64 {
        0
    }
    fn get<W: Width>(m: &mut Machine, i: &Insn, a: u64) -> R<u64>;
    fn put<W: Width>(m: &mut Machine, i: &Insn, a: u64, v: u64) -> R;
}

/// The register in `Insn::d`.
pub(crate) struct Rd;
/// The register in `Insn::s`.
pub(crate) struct Rs;
/// The memory operand.
pub(crate) struct Mem;
/// The immediate (already sign-extended to the operand size at decode).
pub(crate) struct Imm;

impl Loc for Rd {
    #[inline(always)]
    fn get<W: Width>(m: &mut Machine, i: &Insn, _a: u64) -> R<u64> {
        Ok(m.reg::<W>(i.d))
    }
    #[inline(always)]
    fn put<W: Width>(m: &mut Machine, i: &Insn, _a: u64, v: u64) -> R {
        m.set_reg::<W>(i.d, v);
        Ok(())
    }
}

impl Loc for Rs {
    #[inline(always)]
    fn get<W: Width>(m: &mut Machine, i: &Insn, _a: u64) -> R<u64> {
        Ok(m.reg::<W>(i.s))
    }
    #[inline(always)]
    fn put<W: Width>(m: &mut Machine, i: &Insn, _a: u64, v: u64) -> R {
        m.set_reg::<W>(i.s, v);
        Ok(())
    }
}

impl Loc for Mem {
    const IS_MEM: bool = true;
    #[inline(always)]
    fn addr(m: &Machine, i: &Insn) -> u64 {
        m.ea(i)
    }
    #[inline(always)]
    fn get<W: Width>(m: &mut Machine, _i: &Insn, a: u64) -> R<u64> {
        W::read(m, a)
    }
    #[inline(always)]
    fn put<W: Width>(m: &mut Machine, _i: &Insn, a: u64, v: u64) -> R {
        W::write(m, a, v)
    }
}

impl Loc for Imm {
    const IS_IMM: bool = true;
    #[inline(always)]
    fn get<W: Width>(_m: &mut Machine, i: &Insn, _a: u64) -> R<u64> {
        Ok(i.imm & W::MASK)
    }
    fn put<W: Width>(_m: &mut Machine, _i: &Insn, _a: u64, _v: u64) -> R {
        unreachable!("immediates are never destinations")
    }
}
