//! SSE floating-point arithmetic executed on the host's SSE unit.
//!
//! IEEE results depend on MXCSR (rounding mode, DAZ, FTZ) and produce exception flags;
//! the host implements exactly the same x86 semantics, so each guest operation runs as the
//! same host instruction under the guest's MXCSR instead of a software float library.
//!
//! # Why the asm blocks are sound
//! Each block: saves the host MXCSR, loads the guest's (with every exception masked, so
//! nothing can trap, and the flags cleared, so the ones raised are this operation's),
//! runs one SSE instruction on XMM0 (declared clobbered) with its operands in local
//! arrays passed by pointer, stores the resulting MXCSR and restores the host's. It reads
//! and writes only those locals (16-byte aligned `u128`s), does not touch the stack and
//! leaves no state behind.

use std::arch::asm;

/// Exception mask bits (all set) and the flag bits, in MXCSR.
const MASK_ALL: u32 = 0x1f80;
const FLAGS: u32 = 0x3f;

fn guest_csr(csr: u32) -> u32 {
    (csr & !FLAGS) | MASK_ALL
}

/// `insn xmm0(a), [b]` (`, imm` with a fixed immediate) -> (result, raised flags).
macro_rules! vv {
    ($($name:ident = $insn:literal $(, $imm:literal)?;)*) => {$(
        pub(crate) fn $name(a: u128, b: u128, csr: u32) -> (u128, u32) {
            let mut x = [a, b];
            let mut c = [guest_csr(csr), 0u32];
            // SAFETY: see the module documentation.
            unsafe {
                asm!(
                    "stmxcsr [{c} + 4]",
                    "ldmxcsr [{c}]",
                    "movdqa xmm0, [{x}]",
                    concat!($insn, " xmm0, [{x} + 16]" $(, ", ", $imm)?),
                    "movdqa [{x}], xmm0",
                    "stmxcsr [{c}]",
                    "ldmxcsr [{c} + 4]",
                    x = in(reg) x.as_mut_ptr(),
                    c = in(reg) c.as_mut_ptr(),
                    out("xmm0") _,
                    options(nostack),
                );
            }
            (x[0], c[0] & FLAGS)
        }
    )*};
}

vv! {
    addps = "addps"; addss = "addss"; addpd = "addpd"; addsd = "addsd";
    subps = "subps"; subss = "subss"; subpd = "subpd"; subsd = "subsd";
    mulps = "mulps"; mulss = "mulss"; mulpd = "mulpd"; mulsd = "mulsd";
    divps = "divps"; divss = "divss"; divpd = "divpd"; divsd = "divsd";
    minps = "minps"; minss = "minss"; minpd = "minpd"; minsd = "minsd";
    maxps = "maxps"; maxss = "maxss"; maxpd = "maxpd"; maxsd = "maxsd";
    sqrtps = "sqrtps"; sqrtss = "sqrtss"; sqrtpd = "sqrtpd"; sqrtsd = "sqrtsd";
    rcpps = "rcpps"; rcpss = "rcpss"; rsqrtps = "rsqrtps"; rsqrtss = "rsqrtss";
    addsubps = "addsubps"; addsubpd = "addsubpd";
    haddps = "haddps"; haddpd = "haddpd"; hsubps = "hsubps"; hsubpd = "hsubpd";
    cvtdq2ps = "cvtdq2ps"; cvtps2dq = "cvtps2dq"; cvttps2dq = "cvttps2dq";
    cvtdq2pd = "cvtdq2pd"; cvtpd2dq = "cvtpd2dq"; cvttpd2dq = "cvttpd2dq";
    cvtps2pd = "cvtps2pd"; cvtpd2ps = "cvtpd2ps"; cvtss2sd = "cvtss2sd"; cvtsd2ss = "cvtsd2ss";
}

// Rounding as MXCSR says; dot products of every lane into every lane.
vv! {
    roundps_csr = "roundps", "4"; roundpd_csr = "roundpd", "4";
    roundss_csr = "roundss", "4"; roundsd_csr = "roundsd", "4";
    dpps_all = "dpps", "0xff"; dppd_all = "dppd", "0x33";
}

