//! xchg, cmpxchg, cmpxchg8b/16b, xadd. With memory operands these are host atomics when
//! locked (xchg always is).

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::Exception;
use crate::flags::{FlagOp, Flags};
use crate::hostmem::split_lock;
use crate::machine::{Machine, R, W32, W64, Width};
use crate::mmu::Access;
use crate::state::rflags::ZF;

fn xchg_rr<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let a = m.reg::<W>(i.d);
    let b = m.reg::<W>(i.s);
    m.set_reg::<W>(i.d, b);
    m.set_reg::<W>(i.s, a);
    Ok(())
}

/// xchg with memory is implicitly locked.
fn xchg_mem<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let b = m.reg::<W>(i.d);
    let old = m.locked_update::<W>(lin, |_| b)?;
    m.set_reg::<W>(i.d, old);
    Ok(())
}

fn cmpxchg_rr<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let acc = m.reg::<W>(0);
    let dst = m.reg::<W>(i.d);
    let src = m.reg::<W>(i.s);
    if acc == dst {
        m.set_reg::<W>(i.d, src);
    } else {
        m.set_reg::<W>(0, dst);
    }
    m.flags = Flags::new(
        FlagOp::Sub,
        W::BITS,
        acc,
        dst,
        acc.wrapping_sub(dst) & W::MASK,
    );
    Ok(())
}

/// cmpxchg [mem], r. The memory is always written (with its own value on a mismatch), as
/// the processor does, so a read-only page faults either way.
fn cmpxchg_mem<W: Width, const LOCK: bool>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let acc = m.reg::<W>(0);
    let src = m.reg::<W>(i.d);
    let old = if LOCK {
        m.locked_update::<W>(lin, |cur| if cur == acc { src } else { cur })?
    } else {
        let cur = W::read(m, lin)?;
        W::write(m, lin, if cur == acc { src } else { cur })?;
        cur
    };
    if old != acc {
        m.set_reg::<W>(0, old);
    }
    m.flags = Flags::new(
        FlagOp::Sub,
        W::BITS,
        acc,
        old,
        acc.wrapping_sub(old) & W::MASK,
    );
    Ok(())
}

fn cmpxchg8b(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let cmp = (m.regs[2] << 32) | (m.regs[0] & 0xffff_ffff);
    let new = (m.regs[1] << 32) | (m.regs[3] & 0xffff_ffff);
    let old = m.locked_update::<W64>(lin, |cur| if cur == cmp { new } else { cur })?;
    if old == cmp {
        m.flags.set_bits(ZF, ZF);
    } else {
        m.set_reg::<W32>(0, old & 0xffff_ffff);
        m.set_reg::<W32>(2, old >> 32);
        m.flags.set_bits(ZF, 0);
    }
    Ok(())
}

fn cmpxchg16b(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    if lin & 15 != 0 {
        return Err(Exception::GeneralProtection(0).into());
    }
    let cmp = (u128::from(m.regs[2]) << 64) | u128::from(m.regs[0]);
    let new = (u128::from(m.regs[1]) << 64) | u128::from(m.regs[3]);
    let t = m.translate(lin, Access::Write)?;
    let result = match t.host {
        Some(h) => {
            let r = h.compare_exchange16((lin & 0xfff) as usize, cmp, new);
            m.note_write(t.gpa);
            r
        }
        None => {
            // MMIO: no host atomic exists; serialise with other split/MMIO locked ops.
            let _g = split_lock();
            let cur = m.read128(lin)?;
            m.write128(lin, if cur == cmp { new } else { cur })?;
            if cur == cmp { Ok(cur) } else { Err(cur) }
        }
    };
    match result {
        Ok(_) => m.flags.set_bits(ZF, ZF),
        Err(old) => {
            m.regs[0] = old as u64;
            m.regs[2] = (old >> 64) as u64;
            m.flags.set_bits(ZF, 0);
        }
    }
    Ok(())
}

fn xadd_rr<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let a = m.reg::<W>(i.d);
    let b = m.reg::<W>(i.s);
    let r = a.wrapping_add(b) & W::MASK;
    m.set_reg::<W>(i.s, a);
    m.set_reg::<W>(i.d, r);
    m.flags = Flags::new(FlagOp::Add, W::BITS, a, b, r);
    Ok(())
}

fn xadd_mem<W: Width, const LOCK: bool>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let b = m.reg::<W>(i.d);
    let a = if LOCK {
        m.locked_update::<W>(lin, |a| a.wrapping_add(b))?
    } else {
        let a = W::read(m, lin)?;
        W::write(m, lin, a.wrapping_add(b))?;
        a
    };
    let r = a.wrapping_add(b) & W::MASK;
    m.set_reg::<W>(i.d, a);
    m.flags = Flags::new(FlagOp::Add, W::BITS, a, b, r);
    Ok(())
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let lock = i.has_lock_prefix();
    let mem = kind(i, 0) == K::Mem;
    match i.mnemonic() {
        Mn::Xchg => sized!(op_size(i, 0), |W| Some(if mem {
            xchg_mem::<W> as Handler
        } else {
            xchg_rr::<W>
        })),
        Mn::Cmpxchg => sized!(op_size(i, 0), |W| Some(match (mem, lock) {
            (false, _) => cmpxchg_rr::<W> as Handler,
            (true, false) => cmpxchg_mem::<W, false>,
            (true, true) => cmpxchg_mem::<W, true>,
        })),
        Mn::Xadd => sized!(op_size(i, 0), |W| Some(match (mem, lock) {
            (false, _) => xadd_rr::<W> as Handler,
            (true, false) => xadd_mem::<W, false>,
            (true, true) => xadd_mem::<W, true>,
        })),
        Mn::Cmpxchg8b => Some(cmpxchg8b),
        Mn::Cmpxchg16b => Some(cmpxchg16b),
        _ => None,
    }
}
