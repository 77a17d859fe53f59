//! State save/restore: fxsave/fxrstor, xsave/xsaveopt/xsavec, xrstor (standard and
//! compacted images), ldmxcsr/stmxcsr, and the x87 control-word instructions. The whole
//! x87/SSE/AVX/AVX-512 state is randomised and compared on every case.

use iced_x86::Mnemonic as Mn;

use crate::cases::{Fixup, Tweaks};
use crate::host_model::{MODELLED_XSAVE, xsave_area_len};
use crate::native::{comp_offset, rfbm};
use crate::{Family, no_skip, run_family};

fn random_bytes(f: &mut Fixup, off: u64, len: usize) {
    for k in 0..len as u64 {
        let v = f.rng.next();
        f.write_data(off + k, 1, v);
    }
}

fn component_size(c: u32) -> usize {
    crate::host_model::component(c).1
}

/// A random valid MXCSR for this CPU (mask 0x2ffff: DAZ and misaligned-SSE mode).
fn mxcsr(f: &mut Fixup) -> u64 {
    f.rng.next() & 0xffff
}

/// Writes a random but valid legacy area (x87 state with nothing pending, valid MXCSR).
fn legacy_area(f: &mut Fixup, t: u64) {
    random_bytes(f, t, 512);
    let fcw = 0x037f | (f.rng.next() & 0x0f00);
    f.write_data(t, 2, fcw);
    let fsw = f.rng.next() & 0x7f3f;
    f.write_data(t + 2, 2, fsw);
    // Error pointers zero: see the note in `cases`.
    f.write_data(t + 6, 2, 0);
    f.write_data(t + 8, 8, 0);
    f.write_data(t + 16, 8, 0);
    let m = mxcsr(f);
    f.write_data(t + 24, 4, m);
}

fn fpu_hooks(f: &mut Fixup) -> bool {
    let xsave_like = matches!(
        f.mnemonic,
        Mn::Xsave
            | Mn::Xsave64
            | Mn::Xsaveopt
            | Mn::Xsaveopt64
            | Mn::Xsavec
            | Mn::Xsavec64
            | Mn::Xrstor
            | Mn::Xrstor64
    );
    if f.probing() {
        if xsave_like {
            f.pins.extend([0, 2]);
        }
        return true;
    }
    let t = f.targets.first().copied().unwrap_or(0);
    if xsave_like {
        // A random requested-feature bitmap over the components vessel's CPU model offers
        // (the upper halves of RAX and RDX are ignored by the instruction).
        f.regs.gpr[0] = f.rng.next() & !(0xffff_ffff & !MODELLED_XSAVE);
        f.regs.gpr[2] = f.rng.next() & !0xffff_ffff;
    }
    match f.mnemonic {
        Mn::Fxrstor | Mn::Fxrstor64 => legacy_area(f, t),
        Mn::Xrstor | Mn::Xrstor64 => {
            legacy_area(f, t);
            let avail = rfbm();
            let bv = f.rng.next() & avail;
            // Header: XSTATE_BV, XCOMP_BV, reserved zero.
            for k in 0..64 {
                f.write_data(t + 512 + k, 1, 0);
            }
            f.write_data(t + 512, 8, bv);
            if f.rng.chance(2) {
                // Standard format.
                for c in 2..8u32 {
                    if avail & (1 << c) != 0 {
                        random_bytes(f, t + comp_offset(c) as u64, component_size(c));
                    }
                }
            } else {
                // Compacted: components packed after the header in XCOMP_BV order.
                let comp = bv | (f.rng.next() & avail);
                f.write_data(t + 520, 8, (1 << 63) | comp);
                let mut off = 576u64;
                for c in 2..8u32 {
                    if comp & (1 << c) != 0 {
                        let size = component_size(c);
                        random_bytes(f, t + off, size);
                        off += size as u64;
                    }
                }
            }
        }
        Mn::Ldmxcsr => {
            let m = mxcsr(f);
            f.write_data(t, 4, m);
        }
        _ => {}
    }
    true
}

#[test]
fn fx_state() {
    run_family(&Family {
        name: "fxsave/fxrstor",
        mnemonics: &[Mn::Fxsave, Mn::Fxsave64, Mn::Fxrstor, Mn::Fxrstor64],
        per_form: 150,
        seed: 30,
        tweaks: Tweaks {
            mem_size: 512,
            mem_align: 16,
            ..Tweaks::default()
        },
        hooks: &fpu_hooks,
        skip: &no_skip,
    });
}

#[test]
fn xsave_state() {
    run_family(&Family {
        name: "xsave/xrstor",
        mnemonics: &[
            Mn::Xsave,
            Mn::Xsave64,
            Mn::Xsaveopt,
            Mn::Xsaveopt64,
            Mn::Xsavec,
            Mn::Xsavec64,
            Mn::Xrstor,
            Mn::Xrstor64,
        ],
        per_form: 150,
        seed: 31,
        tweaks: Tweaks {
            // The whole standard-format area, from CPUID leaf 0xD.
            mem_size: xsave_area_len(),
            mem_align: 64,
            ..Tweaks::default()
        },
        hooks: &fpu_hooks,
        skip: &no_skip,
    });
}

#[test]
fn control_words() {
    run_family(&Family {
        name: "mxcsr/x87 control",
        mnemonics: &[
            Mn::Ldmxcsr,
            Mn::Stmxcsr,
            // The waiting forms (finit, fstcw...) decode as wait + the no-wait form.
            Mn::Fninit,
            Mn::Fnstcw,
            Mn::Fldcw,
            Mn::Fnstsw,
            Mn::Fnclex,
            Mn::Wait,
        ],
        per_form: 100,
        seed: 32,
        tweaks: Tweaks::default(),
        hooks: &fpu_hooks,
        skip: &no_skip,
    });
}