/// MXCSR's precision exception flag.
const PE: u32 = 0x20;

/// round*: imm[2] clear puts imm[1:0] in MXCSR.RC for this operation; imm[3] keeps
/// the precision exception from being raised.
macro_rules! round {
    ($($name:ident = $host:ident;)*) => {$(
        pub(crate) fn $name(a: u128, b: u128, imm: u8, csr: u32) -> (u128, u32) {
            let csr = if imm & 4 == 0 {
                (csr & !0x6000) | (u32::from(imm & 3) << 13)
            } else {
                csr
            };
            let (r, raised) = $host(a, b, csr);
            (r, if imm & 8 != 0 { raised & !PE } else { raised })
        }
    )*};
}

round! {
    roundps = roundps_csr; roundpd = roundpd_csr; roundss = roundss_csr; roundsd = roundsd_csr;
}

/// Keeps the LANE-bit lanes of `v` that `mask`'s bits name, zeroes the others.
fn lanes_of<const LANE: u32>(v: u128, mask: u8) -> u128 {
    (0..128 / LANE)
        .filter(|k| mask >> k & 1 == 0)
        .fold(v, |v, k| v & !((u128::MAX >> (128 - LANE)) << (LANE * k)))
}

/// dpps: the products of the lanes imm[7:4] names (the others +0.0, as the hardware
/// takes them, raising nothing), summed, into the lanes imm[3:0] names.
pub(crate) fn dpps(a: u128, b: u128, imm: u8, csr: u32) -> (u128, u32) {
    let (r, raised) = dpps_all(
        lanes_of::<32>(a, imm >> 4),
        lanes_of::<32>(b, imm >> 4),
        csr,
    );
    (lanes_of::<32>(r, imm & 15), raised)
}

/// dppd: as dpps, with imm[5:4] and imm[1:0].
pub(crate) fn dppd(a: u128, b: u128, imm: u8, csr: u32) -> (u128, u32) {
    let (r, raised) = dppd_all(
        lanes_of::<64>(a, imm >> 4 & 3),
        lanes_of::<64>(b, imm >> 4 & 3),
        csr,
    );
    (lanes_of::<64>(r, imm & 3), raised)
}

/// `insn xmm0(a), [b], imm` for the eight compare predicates.
macro_rules! cmp {
    ($($name:ident = $insn:literal;)*) => {$(
        pub(crate) fn $name(a: u128, b: u128, pred: u8, csr: u32) -> (u128, u32) {
            let mut x = [a, b];
            let mut c = [guest_csr(csr), 0u32];
            macro_rules! go {
                ($p:literal) => {
                    // SAFETY: see the module documentation.
                    unsafe {
                        asm!(
                            "stmxcsr [{c} + 4]",
                            "ldmxcsr [{c}]",
                            "movdqa xmm0, [{x}]",
                            concat!($insn, " xmm0, [{x} + 16], ", $p),
                            "movdqa [{x}], xmm0",
                            "stmxcsr [{c}]",
                            "ldmxcsr [{c} + 4]",
                            x = in(reg) x.as_mut_ptr(),
                            c = in(reg) c.as_mut_ptr(),
                            out("xmm0") _,
                            options(nostack),
                        )
                    }
                };
            }
            match pred & 7 {
                0 => go!("0"),
                1 => go!("1"),
                2 => go!("2"),
                3 => go!("3"),
                4 => go!("4"),
                5 => go!("5"),
                6 => go!("6"),
                _ => go!("7"),
            }
            (x[0], c[0] & FLAGS)
        }
    )*};
}

cmp! {
    cmpps = "cmpps"; cmpss = "cmpss"; cmppd = "cmppd"; cmpsd = "cmpsd";
}

