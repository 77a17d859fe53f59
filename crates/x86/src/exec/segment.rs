//! Segment register loads: real-mode arithmetic, or descriptors from the GDT/LDT with
//! the checks data-segment and stack loads make (mov sreg, pop sreg, and the far-pointer
//! loads in `legacy`).

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind};
use crate::exception::{Ex, Exception};
use crate::machine::{Loc, Machine, Mem, R, Rd, W16, Width};
use crate::state::{CpuMode, SegReg, Segment};

fn gp() -> Ex {
    Exception::GeneralProtection(0).into()
}

/// A segment or system descriptor read from the GDT or LDT.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Descriptor {
    /// Linear address of the descriptor (for the accessed and busy bits).
    pub lin: u64,
    pub raw: u64,
}

impl Descriptor {
    /// Attributes in the VMX access-rights layout of [`Segment::attr`].
    pub fn attr(&self) -> u32 {
        ((self.raw >> 40) & 0xff) as u32 | ((((self.raw >> 52) & 0xf) as u32) << 12)
    }
    pub fn dpl(&self) -> u8 {
        ((self.raw >> 45) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.raw & (1 << 47) != 0
    }
    /// S = 1 (code or data, not a system descriptor).
    pub fn user(&self) -> bool {
        self.raw & (1 << 44) != 0
    }
    pub fn type_(&self) -> u8 {
        ((self.raw >> 40) & 0xf) as u8
    }
    pub fn code(&self) -> bool {
        self.user() && self.type_() & 8 != 0
    }
    pub fn conforming(&self) -> bool {
        self.code() && self.type_() & 4 != 0
    }
    /// A data segment that can be written (what SS needs).
    pub fn writable_data(&self) -> bool {
        self.user() && self.type_() & 0xa == 2
    }
    /// A code segment that can be read, or any data segment.
    pub fn readable(&self) -> bool {
        self.user() && (self.type_() & 8 == 0 || self.type_() & 2 != 0)
    }
    pub fn long(&self) -> bool {
        self.raw & (1 << 53) != 0
    }
    pub fn big(&self) -> bool {
        self.raw & (1 << 54) != 0
    }
    pub fn base(&self) -> u64 {
        ((self.raw >> 16) & 0xff_ffff) | (((self.raw >> 56) & 0xff) << 24)
    }
    /// The limit in bytes (scaled by G).
    pub fn limit(&self) -> u32 {
        let limit = ((self.raw & 0xffff) | ((self.raw >> 32) & 0xf_0000)) as u32;
        if self.raw & (1 << 55) != 0 {
            (limit << 12) | 0xfff
        } else {
            limit
        }
    }

    /// The descriptor cache contents for selector `sel` (marked accessed).
    pub fn segment(&self, sel: u16) -> Segment {
        Segment {
            selector: sel,
            base: self.base(),
            limit: self.limit(),
            attr: self.attr() | if self.user() { 1 } else { 0 },
        }
    }
}

/// The error code of a fault about selector `sel`: its index and TI bit, plus EXT when
/// the fault happens while delivering an external event.
pub(crate) fn sel_error(sel: u16, ext: bool) -> u16 {
    (sel & !3) | u16::from(ext)
}

/// Reads the descriptor `sel` selects (the caller has ruled out null selectors). A
/// selector beyond its table's limit raises #GP(selector).
pub(crate) fn read_descriptor(m: &mut Machine, sel: u16, ext: bool) -> R<Descriptor> {
    let (base, limit) = if sel & 4 != 0 {
        let l = m.cpu.ldtr;
        if l.attr & Segment::ATTR_UNUSABLE != 0 || !l.present() {
            return Err(Exception::GeneralProtection(sel_error(sel, ext)).into());
        }
        (l.base, u64::from(l.limit))
    } else {
        (m.cpu.gdtr.base, u64::from(m.cpu.gdtr.limit))
    };
    let index = u64::from(sel >> 3) * 8;
    if index + 7 > limit {
        return Err(Exception::GeneralProtection(sel_error(sel, ext)).into());
    }
    let lin = base.wrapping_add(index);
    let lin = if m.long_mode() {
        lin
    } else {
        lin & 0xffff_ffff
    };
    let raw = m.system_read::<8>(lin)?;
    Ok(Descriptor { lin, raw })
}

/// Reads the upper half of a 16-byte system descriptor (LDT, TSS, gates in long mode).
pub(crate) fn read_descriptor_high(m: &mut Machine, d: &Descriptor, sel: u16) -> R<u64> {
    let table_limit = if sel & 4 != 0 {
        u64::from(m.cpu.ldtr.limit)
    } else {
        u64::from(m.cpu.gdtr.limit)
    };
    if u64::from(sel >> 3) * 8 + 15 > table_limit {
        return Err(Exception::GeneralProtection(sel & !3).into());
    }
    m.system_read::<8>(d.lin.wrapping_add(8))
}

/// Sets the accessed bit of a code/data descriptor in memory, as the processor does when
/// it loads one.
pub(crate) fn mark_accessed(m: &mut Machine, d: &Descriptor) -> R {
    if d.user() && d.raw & (1 << 40) == 0 {
        m.system_write::<1>(d.lin.wrapping_add(5), ((d.raw >> 40) & 0xff) | 1)?;
    }
    Ok(())
}

/// A null selector loaded into a data segment register (or SS in 64-bit mode): unusable,
/// with the selector's RPL as DPL (what CPL derives from when it is SS).
pub(crate) fn null_segment(sel: u16) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0,
        attr: Segment::ATTR_UNUSABLE | (u32::from(sel & 3) << 5),
    }
}

