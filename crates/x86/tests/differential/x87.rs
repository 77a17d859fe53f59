//! x87 arithmetic, loads and stores, compares, transcendentals and environment images,
//! and MMX: run natively and on the interpreter (which runs them on the host FPU) from the
//! same random x87 state (random 80-bit register contents, TOP, tags, condition codes,
//! precision and rounding control, every exception masked) and compared in full.

use iced_x86::{Code, Mnemonic as Mn};

use crate::cases::{Fixup, Tweaks};
use crate::{Family, no_hooks, run_family, run_family_in};

/// fldenv/frstor load a random environment: keep every exception masked and none pending
/// (the native harness must never take #MF).
fn env_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        return true;
    }
    if matches!(f.mnemonic, Mn::Fldenv | Mn::Frstor) {
        let t = f.targets[0];
        let fcw = 0x037f | (f.rng.next() & 0x0f00);
        f.write_data(t, 2, fcw);
        let fsw = f.rng.next() & 0x7f3f;
        f.write_data(t + 4, 2, fsw);
    }
    true
}

/// Forms the harness cannot run: the 16-bit environment images (operand-size prefix).
fn skip_env16(c: Code) -> bool {
    matches!(
        c,
        Code::Fldenv_m14byte | Code::Fnstenv_m14byte | Code::Frstor_m94byte | Code::Fnsave_m94byte
    )
}

#[test]
fn x87_arithmetic() {
    run_family(&Family {
        name: "x87 arithmetic",
        mnemonics: &[
            Mn::Fadd,
            Mn::Faddp,
            Mn::Fiadd,
            Mn::Fmul,
            Mn::Fmulp,
            Mn::Fimul,
            Mn::Fsub,
            Mn::Fsubp,
            Mn::Fsubr,
            Mn::Fsubrp,
            Mn::Fisub,
            Mn::Fisubr,
            Mn::Fdiv,
            Mn::Fdivp,
            Mn::Fdivr,
            Mn::Fdivrp,
            Mn::Fidiv,
            Mn::Fidivr,
            Mn::Fsqrt,
            Mn::Fscale,
            Mn::Fprem,
            Mn::Fprem1,
            Mn::Frndint,
            Mn::Fxtract,
            Mn::Fchs,
            Mn::Fabs,
        ],
        per_form: 40,
        seed: 40,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &skip_env16,
    });
}

#[test]
fn x87_loads_stores_and_stack() {
    run_family(&Family {
        name: "x87 loads/stores",
        mnemonics: &[
            Mn::Fld,
            Mn::Fild,
            Mn::Fbld,
            Mn::Fst,
            Mn::Fstp,
            Mn::Fist,
            Mn::Fistp,
            Mn::Fisttp,
            Mn::Fbstp,
            Mn::Fxch,
            Mn::Ffree,
            Mn::Ffreep,
            Mn::Fstpnce,
            Mn::Fld1,
            Mn::Fldl2t,
            Mn::Fldl2e,
            Mn::Fldpi,
            Mn::Fldlg2,
            Mn::Fldln2,
            Mn::Fldz,
            Mn::Fdecstp,
            Mn::Fincstp,
            Mn::Fnop,
            Mn::Fcmovb,
            Mn::Fcmove,
            Mn::Fcmovbe,
            Mn::Fcmovu,
            Mn::Fcmovnb,
            Mn::Fcmovne,
            Mn::Fcmovnbe,
            Mn::Fcmovnu,
        ],
        per_form: 40,
        seed: 41,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &skip_env16,
    });
}

#[test]
fn x87_compares() {
    run_family(&Family {
        name: "x87 compares",
        mnemonics: &[
            Mn::Fcom,
            Mn::Fcomp,
            Mn::Fcompp,
            Mn::Fucom,
            Mn::Fucomp,
            Mn::Fucompp,
            Mn::Ficom,
            Mn::Ficomp,
            Mn::Fcomi,
            Mn::Fcomip,
            Mn::Fucomi,
            Mn::Fucomip,
            Mn::Ftst,
            Mn::Fxam,
        ],
        per_form: 40,
        seed: 42,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &skip_env16,
    });
}

