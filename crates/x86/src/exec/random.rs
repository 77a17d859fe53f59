//! rdrand and rdseed: random numbers from the host's getrandom (the kernel's CSPRNG,
//! seeded from the host's own hardware sources), never from a guest-visible state.

use iced_x86::{Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, op_size};
use crate::flags::Flags;
use crate::machine::{Machine, R, Width};
use crate::state::rflags::CF;

/// Eight random bytes, or None if the host has none to give (hardware's "try again").
fn host_random() -> Option<u64> {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most `v.len()` bytes into `v`, which outlives the call.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), libc::GRND_NONBLOCK) };
    (n == 8).then(|| u64::from_le_bytes(v))
}

/// rdrand/rdseed r: a value and CF set, or zero and CF clear; the other flags clear.
fn random<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let (v, flags) = match host_random() {
        Some(v) => (v & W::MASK, CF),
        None => (0, 0),
    };
    m.set_reg::<W>(i.d, v);
    m.flags = Flags::from_bits(flags);
    Ok(())
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Rdrand | Mn::Rdseed => sized!(op_size(i, 0), |W| Some(random::<W> as Handler)),
        _ => None,
    }
}