/// comiss & co: (ZF|PF|CF as RFLAGS bits, raised flags).
macro_rules! comi {
    ($($name:ident = $insn:literal;)*) => {$(
        pub(crate) fn $name(a: u128, b: u128, csr: u32) -> (u64, u32) {
            let mut x = [a, b];
            let mut c = [guest_csr(csr), 0u32];
            let (z, p, cf): (u8, u8, u8);
            // SAFETY: see the module documentation; setcc only writes the outputs.
            unsafe {
                asm!(
                    "stmxcsr [{c} + 4]",
                    "ldmxcsr [{c}]",
                    "movdqa xmm0, [{x}]",
                    concat!($insn, " xmm0, [{x} + 16]"),
                    "setz {z}",
                    "setp {p}",
                    "setc {cf}",
                    "stmxcsr [{c}]",
                    "ldmxcsr [{c} + 4]",
                    x = in(reg) x.as_mut_ptr(),
                    c = in(reg) c.as_mut_ptr(),
                    z = out(reg_byte) z,
                    p = out(reg_byte) p,
                    cf = out(reg_byte) cf,
                    out("xmm0") _,
                    options(nostack),
                );
            }
            let f = u64::from(z) << 6 | u64::from(p) << 2 | u64::from(cf);
            (f, c[0] & FLAGS)
        }
    )*};
}

comi! {
    comiss = "comiss"; ucomiss = "ucomiss"; comisd = "comisd"; ucomisd = "ucomisd";
}

/// Integer -> float into the low lane of `a`: `insn xmm0, r32/r64`.
macro_rules! from_int {
    ($($name:ident = $insn:literal, $reg:literal;)*) => {$(
        pub(crate) fn $name(a: u128, v: u64, csr: u32) -> (u128, u32) {
            let mut x = [a];
            let mut c = [guest_csr(csr), 0u32];
            // SAFETY: see the module documentation.
            unsafe {
                asm!(
                    "stmxcsr [{c} + 4]",
                    "ldmxcsr [{c}]",
                    "movdqa xmm0, [{x}]",
                    concat!($insn, " xmm0, {v", $reg, "}"),
                    "movdqa [{x}], xmm0",
                    "stmxcsr [{c}]",
                    "ldmxcsr [{c} + 4]",
                    x = in(reg) x.as_mut_ptr(),
                    c = in(reg) c.as_mut_ptr(),
                    v = in(reg) v,
                    out("xmm0") _,
                    options(nostack),
                );
            }
            (x[0], c[0] & FLAGS)
        }
    )*};
}

from_int! {
    cvtsi2ss32 = "cvtsi2ss", ":e"; cvtsi2ss64 = "cvtsi2ss", "";
    cvtsi2sd32 = "cvtsi2sd", ":e"; cvtsi2sd64 = "cvtsi2sd", "";
}

/// Float -> integer from the low lane of `b`: `insn r32/r64, xmm0`.
macro_rules! to_int {
    ($($name:ident = $insn:literal, $reg:literal;)*) => {$(
        pub(crate) fn $name(b: u128, csr: u32) -> (u64, u32) {
            let x = [b];
            let mut c = [guest_csr(csr), 0u32];
            let mut v: u64 = 0;
            // SAFETY: see the module documentation.
            unsafe {
                asm!(
                    "stmxcsr [{c} + 4]",
                    "ldmxcsr [{c}]",
                    "movdqa xmm0, [{x}]",
                    concat!($insn, " {v", $reg, "}, xmm0"),
                    "stmxcsr [{c}]",
                    "ldmxcsr [{c} + 4]",
                    x = in(reg) x.as_ptr(),
                    c = in(reg) c.as_mut_ptr(),
                    v = inout(reg) v,
                    out("xmm0") _,
                    options(nostack),
                );
            }
            (v, c[0] & FLAGS)
        }
    )*};
}

to_int! {
    cvtss2si32 = "cvtss2si", ":e"; cvtss2si64 = "cvtss2si", "";
    cvttss2si32 = "cvttss2si", ":e"; cvttss2si64 = "cvttss2si", "";
    cvtsd2si32 = "cvtsd2si", ":e"; cvtsd2si64 = "cvtsd2si", "";
    cvttsd2si32 = "cvttsd2si", ":e"; cvttsd2si64 = "cvttsd2si", "";
}
