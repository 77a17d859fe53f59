//! Packed and scalar single/double arithmetic, compares (cmpps & co, comiss & co),
//! conversions, and the float shuffles/unpacks.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::{V2, XSrc, Xm, Xs, hostfp, mxcsr_flags, pick, sse_ok, xmm};
use crate::decode::{Handler, Insn, K, kind, op_size};
use crate::flags::Flags;
use crate::machine::{Loc, Machine, Mem, R, Rs, W32, W64, Width};

fp! {
    Addps => hostfp::addps; Addss => hostfp::addss; Addpd => hostfp::addpd; Addsd => hostfp::addsd;
    Subps => hostfp::subps; Subss => hostfp::subss; Subpd => hostfp::subpd; Subsd => hostfp::subsd;
    Mulps => hostfp::mulps; Mulss => hostfp::mulss; Mulpd => hostfp::mulpd; Mulsd => hostfp::mulsd;
    Divps => hostfp::divps; Divss => hostfp::divss; Divpd => hostfp::divpd; Divsd => hostfp::divsd;
    Minps => hostfp::minps; Minss => hostfp::minss; Minpd => hostfp::minpd; Minsd => hostfp::minsd;
    Maxps => hostfp::maxps; Maxss => hostfp::maxss; Maxpd => hostfp::maxpd; Maxsd => hostfp::maxsd;
    Sqrtps => hostfp::sqrtps; Sqrtss => hostfp::sqrtss; Sqrtpd => hostfp::sqrtpd; Sqrtsd => hostfp::sqrtsd;
    Rcpps => hostfp::rcpps; Rcpss => hostfp::rcpss; Rsqrtps => hostfp::rsqrtps; Rsqrtss => hostfp::rsqrtss;
    Cvtdq2ps => hostfp::cvtdq2ps; Cvtps2dq => hostfp::cvtps2dq; Cvttps2dq => hostfp::cvttps2dq;
    Cvtdq2pd => hostfp::cvtdq2pd; Cvtpd2dq => hostfp::cvtpd2dq; Cvttpd2dq => hostfp::cvttpd2dq;
    Cvtps2pd => hostfp::cvtps2pd; Cvtpd2ps => hostfp::cvtpd2ps;
    Cvtss2sd => hostfp::cvtss2sd; Cvtsd2ss => hostfp::cvtsd2ss;
}

fp_imm! {
    Cmpps => hostfp::cmpps; Cmpss => hostfp::cmpss; Cmppd => hostfp::cmppd; Cmpsd => hostfp::cmpsd;
}

fn lane32(v: u128, k: u8) -> u128 {
    (v >> (32 * u32::from(k & 3))) & 0xffff_ffff
}

fn lane64(v: u128, k: u8) -> u128 {
    (v >> (64 * u32::from(k & 1))) & u128::from(u64::MAX)
}

macro_rules! bits_op {
    ($($name:ident => |$a:ident, $b:ident, $i:ident| $e:expr;)*) => {$(
        pub(crate) struct $name;
        impl V2 for $name {
            #[inline(always)]
            #[allow(unused_variables)]
            fn apply(_m: &mut Machine, $a: u128, $b: u128, $i: u8) -> R<u128> {
                Ok($e)
            }
        }
    )*};
}

bits_op! {
    Shufps => |a, b, i| lane32(a, i) | lane32(a, i >> 2) << 32 | lane32(b, i >> 4) << 64 | lane32(b, i >> 6) << 96;
    Shufpd => |a, b, i| lane64(a, i) | lane64(b, i >> 1) << 64;
    Unpcklps => |a, b, i| lane32(a, 0) | lane32(b, 0) << 32 | lane32(a, 1) << 64 | lane32(b, 1) << 96;
    Unpckhps => |a, b, i| lane32(a, 2) | lane32(b, 2) << 32 | lane32(a, 3) << 64 | lane32(b, 3) << 96;
    Unpcklpd => |a, b, i| lane64(a, 0) | lane64(b, 0) << 64;
    Unpckhpd => |a, b, i| lane64(a, 1) | lane64(b, 1) << 64;
}

