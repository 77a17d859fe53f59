//! push/pop (registers, memory, immediates, FS/GS), pushf/popf, enter/leave, and the stack
//! helpers call/ret/interrupt code share.

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::machine::{Imm, Loc, Machine, Mem, R, Rd, W16, W32, W64, Width};
use crate::state::{SegReg, rflags};

impl Machine<'_> {
    /// Linear address of SS:(rSP + delta), with the stack address size.
    #[inline(always)]
    pub(crate) fn stack_lin(&self, delta: u64) -> u64 {
        let off = self.regs[4].wrapping_add(delta) & self.stack_mask;
        let lin = off.wrapping_add(self.seg_base[SegReg::Ss as usize]);
        if self.stack_mask == u64::MAX {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }

    /// rSP += delta within the stack address size.
    #[inline(always)]
    pub(crate) fn bump_rsp(&mut self, delta: u64) {
        let rsp = self.regs[4];
        self.regs[4] = (rsp & !self.stack_mask) | (rsp.wrapping_add(delta) & self.stack_mask);
    }

    #[inline(always)]
    pub(crate) fn push<W: Width>(&mut self, v: u64) -> R {
        let lin = self.stack_lin((W::BYTES as u64).wrapping_neg());
        stack_fault(W::write(self, lin, v))?;
        self.bump_rsp((W::BYTES as u64).wrapping_neg());
        Ok(())
    }

    /// Reads the value `delta` bytes above rSP without popping it.
    #[inline(always)]
    pub(crate) fn peek<W: Width>(&mut self, delta: u64) -> R<u64> {
        let lin = self.stack_lin(delta);
        stack_fault(W::read(self, lin))
    }

    #[inline(always)]
    pub(crate) fn pop<W: Width>(&mut self) -> R<u64> {
        let v = self.peek::<W>(0)?;
        self.bump_rsp(W::BYTES as u64);
        Ok(v)
    }

    /// `push` for code decoded in 64-bit mode (`LONG`): RSP is the linear address (SS has
    /// no base, no stack-size mask), else the general `push`.
    #[inline(always)]
    pub(crate) fn push_in<W: Width, const LONG: bool>(&mut self, v: u64) -> R {
        if !LONG {
            return self.push::<W>(v);
        }
        let lin = self.regs[4].wrapping_sub(W::BYTES as u64);
        stack_fault(W::write(self, lin, v))?;
        self.regs[4] = lin;
        Ok(())
    }

    /// `peek` for code decoded in 64-bit mode (`LONG`).
    #[inline(always)]
    pub(crate) fn peek_in<W: Width, const LONG: bool>(&mut self, delta: u64) -> R<u64> {
        if !LONG {
            return self.peek::<W>(delta);
        }
        let lin = self.regs[4].wrapping_add(delta);
        stack_fault(W::read(self, lin))
    }

    /// `bump_rsp` for code decoded in 64-bit mode (`LONG`).
    #[inline(always)]
    pub(crate) fn bump_rsp_in<const LONG: bool>(&mut self, delta: u64) {
        if LONG {
            self.regs[4] = self.regs[4].wrapping_add(delta);
        } else {
            self.bump_rsp(delta);
        }
    }
}

/// Stack accesses with a non-canonical address raise #SS(0), not #GP(0).
#[inline(always)]
fn stack_fault<T>(r: R<T>) -> R<T> {
    match r {
        Err(e) if e.get() == Exception::GeneralProtection(0) => {
            Err(Exception::StackFault(0).into())
        }
        r => r,
    }
}

fn push<W: Width, S: Loc, const LONG: bool>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let v = S::get::<W>(m, i, sa)?;
    m.push_in::<W, LONG>(v)
}

fn pop_reg<W: Width, const LONG: bool>(m: &mut Machine, i: &Insn) -> R {
    let v = m.peek_in::<W, LONG>(0)?;
    m.bump_rsp_in::<LONG>(W::BYTES as u64);
    m.set_reg::<W>(i.d, v);
    Ok(())
}

/// pop r/m with a memory destination: the address is computed with rSP already
/// incremented (so `pop [rsp]` stores above the popped slot), and nothing is committed if
/// the store faults.
fn pop_mem<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let v = m.peek::<W>(0)?;
    let old = m.regs[4];
    m.bump_rsp(W::BYTES as u64);
    let lin = m.ea(i);
    if let Err(e) = W::write(m, lin, v) {
        m.regs[4] = old;
        return Err(e);
    }
    Ok(())
}

/// push fs/gs: the selector, zero-extended to the operand size.
fn push_sreg<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let v = u64::from(m.cpu.seg[usize::from(i.t & 7)].selector);
    m.push::<W>(v)
}

fn pushf<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let v = m.rflags() & !(rflags::VM | rflags::RF);
    m.push::<W>(v & W::MASK)
}

