//! SSE/SSE2 data movement: full-register moves (aligned, unaligned, non-temporal),
//! scalar and half moves, movd/movq, GPR <-> XMM extracts (pmovmskb,
//! movmskps/pd), maskmovdqu, movnti.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::{V2, Xm, Xs, pick, set_xmm, sse_ok, vec2, xmm};
use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::machine::{Loc, Machine, Mem, R, Rd, Rs, W32, W64, Width};

/// dst = src (loads and register copies; memory sources arrive zero-extended).
pub(crate) struct Mov;
/// Low 32/64 bits from the source, the rest kept (movss/movsd register forms, movlps).
pub(crate) struct MovLow<const N: u32>;
/// High 64 bits from the source's low 64 (movhps load, movlhps).
pub(crate) struct MovHigh;
/// Low 64 bits from the source's high 64 (movhlps).
pub(crate) struct MovHighToLow;
/// movq xmm, xmm/m64: the low quadword, upper cleared.
pub(crate) struct MovQ;

impl V2 for Mov {
    #[inline(always)]
    fn apply(_m: &mut Machine, _a: u128, b: u128, _i: u8) -> R<u128> {
        Ok(b)
    }
}

impl<const N: u32> V2 for MovLow<N> {
    #[inline(always)]
    fn apply(_m: &mut Machine, a: u128, b: u128, _i: u8) -> R<u128> {
        let mask = (1u128 << N) - 1;
        Ok((a & !mask) | (b & mask))
    }
}

impl V2 for MovHigh {
    #[inline(always)]
    fn apply(_m: &mut Machine, a: u128, b: u128, _i: u8) -> R<u128> {
        Ok((a & u128::from(u64::MAX)) | (b << 64))
    }
}

impl V2 for MovHighToLow {
    #[inline(always)]
    fn apply(_m: &mut Machine, a: u128, b: u128, _i: u8) -> R<u128> {
        Ok((a & !u128::from(u64::MAX)) | (b >> 64))
    }
}

impl V2 for MovQ {
    #[inline(always)]
    fn apply(_m: &mut Machine, _a: u128, b: u128, _i: u8) -> R<u128> {
        Ok(b & u128::from(u64::MAX))
    }
}

/// Stores N bytes of the XMM register in `d` (HIGH: its upper quadword) to memory.
fn store<const N: usize, const ALIGN: bool, const HIGH: bool>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let lin = m.ea(i);
    if ALIGN && lin & 15 != 0 {
        return Err(Exception::GeneralProtection(0).into());
    }
    let v = xmm(m, i.d);
    let v = if HIGH { v >> 64 } else { v };
    match N {
        16 => m.write128(lin, v),
        8 => m.write::<8>(lin, v as u64),
        _ => m.write::<4>(lin, v as u64),
    }
}

/// movd/movq xmm, r/m32|64: zero-extended into the register.
fn movd_in<W: Width, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let sa = S::addr(m, i);
    let v = S::get::<W>(m, i, sa)?;
    set_xmm(m, i.d, u128::from(v));
    Ok(())
}

/// movd/movq r/m32|64, xmm (the XMM register is `s` for a register destination, `d`
/// for a memory one).
fn movd_out<W: Width, D: Loc>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let x = if D::IS_MEM { i.d } else { i.s };
    let v = xmm(m, x) as u64 & W::MASK;
    let da = D::addr(m, i);
    D::put::<W>(m, i, da, v)
}

/// movq xmm/m64, xmm (66 0F D6) with a register destination: zero-extends.
fn movq_rr(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let v = xmm(m, i.s) & u128::from(u64::MAX);
    set_xmm(m, i.d, v);
    Ok(())
}

/// pmovmskb / movmskps / movmskpd: the sign bit of each LANE-bit lane into a GPR.
fn movmsk<W: Width, const LANE: u32>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let v = xmm(m, i.s);
    let mut r = 0u64;
    for k in 0..128 / LANE {
        r |= (((v >> (k * LANE + LANE - 1)) & 1) as u64) << k;
    }
    m.set_reg::<W>(i.d, r);
    Ok(())
}

/// maskmovdqu xmm1, xmm2: the bytes of xmm1 whose xmm2 mask byte has bit 7 set go to
/// DS:rDI.
fn maskmovdqu(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let data = xmm(m, i.d);
    let mask = xmm(m, i.s);
    let base = m.regs[7] & i.amask;
    for k in 0..16u32 {
        if (mask >> (8 * k + 7)) & 1 != 0 {
            let off = base.wrapping_add(u64::from(k)) & i.amask;
            let lin = m.linear(i, off);
            m.write::<1>(lin, (data >> (8 * k)) as u64)?;
        }
    }
    Ok(())
}

fn xmm_reg(i: &Instruction, n: u32) -> bool {
    kind(i, n) == K::Reg && i.op_register(n).is_xmm()
}

