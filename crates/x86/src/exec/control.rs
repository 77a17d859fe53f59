//! Near control transfers: jmp, jcc, call, ret, loop family, jrcxz; int3/int n/into, ud.

use iced_x86::{Instruction, InstructionInfoFactory, MemorySize, Mnemonic as Mn, Register};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::machine::{Loc, Machine, Mem, R, Rd, W16, W32, W64, Width};
use crate::mmu::canonical;

/// Branch to an absolute target, checking canonicality in 64-bit mode (#GP(0) at the
/// branch otherwise).
#[inline(always)]
fn branch<W: Width>(m: &mut Machine, target: u64) -> R {
    let t = target & W::MASK;
    if W::BYTES == 8 && !canonical(t) {
        return Err(Exception::GeneralProtection(0).into());
    }
    m.set_rip(t);
    Ok(())
}

fn jmp_rel<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let t = m.rip().wrapping_add(i.imm) & W::MASK;
    m.set_rip(t);
    Ok(())
}

/// jcc with the condition fixed at decode time, so the flag test folds to the few
/// instructions that condition needs.
/// Conditional branches do not end their block: when one is taken, it ends the block
/// here (the instructions after it in the block are the fall-through path).
#[inline(always)]
fn take(m: &mut Machine, i: &Insn, mask: u64) {
    let t = m.rip().wrapping_add(i.imm) & mask;
    m.set_rip(t);
    m.end_block();
}

fn jcc<W: Width, const CC: u8>(m: &mut Machine, i: &Insn) -> R {
    if m.flags.cond(CC) {
        take(m, i, W::MASK);
    }
    Ok(())
}

fn jmp_ind<W: Width, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let t = S::get::<W>(m, i, sa)?;
    branch::<W>(m, t)
}

fn call_rel<W: Width, const LONG: bool>(m: &mut Machine, i: &Insn) -> R {
    let ret = m.rip();
    let t = ret.wrapping_add(i.imm) & W::MASK;
    m.push_in::<W, LONG>(ret)?;
    m.set_rip(t);
    Ok(())
}

fn call_ind<W: Width, S: Loc, const LONG: bool>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let t = S::get::<W>(m, i, sa)? & W::MASK;
    if W::BYTES == 8 && !canonical(t) {
        return Err(Exception::GeneralProtection(0).into());
    }
    let ret = m.rip();
    m.push_in::<W, LONG>(ret)?;
    m.set_rip(t);
    Ok(())
}

fn ret<W: Width, const LONG: bool>(m: &mut Machine, i: &Insn) -> R {
    let t = m.peek_in::<W, LONG>(0)?;
    branch::<W>(m, t)?;
    m.bump_rsp_in::<LONG>((W::BYTES as u64).wrapping_add(i.imm & 0xffff));
    Ok(())
}

/// loop/loope/loopne (KIND 0/1/2) with the count register of `C` width, target width W.
fn loop_<W: Width, C: Width, const KIND: u8>(m: &mut Machine, i: &Insn) -> R {
    let c = m.reg::<C>(1).wrapping_sub(1) & C::MASK;
    m.set_reg::<C>(1, c);
    let go = c != 0
        && match KIND {
            1 => m.flags.zf(),
            2 => !m.flags.zf(),
            _ => true,
        };
    if go {
        take(m, i, W::MASK);
    }
    Ok(())
}

fn jrcxz<W: Width, C: Width>(m: &mut Machine, i: &Insn) -> R {
    if m.reg::<C>(1) == 0 {
        take(m, i, W::MASK);
    }
    Ok(())
}

fn int3(_m: &mut Machine, _i: &Insn) -> R {
    Err(Exception::Breakpoint.into())
}

fn int_n(_m: &mut Machine, i: &Insn) -> R {
    Err(Exception::SoftwareInterrupt(i.imm as u8).into())
}

fn into(m: &mut Machine, _i: &Insn) -> R {
    if m.flags.of() {
        Err(Exception::Overflow.into())
    } else {
        Ok(())
    }
}

fn ud(_m: &mut Machine, _i: &Insn) -> R {
    Err(Exception::InvalidOpcode.into())
}

fn branch_width(i: &Instruction) -> usize {
    match i.op_kind(0) {
        iced_x86::OpKind::NearBranch16 => 2,
        iced_x86::OpKind::NearBranch32 => 4,
        _ => 8,
    }
}

