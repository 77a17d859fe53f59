//! SSE, SSE2, SSE3 and SSSE3 (legacy-encoded XMM forms): data movement, integer,
//! logical, shuffle/unpack, packed and scalar float arithmetic, compares, conversions. Integer
//! and bitwise work is done lane by lane in Rust; anything whose result depends on MXCSR
//! runs on the host's SSE unit (see `hostfp`). MMX and VEX forms are not implemented.

/// Pure XMM operations (no MXCSR): `Name => |a, b, imm| result;` makes a [`V2`].
macro_rules! op {
    ($($name:ident => |$a:ident, $b:ident, $imm:ident| $e:expr;)*) => {$(
        pub(crate) struct $name;
        impl V2 for $name {
            #[inline(always)]
            #[allow(unused_variables)]
            fn apply(_m: &mut Machine, $a: u128, $b: u128, $imm: u8) -> R<u128> {
                Ok($e)
            }
        }
    )*};
}

/// An MXCSR-dependent operation run on the host: `Name => hostfp::f;` makes a [`V2`].
macro_rules! fp {
    ($($name:ident => $f:path;)*) => {$(
        pub(crate) struct $name;
        impl V2 for $name {
            #[inline(always)]
            fn apply(m: &mut Machine, a: u128, b: u128, _imm: u8) -> R<u128> {
                let (r, raised) = $f(a, b, m.cpu.fpu.mxcsr);
                mxcsr_flags(m, raised)?;
                Ok(r)
            }
        }
    )*};
}

/// As `fp!`, for operations that take the immediate too.
macro_rules! fp_imm {
    ($($name:ident => $f:path;)*) => {$(
        pub(crate) struct $name;
        impl V2 for $name {
            #[inline(always)]
            fn apply(m: &mut Machine, a: u128, b: u128, imm: u8) -> R<u128> {
                let (r, raised) = $f(a, b, imm, m.cpu.fpu.mxcsr);
                mxcsr_flags(m, raised)?;
                Ok(r)
            }
        }
    )*};
}

mod aes;
mod float;
mod hostfp;
mod int;
mod lanes;
mod mov;
mod pcmpstr;
mod sse41;
mod ssse3;

use iced_x86::{EncodingKind, Instruction, Mnemonic as Mn, OpKind};

use crate::decode::{Cx, Handler, Insn, K, kind};
use crate::exception::Exception;
use crate::machine::{Machine, R};
use crate::state::ctl;

/// SSE instructions need CR0.EM clear and CR4.OSFXSR set (#UD), CR0.TS clear (#NM).
#[inline(always)]
pub(crate) fn sse_ok(m: &Machine) -> R {
    let (cr0, cr4) = (m.cpu.cr0, m.cpu.cr4);
    if cr0 & ctl::CR0_EM != 0 || cr4 & ctl::CR4_OSFXSR == 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    if cr0 & ctl::CR0_TS != 0 {
        return Err(Exception::DeviceNotAvailable.into());
    }
    Ok(())
}

#[inline(always)]
pub(crate) fn xmm(m: &Machine, r: u8) -> u128 {
    m.cpu.fpu.xmm[(r & 15) as usize]
}

#[inline(always)]
pub(crate) fn set_xmm(m: &mut Machine, r: u8, v: u128) {
    m.cpu.fpu.xmm[(r & 15) as usize] = v;
}

/// Applies the flags an MXCSR-dependent operation raised; an unmasked one raises #XM
/// (#UD without CR4.OSXMMEXCPT) and the caller must not write its result.
pub(crate) fn mxcsr_flags(m: &mut Machine, raised: u32) -> R {
    let csr = m.cpu.fpu.mxcsr;
    m.cpu.fpu.mxcsr = csr | raised;
    if raised & !(csr >> 7) & 0x3f != 0 {
        return Err(if m.cpu.cr4 & ctl::CR4_OSXMMEXCPT != 0 {
            Exception::SimdFloatingPoint.into()
        } else {
            Exception::InvalidOpcode.into()
        });
    }
    Ok(())
}

