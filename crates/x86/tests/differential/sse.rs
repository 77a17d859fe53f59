//! SSE, SSE2, SSE3, SSSE3 and SSE4 families.

use iced_x86::Mnemonic as Mn;

use crate::cases::{Fixup, Tweaks};
use crate::{Family, no_hooks, no_skip, run_family, run_family_in, run_where_host_has};

/// maskmovdqu stores through DS:rDI.
fn maskmov_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        if f.mnemonic == Mn::Maskmovdqu {
            f.pins.push(7);
        }
        return true;
    }
    if f.mnemonic == Mn::Maskmovdqu {
        f.regs.gpr[7] = f.data_base + 0x100 + f.rng.below(0x1c00);
    }
    true
}

fn sse_moves_family() -> Family<'static> {
    Family {
        name: "sse moves",
        mnemonics: &[
            Mn::Movaps,
            Mn::Movups,
            Mn::Movapd,
            Mn::Movupd,
            Mn::Movdqa,
            Mn::Movdqu,
            Mn::Movntps,
            Mn::Movntpd,
            Mn::Movntdq,
            Mn::Movnti,
            Mn::Movss,
            Mn::Movsd,
            Mn::Movlps,
            Mn::Movhps,
            Mn::Movlpd,
            Mn::Movhpd,
            Mn::Movlhps,
            Mn::Movhlps,
            Mn::Movd,
            Mn::Movq,
            Mn::Pextrw,
            Mn::Pinsrw,
            Mn::Pmovmskb,
            Mn::Movmskps,
            Mn::Movmskpd,
            Mn::Maskmovdqu,
        ],
        per_form: 60,
        seed: 20,
        tweaks: Tweaks::default(),
        hooks: &maskmov_hooks,
        skip: &no_skip,
    }
}

#[test]
fn sse_moves() {
    run_family(&sse_moves_family());
}

