//! Instruction semantics, one module per family. Each module has the handlers and a
//! `select` that maps a decoded iced instruction to the handler for its exact form.

use iced_x86::Instruction;

use crate::decode::{Cx, Handler, Insn};

/// Expands `$e` with `$W` bound to the width type for `$n` bytes (1, 2, 4, 8); any other
/// size makes the enclosing `select` return `None`.
macro_rules! sized {
    ($n:expr, |$W:ident| $e:expr) => {
        match $n {
            1 => {
                type $W = $crate::machine::W8;
                $e
            }
            2 => {
                type $W = $crate::machine::W16;
                $e
            }
            4 => {
                type $W = $crate::machine::W32;
                $e
            }
            8 => {
                type $W = $crate::machine::W64;
                $e
            }
            _ => return None,
        }
    };
}

pub(crate) mod alu;
pub(crate) mod atomic;
pub(crate) mod bits;
pub(crate) mod control;
pub(crate) mod far;
pub(crate) mod fpu;
pub(crate) mod interrupt;
pub(crate) mod legacy;
pub(crate) mod mov;
pub(crate) mod muldiv;
pub(crate) mod random;
pub(crate) mod segment;
pub(crate) mod shift;
pub(crate) mod sse;
pub(crate) mod stack;
pub(crate) mod string;
pub(crate) mod system;
pub(crate) mod tables;

pub(crate) fn select(i: &Instruction, d: &mut Insn, cx: &Cx) -> Option<Handler> {
    alu::select(i, d, cx)
        .or_else(|| mov::select(i, d, cx))
        .or_else(|| control::select(i, d, cx))
        .or_else(|| far::select(i, d, cx))
        .or_else(|| interrupt::select(i, d, cx))
        .or_else(|| tables::select(i, d, cx))
        .or_else(|| stack::select(i, d, cx))
        .or_else(|| shift::select(i, d, cx))
        .or_else(|| muldiv::select(i, d, cx))
        .or_else(|| bits::select(i, d, cx))
        .or_else(|| random::select(i, d, cx))
        .or_else(|| atomic::select(i, d, cx))
        .or_else(|| string::select(i, d, cx))
        .or_else(|| system::select(i, d, cx))
        .or_else(|| segment::select(i, d, cx))
        .or_else(|| sse::select(i, d, cx))
        .or_else(|| fpu::select(i, d, cx))
        .or_else(|| legacy::select(i, d, cx))
}
