//! shl/sal/shr/sar, rol/ror/rcl/rcr, shld/shrd.

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::flags::{FlagOp, Flags};
use crate::machine::{Loc, Machine, Mem, R, Rd, Width};
use crate::state::rflags::{CF, OF, PF, SF, ZF};

/// Where the count comes from.
pub(crate) trait Count: 'static {
    fn get(m: &Machine, i: &Insn) -> u64;
}
pub(crate) struct ByImm;
pub(crate) struct ByCl;
impl Count for ByImm {
    #[inline(always)]
    fn get(_m: &Machine, i: &Insn) -> u64 {
        i.imm & 0xff
    }
}
impl Count for ByCl {
    #[inline(always)]
    fn get(m: &Machine, _i: &Insn) -> u64 {
        m.regs[1] & 0xff
    }
}

#[inline(always)]
fn count_mask<W: Width>() -> u64 {
    if W::BYTES == 8 { 0x3f } else { 0x1f }
}

/// shl/shr/sar: OP 0 = shl, 1 = shr, 2 = sar.
fn shift<W: Width, D: Loc, C: Count, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    let n = C::get(m, i) & count_mask::<W>();
    let da = D::addr(m, i);
    let a = D::get::<W>(m, i, da)?;
    if n == 0 {
        // A zero count changes no flags; a 32-bit register still gets its upper half
        // cleared, like every 32-bit register write.
        return zero_count::<W, D>(m, i, da, a);
    }
    let (r, op) = match OP {
        0 => ((a << n) & W::MASK, FlagOp::Shl),
        1 => (a >> n, FlagOp::Shr),
        _ => (
            (((W::sext(a) as i64) >> n.min(63)) as u64) & W::MASK,
            FlagOp::Sar,
        ),
    };
    D::put::<W>(m, i, da, r)?;
    m.flags = Flags::new(op, W::BITS, a, n, r);
    Ok(())
}

/// A shift or rotate that does nothing still writes a 32-bit register destination.
#[inline(always)]
fn zero_count<W: Width, D: Loc>(m: &mut Machine, i: &Insn, da: u64, a: u64) -> R {
    if W::BYTES == 4 && !D::IS_MEM {
        D::put::<W>(m, i, da, a)?;
    }
    Ok(())
}

/// Parity, zero and sign of a W-sized result as RFLAGS bits.
#[inline(always)]
pub(crate) fn szp<W: Width>(r: u64) -> u64 {
    let mut f = 0;
    if (0x9669u64 >> ((r ^ (r >> 4)) & 0xf)) & 1 != 0 {
        f |= PF;
    }
    if r & W::MASK == 0 {
        f |= ZF;
    }
    if W::sign(r) {
        f |= SF;
    }
    f
}

/// rol/ror/rcl/rcr: OP 0 = rol, 1 = ror, 2 = rcl, 3 = rcr. Only CF and OF change; OF is
/// defined for a count of one (the same formula is used for other counts).
fn rotate<W: Width, D: Loc, C: Count, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    let masked = C::get(m, i) & count_mask::<W>();
    let da = D::addr(m, i);
    let a = D::get::<W>(m, i, da)?;
    let bits = u64::from(W::BITS);
    let msb = |v: u64| (v >> (bits - 1)) & 1;
    let (r, cf, of) = match OP {
        0 | 1 => {
            if masked == 0 {
                return zero_count::<W, D>(m, i, da, a);
            }
            let k = masked % bits;
            let r = if OP == 0 {
                ((a << k) | (a >> ((bits - k) % bits))) & W::MASK
            } else {
                ((a >> k) | (a << ((bits - k) % bits))) & W::MASK
            };
            if OP == 0 {
                let cf = r & 1;
                (r, cf, msb(r) ^ cf)
            } else {
                (r, msb(r), msb(r) ^ ((r >> (bits - 2)) & 1))
            }
        }
        _ => {
            // Rotate through carry: a (bits + 1)-bit rotation of CF:value.
            let k = match W::BYTES {
                1 => masked % 9,
                2 => masked % 17,
                _ => masked,
            };
            if k == 0 {
                return zero_count::<W, D>(m, i, da, a);
            }
            let cf_in = u128::from(m.flags.cf());
            let v = (cf_in << bits) | u128::from(a);
            let width = bits as u32 + 1;
            let k = k as u32;
            let full = (1u128 << width) - 1;
            let rot = if OP == 2 {
                ((v << k) | (v >> (width - k))) & full
            } else {
                ((v >> k) | (v << (width - k))) & full
            };
            let r = (rot as u64) & W::MASK;
            let cf = ((rot >> bits) & 1) as u64;
            let of = if OP == 2 {
                msb(r) ^ cf
            } else {
                msb(a) ^ (cf_in as u64)
            };
            (r, cf, of)
        }
    };
    D::put::<W>(m, i, da, r)?;
    m.flags.set_bits(CF | OF, (cf * CF) | (of * OF));
    Ok(())
}

