//! What translated code reads and writes: one `#[repr(C)]` block addressed through a
//! host register (r15) with offsets fixed at compile time.

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::hostmem::TlbEntry;

/// A store translated code made in check mode: where, the bytes it replaced, how many.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct LoggedStore {
    pub ptr: u64,
    pub old: u64,
    pub size: u64,
}

/// Stores logged per block run in check mode; a block has at most one memory operand per
/// instruction and check mode never loops, so this bounds them.
pub(crate) const LOG_CAPACITY: usize = 64;

/// A translated block other translated code may jump to directly: what the
/// interpreter's jump cache proved when the block was last entered from the run loop
/// (its linear address, guest-physical page and mode, the code map's write count) and
/// where to go.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
pub(crate) struct ChainEntry {
    pub lin: u64,
    pub gpa_mode: u64,
    pub writes: u64,
    /// The block's code after its prologue.
    pub entry: u64,
    pub count: u64,
}

pub(crate) const CHAIN_BITS: u32 = 12;

/// The chain table's slot for a block at `lin`.
pub(crate) fn chain_slot(lin: u64) -> usize {
    ((lin ^ (lin >> 12)) & ((1 << CHAIN_BITS) - 1)) as usize
}

#[repr(C)]
pub(crate) struct JitCtx {
    /// The guest's GPRs (in and out).
    pub regs: [u64; 16],
    /// The guest's six arithmetic flags (in when the block reads them; out when
    /// `flags_out` is 1).
    pub flags: u64,
    /// Out: where the guest continues.
    pub rip: u64,
    /// The guest address of the block running (translations are position independent:
    /// the same code mapped at several addresses shares one).
    pub block_rip: u64,
    /// Instructions completed by whole iterations of a block that loops on itself.
    pub done: u64,
    /// `done` never passes this (the caller's remaining budget).
    pub limit: u64,
    /// Out: instructions completed in the last (partial) iteration.
    pub exit_at: u64,
    /// Out: 1 when `flags` was written.
    pub flags_out: u64,
    /// Out: 1 when the guest left the block (a branch taken, a loop stopped at its back
    /// edge); 0 when the block's next instruction (`exit_at`) is where it continues.
    pub left: u64,
    /// The software TLB's entries for the current privilege context.
    pub tlb: *const TlbEntry,
    /// The TLB's read epoch and write epoch (the low bits of a matching tag).
    pub epoch: u64,
    pub wepoch: u64,
    /// Segment bases as addressing uses them (see `Machine::seg_base`).
    pub seg_base: [u64; 8],
    /// Set when the vCPU is wanted (interrupt, pause): a loop stops at its back edge.
    pub attention: *const AtomicBool,
    /// The code map's write count and page-became-code epoch, and their values when
    /// the block was entered: a loop stops when either moves.
    pub code_writes: *const AtomicU64,
    pub code_writes_seen: u64,
    pub code_epoch: *const AtomicU64,
    pub code_epoch_seen: u64,
    /// Blocks translated code may jump to, the current mode tag (`u64::MAX`: none may
    /// be), and out: 1 once it did.
    pub chain: *const ChainEntry,
    pub mode_tag: u64,
    pub chained: u64,
    /// Check mode: the stores made, and how many.
    pub log: *mut LoggedStore,
    pub log_len: u64,
}

/// Byte offsets of the fields translated code uses.
pub(crate) mod off {
    use super::*;
    pub const fn reg(g: u8) -> i32 {
        (offset_of!(JitCtx, regs) + 8 * g as usize) as i32
    }
    pub const FLAGS: i32 = offset_of!(JitCtx, flags) as i32;
    pub const RIP: i32 = offset_of!(JitCtx, rip) as i32;
    pub const BLOCK_RIP: i32 = offset_of!(JitCtx, block_rip) as i32;
    pub const DONE: i32 = offset_of!(JitCtx, done) as i32;
    pub const LIMIT: i32 = offset_of!(JitCtx, limit) as i32;
    pub const EXIT_AT: i32 = offset_of!(JitCtx, exit_at) as i32;
    pub const FLAGS_OUT: i32 = offset_of!(JitCtx, flags_out) as i32;
    pub const LEFT: i32 = offset_of!(JitCtx, left) as i32;
    pub const TLB: i32 = offset_of!(JitCtx, tlb) as i32;
    pub const EPOCH: i32 = offset_of!(JitCtx, epoch) as i32;
    pub const WEPOCH: i32 = offset_of!(JitCtx, wepoch) as i32;
    pub const fn seg_base(s: u8) -> i32 {
        (offset_of!(JitCtx, seg_base) + 8 * (s & 7) as usize) as i32
    }
    pub const ATTENTION: i32 = offset_of!(JitCtx, attention) as i32;
    pub const CODE_WRITES: i32 = offset_of!(JitCtx, code_writes) as i32;
    pub const CODE_WRITES_SEEN: i32 = offset_of!(JitCtx, code_writes_seen) as i32;
    pub const CODE_EPOCH: i32 = offset_of!(JitCtx, code_epoch) as i32;
    pub const CODE_EPOCH_SEEN: i32 = offset_of!(JitCtx, code_epoch_seen) as i32;
    pub const CHAIN: i32 = offset_of!(JitCtx, chain) as i32;
    pub const MODE_TAG: i32 = offset_of!(JitCtx, mode_tag) as i32;
    pub const CHAINED: i32 = offset_of!(JitCtx, chained) as i32;
    pub const CHAIN_LIN: i32 = offset_of!(ChainEntry, lin) as i32;
    pub const CHAIN_GPA_MODE: i32 = offset_of!(ChainEntry, gpa_mode) as i32;
    pub const CHAIN_WRITES: i32 = offset_of!(ChainEntry, writes) as i32;
    pub const CHAIN_ENTRY: i32 = offset_of!(ChainEntry, entry) as i32;
    pub const CHAIN_COUNT: i32 = offset_of!(ChainEntry, count) as i32;
    const _: () = assert!(size_of::<ChainEntry>() == 64);
    pub const LOG: i32 = offset_of!(JitCtx, log) as i32;
    pub const LOG_LEN: i32 = offset_of!(JitCtx, log_len) as i32;
}
