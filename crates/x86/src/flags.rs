//! Lazy arithmetic flags.
//!
//! Most flag results are never read: `add` is followed by another `add`, not by a `jo`.
//! So an arithmetic instruction records what it did (operation, operands, result, width)
//! in four stores, and the six status flags are computed only when something reads them
//! (a jcc/setcc/cmovcc evaluates just the condition it needs; pushf, an exception or the
//! end of `run` materialises all of them). Widths are handled by left-aligning values:
//! `x << sh` with `sh = 64 - bits` puts the operand's sign bit at bit 63, so one code path
//! serves all four widths.

use crate::state::rflags::{AF, CF, OF, PF, SF, ZF};

/// What produced the current flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FlagOp {
    /// `res` holds the six flags themselves.
    Eager,
    /// res = a + b.
    Add,
    /// res = a + b + 1 (adc with carry in).
    Adc,
    /// res = a - b (sub, cmp, neg with a = 0).
    Sub,
    /// res = a - b - 1 (sbb with borrow in).
    Sbb,
    /// and/or/xor/test: CF = OF = 0.
    Logic,
    /// res = a + 1; b holds the preserved CF.
    Inc,
    /// res = a - 1; b holds the preserved CF.
    Dec,
    /// res = a << b (b in 1..=63 after masking, nonzero).
    Shl,
    /// res = a >> b (logical).
    Shr,
    /// res = a >> b (arithmetic).
    Sar,
    /// mul/imul: res = the low half of the product, b = 1 when it overflowed (CF = OF =
    /// b; SF/ZF/PF from res, AF clear: what Intel parts leave in the undefined flags).
    Mul,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Flags {
    pub op: FlagOp,
    /// 64 - operand width in bits.
    pub sh: u8,
    pub a: u64,
    pub b: u64,
    pub res: u64,
}

#[inline(always)]
fn parity(res: u64) -> bool {
    // PF is set when the low byte has an even number of ones.
    let x = (res ^ (res >> 4)) & 0xf;
    (0x9669 >> x) & 1 != 0
}

impl Flags {
    pub(crate) fn from_bits(bits: u64) -> Self {
        Flags {
            op: FlagOp::Eager,
            sh: 0,
            a: 0,
            b: 0,
            res: bits & crate::state::rflags::ARITH,
        }
    }

    #[inline(always)]
    pub(crate) fn new(op: FlagOp, bits: u32, a: u64, b: u64, res: u64) -> Self {
        debug_assert!(
            bits == 64 || (a | b | res) >> bits == 0,
            "flag operands must be masked to the width"
        );
        Flags {
            op,
            sh: (64 - bits) as u8,
            a,
            b,
            res,
        }
    }

    #[inline(always)]
    fn al(&self, x: u64) -> u64 {
        x << self.sh
    }

    #[inline]
    pub(crate) fn cf(&self) -> bool {
        // Operands and results are masked to the width, so unsigned compares of the raw
        // values give the carry without aligning them.
        match self.op {
            FlagOp::Eager => self.res & CF != 0,
            FlagOp::Add => self.res < self.a,
            FlagOp::Adc => self.res <= self.a,
            FlagOp::Sub => self.a < self.b,
            FlagOp::Sbb => self.a <= self.b,
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.b != 0,
            FlagOp::Shl => {
                let bits = 64 - u64::from(self.sh);
                // Last bit shifted out: bit (bits - count) of the operand.
                self.b <= bits && (self.a >> (bits - self.b)) & 1 != 0
            }
            FlagOp::Shr => self.b <= 64 && (self.a >> (self.b - 1)) & 1 != 0,
            FlagOp::Sar => {
                let sx = ((self.a << self.sh) as i64) >> self.sh;
                (sx >> (self.b - 1).min(63)) & 1 != 0
            }
            FlagOp::Mul => self.b != 0,
        }
    }