fn gpr_reg(i: &Instruction, n: u32) -> bool {
    kind(i, n) == K::Reg && i.op_register(n).is_gpr()
}

/// Moves between XMM registers and memory (load via `L`, register copy via `RR`, store N
/// bytes).
fn moves<L: V2, RR: V2, const N: usize, const ALIGN: bool, const HIGH: bool>(
    i: &Instruction,
) -> Option<Handler> {
    match (kind(i, 0), kind(i, 1)) {
        (K::Reg, K::Reg) => Some(vec2::<RR, Xs> as Handler),
        (K::Reg, K::Mem) => match (N, ALIGN) {
            (16, true) => Some(vec2::<L, Xm<16, true>> as Handler),
            (16, false) => Some(vec2::<L, Xm<16, false>>),
            (8, _) => Some(vec2::<L, Xm<8, false>>),
            _ => Some(vec2::<L, Xm<4, false>>),
        },
        (K::Mem, K::Reg) => Some(store::<N, ALIGN, HIGH> as Handler),
        _ => None,
    }
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Movaps | Mn::Movapd | Mn::Movdqa | Mn::Movntps | Mn::Movntpd | Mn::Movntdq => {
            moves::<Mov, Mov, 16, true, false>(i)
        }
        Mn::Movups | Mn::Movupd | Mn::Movdqu => moves::<Mov, Mov, 16, false, false>(i),
        Mn::Movss => moves::<Mov, MovLow<32>, 4, false, false>(i),
        Mn::Movsd if xmm_reg(i, 0) || xmm_reg(i, 1) => moves::<Mov, MovLow<64>, 8, false, false>(i),
        Mn::Movlps | Mn::Movlpd => moves::<MovLow<64>, MovLow<64>, 8, false, false>(i),
        Mn::Movhps | Mn::Movhpd => moves::<MovHigh, MovHigh, 8, false, true>(i),
        Mn::Movlhps => pick::<MovHigh>(i),
        Mn::Movhlps => pick::<MovHighToLow>(i),
        Mn::Movd | Mn::Movq => {
            let (k0, k1) = (kind(i, 0), kind(i, 1));
            if xmm_reg(i, 0) && (gpr_reg(i, 1) || (k1 == K::Mem && i.mnemonic() == Mn::Movd)) {
                return match (op_size(i, 1), k1) {
                    (4, K::Reg) => Some(movd_in::<W32, Rs> as Handler),
                    (4, _) => Some(movd_in::<W32, Mem>),
                    (8, K::Reg) => Some(movd_in::<W64, Rs>),
                    (_, _) => Some(movd_in::<W64, Mem>),
                };
            }
            if xmm_reg(i, 1) && (gpr_reg(i, 0) || (k0 == K::Mem && i.mnemonic() == Mn::Movd)) {
                return match (op_size(i, 0), k0) {
                    (4, K::Reg) => Some(movd_out::<W32, Rd> as Handler),
                    (4, _) => Some(movd_out::<W32, Mem>),
                    (8, K::Reg) => Some(movd_out::<W64, Rd>),
                    (_, _) => Some(movd_out::<W64, Mem>),
                };
            }
            // movq between XMM registers and 64-bit memory.
            match i.code() {
                iced_x86::Code::Movq_xmm_xmmm64 => match k1 {
                    K::Reg => Some(vec2::<MovQ, Xs> as Handler),
                    _ => Some(vec2::<MovQ, Xm<8, false>>),
                },
                iced_x86::Code::Movq_xmmm64_xmm => match k0 {
                    K::Reg => Some(movq_rr as Handler),
                    _ => Some(store::<8, false, false>),
                },
                iced_x86::Code::Movq_xmm_rm64 if k1 == K::Mem => {
                    Some(movd_in::<W64, Mem> as Handler)
                }
                iced_x86::Code::Movq_rm64_xmm if k0 == K::Mem => {
                    Some(movd_out::<W64, Mem> as Handler)
                }
                _ => None,
            }
        }
        Mn::Movnti => match op_size(i, 0) {
            4 => Some(crate::exec::mov::mov::<W32, Mem, Rd> as Handler),
            _ => Some(crate::exec::mov::mov::<W64, Mem, Rd>),
        },
        Mn::Pmovmskb if gpr_reg(i, 0) && xmm_reg(i, 1) => match op_size(i, 0) {
            8 => Some(movmsk::<W64, 8> as Handler),
            _ => Some(movmsk::<W32, 8>),
        },
        Mn::Movmskps if gpr_reg(i, 0) => match op_size(i, 0) {
            8 => Some(movmsk::<W64, 32> as Handler),
            _ => Some(movmsk::<W32, 32>),
        },
        Mn::Movmskpd if gpr_reg(i, 0) => match op_size(i, 0) {
            8 => Some(movmsk::<W64, 64> as Handler),
            _ => Some(movmsk::<W32, 64>),
        },
        Mn::Maskmovdqu => Some(maskmovdqu),
        _ => None,
    }
}