/// shld (LEFT) / shrd: shift `dst` filling from `src` (register `d`/memory, source `s`).
fn shxd<W: Width, D: Loc, C: Count, const LEFT: bool>(m: &mut Machine, i: &Insn) -> R {
    let n = C::get(m, i) & count_mask::<W>();
    let da = D::addr(m, i);
    let a = D::get::<W>(m, i, da)?;
    if n == 0 {
        return zero_count::<W, D>(m, i, da, a);
    }
    let src_reg = if D::IS_MEM { i.d } else { i.s };
    let b = m.reg::<W>(src_reg);
    let bits = u64::from(W::BITS);
    // 16-bit: work on a dst:src:dst concatenation so counts above 16 behave like Intel
    // parts (the result is architecturally undefined there).
    let (r, cf) = if W::BYTES == 2 {
        let cat = (a << 32) | (b << 16) | a;
        if LEFT {
            (((cat << n) >> 32) & 0xffff, (cat >> (48 - n)) & 1)
        } else {
            ((cat >> n) & 0xffff, (cat >> (n - 1)) & 1)
        }
    } else if LEFT {
        let r = ((a << n) | (b >> (bits - n))) & W::MASK;
        (r, (a >> (bits - n)) & 1)
    } else {
        let r = ((a >> n) | (b << (bits - n))) & W::MASK;
        (r, (a >> (n - 1)) & 1)
    };
    D::put::<W>(m, i, da, r)?;
    let of = (r ^ a) >> (bits - 1) & 1;
    m.flags = Flags::from_bits(szp::<W>(r) | (cf * CF) | (of * OF));
    Ok(())
}

fn shift_sel<W: Width, D: Loc>(i: &Instruction, mn: Mn) -> Option<Handler> {
    macro_rules! by_count {
        ($f:ident, $op:expr) => {
            match kind(i, 1) {
                K::Imm => $f::<W, D, ByImm, $op> as Handler,
                _ => $f::<W, D, ByCl, $op>,
            }
        };
    }
    Some(match mn {
        Mn::Shl | Mn::Sal => by_count!(shift, 0),
        Mn::Shr => by_count!(shift, 1),
        Mn::Sar => by_count!(shift, 2),
        Mn::Rol => by_count!(rotate, 0),
        Mn::Ror => by_count!(rotate, 1),
        Mn::Rcl => by_count!(rotate, 2),
        Mn::Rcr => by_count!(rotate, 3),
        _ => return None,
    })
}

fn shxd_sel<W: Width, D: Loc>(i: &Instruction, left: bool) -> Option<Handler> {
    Some(match (kind(i, 2), left) {
        (K::Imm, true) => shxd::<W, D, ByImm, true> as Handler,
        (K::Imm, false) => shxd::<W, D, ByImm, false>,
        (_, true) => shxd::<W, D, ByCl, true>,
        (_, false) => shxd::<W, D, ByCl, false>,
    })
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let mn = i.mnemonic();
    let mem = kind(i, 0) == K::Mem;
    match mn {
        Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar | Mn::Rol | Mn::Ror | Mn::Rcl | Mn::Rcr => {
            sized!(op_size(i, 0), |W| if mem {
                shift_sel::<W, Mem>(i, mn)
            } else {
                shift_sel::<W, Rd>(i, mn)
            })
        }
        Mn::Shld | Mn::Shrd => {
            let left = mn == Mn::Shld;
            sized!(op_size(i, 0), |W| if mem {
                shxd_sel::<W, Mem>(i, left)
            } else {
                shxd_sel::<W, Rd>(i, left)
            })
        }
        _ => None,
    }
}
