//! SSE4.1's and SSE4.2's lane-wise XMM forms: the wider multiplies, min/max and
//! compares, packusdw, sign and zero extensions, blends (by immediate and by XMM0),
//! mpsadbw, phminposuw, movntdqa; rounding and dot products on the host's SSE unit.
//! (Inserts, extracts and ptest are in `lanes`; the string compares are not done yet.)

use iced_x86::{Instruction, Mnemonic as Mn};

use super::int::{build, lane, map2, sx};
use super::{V2, hostfp, mxcsr_flags, pick, xmm};
use crate::decode::Handler;
use crate::machine::{Machine, R};

fn all_ones(c: bool) -> u64 {
    if c { u64::MAX } else { 0 }
}

/// pmovsx/pmovzx: the low FROM-bit lanes of `b`, widened to TO bits.
fn widen<const FROM: u32, const TO: u32, const SIGNED: bool>(b: u128) -> u128 {
    build::<TO>(|k| {
        let v = lane::<FROM>(b, k);
        if SIGNED { sx::<FROM>(v) as u64 } else { v }
    })
}

/// Lanes of `b` where `pick(k)`, else of `a`.
fn blend<const BITS: u32>(a: u128, b: u128, pick: impl Fn(u32) -> bool) -> u128 {
    build::<BITS>(|k| lane::<BITS>(if pick(k) { b } else { a }, k))
}

/// mpsadbw: eight sums of absolute differences of four bytes of `a` (from byte 4 * imm[2]
/// on, sliding) against the four bytes of `b` at 4 * imm[1:0].
fn mpsadbw(a: u128, b: u128, imm: u8) -> u128 {
    let (ao, bo) = (4 * u32::from(imm >> 2 & 1), 4 * u32::from(imm & 3));
    build::<16>(|k| {
        (0..4)
            .map(|j| lane::<8>(a, ao + k + j).abs_diff(lane::<8>(b, bo + j)))
            .sum()
    })
}

/// phminposuw: the smallest word of `b` and its index (the first if tied).
fn phminposuw(b: u128) -> u128 {
    let (index, min) = (0..8u32)
        .map(|k| (k, lane::<16>(b, k)))
        .min_by_key(|&(k, v)| (v, k))
        .expect("eight words");
    u128::from(min) | u128::from(index) << 16
}

op! {
    Pmulld => |a, b, i| map2::<32>(a, b, |x, y| x.wrapping_mul(y));
    Pmuldq => |a, b, i| map2::<64>(a, b, |x, y| (sx::<32>(x & 0xffff_ffff) * sx::<32>(y & 0xffff_ffff)) as u64);
    Pminsb => |a, b, i| map2::<8>(a, b, |x, y| sx::<8>(x).min(sx::<8>(y)) as u64);
    Pminsd => |a, b, i| map2::<32>(a, b, |x, y| sx::<32>(x).min(sx::<32>(y)) as u64);
    Pminuw => |a, b, i| map2::<16>(a, b, |x, y| x.min(y));
    Pminud => |a, b, i| map2::<32>(a, b, |x, y| x.min(y));
    Pmaxsb => |a, b, i| map2::<8>(a, b, |x, y| sx::<8>(x).max(sx::<8>(y)) as u64);
    Pmaxsd => |a, b, i| map2::<32>(a, b, |x, y| sx::<32>(x).max(sx::<32>(y)) as u64);
    Pmaxuw => |a, b, i| map2::<16>(a, b, |x, y| x.max(y));
    Pmaxud => |a, b, i| map2::<32>(a, b, |x, y| x.max(y));
    Pcmpeqq => |a, b, i| map2::<64>(a, b, |x, y| all_ones(x == y));
    Pcmpgtq => |a, b, i| map2::<64>(a, b, |x, y| all_ones((x as i64) > (y as i64)));
    Packusdw => |a, b, i| build::<16>(|k| {
        let v = if k < 4 { lane::<32>(a, k) } else { lane::<32>(b, k - 4) };
        sx::<32>(v).clamp(0, 0xffff) as u64
    });
    Pmovsxbw => |a, b, i| widen::<8, 16, true>(b);
    Pmovsxbd => |a, b, i| widen::<8, 32, true>(b);
    Pmovsxbq => |a, b, i| widen::<8, 64, true>(b);
    Pmovsxwd => |a, b, i| widen::<16, 32, true>(b);
    Pmovsxwq => |a, b, i| widen::<16, 64, true>(b);
    Pmovsxdq => |a, b, i| widen::<32, 64, true>(b);
    Pmovzxbw => |a, b, i| widen::<8, 16, false>(b);
    Pmovzxbd => |a, b, i| widen::<8, 32, false>(b);
    Pmovzxbq => |a, b, i| widen::<8, 64, false>(b);
    Pmovzxwd => |a, b, i| widen::<16, 32, false>(b);
    Pmovzxwq => |a, b, i| widen::<16, 64, false>(b);
    Pmovzxdq => |a, b, i| widen::<32, 64, false>(b);
    Pblendw => |a, b, i| blend::<16>(a, b, |k| i >> k & 1 != 0);
    Blendps => |a, b, i| blend::<32>(a, b, |k| i >> k & 1 != 0);
    Blendpd => |a, b, i| blend::<64>(a, b, |k| i >> k & 1 != 0);
    Mpsadbw => |a, b, i| mpsadbw(a, b, i);
    Phminposuw => |a, b, i| phminposuw(b);
    Movntdqa => |a, b, i| b;
}

