//! SSE2 integer instructions and the bitwise logic shared with the float forms: lane-wise
//! arithmetic (wrapping and saturating), multiplies, averages, min/max, compares, shifts,
//! packs, unpacks and shuffles.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::{V2, pick};
use crate::decode::{Handler, Insn};
use crate::machine::{Machine, R};

/// Lane `k` of `v` with `BITS`-bit lanes.
#[inline(always)]
pub(super) fn lane<const BITS: u32>(v: u128, k: u32) -> u64 {
    ((v >> (k * BITS)) as u64) & mask::<BITS>()
}

#[inline(always)]
pub(super) const fn mask<const BITS: u32>() -> u64 {
    if BITS == 64 {
        u64::MAX
    } else {
        (1u64 << BITS) - 1
    }
}

#[inline(always)]
pub(super) fn sx<const BITS: u32>(x: u64) -> i64 {
    ((x << (64 - BITS)) as i64) >> (64 - BITS)
}

/// Builds a vector lane by lane from `f(lane index)`.
#[inline(always)]
pub(super) fn build<const BITS: u32>(f: impl Fn(u32) -> u64) -> u128 {
    let mut r = 0u128;
    for k in 0..128 / BITS {
        r |= u128::from(f(k) & mask::<BITS>()) << (k * BITS);
    }
    r
}

#[inline(always)]
pub(super) fn map2<const BITS: u32>(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    build::<BITS>(|k| f(lane::<BITS>(a, k), lane::<BITS>(b, k)))
}

pub(super) fn sat_s<const BITS: u32>(v: i64) -> u64 {
    let max = (1i64 << (BITS - 1)) - 1;
    let min = -(1i64 << (BITS - 1));
    v.clamp(min, max) as u64
}

fn sat_u<const BITS: u32>(v: i64) -> u64 {
    v.clamp(0, mask::<BITS>() as i64) as u64
}

/// Shift count of psll/psrl/psra: the whole low quadword of the source (or the imm8).
fn count(b: u128) -> u64 {
    b as u64
}

fn shl<const BITS: u32>(a: u128, n: u64) -> u128 {
    if n >= u64::from(BITS) {
        0
    } else {
        build::<BITS>(|k| lane::<BITS>(a, k) << n)
    }
}

fn shr<const BITS: u32>(a: u128, n: u64) -> u128 {
    if n >= u64::from(BITS) {
        0
    } else {
        build::<BITS>(|k| lane::<BITS>(a, k) >> n)
    }
}

fn sar<const BITS: u32>(a: u128, n: u64) -> u128 {
    let n = n.min(u64::from(BITS) - 1);
    build::<BITS>(|k| (sx::<BITS>(lane::<BITS>(a, k)) >> n) as u64)
}

/// Interleaves the low (HIGH = false) or high halves of a and b, lanes of BITS.
fn unpack<const BITS: u32>(a: u128, b: u128, high: bool) -> u128 {
    let half = 64 / BITS;
    let base = if high { half } else { 0 };
    build::<BITS>(|k| {
        let src = if k % 2 == 0 { a } else { b };
        lane::<BITS>(src, base + k / 2)
    })
}

/// Packs the FROM-bit lanes of a then b into lanes half as wide, saturating.
fn pack<const FROM: u32, const SIGNED_DST: bool>(a: u128, b: u128) -> u128 {
    let n = 128 / FROM;
    let to = FROM / 2;
    let mut r = 0u128;
    for k in 0..2 * n {
        let v = if k < n {
            lane_dyn(a, k, FROM)
        } else {
            lane_dyn(b, k - n, FROM)
        };
        let s = ((v << (64 - FROM)) as i64) >> (64 - FROM);
        let max_s = (1i64 << (to - 1)) - 1;
        let min_s = -(1i64 << (to - 1));
        let out = if SIGNED_DST {
            s.clamp(min_s, max_s) as u64
        } else {
            s.clamp(0, (1i64 << to) - 1) as u64
        } & ((1u64 << to) - 1);
        r |= u128::from(out) << (k * to);
    }
    r
}

fn lane_dyn(v: u128, k: u32, bits: u32) -> u64 {
    ((v >> (k * bits)) as u64)
        & if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
}