    #[inline]
    pub(crate) fn zf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.res & ZF != 0,
            _ => self.res == 0,
        }
    }

    #[inline]
    pub(crate) fn sf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.res & SF != 0,
            _ => (self.al(self.res) as i64) < 0,
        }
    }

    #[inline]
    pub(crate) fn of(&self) -> bool {
        let (a, b, r) = (self.al(self.a), self.al(self.b), self.al(self.res));
        match self.op {
            FlagOp::Eager => self.res & OF != 0,
            FlagOp::Add | FlagOp::Adc => (((a ^ r) & (b ^ r)) as i64) < 0,
            FlagOp::Sub | FlagOp::Sbb => (((a ^ b) & (a ^ r)) as i64) < 0,
            FlagOp::Logic => false,
            // Only the increment past the largest positive / decrement past the most
            // negative value overflows.
            FlagOp::Inc => r == 1 << 63,
            FlagOp::Dec => a == 1 << 63,
            FlagOp::Shl => ((r ^ if self.cf() { 1 << 63 } else { 0 }) as i64) < 0,
            FlagOp::Shr => (a as i64) < 0,
            FlagOp::Sar => false,
            FlagOp::Mul => self.b != 0,
        }
    }

    #[inline]
    pub(crate) fn pf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.res & PF != 0,
            _ => parity(self.res),
        }
    }

    #[inline]
    pub(crate) fn af(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.res & AF != 0,
            FlagOp::Add | FlagOp::Adc | FlagOp::Sub | FlagOp::Sbb => {
                (self.a ^ self.b ^ self.res) & 0x10 != 0
            }
            FlagOp::Inc | FlagOp::Dec => (self.a ^ self.res ^ 1) & 0x10 != 0,
            FlagOp::Logic | FlagOp::Shl | FlagOp::Shr | FlagOp::Sar | FlagOp::Mul => false,
        }
    }

    /// The six status flags as RFLAGS bits.
    pub(crate) fn bits(&self) -> u64 {
        if self.op == FlagOp::Eager {
            return self.res;
        }
        let mut f = 0;
        if self.cf() {
            f |= CF;
        }
        if self.pf() {
            f |= PF;
        }
        if self.af() {
            f |= AF;
        }
        if self.zf() {
            f |= ZF;
        }
        if self.sf() {
            f |= SF;
        }
        if self.of() {
            f |= OF;
        }
        f
    }

    /// Replaces the flags in `mask` with those in `bits`, keeping the others.
    pub(crate) fn set_bits(&mut self, mask: u64, bits: u64) {
        let cur = self.bits();
        *self = Flags::from_bits((cur & !mask) | (bits & mask));
    }

    /// Condition code `cc` (the low nibble of jcc/setcc/cmovcc opcodes).
    #[inline(always)]
    pub(crate) fn cond(&self, cc: u8) -> bool {
        // Fast paths for the combinations compilers emit: cmp/sub and test/and followed by
        // a branch. Everything else goes through the generic flag getters.
        let v = match (self.op, cc >> 1) {
            (_, 2) if self.op != FlagOp::Eager => self.res == 0,
            (FlagOp::Sub, 1) => self.a < self.b,
            (FlagOp::Sub, 3) => self.a <= self.b,
            (FlagOp::Sub, 6) => (self.al(self.a) as i64) < (self.al(self.b) as i64),
            (FlagOp::Sub, 7) => (self.al(self.a) as i64) <= (self.al(self.b) as i64),
            (FlagOp::Logic, 1) => false,
            (FlagOp::Logic, 3) => self.res == 0,
            (FlagOp::Logic, 6) => (self.al(self.res) as i64) < 0,
            (FlagOp::Logic, 7) => (self.al(self.res) as i64) <= 0,
            (_, 0) => self.of(),
            (_, 1) => self.cf(),
            (_, 2) => self.zf(),
            (_, 3) => self.cf() || self.zf(),
            (_, 4) => self.sf(),
            (_, 5) => self.pf(),
            (_, 6) => self.sf() != self.of(),
            _ => self.zf() || (self.sf() != self.of()),
        };
        v ^ (cc & 1 != 0)
    }
}