/// comiss/ucomiss/comisd/ucomisd: ZF, PF, CF from the compare; OF, SF, AF cleared.
fn comi<S: XSrc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let b = S::get(m, i)?;
    let a = xmm(m, i.d);
    let csr = m.cpu.fpu.mxcsr;
    let (f, raised) = match OP {
        0 => hostfp::comiss(a, b, csr),
        1 => hostfp::ucomiss(a, b, csr),
        2 => hostfp::comisd(a, b, csr),
        _ => hostfp::ucomisd(a, b, csr),
    };
    mxcsr_flags(m, raised)?;
    m.flags = Flags::from_bits(f);
    Ok(())
}

/// cvtsi2ss/cvtsi2sd xmm, r/m32|64 (W = integer width, SD = double).
fn cvt_from_int<W: Width, S: Loc, const SD: bool>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let sa = S::addr(m, i);
    let v = S::get::<W>(m, i, sa)?;
    let a = xmm(m, i.d);
    let csr = m.cpu.fpu.mxcsr;
    let (r, raised) = match (W::BYTES, SD) {
        (4, false) => hostfp::cvtsi2ss32(a, v, csr),
        (4, true) => hostfp::cvtsi2sd32(a, v, csr),
        (_, false) => hostfp::cvtsi2ss64(a, v, csr),
        (_, true) => hostfp::cvtsi2sd64(a, v, csr),
    };
    mxcsr_flags(m, raised)?;
    super::set_xmm(m, i.d, r);
    Ok(())
}

/// cvt(t)ss2si / cvt(t)sd2si r32|64, xmm/m (OP: 0 ss, 1 tss, 2 sd, 3 tsd).
fn cvt_to_int<W: Width, S: XSrc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let b = S::get(m, i)?;
    let csr = m.cpu.fpu.mxcsr;
    let wide = W::BYTES == 8;
    let (v, raised) = match (OP, wide) {
        (0, false) => hostfp::cvtss2si32(b, csr),
        (0, true) => hostfp::cvtss2si64(b, csr),
        (1, false) => hostfp::cvttss2si32(b, csr),
        (1, true) => hostfp::cvttss2si64(b, csr),
        (2, false) => hostfp::cvtsd2si32(b, csr),
        (2, true) => hostfp::cvtsd2si64(b, csr),
        (_, false) => hostfp::cvttsd2si32(b, csr),
        (_, true) => hostfp::cvttsd2si64(b, csr),
    };
    mxcsr_flags(m, raised)?;
    m.set_reg::<W>(i.d, v);
    Ok(())
}

fn comi_sel<const OP: u8>(i: &Instruction) -> Option<Handler> {
    Some(match (kind(i, 1), OP) {
        (K::Reg, _) => comi::<Xs, OP> as Handler,
        (K::Mem, 0 | 1) => comi::<Xm<4, false>, OP>,
        (K::Mem, _) => comi::<Xm<8, false>, OP>,
        _ => return None,
    })
}

fn from_int_sel<const SD: bool>(i: &Instruction) -> Option<Handler> {
    let mem = kind(i, 1) == K::Mem;
    Some(match (op_size(i, 1), mem) {
        (4, false) => cvt_from_int::<W32, Rs, SD> as Handler,
        (4, true) => cvt_from_int::<W32, Mem, SD>,
        (8, false) => cvt_from_int::<W64, Rs, SD>,
        (8, true) => cvt_from_int::<W64, Mem, SD>,
        _ => return None,
    })
}

