//! String instructions: every element size, rep/repe/repne, 64- and 32-bit addressing,
//! both directions. Encoded by hand (the encodings are one opcode byte plus prefixes).

use iced_x86::{Decoder, DecoderOptions};

use crate::cases::{Case, DF, RFLAGS_ARITH};
use crate::common::Rng;
use crate::native::{DATA_LEN, Native, RegState};
use crate::{FormGen, check, check_in};

#[derive(Clone, Copy, Debug)]
enum Op {
    Movs,
    Cmps,
    Stos,
    Lods,
    Scas,
}

fn opcode(op: Op) -> u8 {
    match op {
        Op::Movs => 0xa4,
        Op::Cmps => 0xa6,
        Op::Stos => 0xaa,
        Op::Lods => 0xac,
        Op::Scas => 0xae,
    }
}

/// One case; `bits` 64, or 32 for compatibility mode (where `a32` is the default address
/// size and no REX prefix exists).
fn string_case(
    rng: &mut Rng,
    native: &Native,
    bits: u32,
    op: Op,
    size: usize,
    rep: u8,
    a32: bool,
) -> Option<Case> {
    let mut bytes = Vec::new();
    if rep != 0 {
        bytes.push(rep);
    }
    if a32 && bits == 64 {
        bytes.push(0x67);
    }
    if size == 2 {
        bytes.push(0x66);
    }
    if size == 8 {
        bytes.push(0x48);
    }
    bytes.push(opcode(op) + u8::from(size > 1));

    let mut regs = RegState {
        rflags: 0x202 | (rng.next() & RFLAGS_ARITH) | if rng.chance(2) { DF } else { 0 },
        x87: crate::native::X87 {
            fcw: 0x37f,
            ..Default::default()
        },
        mxcsr: 0x1f80,
        ..RegState::default()
    };
    for (k, g) in regs.gpr.iter_mut().enumerate() {
        *g = rng.interesting();
        if bits == 32 {
            *g &= if k < 8 { 0xffff_ffff } else { 0 };
        }
    }
    let base = native.data_addr();
    regs.gpr[4] = base + 0x1000;
    let si = 0x300 + rng.below(0x1700);
    let di = if rng.chance(4) {
        // Overlapping copies a few bytes apart, both ways.
        (si + rng.below(24)).saturating_sub(12).max(0x300)
    } else {
        0x300 + rng.below(0x1700)
    };
    let (si, di) = if rng.chance(3) {
        (si & !(size as u64 - 1), di & !(size as u64 - 1))
    } else {
        (si, di)
    };
    let upper = |rng: &mut Rng| {
        if a32 && bits == 64 {
            rng.next() << 32
        } else {
            0
        }
    };
    regs.gpr[6] = (base + si) | upper(rng);
    regs.gpr[7] = (base + di) | upper(rng);
    let down = regs.rflags & DF != 0;
    // Long runs cross the window's page boundary (the bulk paths split there).
    let fits = |off: u64| {
        if down {
            off / size as u64
        } else {
            (DATA_LEN as u64 - off) / size as u64
        }
    };
    let count = match rng.below(5) {
        0 => rng.below(3),
        1 => rng.below(fits(si).min(fits(di)) + 1),
        _ => rng.below(40),
    };
    regs.gpr[1] = count | upper(rng);
    let mut data = vec![0u8; DATA_LEN];
    for b in data.iter_mut() {
        *b = rng.next() as u8;
    }
    let step: i64 = if regs.rflags & DF != 0 {
        -(size as i64)
    } else {
        size as i64
    };
    // Let repe/repne run a while: make the compared elements equal up to a random point.
    if matches!(op, Op::Cmps | Op::Scas) && rng.chance(2) {
        let run = rng.below(count + 1) as i64;
        let acc = regs.gpr[0].to_le_bytes();
        for k in 0..run {
            for b in 0..size as i64 {
                let d = (di as i64 + k * step + b) as usize;
                let v = if matches!(op, Op::Cmps) {
                    data[(si as i64 + k * step + b) as usize]
                } else {
                    acc[b as usize]
                };
                if rep == 0xf2 {
                    data[d] = v ^ 0x5a;
                } else {
                    data[d] = v;
                }
            }
        }
    }
    let at = if bits == 64 {
        native.insn_addr()
    } else {
        native.insn32_addr()
    };
    let instr = Decoder::with_ip(bits, &bytes, at, DecoderOptions::NONE).decode();
    if instr.is_invalid() {
        return None;
    }
    Some(Case {
        bytes,
        regs,
        data,
        flags_mask: !0,
        instr,
    })
}

fn string_forms(bits: u32) -> Vec<(String, Box<FormGen<'static>>)> {
    let mut forms: Vec<(String, Box<FormGen>)> = Vec::new();
    let sizes: &[usize] = if bits == 64 {
        &[1, 2, 4, 8]
    } else {
        &[1, 2, 4]
    };
    let asizes: &[bool] = if bits == 64 { &[false, true] } else { &[true] };
    for op in [Op::Movs, Op::Cmps, Op::Stos, Op::Lods, Op::Scas] {
        for &size in sizes {
            for rep in [0u8, 0xf3, 0xf2] {
                for &a32 in asizes {
                    let name = format!("{op:?}{size} rep={rep:#x} a32={a32}");
                    let g: Box<FormGen> = Box::new(move |rng: &mut Rng, native: &Native| {
                        string_case(rng, native, bits, op, size, rep, a32)
                    });
                    forms.push((name, g));
                }
            }
        }
    }
    forms
}

#[test]
fn strings() {
    check("string", &string_forms(64), 40, 10);
}

#[test]
fn strings_32() {
    check_in("string (32-bit)", &string_forms(32), 40, 11, 32);
}
