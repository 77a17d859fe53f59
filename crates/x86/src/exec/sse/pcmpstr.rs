//! SSE4.2's string compares: pcmpestri, pcmpestrm (lengths in EAX and EDX, or RAX
//! and RDX with REX.W), pcmpistri, pcmpistrm (lengths up to the first zero element).
//! The immediate picks the element format, the aggregation (equal any, ranges, equal
//! each, equal ordered), the polarity and the output (an index into ECX or a mask into
//! XMM0); the flags report what was found and where the strings ended.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::int::lane;
use super::{XSrc, Xm, Xs, set_xmm, sse_ok, xmm};
use crate::decode::{Handler, Insn, K, kind};
use crate::flags::Flags;
use crate::machine::{Machine, R, W32};
use crate::state::rflags::{CF, OF, SF, ZF};

/// The element count and each element, sign- or zero-extended, as the format says.
struct Elements {
    count: usize,
    values: [i64; 16],
}

fn elements(v: u128, imm: u8) -> Elements {
    let words = imm & 1 != 0;
    let signed = imm & 2 != 0;
    let (count, bits) = if words { (8, 16) } else { (16, 8) };
    let mut values = [0i64; 16];
    for (k, e) in values.iter_mut().enumerate().take(count) {
        let x = if words {
            lane::<16>(v, k as u32)
        } else {
            lane::<8>(v, k as u32)
        };
        *e = if signed {
            ((x << (64 - bits)) as i64) >> (64 - bits)
        } else {
            x as i64
        };
    }
    Elements { count, values }
}

/// The implicit length: the index of the first zero element, or the count.
fn implicit_len(e: &Elements) -> usize {
    e.values[..e.count]
        .iter()
        .position(|&x| x == 0)
        .unwrap_or(e.count)
}

/// An explicit length: its absolute value, no more than the count.
fn explicit_len(v: u64, wide: bool, count: usize) -> usize {
    let abs = if wide {
        (v as i64).unsigned_abs()
    } else {
        u64::from((v as i32).unsigned_abs())
    };
    abs.min(count as u64) as usize
}

/// IntRes2: the aggregation of `a` (the set, ranges or needle; `la` valid elements)
/// against `b` (`lb` valid), then the polarity, one bit per element of `b`.
fn compare(a: &Elements, la: usize, b: &Elements, lb: usize, imm: u8) -> u32 {
    let n = a.count;
    let mut res1 = 0u32;
    for j in 0..n {
        let hit = match imm >> 2 & 3 {
            // Equal any: b[j] is one of a's valid elements.
            0 => j < lb && (0..la).any(|i| a.values[i] == b.values[j]),
            // Ranges: b[j] lies in one of a's valid (lower, upper) pairs.
            1 => {
                j < lb
                    && (0..la / 2 * 2)
                        .step_by(2)
                        .any(|i| a.values[i] <= b.values[j] && b.values[j] <= a.values[i + 1])
            }
            // Equal each: element by element; both invalid counts as equal.
            2 => match (j < la, j < lb) {
                (true, true) => a.values[j] == b.values[j],
                (false, false) => true,
                _ => false,
            },
            // Equal ordered: a (to its end) starts at b[j].
            _ => (0..n - j).all(|k| match (k < la, j + k < lb) {
                (false, _) => true,
                (true, false) => false,
                (true, true) => a.values[k] == b.values[j + k],
            }),
        };
        res1 |= u32::from(hit) << j;
    }
    let all = (1u32 << n) - 1;
    match imm >> 4 & 3 {
        1 => !res1 & all,
        3 => res1 ^ ((1u32 << lb) - 1),
        _ => res1,
    }
}

/// One string compare: EXPLICIT lengths or implicit ones, an INDEX or a mask.
fn pcmpstr<S: XSrc, const EXPLICIT: bool, const INDEX: bool>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let imm = i.imm as u8;
    let b = elements(S::get(m, i)?, imm);
    let a = elements(xmm(m, i.d), imm);
    let (la, lb) = if EXPLICIT {
        // REX.W widens the length registers (the decoder keeps it in `t`).
        let wide = i.t != 0;
        (
            explicit_len(m.regs[0], wide, a.count),
            explicit_len(m.regs[2], wide, b.count),
        )
    } else {
        (implicit_len(&a), implicit_len(&b))
    };
    let res2 = compare(&a, la, &b, lb, imm);
    let n = a.count;
    if INDEX {
        let index = if res2 == 0 {
            n as u32
        } else if imm & 0x40 != 0 {
            31 - res2.leading_zeros()
        } else {
            res2.trailing_zeros()
        };
        m.set_reg::<W32>(1, u64::from(index));
    } else {
        let mask = if imm & 0x40 == 0 {
            u128::from(res2)
        } else {
            let bits = 128 / n as u32;
            (0..n as u32)
                .filter(|k| res2 >> k & 1 != 0)
                .fold(0u128, |v, k| v | (u128::MAX >> (128 - bits)) << (bits * k))
        };
        set_xmm(m, 0, mask);
    }
    let mut flags = 0;
    if res2 != 0 {
        flags |= CF;
    }
    if lb < n {
        flags |= ZF;
    }
    if la < n {
        flags |= SF;
    }
    if res2 & 1 != 0 {
        flags |= OF;
    }
    m.flags = Flags::from_bits(flags);
    Ok(())
}

pub(crate) fn select(i: &Instruction, d: &mut Insn) -> Option<Handler> {
    let (explicit, index) = match i.mnemonic() {
        Mn::Pcmpestri | Mn::Pcmpestri64 => (true, true),
        Mn::Pcmpestrm | Mn::Pcmpestrm64 => (true, false),
        Mn::Pcmpistri => (false, true),
        Mn::Pcmpistrm => (false, false),
        _ => return None,
    };
    if !(kind(i, 0) == K::Reg && i.op_register(0).is_xmm()) {
        return None;
    }
    d.t = u8::from(matches!(i.mnemonic(), Mn::Pcmpestri64 | Mn::Pcmpestrm64));
    // The string compares take unaligned memory.
    macro_rules! forms {
        ($($e:literal, $x:literal);*) => {
            match (kind(i, 1), explicit, index) {
                $(
                    (K::Reg, $e, $x) => pcmpstr::<Xs, $e, $x> as Handler,
                    (K::Mem, $e, $x) => pcmpstr::<Xm<16, false>, $e, $x>,
                )*
                _ => return None,
            }
        };
    }
    Some(forms!(true, true; true, false; false, true; false, false))
}