fn to_int_sel<const OP: u8>(i: &Instruction) -> Option<Handler> {
    let wide = op_size(i, 0) == 8;
    let src_bytes = if OP < 2 { 4 } else { 8 };
    Some(match (kind(i, 1), wide, src_bytes) {
        (K::Reg, false, _) => cvt_to_int::<W32, Xs, OP> as Handler,
        (K::Reg, true, _) => cvt_to_int::<W64, Xs, OP>,
        (K::Mem, false, 4) => cvt_to_int::<W32, Xm<4, false>, OP>,
        (K::Mem, true, 4) => cvt_to_int::<W64, Xm<4, false>, OP>,
        (K::Mem, false, _) => cvt_to_int::<W32, Xm<8, false>, OP>,
        (K::Mem, true, _) => cvt_to_int::<W64, Xm<8, false>, OP>,
        _ => return None,
    })
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Addps => pick::<Addps>(i),
        Mn::Addss => pick::<Addss>(i),
        Mn::Addpd => pick::<Addpd>(i),
        Mn::Addsd => pick::<Addsd>(i),
        Mn::Subps => pick::<Subps>(i),
        Mn::Subss => pick::<Subss>(i),
        Mn::Subpd => pick::<Subpd>(i),
        Mn::Subsd => pick::<Subsd>(i),
        Mn::Mulps => pick::<Mulps>(i),
        Mn::Mulss => pick::<Mulss>(i),
        Mn::Mulpd => pick::<Mulpd>(i),
        Mn::Mulsd => pick::<Mulsd>(i),
        Mn::Divps => pick::<Divps>(i),
        Mn::Divss => pick::<Divss>(i),
        Mn::Divpd => pick::<Divpd>(i),
        Mn::Divsd => pick::<Divsd>(i),
        Mn::Minps => pick::<Minps>(i),
        Mn::Minss => pick::<Minss>(i),
        Mn::Minpd => pick::<Minpd>(i),
        Mn::Minsd => pick::<Minsd>(i),
        Mn::Maxps => pick::<Maxps>(i),
        Mn::Maxss => pick::<Maxss>(i),
        Mn::Maxpd => pick::<Maxpd>(i),
        Mn::Maxsd => pick::<Maxsd>(i),
        Mn::Sqrtps => pick::<Sqrtps>(i),
        Mn::Sqrtss => pick::<Sqrtss>(i),
        Mn::Sqrtpd => pick::<Sqrtpd>(i),
        Mn::Sqrtsd => pick::<Sqrtsd>(i),
        Mn::Rcpps => pick::<Rcpps>(i),
        Mn::Rcpss => pick::<Rcpss>(i),
        Mn::Rsqrtps => pick::<Rsqrtps>(i),
        Mn::Rsqrtss => pick::<Rsqrtss>(i),
        Mn::Cmpps => pick::<Cmpps>(i),
        Mn::Cmpss => pick::<Cmpss>(i),
        Mn::Cmppd => pick::<Cmppd>(i),
        // cmpsd is also the string compare; the SSE2 form has XMM operands.
        Mn::Cmpsd if kind(i, 0) == K::Reg => pick::<Cmpsd>(i),
        Mn::Comiss => comi_sel::<0>(i),
        Mn::Ucomiss => comi_sel::<1>(i),
        Mn::Comisd => comi_sel::<2>(i),
        Mn::Ucomisd => comi_sel::<3>(i),
        Mn::Cvtdq2ps => pick::<Cvtdq2ps>(i),
        Mn::Cvtps2dq => pick::<Cvtps2dq>(i),
        Mn::Cvttps2dq => pick::<Cvttps2dq>(i),
        Mn::Cvtdq2pd => pick::<Cvtdq2pd>(i),
        Mn::Cvtpd2dq => pick::<Cvtpd2dq>(i),
        Mn::Cvttpd2dq => pick::<Cvttpd2dq>(i),
        Mn::Cvtps2pd => pick::<Cvtps2pd>(i),
        Mn::Cvtpd2ps => pick::<Cvtpd2ps>(i),
        Mn::Cvtss2sd => pick::<Cvtss2sd>(i),
        Mn::Cvtsd2ss => pick::<Cvtsd2ss>(i),
        Mn::Cvtsi2ss => from_int_sel::<false>(i),
        Mn::Cvtsi2sd => from_int_sel::<true>(i),
        Mn::Cvtss2si => to_int_sel::<0>(i),
        Mn::Cvttss2si => to_int_sel::<1>(i),
        Mn::Cvtsd2si => to_int_sel::<2>(i),
        Mn::Cvttsd2si => to_int_sel::<3>(i),
        Mn::Shufps => pick::<Shufps>(i),
        Mn::Shufpd => pick::<Shufpd>(i),
        Mn::Unpcklps => pick::<Unpcklps>(i),
        Mn::Unpckhps => pick::<Unpckhps>(i),
        Mn::Unpcklpd => pick::<Unpcklpd>(i),
        Mn::Unpckhpd => pick::<Unpckhpd>(i),
        _ => None,
    }
}
