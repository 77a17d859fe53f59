//! add/or/adc/sbb/and/sub/xor/cmp/test, inc/dec/neg/not.

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::flags::{FlagOp, Flags};
use crate::machine::{Imm, Loc, Machine, Mem, R, Rd, Rs, Width};

/// A two-operand ALU operation: result and the flags it leaves.
pub(crate) trait AluOp: 'static {
    /// cmp and test only set flags.
    const WRITES: bool = true;
    fn apply<W: Width>(f: &Flags, a: u64, b: u64) -> (u64, Flags);
}

pub(crate) struct Add;
pub(crate) struct Adc;
pub(crate) struct Sub;
pub(crate) struct Sbb;
pub(crate) struct Cmp;
pub(crate) struct And;
pub(crate) struct Or;
pub(crate) struct Xor;
pub(crate) struct Test;

impl AluOp for Add {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let r = a.wrapping_add(b) & W::MASK;
        (r, Flags::new(FlagOp::Add, W::BITS, a, b, r))
    }
}

impl AluOp for Adc {
    #[inline(always)]
    fn apply<W: Width>(f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let c = f.cf();
        let r = a.wrapping_add(b).wrapping_add(u64::from(c)) & W::MASK;
        let op = if c { FlagOp::Adc } else { FlagOp::Add };
        (r, Flags::new(op, W::BITS, a, b, r))
    }
}

impl AluOp for Sub {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let r = a.wrapping_sub(b) & W::MASK;
        (r, Flags::new(FlagOp::Sub, W::BITS, a, b, r))
    }
}

impl AluOp for Sbb {
    #[inline(always)]
    fn apply<W: Width>(f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let c = f.cf();
        let r = a.wrapping_sub(b).wrapping_sub(u64::from(c)) & W::MASK;
        let op = if c { FlagOp::Sbb } else { FlagOp::Sub };
        (r, Flags::new(op, W::BITS, a, b, r))
    }
}

impl AluOp for Cmp {
    const WRITES: bool = false;
    #[inline(always)]
    fn apply<W: Width>(f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        Sub::apply::<W>(f, a, b)
    }
}

impl AluOp for And {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let r = a & b;
        (r, Flags::new(FlagOp::Logic, W::BITS, a, b, r))
    }
}

impl AluOp for Or {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let r = a | b;
        (r, Flags::new(FlagOp::Logic, W::BITS, a, b, r))
    }
}

impl AluOp for Xor {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        let r = a ^ b;
        (r, Flags::new(FlagOp::Logic, W::BITS, a, b, r))
    }
}

impl AluOp for Test {
    const WRITES: bool = false;
    #[inline(always)]
    fn apply<W: Width>(f: &Flags, a: u64, b: u64) -> (u64, Flags) {
        And::apply::<W>(f, a, b)
    }
}

/// `op dst, src` for every operand form. Flags are committed only after the write, so a
/// faulting write leaves them as they were.
pub(crate) fn alu<O: AluOp, W: Width, D: Loc, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let da = D::addr(m, i);
    let sa = S::addr(m, i);
    let a = D::get::<W>(m, i, da)?;
    let b = S::get::<W>(m, i, sa)?;
    let (r, f) = O::apply::<W>(&m.flags, a, b);
    if O::WRITES {
        D::put::<W>(m, i, da, r)?;
    }
    m.flags = f;
    Ok(())
}

/// `lock op [mem], src`: an atomic read-modify-write on guest memory.
pub(crate) fn alu_locked<O: AluOp, W: Width, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let b = S::get::<W>(m, i, 0)?;
    let f0 = m.flags;
    let old = m.locked_update::<W>(lin, |a| O::apply::<W>(&f0, a, b).0)?;
    m.flags = O::apply::<W>(&f0, old, b).1;
    Ok(())
}

/// A one-operand operation; `None` flags = flags unchanged (not).
pub(crate) trait UnOp: 'static {
    fn apply<W: Width>(f: &Flags, a: u64) -> (u64, Option<Flags>);
}

pub(crate) struct Inc;
pub(crate) struct Dec;
pub(crate) struct Neg;
pub(crate) struct Not;