#[test]
fn sse_moves_32() {
    let mut f = sse_moves_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

fn sse_integer_family() -> Family<'static> {
    Family {
        name: "sse2 integer",
        mnemonics: &[
            Mn::Paddb,
            Mn::Paddw,
            Mn::Paddd,
            Mn::Paddq,
            Mn::Psubb,
            Mn::Psubw,
            Mn::Psubd,
            Mn::Psubq,
            Mn::Paddsb,
            Mn::Paddsw,
            Mn::Psubsb,
            Mn::Psubsw,
            Mn::Paddusb,
            Mn::Paddusw,
            Mn::Psubusb,
            Mn::Psubusw,
            Mn::Pmullw,
            Mn::Pmulhw,
            Mn::Pmulhuw,
            Mn::Pmuludq,
            Mn::Pmaddwd,
            Mn::Psadbw,
            Mn::Pavgb,
            Mn::Pavgw,
            Mn::Pminub,
            Mn::Pmaxub,
            Mn::Pminsw,
            Mn::Pmaxsw,
            Mn::Pcmpeqb,
            Mn::Pcmpeqw,
            Mn::Pcmpeqd,
            Mn::Pcmpgtb,
            Mn::Pcmpgtw,
            Mn::Pcmpgtd,
            Mn::Psllw,
            Mn::Pslld,
            Mn::Psllq,
            Mn::Psrlw,
            Mn::Psrld,
            Mn::Psrlq,
            Mn::Psraw,
            Mn::Psrad,
            Mn::Pslldq,
            Mn::Psrldq,
        ],
        per_form: 40,
        seed: 21,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn sse_integer() {
    run_family(&sse_integer_family());
}

#[test]
fn sse_integer_32() {
    let mut f = sse_integer_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

fn sse_logic_shuffle_family() -> Family<'static> {
    Family {
        name: "sse logic/shuffle/unpack",
        mnemonics: &[
            Mn::Pand,
            Mn::Pandn,
            Mn::Por,
            Mn::Pxor,
            Mn::Andps,
            Mn::Andnps,
            Mn::Orps,
            Mn::Xorps,
            Mn::Andpd,
            Mn::Andnpd,
            Mn::Orpd,
            Mn::Xorpd,
            Mn::Packsswb,
            Mn::Packssdw,
            Mn::Packuswb,
            Mn::Punpcklbw,
            Mn::Punpcklwd,
            Mn::Punpckldq,
            Mn::Punpcklqdq,
            Mn::Punpckhbw,
            Mn::Punpckhwd,
            Mn::Punpckhdq,
            Mn::Punpckhqdq,
            Mn::Pshufd,
            Mn::Pshuflw,
            Mn::Pshufhw,
            Mn::Shufps,
            Mn::Shufpd,
            Mn::Unpcklps,
            Mn::Unpckhps,
            Mn::Unpcklpd,
            Mn::Unpckhpd,
        ],
        per_form: 40,
        seed: 22,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn sse_logic_shuffle() {
    run_family(&sse_logic_shuffle_family());
}

const FLOAT: Tweaks = Tweaks {
    random_mxcsr: true,
    random_df: false,
    float_values: true,
    mem_size: 0,
    mem_align: 0,
};

fn sse_float_arith_family() -> Family<'static> {
    Family {
        name: "sse float arithmetic",
        mnemonics: &[
            Mn::Addps,
            Mn::Addss,
            Mn::Addpd,
            Mn::Addsd,
            Mn::Subps,
            Mn::Subss,
            Mn::Subpd,
            Mn::Subsd,
            Mn::Mulps,
            Mn::Mulss,
            Mn::Mulpd,
            Mn::Mulsd,
            Mn::Divps,
            Mn::Divss,
            Mn::Divpd,
            Mn::Divsd,
            Mn::Minps,
            Mn::Minss,
            Mn::Minpd,
            Mn::Minsd,
            Mn::Maxps,
            Mn::Maxss,
            Mn::Maxpd,
            Mn::Maxsd,
            Mn::Sqrtps,
            Mn::Sqrtss,
            Mn::Sqrtpd,
            Mn::Sqrtsd,
            Mn::Rcpps,
            Mn::Rcpss,
            Mn::Rsqrtps,
            Mn::Rsqrtss,
        ],
        per_form: 50,
        seed: 23,
        tweaks: FLOAT,
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn sse_float_arith() {
    run_family(&sse_float_arith_family());
}

#[test]
fn sse_float_arith_32() {
    let mut f = sse_float_arith_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

fn sse_float_compare_family() -> Family<'static> {
    Family {
        name: "sse float compare",
        mnemonics: &[
            Mn::Cmpps,
            Mn::Cmpss,
            Mn::Cmppd,
            Mn::Cmpsd,
            Mn::Comiss,
            Mn::Ucomiss,
            Mn::Comisd,
            Mn::Ucomisd,
        ],
        per_form: 150,
        seed: 24,
        tweaks: FLOAT,
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn sse_float_compare() {
    run_family(&sse_float_compare_family());
}

fn sse_conversions_family() -> Family<'static> {
    Family {
        name: "sse conversions",
        mnemonics: &[
            Mn::Cvtdq2ps,
            Mn::Cvtps2dq,
            Mn::Cvttps2dq,
            Mn::Cvtdq2pd,
            Mn::Cvtpd2dq,
            Mn::Cvttpd2dq,
            Mn::Cvtps2pd,
            Mn::Cvtpd2ps,
            Mn::Cvtss2sd,
            Mn::Cvtsd2ss,
            Mn::Cvtsi2ss,
            Mn::Cvtsi2sd,
            Mn::Cvtss2si,
            Mn::Cvttss2si,
            Mn::Cvtsd2si,
            Mn::Cvttsd2si,
        ],
        per_form: 80,
        seed: 25,
        tweaks: FLOAT,
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn sse_conversions() {
    run_family(&sse_conversions_family());
}

#[test]
fn sse_conversions_32() {
    let mut f = sse_conversions_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// SSE3 and SSSE3 (vessel's CPU model offers them everywhere).
fn sse3_ssse3_families() -> [Family<'static>; 2] {
    [
        Family {
            name: "sse3/ssse3 integer and moves",
            mnemonics: &[
                Mn::Movddup,
                Mn::Movshdup,
                Mn::Movsldup,
                Mn::Pshufb,
                Mn::Phaddw,
                Mn::Phaddd,
                Mn::Phaddsw,
                Mn::Phsubw,
                Mn::Phsubd,
                Mn::Phsubsw,
                Mn::Pmaddubsw,
                Mn::Pmulhrsw,
                Mn::Psignb,
                Mn::Psignw,
                Mn::Psignd,
                Mn::Pabsb,
                Mn::Pabsw,
                Mn::Pabsd,
                Mn::Palignr,
            ],
            per_form: 60,
            seed: 31,
            tweaks: Tweaks::default(),
            hooks: &no_hooks,
            // SSSE3's MMX forms are not implemented (nor offered).
            skip: &|c| {
                let o = c.op_code();
                (0..o.op_count()).any(|n| {
                    use iced_x86::OpCodeOperandKind as K;
                    matches!(o.op_kind(n), K::mm_reg | K::mm_rm | K::mm_or_mem)
                })
            },
        },
        Family {
            name: "sse3 float arithmetic",
            mnemonics: &[
                Mn::Addsubps,
                Mn::Addsubpd,
                Mn::Haddps,
                Mn::Haddpd,
                Mn::Hsubps,
                Mn::Hsubpd,
            ],
            per_form: 80,
            seed: 32,
            tweaks: FLOAT,
            hooks: &no_hooks,
            skip: &no_skip,
        },
    ]
}

#[test]
fn sse3_ssse3() {
    for f in sse3_ssse3_families() {
        run_where_host_has(std::arch::is_x86_feature_detected!("ssse3"), "SSSE3", &f);
    }
}

/// SSE4.1 and SSE4.2's lane-wise forms, single-lane moves and ptest, where this host
/// has them.
#[test]
fn sse41_sse42() {
    let f = Family {
        name: "sse4.1/4.2 lane-wise, inserts, extracts, ptest",
        mnemonics: &[
            Mn::Pmulld,
            Mn::Pmuldq,
            Mn::Pminsb,
            Mn::Pminsd,
            Mn::Pminuw,
            Mn::Pminud,
            Mn::Pmaxsb,
            Mn::Pmaxsd,
            Mn::Pmaxuw,
            Mn::Pmaxud,
            Mn::Pcmpeqq,
            Mn::Pcmpgtq,
            Mn::Packusdw,
            Mn::Pmovsxbw,
            Mn::Pmovsxbd,
            Mn::Pmovsxbq,
            Mn::Pmovsxwd,
            Mn::Pmovsxwq,
            Mn::Pmovsxdq,
            Mn::Pmovzxbw,
            Mn::Pmovzxbd,
            Mn::Pmovzxbq,
            Mn::Pmovzxwd,
            Mn::Pmovzxwq,
            Mn::Pmovzxdq,
            Mn::Pblendw,
            Mn::Blendps,
            Mn::Blendpd,
            Mn::Pblendvb,
            Mn::Blendvps,
            Mn::Blendvpd,
            Mn::Mpsadbw,
            Mn::Phminposuw,
            Mn::Movntdqa,
            Mn::Pextrb,
            Mn::Pextrd,
            Mn::Pextrq,
            Mn::Extractps,
            Mn::Pinsrb,
            Mn::Pinsrd,
            Mn::Pinsrq,
            Mn::Insertps,
            Mn::Ptest,
        ],
        per_form: 60,
        seed: 33,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    };
    run_where_host_has(std::arch::is_x86_feature_detected!("sse4.2"), "SSE4.2", &f);
}

/// SSE4.1's rounding and dot products, where this host has them.
#[test]
fn sse41_float() {
    let f = Family {
        name: "sse4.1 rounding and dot products",
        mnemonics: &[
            Mn::Roundps,
            Mn::Roundpd,
            Mn::Roundss,
            Mn::Roundsd,
            Mn::Dpps,
            Mn::Dppd,
        ],
        per_form: 150,
        seed: 34,
        tweaks: FLOAT,
        hooks: &no_hooks,
        skip: &no_skip,
    };
    run_where_host_has(std::arch::is_x86_feature_detected!("sse4.1"), "SSE4.1", &f);
}

/// Strings over a three-letter alphabet with zeros (random bytes rarely match or end).
fn small_alphabet(rng: &mut crate::common::Rng) -> u128 {
    (0..16).fold(0u128, |v, k| {
        v | u128::from([0u8, b'a', b'b', b'c'][rng.below(4) as usize]) << (8 * k)
    })
}

/// Short explicit lengths half the time (random ones are mostly past the end), small
/// alphabets half the time.
fn pcmpstr_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        return true;
    }
    let (base, index) = (f.instr.memory_base(), f.instr.memory_index());
    let addresses = |r: usize| {
        [base, index]
            .into_iter()
            .any(|x| x != iced_x86::Register::None && crate::cases::gpr_index(x) == r)
    };
    if f.rng.below(2) == 0 {
        for r in [0, 2] {
            if !addresses(r) {
                f.regs.gpr[r] = f.rng.below(40).wrapping_sub(20);
            }
        }
    }
    if f.rng.below(2) == 0 {
        for x in f.regs.xmm.iter_mut() {
            *x = small_alphabet(f.rng);
        }
        for t in f.targets.clone() {
            let v = small_alphabet(f.rng).to_le_bytes();
            let at = t as usize;
            if let Some(slot) = f.data.get_mut(at..at + 16) {
                slot.copy_from_slice(&v);
            }
        }
    }
    true
}

/// SSE4.2's string compares, where this host has them.
#[test]
fn sse42_string_compares() {
    let f = Family {
        name: "sse4.2 string compares",
        mnemonics: &[
            Mn::Pcmpestri,
            Mn::Pcmpestri64,
            Mn::Pcmpestrm,
            Mn::Pcmpestrm64,
            Mn::Pcmpistri,
            Mn::Pcmpistrm,
        ],
        per_form: 400,
        seed: 35,
        tweaks: Tweaks::default(),
        hooks: &pcmpstr_hooks,
        skip: &no_skip,
    };
    run_where_host_has(std::arch::is_x86_feature_detected!("sse4.2"), "SSE4.2", &f);
}

/// AES-NI and PCLMULQDQ (done in software), where this host has them.
#[test]
fn aes_and_carry_less_multiplication() {
    let f = Family {
        name: "aes-ni, pclmulqdq",
        mnemonics: &[
            Mn::Aesenc,
            Mn::Aesenclast,
            Mn::Aesdec,
            Mn::Aesdeclast,
            Mn::Aesimc,
            Mn::Aeskeygenassist,
            Mn::Pclmulqdq,
        ],
        per_form: 80,
        seed: 35,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    };
    let host = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    run_where_host_has(host, "AES-NI and PCLMULQDQ", &f);
}