fp_imm! {
    Roundps => hostfp::roundps; Roundpd => hostfp::roundpd;
    Roundss => hostfp::roundss; Roundsd => hostfp::roundsd;
    Dpps => hostfp::dpps; Dppd => hostfp::dppd;
}

/// pblendvb/blendvps/blendvpd: lanes of the source where XMM0's lane has its top bit
/// set.
pub(crate) struct Blendv<const BITS: u32>;

impl<const BITS: u32> V2 for Blendv<BITS> {
    #[inline(always)]
    fn apply(m: &mut Machine, a: u128, b: u128, _imm: u8) -> R<u128> {
        let mask = xmm(m, 0);
        Ok(blend::<BITS>(a, b, |k| {
            lane::<BITS>(mask, k) >> (BITS - 1) != 0
        }))
    }
}

pub(crate) fn select(i: &Instruction) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Pmulld => pick::<Pmulld>(i),
        Mn::Pmuldq => pick::<Pmuldq>(i),
        Mn::Pminsb => pick::<Pminsb>(i),
        Mn::Pminsd => pick::<Pminsd>(i),
        Mn::Pminuw => pick::<Pminuw>(i),
        Mn::Pminud => pick::<Pminud>(i),
        Mn::Pmaxsb => pick::<Pmaxsb>(i),
        Mn::Pmaxsd => pick::<Pmaxsd>(i),
        Mn::Pmaxuw => pick::<Pmaxuw>(i),
        Mn::Pmaxud => pick::<Pmaxud>(i),
        Mn::Pcmpeqq => pick::<Pcmpeqq>(i),
        Mn::Pcmpgtq => pick::<Pcmpgtq>(i),
        Mn::Packusdw => pick::<Packusdw>(i),
        Mn::Pmovsxbw => pick::<Pmovsxbw>(i),
        Mn::Pmovsxbd => pick::<Pmovsxbd>(i),
        Mn::Pmovsxbq => pick::<Pmovsxbq>(i),
        Mn::Pmovsxwd => pick::<Pmovsxwd>(i),
        Mn::Pmovsxwq => pick::<Pmovsxwq>(i),
        Mn::Pmovsxdq => pick::<Pmovsxdq>(i),
        Mn::Pmovzxbw => pick::<Pmovzxbw>(i),
        Mn::Pmovzxbd => pick::<Pmovzxbd>(i),
        Mn::Pmovzxbq => pick::<Pmovzxbq>(i),
        Mn::Pmovzxwd => pick::<Pmovzxwd>(i),
        Mn::Pmovzxwq => pick::<Pmovzxwq>(i),
        Mn::Pmovzxdq => pick::<Pmovzxdq>(i),
        Mn::Pblendw => pick::<Pblendw>(i),
        Mn::Blendps => pick::<Blendps>(i),
        Mn::Blendpd => pick::<Blendpd>(i),
        Mn::Pblendvb => pick::<Blendv<8>>(i),
        Mn::Blendvps => pick::<Blendv<32>>(i),
        Mn::Blendvpd => pick::<Blendv<64>>(i),
        Mn::Mpsadbw => pick::<Mpsadbw>(i),
        Mn::Phminposuw => pick::<Phminposuw>(i),
        Mn::Movntdqa => pick::<Movntdqa>(i),
        Mn::Roundps => pick::<Roundps>(i),
        Mn::Roundpd => pick::<Roundpd>(i),
        Mn::Roundss => pick::<Roundss>(i),
        Mn::Roundsd => pick::<Roundsd>(i),
        Mn::Dpps => pick::<Dpps>(i),
        Mn::Dppd => pick::<Dppd>(i),
        _ => None,
    }
}