/// Width of the count register loop/jrcxz use (the address size).
fn count_width(i: &Instruction) -> usize {
    let mut f = InstructionInfoFactory::new();
    for r in f.info(i).used_registers() {
        match r.register() {
            Register::RCX => return 8,
            Register::ECX => return 4,
            Register::CX => return 2,
            _ => {}
        }
    }
    8
}

macro_rules! jcc_cc {
    ($W:ty, $cc:expr) => {
        match $cc {
            0 => jcc::<$W, 0> as Handler,
            1 => jcc::<$W, 1>,
            2 => jcc::<$W, 2>,
            3 => jcc::<$W, 3>,
            4 => jcc::<$W, 4>,
            5 => jcc::<$W, 5>,
            6 => jcc::<$W, 6>,
            7 => jcc::<$W, 7>,
            8 => jcc::<$W, 8>,
            9 => jcc::<$W, 9>,
            10 => jcc::<$W, 10>,
            11 => jcc::<$W, 11>,
            12 => jcc::<$W, 12>,
            13 => jcc::<$W, 13>,
            14 => jcc::<$W, 14>,
            _ => jcc::<$W, 15>,
        }
    };
}

fn loop_sel<W: Width>(i: &Instruction, kind_: u8) -> Option<Handler> {
    sized!(count_width(i), |C| Some(match kind_ {
        0 => loop_::<W, C, 0> as Handler,
        1 => loop_::<W, C, 1>,
        _ => loop_::<W, C, 2>,
    }))
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, cx: &Cx) -> Option<Handler> {
    let k0 = kind(i, 0);
    let far = matches!(
        i.memory_size(),
        MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
    );
    match i.mnemonic() {
        Mn::Jmp if k0 == K::Rel => sized!(branch_width(i), |W| Some(jmp_rel::<W> as Handler)),
        Mn::Jmp if !far => sized!(op_size(i, 0), |W| Some(match k0 {
            K::Reg => jmp_ind::<W, Rd> as Handler,
            K::Mem => jmp_ind::<W, Mem>,
            _ => return None,
        })),
        Mn::Jo
        | Mn::Jno
        | Mn::Jb
        | Mn::Jae
        | Mn::Je
        | Mn::Jne
        | Mn::Jbe
        | Mn::Ja
        | Mn::Js
        | Mn::Jns
        | Mn::Jp
        | Mn::Jnp
        | Mn::Jl
        | Mn::Jge
        | Mn::Jle
        | Mn::Jg => match branch_width(i) {
            2 => Some(jcc_cc!(W16, d.cc)),
            4 => Some(jcc_cc!(W32, d.cc)),
            _ => Some(jcc_cc!(W64, d.cc)),
        },
        Mn::Call if k0 == K::Rel => sized!(branch_width(i), |W| Some(if cx.long() {
            call_rel::<W, true> as Handler
        } else {
            call_rel::<W, false>
        })),
        Mn::Call if !far => sized!(op_size(i, 0), |W| Some(match (k0, cx.long()) {
            (K::Reg, true) => call_ind::<W, Rd, true> as Handler,
            (K::Mem, true) => call_ind::<W, Mem, true>,
            (K::Reg, false) => call_ind::<W, Rd, false>,
            (K::Mem, false) => call_ind::<W, Mem, false>,
            _ => return None,
        })),
        Mn::Ret => {
            let n = i.stack_pointer_increment() as u64 as usize;
            // stack_pointer_increment includes the immediate; the width is the rest.
            let w = n - (d.imm as usize & 0xffff);
            sized!(w, |W| Some(if cx.long() {
                ret::<W, true> as Handler
            } else {
                ret::<W, false>
            }))
        }
        Mn::Loop | Mn::Loope | Mn::Loopne => {
            let kind_ = match i.mnemonic() {
                Mn::Loop => 0,
                Mn::Loope => 1,
                _ => 2,
            };
            sized!(branch_width(i), |W| loop_sel::<W>(i, kind_))
        }
        Mn::Jrcxz | Mn::Jecxz | Mn::Jcxz => {
            let c = match i.mnemonic() {
                Mn::Jrcxz => 8,
                Mn::Jecxz => 4,
                _ => 2,
            };
            sized!(branch_width(i), |W| sized!(c, |C| Some(
                jrcxz::<W, C> as Handler
            )))
        }
        Mn::Int3 => Some(int3),
        Mn::Int => Some(int_n),
        Mn::Into => Some(into),
        Mn::Ud0 | Mn::Ud1 | Mn::Ud2 => Some(ud),
        _ => None,
    }
}
