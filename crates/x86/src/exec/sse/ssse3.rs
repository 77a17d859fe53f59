//! SSE3's and SSSE3's XMM forms: the duplicating moves, the horizontal and
//! add-subtract float arithmetic (on the host's SSE unit, as the other MXCSR-dependent
//! operations), and SSSE3's byte shuffle, horizontal integer arithmetic, multiplies,
//! signs, absolute values and byte alignment.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::int::{build, lane, map2, sat_s, sx};
use super::{V2, hostfp, mxcsr_flags, pick};
use crate::decode::Handler;
use crate::machine::{Machine, R};

/// Horizontal pairs: the first half of the result from `a`'s adjacent lanes, the
/// second from `b`'s.
fn horizontal<const BITS: u32>(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    let half = 64 / BITS;
    build::<BITS>(|k| {
        let (v, j) = if k < half { (a, k) } else { (b, k - half) };
        f(lane::<BITS>(v, 2 * j), lane::<BITS>(v, 2 * j + 1))
    })
}

/// psign: each lane of `a` negated, zeroed or kept as `b`'s lane is negative, zero or
/// positive.
fn sign<const BITS: u32>(a: u128, b: u128) -> u128 {
    map2::<BITS>(a, b, |x, y| match sx::<BITS>(y) {
        0 => 0,
        s if s < 0 => x.wrapping_neg(),
        _ => x,
    })
}

fn abs<const BITS: u32>(b: u128) -> u128 {
    build::<BITS>(|k| sx::<BITS>(lane::<BITS>(b, k)).unsigned_abs())
}

/// palignr: `a:b` (a the high half) shifted right by `n` bytes, the low 16 kept.
fn align(a: u128, b: u128, n: u8) -> u128 {
    match u32::from(n) {
        0 => b,
        n @ 1..=15 => (b >> (8 * n)) | (a << (8 * (16 - n))),
        n @ 16..=31 => a >> (8 * (n - 16)),
        _ => 0,
    }
}

op! {
    Movddup => |a, b, i| (b as u64 as u128) * ((1u128 << 64) + 1);
    Movshdup => |a, b, i| build::<32>(|k| lane::<32>(b, k | 1));
    Movsldup => |a, b, i| build::<32>(|k| lane::<32>(b, k & !1));
    Pshufb => |a, b, i| build::<8>(|k| {
        let s = lane::<8>(b, k);
        if s & 0x80 != 0 { 0 } else { lane::<8>(a, (s & 15) as u32) }
    });
    Phaddw => |a, b, i| horizontal::<16>(a, b, |x, y| x.wrapping_add(y));
    Phaddd => |a, b, i| horizontal::<32>(a, b, |x, y| x.wrapping_add(y));
    Phaddsw => |a, b, i| horizontal::<16>(a, b, |x, y| sat_s::<16>(sx::<16>(x) + sx::<16>(y)));
    Phsubw => |a, b, i| horizontal::<16>(a, b, |x, y| x.wrapping_sub(y));
    Phsubd => |a, b, i| horizontal::<32>(a, b, |x, y| x.wrapping_sub(y));
    Phsubsw => |a, b, i| horizontal::<16>(a, b, |x, y| sat_s::<16>(sx::<16>(x) - sx::<16>(y)));
    Pmaddubsw => |a, b, i| build::<16>(|k| {
        let p = |j: u32| lane::<8>(a, j) as i64 * sx::<8>(lane::<8>(b, j));
        sat_s::<16>(p(2 * k) + p(2 * k + 1))
    });
    Pmulhrsw => |a, b, i| map2::<16>(a, b, |x, y| ((((sx::<16>(x) * sx::<16>(y)) >> 14) + 1) >> 1) as u64);
    Psignb => |a, b, i| sign::<8>(a, b);
    Psignw => |a, b, i| sign::<16>(a, b);
    Psignd => |a, b, i| sign::<32>(a, b);
    Pabsb => |a, b, i| abs::<8>(b);
    Pabsw => |a, b, i| abs::<16>(b);
    Pabsd => |a, b, i| abs::<32>(b);
    Palignr => |a, b, i| align(a, b, i);
}

// SSE3's float arithmetic, run on the host under the guest's MXCSR.
fp! {
    Addsubps => hostfp::addsubps; Addsubpd => hostfp::addsubpd;
    Haddps => hostfp::haddps; Haddpd => hostfp::haddpd;
    Hsubps => hostfp::hsubps; Hsubpd => hostfp::hsubpd;
}

pub(crate) fn select(i: &Instruction) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Movddup => pick::<Movddup>(i),
        Mn::Movshdup => pick::<Movshdup>(i),
        Mn::Movsldup => pick::<Movsldup>(i),
        Mn::Addsubps => pick::<Addsubps>(i),
        Mn::Addsubpd => pick::<Addsubpd>(i),
        Mn::Haddps => pick::<Haddps>(i),
        Mn::Haddpd => pick::<Haddpd>(i),
        Mn::Hsubps => pick::<Hsubps>(i),
        Mn::Hsubpd => pick::<Hsubpd>(i),
        Mn::Pshufb => pick::<Pshufb>(i),
        Mn::Phaddw => pick::<Phaddw>(i),
        Mn::Phaddd => pick::<Phaddd>(i),
        Mn::Phaddsw => pick::<Phaddsw>(i),
        Mn::Phsubw => pick::<Phsubw>(i),
        Mn::Phsubd => pick::<Phsubd>(i),
        Mn::Phsubsw => pick::<Phsubsw>(i),
        Mn::Pmaddubsw => pick::<Pmaddubsw>(i),
        Mn::Pmulhrsw => pick::<Pmulhrsw>(i),
        Mn::Psignb => pick::<Psignb>(i),
        Mn::Psignw => pick::<Psignw>(i),
        Mn::Psignd => pick::<Psignd>(i),
        Mn::Pabsb => pick::<Pabsb>(i),
        Mn::Pabsw => pick::<Pabsw>(i),
        Mn::Pabsd => pick::<Pabsd>(i),
        Mn::Palignr => pick::<Palignr>(i),
        _ => None,
    }
}