#[test]
fn x87_transcendental() {
    run_family(&Family {
        name: "x87 transcendental",
        mnemonics: &[
            Mn::F2xm1,
            Mn::Fyl2x,
            Mn::Fyl2xp1,
            Mn::Fptan,
            Mn::Fpatan,
            Mn::Fsin,
            Mn::Fcos,
            Mn::Fsincos,
        ],
        per_form: 40,
        seed: 43,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &skip_env16,
    });
}

#[test]
fn x87_environment() {
    run_family(&Family {
        name: "x87 environment",
        mnemonics: &[Mn::Fldenv, Mn::Fnstenv, Mn::Frstor, Mn::Fnsave],
        per_form: 60,
        seed: 44,
        tweaks: Tweaks::default(),
        hooks: &env_hooks,
        skip: &skip_env16,
    });
}

#[test]
fn x87_in_compatibility_mode() {
    run_family_in(
        &Family {
            name: "x87",
            mnemonics: &[
                Mn::Fadd,
                Mn::Fld,
                Mn::Fstp,
                Mn::Fistp,
                Mn::Fcomi,
                Mn::Fxch,
                Mn::Fnstenv,
                Mn::Fsqrt,
            ],
            per_form: 30,
            seed: 45,
            tweaks: Tweaks::default(),
            hooks: &no_hooks,
            skip: &skip_env16,
        },
        32,
    );
}

/// MMX forms only (the XMM forms of the same mnemonics are covered in `sse`).
fn not_mmx(c: Code) -> bool {
    !format!("{c:?}").contains("_mm") || format!("{c:?}").contains("xmm_xmm")
}

#[test]
fn mmx() {
    run_family(&Family {
        name: "mmx",
        mnemonics: &[
            Mn::Punpcklbw,
            Mn::Punpcklwd,
            Mn::Punpckldq,
            Mn::Packsswb,
            Mn::Pcmpgtb,
            Mn::Pcmpgtw,
            Mn::Pcmpgtd,
            Mn::Packuswb,
            Mn::Punpckhbw,
            Mn::Punpckhwd,
            Mn::Punpckhdq,
            Mn::Packssdw,
            Mn::Pcmpeqb,
            Mn::Pcmpeqw,
            Mn::Pcmpeqd,
            Mn::Psrlw,
            Mn::Psrld,
            Mn::Psrlq,
            Mn::Paddq,
            Mn::Pmullw,
            Mn::Psubusb,
            Mn::Psubusw,
            Mn::Pminub,
            Mn::Pand,
            Mn::Paddusb,
            Mn::Paddusw,
            Mn::Pmaxub,
            Mn::Pandn,
            Mn::Pavgb,
            Mn::Psraw,
            Mn::Psrad,
            Mn::Pavgw,
            Mn::Pmulhuw,
            Mn::Pmulhw,
            Mn::Psubsb,
            Mn::Psubsw,
            Mn::Pminsw,
            Mn::Por,
            Mn::Paddsb,
            Mn::Paddsw,
            Mn::Pmaxsw,
            Mn::Pxor,
            Mn::Psllw,
            Mn::Pslld,
            Mn::Psllq,
            Mn::Pmuludq,
            Mn::Pmaddwd,
            Mn::Psadbw,
            Mn::Psubb,
            Mn::Psubw,
            Mn::Psubd,
            Mn::Psubq,
            Mn::Paddb,
            Mn::Paddw,
            Mn::Paddd,
            Mn::Movd,
            Mn::Movq,
            Mn::Movntq,
            Mn::Pshufw,
            Mn::Pextrw,
            Mn::Pinsrw,
            Mn::Pmovmskb,
            Mn::Movq2dq,
            Mn::Movdq2q,
            Mn::Emms,
        ],
        per_form: 30,
        seed: 46,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &|c| c != Code::Emms && not_mmx(c),
    });
}
