//! Single-lane moves and ptest: pextrb/pextrw/pextrd/pextrq/extractps (a lane to a
//! GPR or memory), pinsrb/pinsrw/pinsrd/pinsrq (a GPR or memory into a lane),
//! insertps, and ptest's flags.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::int::lane;
use super::{V2, XSrc, Xm, Xs, sse_ok, vec2, xmm};
use crate::decode::{Handler, Insn, K, kind, op_size};
use crate::flags::Flags;
use crate::machine::{Machine, R, W32, W64, Width};
use crate::state::rflags::{CF, ZF};

/// The BITS-bit lane of `v` the immediate selects.
fn selected<const BITS: u32>(v: u128, imm: u64) -> u64 {
    lane::<BITS>(v, imm as u32 & (128 / BITS - 1))
}

/// pextr*/extractps to a register (zero-extended to its width W).
fn extract_reg<const BITS: u32, W: Width>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let v = selected::<BITS>(xmm(m, i.s), i.imm);
    m.set_reg::<W>(i.d, v);
    Ok(())
}

/// pextr*/extractps to memory (BITS / 8 bytes).
fn extract_mem<const BITS: u32>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let v = selected::<BITS>(xmm(m, i.d), i.imm);
    let lin = m.ea(i);
    match BITS {
        8 => m.write::<1>(lin, v),
        16 => m.write::<2>(lin, v),
        32 => m.write::<4>(lin, v),
        _ => m.write::<8>(lin, v),
    }
}

/// A GPR as the source of pinsr*.
pub(crate) struct Xg;

impl XSrc for Xg {
    #[inline(always)]
    fn get(m: &mut Machine, i: &Insn) -> R<u128> {
        Ok(u128::from(m.regs[(i.s & 15) as usize]))
    }
}

/// pinsr*: the source's low BITS into the lane the immediate selects.
pub(crate) struct Insert<const BITS: u32>;

impl<const BITS: u32> V2 for Insert<BITS> {
    #[inline(always)]
    fn apply(_m: &mut Machine, a: u128, b: u128, imm: u8) -> R<u128> {
        let mask = u128::from(u64::MAX >> (64 - BITS));
        let shift = BITS * (u32::from(imm) & (128 / BITS - 1));
        Ok((a & !(mask << shift)) | ((b & mask) << shift))
    }
}

/// insertps: a dword (from a register's lane imm[7:6], or memory: FROM_REG false) into
/// lane imm[5:4], then the lanes imm[3:0] names zeroed.
pub(crate) struct Insertps<const FROM_REG: bool>;

impl<const FROM_REG: bool> V2 for Insertps<FROM_REG> {
    #[inline(always)]
    fn apply(_m: &mut Machine, a: u128, b: u128, imm: u8) -> R<u128> {
        let src = if FROM_REG {
            lane::<32>(b, u32::from(imm >> 6))
        } else {
            b as u32 as u64
        };
        let at = 32 * u32::from(imm >> 4 & 3);
        let mut r = (a & !(0xffff_ffffu128 << at)) | (u128::from(src) << at);
        for k in 0..4 {
            if imm >> k & 1 != 0 {
                r &= !(0xffff_ffffu128 << (32 * k));
            }
        }
        Ok(r)
    }
}

/// ptest: ZF when dst AND src is zero, CF when (NOT dst) AND src is; the other
/// arithmetic flags clear.
fn ptest<S: XSrc>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let b = S::get(m, i)?;
    let a = xmm(m, i.d);
    let zf = if a & b == 0 { ZF } else { 0 };
    let cf = if !a & b == 0 { CF } else { 0 };
    m.flags = Flags::from_bits(zf | cf);
    Ok(())
}

fn xmm_at(i: &Instruction, n: u32) -> bool {
    kind(i, n) == K::Reg && i.op_register(n).is_xmm()
}

fn extract<const BITS: u32>(i: &Instruction) -> Option<Handler> {
    if !xmm_at(i, 1) {
        return None;
    }
    Some(match (kind(i, 0), op_size(i, 0)) {
        (K::Mem, _) => extract_mem::<BITS> as Handler,
        (K::Reg, 8) => extract_reg::<BITS, W64>,
        (K::Reg, _) => extract_reg::<BITS, W32>,
        _ => return None,
    })
}

fn insert<const BITS: u32>(i: &Instruction) -> Option<Handler> {
    if !xmm_at(i, 0) {
        return None;
    }
    Some(match (kind(i, 1), BITS) {
        (K::Reg, _) => vec2::<Insert<BITS>, Xg> as Handler,
        (K::Mem, 8) => vec2::<Insert<BITS>, Xm<1, false>>,
        (K::Mem, 16) => vec2::<Insert<BITS>, Xm<2, false>>,
        (K::Mem, 32) => vec2::<Insert<BITS>, Xm<4, false>>,
        (K::Mem, _) => vec2::<Insert<BITS>, Xm<8, false>>,
        _ => return None,
    })
}

pub(crate) fn select(i: &Instruction) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Pextrb => extract::<8>(i),
        Mn::Pextrw => extract::<16>(i),
        Mn::Pextrd | Mn::Extractps => extract::<32>(i),
        Mn::Pextrq => extract::<64>(i),
        Mn::Pinsrb => insert::<8>(i),
        Mn::Pinsrw => insert::<16>(i),
        Mn::Pinsrd => insert::<32>(i),
        Mn::Pinsrq => insert::<64>(i),
        Mn::Insertps if xmm_at(i, 0) => match kind(i, 1) {
            K::Reg => Some(vec2::<Insertps<true>, Xs> as Handler),
            K::Mem => Some(vec2::<Insertps<false>, Xm<4, false>>),
            _ => None,
        },
        Mn::Ptest if xmm_at(i, 0) => match kind(i, 1) {
            K::Reg => Some(ptest::<Xs> as Handler),
            K::Mem => Some(ptest::<Xm<16, true>>),
            _ => None,
        },
        _ => None,
    }
}
