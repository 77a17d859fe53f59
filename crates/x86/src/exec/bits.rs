//! bt/bts/btr/btc, bsf/bsr, popcnt/lzcnt/tzcnt, bswap, movbe, crc32.

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::flags::Flags;
use crate::machine::{Imm, Loc, Machine, Mem, R, Rd, Rs, W16, W32, W64, Width};
use crate::state::rflags::{CF, ZF};

/// What bt* does to the selected bit: 0 = test, 1 = set, 2 = reset, 3 = complement.
#[inline(always)]
fn bit_op<const OP: u8>(v: u64, bit: u64) -> u64 {
    match OP {
        1 => v | (1 << bit),
        2 => v & !(1 << bit),
        3 => v ^ (1 << bit),
        _ => v,
    }
}

/// bt* with a register destination (bit offset modulo the width).
fn bt_reg<W: Width, S: Loc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    let v = m.reg::<W>(i.d);
    let bit = S::get::<W>(m, i, 0)? & u64::from(W::BITS - 1);
    if OP != 0 {
        m.set_reg::<W>(i.d, bit_op::<OP>(v, bit));
    }
    m.flags.set_bits(CF, ((v >> bit) & 1) * CF);
    Ok(())
}

/// Address and bit number of a bt* memory operand. A register bit offset is signed and
/// may select any bit relative to the operand address; an immediate one is taken modulo
/// the operand width.
#[inline(always)]
fn bt_target<W: Width, S: Loc>(m: &mut Machine, i: &Insn) -> R<(u64, u64)> {
    let raw = S::get::<W>(m, i, 0)?;
    let bits = u64::from(W::BITS);
    if S::IS_IMM {
        return Ok((m.ea(i), raw & (bits - 1)));
    }
    let off = W::sext(raw) as i64;
    let words = off >> bits.trailing_zeros();
    let delta = (words as u64).wrapping_mul(W::BYTES as u64);
    let ea = i
        .disp
        .wrapping_add(m.regs[(i.base & 31) as usize])
        .wrapping_add(m.regs[(i.index & 31) as usize] << (i.scale & 3))
        .wrapping_add(delta)
        & i.amask;
    Ok((m.linear(i, ea), (off as u64) & (bits - 1)))
}

fn bt_mem<W: Width, S: Loc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    let (lin, bit) = bt_target::<W, S>(m, i)?;
    let v = W::read(m, lin)?;
    if OP != 0 {
        W::write(m, lin, bit_op::<OP>(v, bit))?;
    }
    m.flags.set_bits(CF, ((v >> bit) & 1) * CF);
    Ok(())
}

fn bt_locked<W: Width, S: Loc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    let (lin, bit) = bt_target::<W, S>(m, i)?;
    let old = m.locked_update::<W>(lin, |v| bit_op::<OP>(v, bit))?;
    m.flags.set_bits(CF, ((old >> bit) & 1) * CF);
    Ok(())
}

/// bsf (REV false) / bsr. A zero source sets ZF and leaves the destination unchanged
/// (AMD documents this; Intel parts behave the same).
fn bsf<W: Width, S: Loc, const REV: bool>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let v = S::get::<W>(m, i, sa)?;
    if v == 0 {
        m.flags.set_bits(ZF, ZF);
        return Ok(());
    }
    let idx = if REV {
        63 - u64::from(v.leading_zeros())
    } else {
        u64::from(v.trailing_zeros())
    };
    m.set_reg::<W>(i.d, idx);
    m.flags.set_bits(ZF, 0);
    Ok(())
}

/// popcnt (OP 0), lzcnt (1), tzcnt (2).
fn count<W: Width, S: Loc, const OP: u8>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let v = S::get::<W>(m, i, sa)?;
    let bits = W::BITS;
    let (r, flags) = match OP {
        0 => {
            let r = u64::from(v.count_ones());
            (r, if v == 0 { ZF } else { 0 })
        }
        1 => {
            let r = u64::from(v.leading_zeros() - (64 - bits));
            (r, if v == 0 { CF } else { 0 } | if r == 0 { ZF } else { 0 })
        }
        _ => {
            let r = if v == 0 {
                u64::from(bits)
            } else {
                u64::from(v.trailing_zeros())
            };
            (r, if v == 0 { CF } else { 0 } | if r == 0 { ZF } else { 0 })
        }
    };
    m.set_reg::<W>(i.d, r);
    m.flags = Flags::from_bits(flags);
    Ok(())
}