op! {
    Paddb => |a, b, i| map2::<8>(a, b, |x, y| x.wrapping_add(y));
    Paddw => |a, b, i| map2::<16>(a, b, |x, y| x.wrapping_add(y));
    Paddd => |a, b, i| map2::<32>(a, b, |x, y| x.wrapping_add(y));
    Paddq => |a, b, i| map2::<64>(a, b, |x, y| x.wrapping_add(y));
    Psubb => |a, b, i| map2::<8>(a, b, |x, y| x.wrapping_sub(y));
    Psubw => |a, b, i| map2::<16>(a, b, |x, y| x.wrapping_sub(y));
    Psubd => |a, b, i| map2::<32>(a, b, |x, y| x.wrapping_sub(y));
    Psubq => |a, b, i| map2::<64>(a, b, |x, y| x.wrapping_sub(y));
    Paddsb => |a, b, i| map2::<8>(a, b, |x, y| sat_s::<8>(sx::<8>(x) + sx::<8>(y)));
    Paddsw => |a, b, i| map2::<16>(a, b, |x, y| sat_s::<16>(sx::<16>(x) + sx::<16>(y)));
    Psubsb => |a, b, i| map2::<8>(a, b, |x, y| sat_s::<8>(sx::<8>(x) - sx::<8>(y)));
    Psubsw => |a, b, i| map2::<16>(a, b, |x, y| sat_s::<16>(sx::<16>(x) - sx::<16>(y)));
    Paddusb => |a, b, i| map2::<8>(a, b, |x, y| sat_u::<8>(x as i64 + y as i64));
    Paddusw => |a, b, i| map2::<16>(a, b, |x, y| sat_u::<16>(x as i64 + y as i64));
    Psubusb => |a, b, i| map2::<8>(a, b, |x, y| sat_u::<8>(x as i64 - y as i64));
    Psubusw => |a, b, i| map2::<16>(a, b, |x, y| sat_u::<16>(x as i64 - y as i64));
    Pmullw => |a, b, i| map2::<16>(a, b, |x, y| (sx::<16>(x) * sx::<16>(y)) as u64);
    Pmulhw => |a, b, i| map2::<16>(a, b, |x, y| ((sx::<16>(x) * sx::<16>(y)) >> 16) as u64);
    Pmulhuw => |a, b, i| map2::<16>(a, b, |x, y| (x * y) >> 16);
    Pmuludq => |a, b, i| map2::<64>(a, b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff));
    Pmaddwd => |a, b, i| build::<32>(|k| {
        let p0 = sx::<16>(lane::<16>(a, 2 * k)) * sx::<16>(lane::<16>(b, 2 * k));
        let p1 = sx::<16>(lane::<16>(a, 2 * k + 1)) * sx::<16>(lane::<16>(b, 2 * k + 1));
        (p0 + p1) as u64
    });
    Psadbw => |a, b, i| build::<64>(|k| {
        (0..8).map(|j| lane::<8>(a, 8 * k + j).abs_diff(lane::<8>(b, 8 * k + j))).sum()
    });
    Pavgb => |a, b, i| map2::<8>(a, b, |x, y| (x + y + 1) >> 1);
    Pavgw => |a, b, i| map2::<16>(a, b, |x, y| (x + y + 1) >> 1);
    Pminub => |a, b, i| map2::<8>(a, b, |x, y| x.min(y));
    Pmaxub => |a, b, i| map2::<8>(a, b, |x, y| x.max(y));
    Pminsw => |a, b, i| map2::<16>(a, b, |x, y| sx::<16>(x).min(sx::<16>(y)) as u64);
    Pmaxsw => |a, b, i| map2::<16>(a, b, |x, y| sx::<16>(x).max(sx::<16>(y)) as u64);
    Pcmpeqb => |a, b, i| map2::<8>(a, b, |x, y| if x == y { u64::MAX } else { 0 });
    Pcmpeqw => |a, b, i| map2::<16>(a, b, |x, y| if x == y { u64::MAX } else { 0 });
    Pcmpeqd => |a, b, i| map2::<32>(a, b, |x, y| if x == y { u64::MAX } else { 0 });
    Pcmpgtb => |a, b, i| map2::<8>(a, b, |x, y| if sx::<8>(x) > sx::<8>(y) { u64::MAX } else { 0 });
    Pcmpgtw => |a, b, i| map2::<16>(a, b, |x, y| if sx::<16>(x) > sx::<16>(y) { u64::MAX } else { 0 });
    Pcmpgtd => |a, b, i| map2::<32>(a, b, |x, y| if sx::<32>(x) > sx::<32>(y) { u64::MAX } else { 0 });
    And => |a, b, i| a & b;
    AndNot => |a, b, i| !a & b;
    Or => |a, b, i| a | b;
    Xor => |a, b, i| a ^ b;
    Psllw => |a, b, i| shl::<16>(a, count(b));
    Pslld => |a, b, i| shl::<32>(a, count(b));
    Psllq => |a, b, i| shl::<64>(a, count(b));
    Psrlw => |a, b, i| shr::<16>(a, count(b));
    Psrld => |a, b, i| shr::<32>(a, count(b));
    Psrlq => |a, b, i| shr::<64>(a, count(b));
    Psraw => |a, b, i| sar::<16>(a, count(b));
    Psrad => |a, b, i| sar::<32>(a, count(b));
    Pslldq => |a, b, i| if i > 15 { 0 } else { a << (8 * u32::from(i)) };
    Psrldq => |a, b, i| if i > 15 { 0 } else { a >> (8 * u32::from(i)) };
    Packsswb => |a, b, i| pack::<16, true>(a, b);
    Packssdw => |a, b, i| pack::<32, true>(a, b);
    Packuswb => |a, b, i| pack::<16, false>(a, b);
    Punpcklbw => |a, b, i| unpack::<8>(a, b, false);
    Punpcklwd => |a, b, i| unpack::<16>(a, b, false);
    Punpckldq => |a, b, i| unpack::<32>(a, b, false);
    Punpcklqdq => |a, b, i| unpack::<64>(a, b, false);
    Punpckhbw => |a, b, i| unpack::<8>(a, b, true);
    Punpckhwd => |a, b, i| unpack::<16>(a, b, true);
    Punpckhdq => |a, b, i| unpack::<32>(a, b, true);
    Punpckhqdq => |a, b, i| unpack::<64>(a, b, true);
    Pshufd => |a, b, i| build::<32>(|k| lane::<32>(b, (u32::from(i) >> (2 * k)) & 3));
    Pshuflw => |a, b, i| build::<16>(|k| if k < 4 { lane::<16>(b, (u32::from(i) >> (2 * k)) & 3) } else { lane::<16>(b, k) });
    Pshufhw => |a, b, i| build::<16>(|k| if k >= 4 { lane::<16>(b, 4 + ((u32::from(i) >> (2 * (k - 4))) & 3)) } else { lane::<16>(b, k) });
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Paddb => pick::<Paddb>(i),
        Mn::Paddw => pick::<Paddw>(i),
        Mn::Paddd => pick::<Paddd>(i),
        Mn::Paddq => pick::<Paddq>(i),
        Mn::Psubb => pick::<Psubb>(i),
        Mn::Psubw => pick::<Psubw>(i),
        Mn::Psubd => pick::<Psubd>(i),
        Mn::Psubq => pick::<Psubq>(i),
        Mn::Paddsb => pick::<Paddsb>(i),
        Mn::Paddsw => pick::<Paddsw>(i),
        Mn::Psubsb => pick::<Psubsb>(i),
        Mn::Psubsw => pick::<Psubsw>(i),
        Mn::Paddusb => pick::<Paddusb>(i),
        Mn::Paddusw => pick::<Paddusw>(i),
        Mn::Psubusb => pick::<Psubusb>(i),
        Mn::Psubusw => pick::<Psubusw>(i),
        Mn::Pmullw => pick::<Pmullw>(i),
        Mn::Pmulhw => pick::<Pmulhw>(i),
        Mn::Pmulhuw => pick::<Pmulhuw>(i),
        Mn::Pmuludq => pick::<Pmuludq>(i),
        Mn::Pmaddwd => pick::<Pmaddwd>(i),
        Mn::Psadbw => pick::<Psadbw>(i),
        Mn::Pavgb => pick::<Pavgb>(i),
        Mn::Pavgw => pick::<Pavgw>(i),
        Mn::Pminub => pick::<Pminub>(i),
        Mn::Pmaxub => pick::<Pmaxub>(i),
        Mn::Pminsw => pick::<Pminsw>(i),
        Mn::Pmaxsw => pick::<Pmaxsw>(i),
        Mn::Pcmpeqb => pick::<Pcmpeqb>(i),
        Mn::Pcmpeqw => pick::<Pcmpeqw>(i),
        Mn::Pcmpeqd => pick::<Pcmpeqd>(i),
        Mn::Pcmpgtb => pick::<Pcmpgtb>(i),
        Mn::Pcmpgtw => pick::<Pcmpgtw>(i),
        Mn::Pcmpgtd => pick::<Pcmpgtd>(i),
        Mn::Pand | Mn::Andps | Mn::Andpd => pick::<And>(i),
        Mn::Pandn | Mn::Andnps | Mn::Andnpd => pick::<AndNot>(i),
        Mn::Por | Mn::Orps | Mn::Orpd => pick::<Or>(i),
        Mn::Pxor | Mn::Xorps | Mn::Xorpd => pick::<Xor>(i),
        Mn::Psllw => pick::<Psllw>(i),
        Mn::Pslld => pick::<Pslld>(i),
        Mn::Psllq => pick::<Psllq>(i),
        Mn::Psrlw => pick::<Psrlw>(i),
        Mn::Psrld => pick::<Psrld>(i),
        Mn::Psrlq => pick::<Psrlq>(i),
        Mn::Psraw => pick::<Psraw>(i),
        Mn::Psrad => pick::<Psrad>(i),
        Mn::Pslldq => pick::<Pslldq>(i),
        Mn::Psrldq => pick::<Psrldq>(i),
        Mn::Packsswb => pick::<Packsswb>(i),
        Mn::Packssdw => pick::<Packssdw>(i),
        Mn::Packuswb => pick::<Packuswb>(i),
        Mn::Punpcklbw => pick::<Punpcklbw>(i),
        Mn::Punpcklwd => pick::<Punpcklwd>(i),
        Mn::Punpckldq => pick::<Punpckldq>(i),
        Mn::Punpcklqdq => pick::<Punpcklqdq>(i),
        Mn::Punpckhbw => pick::<Punpckhbw>(i),
        Mn::Punpckhwd => pick::<Punpckhwd>(i),
        Mn::Punpckhdq => pick::<Punpckhdq>(i),
        Mn::Punpckhqdq => pick::<Punpckhqdq>(i),
        Mn::Pshufd => pick::<Pshufd>(i),
        Mn::Pshuflw => pick::<Pshuflw>(i),
        Mn::Pshufhw => pick::<Pshufhw>(i),
        _ => None,
    }
}
