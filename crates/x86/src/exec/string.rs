//! movs/stos/lods/cmps/scas/ins/outs with rep/repe/repne. Each iteration commits its
//! register updates, so a fault part-way leaves rSI/rDI/rCX describing the remaining work
//! and RIP at the instruction, as on hardware.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::system::port_allowed;
use crate::decode::{Cx, Handler, Insn, op_size};
use crate::exception::Exception;
use crate::flags::{FlagOp, Flags};
use crate::hostmem::PAGE;
use crate::machine::{Machine, R, SEG_NONE, Width};
use crate::mmu::Access;
use crate::state::rflags::DF;

const NONE: u8 = 0;
const REPE: u8 = 1;
const REPNE: u8 = 2;

/// Step for rSI/rDI: +size, or -size with DF set.
#[inline(always)]
fn delta<W: Width>(m: &Machine) -> u64 {
    if m.cpu.rflags & DF != 0 {
        (W::BYTES as u64).wrapping_neg()
    } else {
        W::BYTES as u64
    }
}

/// Writes an address-sized register: 16-bit merges, 32-bit zero-extends, 64-bit replaces.
#[inline(always)]
fn set_areg(m: &mut Machine, r: usize, v: u64, amask: u64) {
    m.regs[r] = if amask == 0xffff {
        (m.regs[r] & !0xffff) | (v & 0xffff)
    } else {
        v & amask
    };
}

#[inline(always)]
fn advance(m: &mut Machine, r: usize, d: u64, amask: u64) {
    let v = m.regs[r].wrapping_add(d);
    set_areg(m, r, v, amask);
}

#[inline(always)]
fn src_lin(m: &Machine, i: &Insn) -> u64 {
    m.linear(i, m.regs[6] & i.amask)
}

#[inline(always)]
fn dst_lin(m: &Machine, i: &Insn) -> u64 {
    let off = m.regs[7] & i.amask;
    let lin = off.wrapping_add(m.seg_base[(i.cc & 7) as usize]);
    if i.wrap32 { lin & 0xffff_ffff } else { lin }
}

/// Runs `body` once, or rCX times with a rep prefix; `body` returns false to stop a
/// repe/repne loop early.
#[inline(always)]
fn repeat<const REP: u8>(
    m: &mut Machine,
    i: &Insn,
    mut body: impl FnMut(&mut Machine) -> R<bool>,
) -> R {
    if REP == NONE {
        body(m)?;
        return Ok(());
    }
    loop {
        let c = m.regs[1] & i.amask;
        if c == 0 {
            return Ok(());
        }
        let go_on = body(m)?;
        set_areg(m, 1, c - 1, i.amask);
        if !go_on {
            return Ok(());
        }
    }
}

/// Bytes a rep movs/stos moves in bulk before letting the run loop look at interrupts
/// (the instruction then restarts where it stopped, as after an interrupt).
const BULK_SLICE: u64 = 64 << 10;

/// How many `size`-byte elements, the first at linear `lin` (offset `reg` in its
/// segment), lie entirely in the current page and before the offset wraps, going up or
/// (`down`) down.
#[inline(always)]
fn room(lin: u64, reg: u64, amask: u64, size: u64, down: bool) -> u64 {
    let off = lin & 0xfff;
    let page = PAGE as u64;
    let in_page = if down {
        if off + size > page { 0 } else { off / size + 1 }
    } else {
        (page - off) / size
    };
    if amask == u64::MAX {
        return in_page;
    }
    let reg = reg & amask;
    let in_seg = if down {
        reg / size + 1
    } else {
        (amask - reg + 1) / size
    };
    in_page.min(in_seg)
}

/// Commits `n` elements of a string operation: the index registers move by `n` elements
/// and rCX counts them off.
#[inline(always)]
fn commit(m: &mut Machine, i: &Insn, n: u64, size: u64, down: bool, regs: &[usize]) {
    let delta = if down {
        (n * size).wrapping_neg()
    } else {
        n * size
    };
    for &r in regs {
        advance(m, r, delta, i.amask);
    }
    let c = (m.regs[1] & i.amask) - n;
    set_areg(m, 1, c, i.amask);
}

/// Ends the instruction early with rCX/rSI/rDI describing the remaining work and RIP at
/// the instruction, so it continues after the run loop has looked at interrupts.
fn restart(m: &mut Machine, i: &Insn) {
    let ip = m.rip().wrapping_sub(u64::from(i.len));
    let ip = match m.mode.bitness() {
        64 => ip,
        32 => ip & 0xffff_ffff,
        _ => ip & 0xffff,
    };
    m.set_rip(ip);
    m.end_block();
}