/// Loads a segment register from a selector: real-mode arithmetic, or a descriptor from
/// the GDT/LDT with the checks data-segment and stack loads make.
pub(crate) fn load_segment(m: &mut Machine, seg: SegReg, sel: u16) -> R {
    let mode = m.cpu.mode();
    if matches!(mode, CpuMode::Real | CpuMode::Virtual8086) {
        let s = &mut m.cpu.seg[seg as usize];
        s.selector = sel;
        s.base = u64::from(sel) << 4;
        m.reload_segments();
        return Ok(());
    }
    let cpl = m.cpu.cpl();
    let rpl = (sel & 3) as u8;
    let err = sel & !3;
    if sel & !3 == 0 {
        // Null selector: fine for data segments (unusable), and for SS only in 64-bit mode
        // below CPL 3 with RPL = CPL.
        if seg == SegReg::Ss && !(mode == CpuMode::Long64 && cpl != 3 && rpl == cpl) {
            return Err(gp());
        }
        m.cpu.seg[seg as usize] = null_segment(sel);
        m.reload_segments();
        return Ok(());
    }
    let d = read_descriptor(m, sel, false)?;
    let dpl = d.dpl();
    if seg == SegReg::Ss {
        // A writable data segment at exactly the current privilege.
        if !d.writable_data() || rpl != cpl || dpl != cpl {
            return Err(Exception::GeneralProtection(err).into());
        }
        if !d.present() {
            return Err(Exception::StackFault(err).into());
        }
    } else {
        if !d.readable() || (!d.conforming() && dpl < cpl.max(rpl)) {
            return Err(Exception::GeneralProtection(err).into());
        }
        if !d.present() {
            return Err(Exception::SegmentNotPresent(err).into());
        }
    }
    mark_accessed(m, &d)?;
    m.cpu.seg[seg as usize] = d.segment(sel);
    m.reload_segments();
    Ok(())
}

impl Machine<'_> {
    /// An implicit supervisor-mode access (descriptor tables): translated as CPL 0.
    pub(crate) fn system_read<const N: usize>(&mut self, lin: u64) -> R<u64> {
        let saved = self.tlb_set;
        self.tlb_set = 0;
        let r = self.read::<N>(lin);
        self.tlb_set = saved;
        r
    }

    pub(crate) fn system_write<const N: usize>(&mut self, lin: u64, v: u64) -> R {
        let saved = self.tlb_set;
        self.tlb_set = 0;
        let r = self.write::<N>(lin, v);
        self.tlb_set = saved;
        r
    }
}

fn seg_of(r: u8) -> Option<SegReg> {
    Some(match r {
        0 => SegReg::Es,
        2 => SegReg::Ss,
        3 => SegReg::Ds,
        4 => SegReg::Fs,
        5 => SegReg::Gs,
        _ => return None,
    })
}

/// mov sreg, r/m16 (segment number in `t`).
fn mov_to_sreg<S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let a = S::addr(m, i);
    let sel = S::get::<W16>(m, i, a)? as u16;
    let seg = seg_of(i.t).ok_or(Exception::InvalidOpcode)?;
    load_segment(m, seg, sel)?;
    // Loading SS blocks interrupts for one instruction (so the rSP load can follow).
    m.cpu.interrupt_shadow |= seg == SegReg::Ss;
    m.end_block();
    Ok(())
}

fn pop_sreg<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let sel = m.peek::<W>(0)? as u16;
    let seg = seg_of(i.t).ok_or(Exception::InvalidOpcode)?;
    load_segment(m, seg, sel)?;
    m.bump_rsp(W::BYTES as u64);
    m.cpu.interrupt_shadow |= seg == SegReg::Ss;
    m.end_block();
    Ok(())
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let (k0, k1) = (kind(i, 0), kind(i, 1));
    let sreg0 = k0 == K::Reg && i.op_register(0).is_segment_register();
    match i.mnemonic() {
        Mn::Mov if sreg0 => {
            d.t = i.op_register(0).number() as u8;
            Some(match k1 {
                K::Mem => mov_to_sreg::<Mem> as Handler,
                _ => {
                    d.d = d.s;
                    mov_to_sreg::<Rd>
                }
            })
        }
        Mn::Pop if sreg0 => {
            d.t = i.op_register(0).number() as u8;
            let n = i.stack_pointer_increment() as usize;
            sized!(n, |W| Some(pop_sreg::<W> as Handler))
        }
        _ => None,
    }
}