impl UnOp for Inc {
    #[inline(always)]
    fn apply<W: Width>(f: &Flags, a: u64) -> (u64, Option<Flags>) {
        let r = a.wrapping_add(1) & W::MASK;
        // CF is preserved: carry it along in the lazy record.
        (
            r,
            Some(Flags::new(FlagOp::Inc, W::BITS, a, u64::from(f.cf()), r)),
        )
    }
}

impl UnOp for Dec {
    #[inline(always)]
    fn apply<W: Width>(f: &Flags, a: u64) -> (u64, Option<Flags>) {
        let r = a.wrapping_sub(1) & W::MASK;
        (
            r,
            Some(Flags::new(FlagOp::Dec, W::BITS, a, u64::from(f.cf()), r)),
        )
    }
}

impl UnOp for Neg {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64) -> (u64, Option<Flags>) {
        let r = 0u64.wrapping_sub(a) & W::MASK;
        (r, Some(Flags::new(FlagOp::Sub, W::BITS, 0, a, r)))
    }
}

impl UnOp for Not {
    #[inline(always)]
    fn apply<W: Width>(_f: &Flags, a: u64) -> (u64, Option<Flags>) {
        (!a & W::MASK, None)
    }
}

pub(crate) fn unary<O: UnOp, W: Width, D: Loc>(m: &mut Machine, i: &Insn) -> R {
    let da = D::addr(m, i);
    let a = D::get::<W>(m, i, da)?;
    let (r, f) = O::apply::<W>(&m.flags, a);
    D::put::<W>(m, i, da, r)?;
    if let Some(f) = f {
        m.flags = f;
    }
    Ok(())
}

pub(crate) fn unary_locked<O: UnOp, W: Width>(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    let f0 = m.flags;
    let old = m.locked_update::<W>(lin, |a| O::apply::<W>(&f0, a).0)?;
    if let Some(f) = O::apply::<W>(&f0, old).1 {
        m.flags = f;
    }
    Ok(())
}

fn binary<O: AluOp>(i: &Instruction, lock: bool) -> Option<Handler> {
    // Registers are numbered in operand order: the first register operand is `d`.
    sized!(op_size(i, 0), |W| Some(
        match (kind(i, 0), kind(i, 1), lock) {
            (K::Reg, K::Reg, false) => alu::<O, W, Rd, Rs> as Handler,
            (K::Reg, K::Mem, false) => alu::<O, W, Rd, Mem>,
            (K::Reg, K::Imm, false) => alu::<O, W, Rd, Imm>,
            (K::Mem, K::Reg, false) => alu::<O, W, Mem, Rd>,
            (K::Mem, K::Imm, false) => alu::<O, W, Mem, Imm>,
            (K::Mem, K::Reg, true) if O::WRITES => alu_locked::<O, W, Rd>,
            (K::Mem, K::Imm, true) if O::WRITES => alu_locked::<O, W, Imm>,
            _ => return None,
        }
    ))
}

fn unary_sel<O: UnOp>(i: &Instruction, lock: bool) -> Option<Handler> {
    sized!(op_size(i, 0), |W| Some(match (kind(i, 0), lock) {
        (K::Reg, false) => unary::<O, W, Rd> as Handler,
        (K::Mem, false) => unary::<O, W, Mem>,
        (K::Mem, true) => unary_locked::<O, W>,
        _ => return None,
    }))
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let lock = i.has_lock_prefix();
    match i.mnemonic() {
        Mn::Add => binary::<Add>(i, lock),
        Mn::Adc => binary::<Adc>(i, lock),
        Mn::Sub => binary::<Sub>(i, lock),
        Mn::Sbb => binary::<Sbb>(i, lock),
        Mn::Cmp => binary::<Cmp>(i, lock),
        Mn::And => binary::<And>(i, lock),
        Mn::Or => binary::<Or>(i, lock),
        Mn::Xor => binary::<Xor>(i, lock),
        Mn::Test => binary::<Test>(i, lock),
        Mn::Inc => unary_sel::<Inc>(i, lock),
        Mn::Dec => unary_sel::<Dec>(i, lock),
        Mn::Neg => unary_sel::<Neg>(i, lock),
        Mn::Not => unary_sel::<Not>(i, lock),
        _ => None,
    }
}