/// rep movs over RAM: as many whole elements as both pages hold, copied on the host.
/// Returns how many (0: do the next element one at a time).
#[inline(always)]
fn movs_chunk<W: Width>(m: &mut Machine, i: &Insn, c: u64, down: bool) -> R<u64> {
    let size = W::BYTES as u64;
    let src = src_lin(m, i);
    let dst = dst_lin(m, i);
    let n = c
        .min(room(src, m.regs[6], i.amask, size, down))
        .min(room(dst, m.regs[7], i.amask, size, down));
    if n < 2 {
        return Ok(0);
    }
    let ts = m.translate(src, Access::Read)?;
    let td = m.translate(dst, Access::Write)?;
    let (Some(hs), Some(hd)) = (ts.host, td.host) else {
        return Ok(0);
    };
    hd.rep_movs(
        (dst & 0xfff) as usize,
        hs,
        (src & 0xfff) as usize,
        W::BYTES,
        n as usize,
        down,
    );
    m.note_write(td.gpa);
    commit(m, i, n, size, down, &[6, 7]);
    Ok(n)
}

/// rep stos over RAM, as `movs_chunk`.
#[inline(always)]
fn stos_chunk<W: Width>(m: &mut Machine, i: &Insn, c: u64, v: u64, down: bool) -> R<u64> {
    let size = W::BYTES as u64;
    let dst = dst_lin(m, i);
    let n = c.min(room(dst, m.regs[7], i.amask, size, down));
    if n < 2 {
        return Ok(0);
    }
    let td = m.translate(dst, Access::Write)?;
    let Some(hd) = td.host else {
        return Ok(0);
    };
    hd.rep_stos((dst & 0xfff) as usize, W::BYTES, n as usize, v, down);
    m.note_write(td.gpa);
    commit(m, i, n, size, down, &[7]);
    Ok(n)
}

fn movs<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    let one = |m: &mut Machine| -> R {
        let v = W::read(m, src_lin(m, i))?;
        W::write(m, dst_lin(m, i), v)?;
        advance(m, 6, d, i.amask);
        advance(m, 7, d, i.amask);
        Ok(())
    };
    if REP == NONE {
        return one(m);
    }
    let down = m.cpu.rflags & DF != 0;
    let mut moved = 0;
    loop {
        let c = m.regs[1] & i.amask;
        if c == 0 {
            return Ok(());
        }
        if moved >= BULK_SLICE {
            restart(m, i);
            return Ok(());
        }
        let n = movs_chunk::<W>(m, i, c, down)?;
        if n == 0 {
            one(m)?;
            set_areg(m, 1, c - 1, i.amask);
        }
        moved += n.max(1) * W::BYTES as u64;
    }
}

fn stos<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    let v = m.reg::<W>(0);
    let one = |m: &mut Machine| -> R {
        W::write(m, dst_lin(m, i), v)?;
        advance(m, 7, d, i.amask);
        Ok(())
    };
    if REP == NONE {
        return one(m);
    }
    let down = m.cpu.rflags & DF != 0;
    let mut moved = 0;
    loop {
        let c = m.regs[1] & i.amask;
        if c == 0 {
            return Ok(());
        }
        if moved >= BULK_SLICE {
            restart(m, i);
            return Ok(());
        }
        let n = stos_chunk::<W>(m, i, c, v, down)?;
        if n == 0 {
            one(m)?;
            set_areg(m, 1, c - 1, i.amask);
        }
        moved += n.max(1) * W::BYTES as u64;
    }
}

fn lods<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    repeat::<REP>(m, i, |m| {
        let v = W::read(m, src_lin(m, i))?;
        m.set_reg::<W>(0, v);
        advance(m, 6, d, i.amask);
        Ok(true)
    })
}

#[inline(always)]
fn keep_going<const REP: u8>(zf: bool) -> bool {
    match REP {
        REPE => zf,
        REPNE => !zf,
        _ => true,
    }
}

fn cmps<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    repeat::<REP>(m, i, |m| {
        let a = W::read(m, src_lin(m, i))?;
        let b = W::read(m, dst_lin(m, i))?;
        let r = a.wrapping_sub(b) & W::MASK;
        m.flags = Flags::new(FlagOp::Sub, W::BITS, a, b, r);
        advance(m, 6, d, i.amask);
        advance(m, 7, d, i.amask);
        Ok(keep_going::<REP>(r == 0))
    })
}

fn scas<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    let a = m.reg::<W>(0);
    repeat::<REP>(m, i, |m| {
        let b = W::read(m, dst_lin(m, i))?;
        let r = a.wrapping_sub(b) & W::MASK;
        m.flags = Flags::new(FlagOp::Sub, W::BITS, a, b, r);
        advance(m, 7, d, i.amask);
        Ok(keep_going::<REP>(r == 0))
    })
}

