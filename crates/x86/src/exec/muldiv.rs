//! mul/imul (one, two and three operands), div/idiv with #DE.

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::flags::{FlagOp, Flags};
use crate::machine::{Imm, Loc, Machine, Mem, R, Rd, Rs, W16, Width};

/// SF/ZF/AF/PF are undefined after multiplies; they are derived from the low result
/// (what Intel parts do), CF = OF = `overflow`. Kept lazily like arithmetic flags.
#[inline(always)]
fn mul_flags<W: Width>(lo: u64, overflow: bool) -> Flags {
    Flags::new(FlagOp::Mul, W::BITS, 0, u64::from(overflow), lo)
}

/// mul/imul r/m: rDX:rAX (AX for bytes) = rAX * src.
fn mul1<W: Width, S: Loc, const SIGNED: bool>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let b = S::get::<W>(m, i, sa)?;
    let a = m.reg::<W>(0);
    let bits = W::BITS;
    let (lo, hi, overflow) = if SIGNED {
        let p = i128::from(W::sext(a) as i64) * i128::from(W::sext(b) as i64);
        let lo = (p as u64) & W::MASK;
        let hi = ((p >> bits) as u64) & W::MASK;
        (lo, hi, p != i128::from(W::sext(lo) as i64))
    } else {
        let p = u128::from(a) * u128::from(b);
        let lo = (p as u64) & W::MASK;
        let hi = ((p >> bits) as u64) & W::MASK;
        (lo, hi, hi != 0)
    };
    if W::BYTES == 1 {
        m.set_reg::<W16>(0, lo | (hi << 8));
    } else {
        m.set_reg::<W>(0, lo);
        m.set_reg::<W>(2, hi);
    }
    m.flags = mul_flags::<W>(lo, overflow);
    Ok(())
}

/// imul r, r/m (A = the register, B = src) and imul r, r/m, imm (A = src, B = imm).
fn imul<W: Width, A: Loc, B: Loc>(m: &mut Machine, i: &Insn) -> R {
    let aa = A::addr(m, i);
    let a = A::get::<W>(m, i, aa)?;
    let ba = B::addr(m, i);
    let b = B::get::<W>(m, i, ba)?;
    let p = i128::from(W::sext(a) as i64) * i128::from(W::sext(b) as i64);
    let lo = (p as u64) & W::MASK;
    m.set_reg::<W>(i.d, lo);
    m.flags = mul_flags::<W>(lo, p != i128::from(W::sext(lo) as i64));
    Ok(())
}

/// div/idiv r/m. Flags are undefined and left unchanged.
fn div<W: Width, S: Loc, const SIGNED: bool>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let b = S::get::<W>(m, i, sa)?;
    if b == 0 {
        return Err(Exception::DivideError.into());
    }
    let bits = W::BITS;
    let (lo, hi) = if W::BYTES == 1 {
        (m.regs[0] & 0xff, (m.regs[0] >> 8) & 0xff)
    } else {
        (m.reg::<W>(0), m.reg::<W>(2))
    };
    let dividend = (u128::from(hi) << bits) | u128::from(lo);
    let (q, r) = if SIGNED {
        // Sign-extend the 2*bits-wide dividend.
        let sh = 128 - 2 * bits;
        let n = ((dividend << sh) as i128) >> sh;
        let d = i128::from(W::sext(b) as i64);
        // -2^127 / -1 does not fit even in i128 (64-bit idiv of RDX:RAX = 2^127 by -1).
        let Some(q) = n.checked_div(d) else {
            return Err(Exception::DivideError.into());
        };
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if q < min || q > max {
            return Err(Exception::DivideError.into());
        }
        ((q as u64) & W::MASK, ((n % d) as u64) & W::MASK)
    } else {
        let q = dividend / u128::from(b);
        if q > u128::from(W::MASK) {
            return Err(Exception::DivideError.into());
        }
        (q as u64, (dividend % u128::from(b)) as u64)
    };
    if W::BYTES == 1 {
        m.set_reg::<W16>(0, q | (r << 8));
    } else {
        m.set_reg::<W>(0, q);
        m.set_reg::<W>(2, r);
    }
    Ok(())
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let (k0, k1, k2) = (kind(i, 0), kind(i, 1), kind(i, 2));
    match i.mnemonic() {
        Mn::Mul | Mn::Div | Mn::Idiv | Mn::Imul if i.op_count() == 1 => {
            let mem = k0 == K::Mem;
            sized!(op_size(i, 0), |W| Some(match (i.mnemonic(), mem) {
                (Mn::Mul, false) => mul1::<W, Rd, false> as Handler,
                (Mn::Mul, true) => mul1::<W, Mem, false>,
                (Mn::Imul, false) => mul1::<W, Rd, true>,
                (Mn::Imul, true) => mul1::<W, Mem, true>,
                (Mn::Div, false) => div::<W, Rd, false>,
                (Mn::Div, true) => div::<W, Mem, false>,
                (Mn::Idiv, false) => div::<W, Rd, true>,
                _ => div::<W, Mem, true>,
            }))
        }
        Mn::Imul => sized!(op_size(i, 0), |W| Some(match (k1, k2) {
            (K::Reg, K::Absent) => imul::<W, Rd, Rs> as Handler,
            (K::Mem, K::Absent) => imul::<W, Rd, Mem>,
            (K::Reg, K::Imm) => imul::<W, Rs, Imm>,
            (K::Mem, K::Imm) => imul::<W, Mem, Imm>,
            _ => return None,
        })),
        _ => None,
    }
}
