//! The descriptor-table instructions besides lgdt/lidt: ltr/str, lldt/sldt, and the
//! descriptor probes lar/lsl/verr/verw.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::segment::{Descriptor, read_descriptor, read_descriptor_high};
use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::machine::{Loc, Machine, Mem, R, Rd, Rs, W16, Width};
use crate::state::rflags::ZF;
use crate::state::{CpuMode, Segment};

fn protected(m: &Machine) -> R {
    if matches!(m.mode, CpuMode::Real | CpuMode::Virtual8086) {
        Err(Exception::InvalidOpcode.into())
    } else {
        Ok(())
    }
}

fn cpl0(m: &Machine) -> R {
    if m.cpu.cpl() != 0 {
        Err(Exception::GeneralProtection(0).into())
    } else {
        Ok(())
    }
}

/// A system descriptor (LDT or TSS) from the GDT, with the upper base half in long mode.
fn system_descriptor(m: &mut Machine, sel: u16, types: &[u8]) -> R<(Descriptor, Segment)> {
    let err = sel & !3;
    if sel & 4 != 0 {
        return Err(Exception::GeneralProtection(err).into());
    }
    let d = read_descriptor(m, sel, false)?;
    if d.user() || !types.contains(&d.type_()) {
        return Err(Exception::GeneralProtection(err).into());
    }
    if !d.present() {
        return Err(Exception::SegmentNotPresent(err).into());
    }
    let mut seg = d.segment(sel);
    if m.long_mode() {
        // The upper half's type field must be zero, and the base canonical.
        let hi = read_descriptor_high(m, &d, sel)?;
        seg.base |= (hi & 0xffff_ffff) << 32;
        if hi >> 40 & 0x1f != 0 || !crate::mmu::canonical(seg.base) {
            return Err(Exception::GeneralProtection(err).into());
        }
    }
    Ok((d, seg))
}

fn ltr<S: Loc>(m: &mut Machine, i: &Insn) -> R {
    protected(m)?;
    cpl0(m)?;
    let a = S::addr(m, i);
    let sel = S::get::<W16>(m, i, a)? as u16;
    if sel & !3 == 0 {
        return Err(Exception::GeneralProtection(0).into());
    }
    // An available 16-bit (1) or 32/64-bit (9) TSS.
    let types: &[u8] = if m.long_mode() { &[9] } else { &[1, 9] };
    let (d, mut seg) = system_descriptor(m, sel, types)?;
    // Mark it busy in the GDT.
    m.system_write::<1>(d.lin.wrapping_add(5), ((d.raw >> 40) & 0xff) | 2)?;
    seg.attr |= 2;
    m.cpu.tr = seg;
    Ok(())
}

fn lldt<S: Loc>(m: &mut Machine, i: &Insn) -> R {
    protected(m)?;
    cpl0(m)?;
    let a = S::addr(m, i);
    let sel = S::get::<W16>(m, i, a)? as u16;
    if sel & !3 == 0 {
        m.cpu.ldtr = Segment {
            selector: sel,
            base: 0,
            limit: 0,
            attr: Segment::ATTR_UNUSABLE,
        };
        return Ok(());
    }
    let (_, seg) = system_descriptor(m, sel, &[2])?;
    m.cpu.ldtr = seg;
    Ok(())
}

/// sldt/str (TR when TR is true): the selector, zero-extended into a register or stored as
/// a word.
fn store_sel<W: Width, D: Loc, const TR: bool>(m: &mut Machine, i: &Insn) -> R {
    protected(m)?;
    if m.cpu.cr4 & crate::state::ctl::CR4_UMIP != 0 && m.cpu.cpl() != 0 {
        return Err(Exception::GeneralProtection(0).into());
    }
    let v = u64::from(if TR {
        m.cpu.tr.selector
    } else {
        m.cpu.ldtr.selector
    });
    let a = D::addr(m, i);
    D::put::<W>(m, i, a, v)
}