fn popf<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let v = m.pop::<W>()?;
    let old = m.rflags();
    let cpl = m.cpu.cpl();
    let iopl = ((old & rflags::IOPL) >> 12) as u8;
    let mut mask = rflags::ARITH | rflags::TF | rflags::DF | rflags::NT | rflags::AC | rflags::ID;
    if cpl == 0 {
        mask |= rflags::IOPL | rflags::IF;
    } else if cpl <= iopl {
        mask |= rflags::IF;
    }
    mask &= W::MASK;
    let new = ((old & !mask) | (v & mask)) & !rflags::RF;
    m.cpu.rflags = new;
    m.flags = crate::flags::Flags::from_bits(new);
    Ok(())
}

/// enter size, level (W = operand size).
fn enter<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let size = i.imm & 0xffff;
    let level = u64::from(i.imm2 & 31);
    let n = W::BYTES as u64;
    let old_rsp = m.regs[4];
    let old_rbp = m.regs[5];
    let rbp_val = m.reg::<W>(5);
    let result = (|| {
        m.push::<W>(rbp_val)?;
        let frame = m.regs[4] & m.stack_mask;
        if level > 0 {
            let mut bp = old_rbp;
            for _ in 1..level {
                bp = (bp & !m.stack_mask) | (bp.wrapping_sub(n) & m.stack_mask);
                let lin = {
                    let off = bp & m.stack_mask;
                    let lin = off.wrapping_add(m.seg_base[SegReg::Ss as usize]);
                    if m.stack_mask == u64::MAX {
                        lin
                    } else {
                        lin & 0xffff_ffff
                    }
                };
                let v = W::read(m, lin)?;
                m.push::<W>(v)?;
            }
            m.push::<W>(frame)?;
        }
        m.set_reg::<W>(5, frame);
        m.bump_rsp(size.wrapping_neg());
        Ok(())
    })();
    if result.is_err() {
        m.regs[4] = old_rsp;
        m.regs[5] = old_rbp;
    }
    result
}

fn leave<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let old_rsp = m.regs[4];
    let mask = m.stack_mask;
    m.regs[4] = (old_rsp & !mask) | (m.regs[5] & mask);
    match m.pop::<W>() {
        Ok(v) => {
            m.set_reg::<W>(5, v);
            Ok(())
        }
        Err(e) => {
            m.regs[4] = old_rsp;
            Err(e)
        }
    }
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, cx: &Cx) -> Option<Handler> {
    let k0 = kind(i, 0);
    match i.mnemonic() {
        Mn::Push => {
            if k0 == K::Reg && i.op_register(0).is_segment_register() {
                d.t = i.op_register(0).number() as u8;
                let n = i.stack_pointer_increment().unsigned_abs() as usize;
                return sized!(n, |W| Some(push_sreg::<W> as Handler));
            }
            let n = i.stack_pointer_increment().unsigned_abs() as usize;
            let long = cx.long();
            sized!(n, |W| Some(match (k0, long) {
                (K::Reg, true) => push::<W, Rd, true> as Handler,
                (K::Mem, true) => push::<W, Mem, true>,
                (K::Imm, true) => push::<W, Imm, true>,
                (K::Reg, false) => push::<W, Rd, false>,
                (K::Mem, false) => push::<W, Mem, false>,
                (K::Imm, false) => push::<W, Imm, false>,
                _ => return None,
            }))
        }
        Mn::Pop => {
            if k0 == K::Reg && i.op_register(0).is_segment_register() {
                return None; // segment loads: system.rs
            }
            let long = cx.long();
            sized!(op_size(i, 0), |W| Some(match (k0, long) {
                (K::Reg, true) => pop_reg::<W, true> as Handler,
                (K::Reg, false) => pop_reg::<W, false>,
                (K::Mem, _) => pop_mem::<W>,
                _ => return None,
            }))
        }
        Mn::Pushf => Some(pushf::<W16> as Handler),
        Mn::Pushfd => Some(pushf::<W32> as Handler),
        Mn::Pushfq => Some(pushf::<W64> as Handler),
        Mn::Popf => Some(popf::<W16> as Handler),
        Mn::Popfd => Some(popf::<W32> as Handler),
        Mn::Popfq => Some(popf::<W64> as Handler),
        Mn::Enter => {
            let n = match i.code() {
                iced_x86::Code::Enterw_imm16_imm8 => 2,
                iced_x86::Code::Enterd_imm16_imm8 => 4,
                _ => 8,
            };
            sized!(n, |W| Some(enter::<W> as Handler))
        }
        Mn::Leave => {
            let n = match i.code() {
                iced_x86::Code::Leavew => 2,
                iced_x86::Code::Leaved => 4,
                _ => 8,
            };
            sized!(n, |W| Some(leave::<W> as Handler))
        }
        _ => None,
    }
}