fn bswap<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let v = m.reg::<W>(i.d);
    let r = match W::BYTES {
        4 => u64::from((v as u32).swap_bytes()),
        8 => v.swap_bytes(),
        // bswap r16 is undefined; Intel and AMD parts clear the low word.
        _ => 0,
    };
    m.set_reg::<W>(i.d, r);
    Ok(())
}

/// The low `W::BYTES` of `v` in the other byte order.
fn swapped<W: Width>(v: u64) -> u64 {
    v.swap_bytes() >> (64 - W::BITS)
}

/// movbe: a load into the register (LOAD) or a store from it, bytes reversed.
fn movbe<W: Width, const LOAD: bool>(m: &mut Machine, i: &Insn) -> R {
    let a = Mem::addr(m, i);
    if LOAD {
        let v = Mem::get::<W>(m, i, a)?;
        m.set_reg::<W>(i.d, swapped::<W>(v));
        Ok(())
    } else {
        let v = m.reg::<W>(i.d);
        Mem::put::<W>(m, i, a, swapped::<W>(v))
    }
}

/// CRC-32C (Castagnoli, bit-reflected) of `crc` extended by the low `bytes` of `v`.
fn crc32c(mut crc: u32, v: u64, bytes: usize) -> u32 {
    for k in 0..bytes {
        crc ^= u32::from((v >> (8 * k)) as u8);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

/// crc32 r32/r64, r/m: the register's low half extended by the source, zero-extended.
fn crc32<W: Width, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let a = S::addr(m, i);
    let v = S::get::<W>(m, i, a)?;
    let crc = m.reg::<W32>(i.d) as u32;
    m.set_reg::<W64>(i.d, u64::from(crc32c(crc, v, W::BYTES)));
    Ok(())
}

fn bt_sel<W: Width, const OP: u8>(i: &Instruction, lock: bool) -> Option<Handler> {
    Some(match (kind(i, 0), kind(i, 1), lock) {
        (K::Reg, K::Reg, false) => bt_reg::<W, Rs, OP> as Handler,
        (K::Reg, K::Imm, false) => bt_reg::<W, Imm, OP>,
        (K::Mem, K::Reg, false) => bt_mem::<W, Rd, OP>,
        (K::Mem, K::Imm, false) => bt_mem::<W, Imm, OP>,
        (K::Mem, K::Reg, true) if OP != 0 => bt_locked::<W, Rd, OP>,
        (K::Mem, K::Imm, true) if OP != 0 => bt_locked::<W, Imm, OP>,
        _ => return None,
    })
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let lock = i.has_lock_prefix();
    let mem1 = kind(i, 1) == K::Mem;
    let size = op_size(i, 0);
    match i.mnemonic() {
        Mn::Bt => sized!(size, |W| bt_sel::<W, 0>(i, lock)),
        Mn::Bts => sized!(size, |W| bt_sel::<W, 1>(i, lock)),
        Mn::Btr => sized!(size, |W| bt_sel::<W, 2>(i, lock)),
        Mn::Btc => sized!(size, |W| bt_sel::<W, 3>(i, lock)),
        Mn::Bsf | Mn::Bsr => {
            let rev = i.mnemonic() == Mn::Bsr;
            sized!(size, |W| Some(match (mem1, rev) {
                (false, false) => bsf::<W, Rs, false> as Handler,
                (true, false) => bsf::<W, Mem, false>,
                (false, true) => bsf::<W, Rs, true>,
                (true, true) => bsf::<W, Mem, true>,
            }))
        }
        Mn::Popcnt | Mn::Lzcnt | Mn::Tzcnt => {
            let op = match i.mnemonic() {
                Mn::Popcnt => 0,
                Mn::Lzcnt => 1,
                _ => 2,
            };
            sized!(size, |W| Some(match (mem1, op) {
                (false, 0) => count::<W, Rs, 0> as Handler,
                (true, 0) => count::<W, Mem, 0>,
                (false, 1) => count::<W, Rs, 1>,
                (true, 1) => count::<W, Mem, 1>,
                (false, _) => count::<W, Rs, 2>,
                (true, _) => count::<W, Mem, 2>,
            }))
        }
        Mn::Crc32 => {
            let size = if mem1 {
                i.memory_size().size()
            } else {
                i.op_register(1).size()
            };
            sized!(size, |W| Some(if mem1 {
                crc32::<W, Mem> as Handler
            } else {
                crc32::<W, Rs>
            }))
        }
        Mn::Movbe => sized!(size, |W| Some(if mem1 {
            movbe::<W, true> as Handler
        } else {
            movbe::<W, false>
        })),
        Mn::Bswap => match size {
            2 => Some(bswap::<W16> as Handler),
            _ => sized!(size, |W| Some(bswap::<W> as Handler)),
        },
        _ => None,
    }
}