fn ins<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let port = m.regs[2] as u16;
    if !port_allowed(m, port, W::BYTES) {
        return Err(Exception::GeneralProtection(0).into());
    }
    let d = delta::<W>(m);
    repeat::<REP>(m, i, |m| {
        let lin = dst_lin(m, i);
        // The store must be able to succeed before the port is read (reads have effects).
        m.probe_write(lin, W::BYTES)?;
        let mut b = [0u8; 8];
        m.platform(|p| p.io_in(port, &mut b[..W::BYTES]));
        W::write(m, lin, u64::from_le_bytes(b))?;
        advance(m, 7, d, i.amask);
        Ok(true)
    })
}

fn outs<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let port = m.regs[2] as u16;
    if !port_allowed(m, port, W::BYTES) {
        return Err(Exception::GeneralProtection(0).into());
    }
    let d = delta::<W>(m);
    repeat::<REP>(m, i, |m| {
        let v = W::read(m, src_lin(m, i))?;
        let b = v.to_le_bytes();
        m.platform(|p| p.io_out(port, &b[..W::BYTES]));
        advance(m, 6, d, i.amask);
        Ok(true)
    })
}

macro_rules! by_rep {
    ($f:ident, $W:ty, $rep:expr) => {
        match $rep {
            NONE => $f::<$W, NONE> as Handler,
            REPE => $f::<$W, REPE>,
            _ => $f::<$W, REPNE>,
        }
    };
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, cx: &Cx) -> Option<Handler> {
    let rep = if i.has_repne_prefix() {
        REPNE
    } else if i.has_rep_prefix() || i.has_repe_prefix() {
        REPE
    } else {
        NONE
    };
    // Destination segment: ES (base ignored in 64-bit mode).
    let es = if cx.long() { SEG_NONE } else { 0 };
    type Pick = fn(usize, u8) -> Option<Handler>;
    let (size, f): (usize, Pick) = match i.mnemonic() {
        Mn::Movsb | Mn::Movsw | Mn::Movsd | Mn::Movsq if i.op_count() == 2 && is_string(i) => {
            (op_size(i, 0), |n, r| {
                sized!(n, |W| Some(by_rep!(movs, W, r)))
            })
        }
        Mn::Stosb | Mn::Stosw | Mn::Stosd | Mn::Stosq => (op_size(i, 0), |n, r| {
            sized!(n, |W| Some(by_rep!(stos, W, r)))
        }),
        Mn::Lodsb | Mn::Lodsw | Mn::Lodsd | Mn::Lodsq => (op_size(i, 1), |n, r| {
            sized!(n, |W| Some(by_rep!(lods, W, r)))
        }),
        Mn::Cmpsb | Mn::Cmpsw | Mn::Cmpsd | Mn::Cmpsq if is_string(i) => (op_size(i, 0), |n, r| {
            sized!(n, |W| Some(by_rep!(cmps, W, r)))
        }),
        Mn::Scasb | Mn::Scasw | Mn::Scasd | Mn::Scasq => (op_size(i, 1), |n, r| {
            sized!(n, |W| Some(by_rep!(scas, W, r)))
        }),
        Mn::Insb | Mn::Insw | Mn::Insd => (op_size(i, 0), |n, r| {
            sized!(n, |W| Some(by_rep!(ins, W, r)))
        }),
        Mn::Outsb | Mn::Outsw | Mn::Outsd => (op_size(i, 1), |n, r| {
            sized!(n, |W| Some(by_rep!(outs, W, r)))
        }),
        _ => return None,
    };
    d.cc = es;
    // movs/stos/lods/ins/outs treat repne like rep.
    let rep = match i.mnemonic() {
        Mn::Cmpsb
        | Mn::Cmpsw
        | Mn::Cmpsd
        | Mn::Cmpsq
        | Mn::Scasb
        | Mn::Scasw
        | Mn::Scasd
        | Mn::Scasq => rep,
        _ if rep != NONE => REPE,
        _ => NONE,
    };
    f(size, rep)
}

/// movsd/cmpsd are also SSE2 mnemonics; the string forms have string operands.
fn is_string(i: &Instruction) -> bool {
    matches!(
        i.op_kind(0),
        iced_x86::OpKind::MemoryESDI
            | iced_x86::OpKind::MemoryESEDI
            | iced_x86::OpKind::MemoryESRDI
            | iced_x86::OpKind::MemorySegSI
            | iced_x86::OpKind::MemorySegESI
            | iced_x86::OpKind::MemorySegRSI
    )
}
