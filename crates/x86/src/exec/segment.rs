//! Segment register loads: real-mode arithmetic, or descriptors from the GDT/LDT with
//! the checks data-segment and stack loads make (mov sreg, pop sreg, and the far-pointer
//! loads in `legacy`).

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind};
use crate::exception::Exception;
use crate::machine::{Loc, Machine, Mem, R, Rd, W16, Width};
use crate::state::{CpuMode, SegReg, Segment};

fn gp() -> Exception {
    Exception::GeneralProtection(0)
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
        let s = &mut m.cpu.seg[seg as usize];
        *s = Segment {
            selector: sel,
            base: 0,
            limit: 0,
            attr: Segment::ATTR_UNUSABLE | (u32::from(rpl) << 5),
        };
        m.reload_segments();
        return Ok(());
    }
    let table = if sel & 4 != 0 {
        m.cpu.ldtr
    } else {
        Segment {
            base: m.cpu.gdtr.base,
            limit: u32::from(m.cpu.gdtr.limit),
            ..Segment::default()
        }
    };
    let index = u64::from(sel >> 3) * 8;
    if index + 7 > u64::from(table.limit) {
        return Err(Exception::GeneralProtection(err));
    }
    let lin = table.base.wrapping_add(index);
    let desc = m.system_read::<8>(lin)?;
    let attr = ((desc >> 40) & 0xff) as u32 | ((((desc >> 52) & 0xf) as u32) << 12);
    let s_bit = attr & Segment::ATTR_S != 0;
    let typ = attr & 0xf;
    let code = typ & 8 != 0;
    let dpl = ((attr >> 5) & 3) as u8;
    if seg == SegReg::Ss {
        // A writable data segment at exactly the current privilege.
        if !s_bit || code || typ & 2 == 0 || rpl != cpl || dpl != cpl {
            return Err(Exception::GeneralProtection(err));
        }
        if attr & Segment::ATTR_P == 0 {
            return Err(Exception::StackFault(err));
        }
    } else {
        let readable = !code || typ & 2 != 0;
        let conforming = code && typ & 4 != 0;
        if !s_bit || !readable || (!conforming && dpl < cpl.max(rpl)) {
            return Err(Exception::GeneralProtection(err));
        }
        if attr & Segment::ATTR_P == 0 {
            return Err(Exception::SegmentNotPresent(err));
        }
    }
    if attr & 1 == 0 {
        // Mark the descriptor accessed, as the processor does.
        m.system_write::<1>(lin.wrapping_add(5), ((desc >> 40) & 0xff) | 1)?;
    }
    let mut limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    if attr & Segment::ATTR_G != 0 {
        limit = (limit << 12) | 0xfff;
    }
    let base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
    m.cpu.seg[seg as usize] = Segment {
        selector: sel,
        base,
        limit,
        attr: attr | 1,
    };
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
    m.end_block();
    Ok(())
}

fn pop_sreg<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let sel = m.peek::<W>(0)? as u16;
    let seg = seg_of(i.t).ok_or(Exception::InvalidOpcode)?;
    load_segment(m, seg, sel)?;
    m.bump_rsp(W::BYTES as u64);
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
