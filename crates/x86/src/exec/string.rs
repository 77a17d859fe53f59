//! movs/stos/lods/cmps/scas/ins/outs with rep/repe/repne. Each iteration commits its
//! register updates, so a fault part-way leaves rSI/rDI/rCX describing the remaining work
//! and RIP at the instruction, as on hardware.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::system::io_allowed;
use crate::decode::{Cx, Handler, Insn, op_size};
use crate::exception::Exception;
use crate::flags::{FlagOp, Flags};
use crate::machine::{Machine, R, SEG_NONE, Width};
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

fn movs<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    repeat::<REP>(m, i, |m| {
        let v = W::read(m, src_lin(m, i))?;
        W::write(m, dst_lin(m, i), v)?;
        advance(m, 6, d, i.amask);
        advance(m, 7, d, i.amask);
        Ok(true)
    })
}

fn stos<W: Width, const REP: u8>(m: &mut Machine, i: &Insn) -> R {
    let d = delta::<W>(m);
    let v = m.reg::<W>(0);
    repeat::<REP>(m, i, |m| {
        W::write(m, dst_lin(m, i), v)?;
        advance(m, 7, d, i.amask);
        Ok(true)
    })
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
    if !io_allowed(m) {
        return Err(Exception::GeneralProtection(0));
    }
    let d = delta::<W>(m);
    let port = m.regs[2] as u16;
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
    if !io_allowed(m) {
        return Err(Exception::GeneralProtection(0));
    }
    let d = delta::<W>(m);
    let port = m.regs[2] as u16;
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