/// What lar/lsl/verr/verw check (OP 0..3) for the descriptor of `sel`; None leaves ZF
/// clear.
fn probe(m: &mut Machine, sel: u16, op: u8) -> R<Option<Descriptor>> {
    if sel & !3 == 0 {
        return Ok(None);
    }
    let d = match read_descriptor(m, sel, false) {
        Ok(d) => d,
        Err(e) if matches!(e.get(), Exception::GeneralProtection(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let cpl = m.cpu.cpl();
    let rpl = (sel & 3) as u8;
    let long = m.long_mode();
    let type_ok = if d.user() {
        match op {
            2 => d.readable(),
            3 => d.writable_data(),
            _ => true,
        }
    } else {
        let t = d.type_();
        match op {
            0 if long => matches!(t, 2 | 9 | 0xb | 0xc),
            0 => matches!(t, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc),
            1 if long => matches!(t, 2 | 9 | 0xb),
            1 => matches!(t, 1 | 2 | 3 | 9 | 0xb),
            _ => false,
        }
    };
    // Conforming code segments are visible from any privilege level.
    let priv_ok = d.conforming() || d.dpl() >= cpl.max(rpl);
    Ok((type_ok && priv_ok).then_some(d))
}

/// lar (OP 0) / lsl (OP 1): access rights or limit into the register when visible.
fn lar_lsl<W: Width, S: Loc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    protected(m)?;
    let a = S::addr(m, i);
    let sel = S::get::<W16>(m, i, a)? as u16;
    match probe(m, sel, OP)? {
        Some(d) => {
            let v = if OP == 0 {
                (d.raw >> 32) & 0x00ff_ff00
            } else {
                u64::from(d.limit())
            };
            m.set_reg::<W>(i.d, v & W::MASK);
            m.flags.set_bits(ZF, ZF);
        }
        None => m.flags.set_bits(ZF, 0),
    }
    Ok(())
}

/// verr (OP 2) / verw (OP 3).
fn ver<S: Loc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    protected(m)?;
    let a = S::addr(m, i);
    let sel = S::get::<W16>(m, i, a)? as u16;
    let ok = probe(m, sel, OP)?.is_some();
    m.flags.set_bits(ZF, if ok { ZF } else { 0 });
    Ok(())
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let mem0 = kind(i, 0) == K::Mem;
    let mem1 = kind(i, 1) == K::Mem;
    match i.mnemonic() {
        Mn::Ltr => Some(if mem0 {
            ltr::<Mem> as Handler
        } else {
            ltr::<Rd>
        }),
        Mn::Lldt => Some(if mem0 {
            lldt::<Mem> as Handler
        } else {
            lldt::<Rd>
        }),
        Mn::Str | Mn::Sldt => {
            let tr = i.mnemonic() == Mn::Str;
            sized!(op_size(i, 0), |W| Some(match (mem0, tr) {
                (true, true) => store_sel::<W, Mem, true> as Handler,
                (true, false) => store_sel::<W, Mem, false>,
                (false, true) => store_sel::<W, Rd, true>,
                (false, false) => store_sel::<W, Rd, false>,
            }))
        }
        Mn::Lar | Mn::Lsl => {
            let lar = i.mnemonic() == Mn::Lar;
            sized!(op_size(i, 0), |W| Some(match (mem1, lar) {
                (true, true) => lar_lsl::<W, Mem, 0> as Handler,
                (true, false) => lar_lsl::<W, Mem, 1>,
                (false, true) => lar_lsl::<W, Rs, 0>,
                (false, false) => lar_lsl::<W, Rs, 1>,
            }))
        }
        Mn::Verr | Mn::Verw => {
            let _ = d;
            Some(match (mem0, i.mnemonic() == Mn::Verr) {
                (true, true) => ver::<Mem, 2> as Handler,
                (true, false) => ver::<Mem, 3>,
                (false, true) => ver::<Rd, 2>,
                (false, false) => ver::<Rd, 3>,
            })
        }
        _ => None,
    }
}
