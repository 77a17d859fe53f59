//! Instructions that exist outside 64-bit mode (or mostly there): pusha/popa, the BCD
//! adjustments, bound, and the far-pointer loads lds/les/lss/lfs/lgs.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::segment::load_segment;
use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::flags::Flags;
use crate::machine::{Machine, R, W8, W16, W32, Width};
use crate::state::SegReg;
use crate::state::rflags::{AF, CF};

/// pusha/pushad: AX CX DX BX (original) SP BP SI DI.
fn pusha<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let n = W::BYTES as u64;
    let sp = m.regs[4];
    // Every slot is checked before anything is written, so a fault leaves memory as is.
    let low = m.stack_lin((8 * n).wrapping_neg());
    m.probe_write(low, 8 * W::BYTES)?;
    for r in 0..8u8 {
        let v = if r == 4 { sp & W::MASK } else { m.reg::<W>(r) };
        m.push::<W>(v)?;
    }
    Ok(())
}

/// popa/popad: DI SI BP (skip SP) BX DX CX AX.
fn popa<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let n = W::BYTES as u64;
    let mut vals = [0u64; 8];
    for (k, v) in vals.iter_mut().enumerate() {
        *v = m.peek::<W>(k as u64 * n)?;
    }
    for (k, r) in (0..8u8).rev().enumerate() {
        if r != 4 {
            m.set_reg::<W>(r, vals[k]);
        }
    }
    m.bump_rsp(8 * n);
    Ok(())
}

fn szp8(al: u64) -> u64 {
    super::shift::szp::<W8>(al)
}

fn daa(m: &mut Machine, _i: &Insn) -> R {
    let old_al = m.regs[0] & 0xff;
    let old_cf = m.flags.cf();
    let mut al = old_al;
    let mut af = false;
    if al & 0xf > 9 || m.flags.af() {
        al = (al + 6) & 0xff;
        af = true;
    }
    // The carry of the low adjustment is always overwritten by the high one.
    let cf = old_al > 0x99 || old_cf;
    if cf {
        al = (al + 0x60) & 0xff;
    }
    m.set_reg::<W8>(0, al);
    m.flags = Flags::from_bits(szp8(al) | if cf { CF } else { 0 } | if af { AF } else { 0 });
    Ok(())
}

fn das(m: &mut Machine, _i: &Insn) -> R {
    let old_al = m.regs[0] & 0xff;
    let old_cf = m.flags.cf();
    let mut al = old_al;
    let mut cf = false;
    let mut af = false;
    if al & 0xf > 9 || m.flags.af() {
        cf = old_cf || al < 6;
        al = al.wrapping_sub(6) & 0xff;
        af = true;
    }
    if old_al > 0x99 || old_cf {
        al = al.wrapping_sub(0x60) & 0xff;
        cf = true;
    }
    m.set_reg::<W8>(0, al);
    m.flags = Flags::from_bits(szp8(al) | if cf { CF } else { 0 } | if af { AF } else { 0 });
    Ok(())
}

/// aaa (SUB false) / aas: adjust AX after unpacked-BCD add/subtract.
fn aaa<const SUB: bool>(m: &mut Machine, _i: &Insn) -> R {
    let ax = m.regs[0] & 0xffff;
    let adjust = ax & 0xf > 9 || m.flags.af();
    let ax = if adjust {
        if SUB {
            // AX - 6 (the borrow reaches AH), then AH - 1.
            ax.wrapping_sub(6).wrapping_sub(0x100) & 0xffff
        } else {
            ax.wrapping_add(0x106) & 0xffff
        }
    } else {
        ax
    };
    let ax = ax & 0xff0f;
    m.set_reg::<W16>(0, ax);
    let f = if adjust { AF | CF } else { 0 };
    m.flags = Flags::from_bits(szp8(ax & 0xff) | f);
    Ok(())
}

fn aam(m: &mut Machine, i: &Insn) -> R {
    let base = i.imm & 0xff;
    if base == 0 {
        return Err(Exception::DivideError.into());
    }
    let al = m.regs[0] & 0xff;
    let ax = ((al / base) << 8) | (al % base);
    m.set_reg::<W16>(0, ax);
    m.flags = Flags::from_bits(szp8(ax & 0xff));
    Ok(())
}

fn aad(m: &mut Machine, i: &Insn) -> R {
    let base = i.imm & 0xff;
    let al = m.regs[0] & 0xff;
    let ah = (m.regs[0] >> 8) & 0xff;
    let r = (al + ah * base) & 0xff;
    m.set_reg::<W16>(0, r);
    m.flags = Flags::from_bits(szp8(r));
    Ok(())
}

/// bound r, m: #BR unless lower <= r <= upper (signed, W-sized bounds pair in memory).
fn bound<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let lo = W::sext(W::read(m, lin)?) as i64;
    let hi = W::sext(W::read(m, lin.wrapping_add(W::BYTES as u64))?) as i64;
    let v = W::sext(m.reg::<W>(i.d)) as i64;
    if v < lo || v > hi {
        return Err(Exception::BoundRange.into());
    }
    Ok(())
}

/// lds/les/lss/lfs/lgs r, m16:W: offset into the register, selector into the segment
/// (in `t`).
fn load_far<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let off = W::read(m, lin)?;
    let sel = m.read::<2>(lin.wrapping_add(W::BYTES as u64))? as u16;
    let seg = match i.t {
        0 => SegReg::Es,
        2 => SegReg::Ss,
        3 => SegReg::Ds,
        4 => SegReg::Fs,
        _ => SegReg::Gs,
    };
    load_segment(m, seg, sel)?;
    m.set_reg::<W>(i.d, off);
    m.end_block();
    Ok(())
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Pusha => Some(pusha::<W16> as Handler),
        Mn::Pushad => Some(pusha::<W32> as Handler),
        Mn::Popa => Some(popa::<W16> as Handler),
        Mn::Popad => Some(popa::<W32> as Handler),
        Mn::Daa => Some(daa),
        Mn::Das => Some(das),
        Mn::Aaa => Some(aaa::<false>),
        Mn::Aas => Some(aaa::<true>),
        Mn::Aam => Some(aam),
        Mn::Aad => Some(aad),
        Mn::Bound => match op_size(i, 0) {
            2 => Some(bound::<W16> as Handler),
            _ => Some(bound::<W32> as Handler),
        },
        Mn::Lds | Mn::Les | Mn::Lss | Mn::Lfs | Mn::Lgs if kind(i, 1) == K::Mem => {
            d.t = match i.mnemonic() {
                Mn::Les => 0,
                Mn::Lss => 2,
                Mn::Lds => 3,
                Mn::Lfs => 4,
                _ => 5,
            };
            match op_size(i, 0) {
                2 => Some(load_far::<W16> as Handler),
                4 => Some(load_far::<W32> as Handler),
                _ => Some(load_far::<crate::machine::W64> as Handler),
            }
        }
        _ => None,
    }
}