/// Where the second operand of an XMM instruction comes from.
pub(crate) trait XSrc: 'static {
    fn get(m: &mut Machine, i: &Insn) -> R<u128>;
}

/// The XMM register in `Insn::s`.
pub(crate) struct Xs;
/// N bytes of memory, zero-extended; ALIGN: a 16-byte operand that must be aligned.
pub(crate) struct Xm<const N: usize, const ALIGN: bool>;
/// The immediate (shift-by-immediate forms).
pub(crate) struct Ximm;

impl XSrc for Xs {
    #[inline(always)]
    fn get(m: &mut Machine, i: &Insn) -> R<u128> {
        Ok(xmm(m, i.s))
    }
}

impl<const N: usize, const ALIGN: bool> XSrc for Xm<N, ALIGN> {
    #[inline(always)]
    fn get(m: &mut Machine, i: &Insn) -> R<u128> {
        let lin = m.ea(i);
        if ALIGN && lin & 15 != 0 {
            return Err(Exception::GeneralProtection(0).into());
        }
        Ok(match N {
            16 => m.read128(lin)?,
            8 => u128::from(m.read::<8>(lin)?),
            4 => u128::from(m.read::<4>(lin)?),
            2 => u128::from(m.read::<2>(lin)?),
            _ => u128::from(m.read::<1>(lin)?),
        })
    }
}

impl XSrc for Ximm {
    #[inline(always)]
    fn get(_m: &mut Machine, i: &Insn) -> R<u128> {
        Ok(u128::from(i.imm as u8))
    }
}

/// dst = op(dst, src, imm8) on XMM values.
pub(crate) trait V2: 'static {
    fn apply(m: &mut Machine, a: u128, b: u128, imm: u8) -> R<u128>;
}

pub(crate) fn vec2<O: V2, S: XSrc>(m: &mut Machine, i: &Insn) -> R {
    sse_ok(m)?;
    let b = S::get(m, i)?;
    let a = xmm(m, i.d);
    let r = O::apply(m, a, b, i.imm as u8)?;
    set_xmm(m, i.d, r);
    Ok(())
}

/// Legacy SSE requires 16-byte alignment of 128-bit memory operands, except for the
/// explicitly unaligned moves.
fn needs_alignment(i: &Instruction) -> bool {
    i.memory_size().size() == 16
        && !matches!(
            i.mnemonic(),
            Mn::Movups | Mn::Movupd | Mn::Movdqu | Mn::Lddqu
        )
}

/// The handler for an `xmm, xmm/mem[, imm8]` instruction.
pub(crate) fn pick<O: V2>(i: &Instruction) -> Option<Handler> {
    if !(kind(i, 0) == K::Reg && i.op_register(0).is_xmm()) {
        return None;
    }
    Some(match kind(i, 1) {
        K::Reg if i.op_register(1).is_xmm() => vec2::<O, Xs> as Handler,
        K::Mem => match (i.memory_size().size(), needs_alignment(i)) {
            (16, true) => vec2::<O, Xm<16, true>>,
            (16, false) => vec2::<O, Xm<16, false>>,
            (8, _) => vec2::<O, Xm<8, false>>,
            (4, _) => vec2::<O, Xm<4, false>>,
            (2, _) => vec2::<O, Xm<2, false>>,
            _ => return None,
        },
        K::Imm => vec2::<O, Ximm>,
        _ => return None,
    })
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, cx: &Cx) -> Option<Handler> {
    if i.encoding() != EncodingKind::Legacy {
        return None;
    }
    // MMX forms share mnemonics with the SSE2 ones; they are not implemented.
    let mmx =
        (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm());
    if mmx {
        return None;
    }
    mov::select(i, d, cx)
        .or_else(|| int::select(i, d))
        .or_else(|| ssse3::select(i))
        .or_else(|| sse41::select(i))
        .or_else(|| aes::select(i))
        .or_else(|| lanes::select(i))
        .or_else(|| pcmpstr::select(i, d))
        .or_else(|| float::select(i, d))
}
