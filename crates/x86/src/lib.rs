//! vessel's x86-64 interpreter: decode (iced-x86) and execute guest instructions against
//! a [`CpuState`] and guest memory reached through the guest's own page tables.
//!
//! Two users, one engine:
//! 1. **KVM fallback** (now): when KVM cannot emulate an instruction, the dispatcher loads
//!    the vCPU state into a [`CpuState`], calls [`Interpreter::step`] once, writes the state
//!    back and resumes KVM. Exceptions come back as [`Fault::Exception`] for the caller to
//!    inject; instructions not implemented come back as [`Fault::Unsupported`] with their
//!    bytes and mnemonic, the state untouched.
//! 2. **Software CPU** (next): [`Interpreter::run`] executes block after block until a
//!    budget is used up or `hlt`; the emu backend will add interrupt delivery between
//!    blocks and the system instructions Linux needs (see "Driving blocks" below).
//!
//! ```text
//! Interpreter ── CodeCache (blocks of Insn by guest-physical address, jump cache by RIP)
//!      │      └─ Tlb (linear page -> guest page + host pointer + permissions)
//!      ▼
//! Machine (per call: working registers, lazy flags, &mut CpuState, &mut dyn Bus)
//!      │ handler(&mut Machine, &Insn) for each pre-decoded instruction
//!      ▼
//! exec/* (one module per family)  ──►  mmu (walk, slow paths)  ──►  hostmem (host pointers)
//! ```
//!
//! # State
//! [`CpuState`] is plain serialisable data: GPRs, RIP, RFLAGS, segment registers with
//! their descriptor caches (VMX access-rights layout), descriptor tables, control
//! registers, EFER, XCR0, the MSRs instructions touch, and the x87/SSE/AVX/AVX-512 register
//! file. It is the only thing the caller sees. During a call the interpreter works on a
//! `machine::Machine`: a copy of the GPRs and RIP in a flat array (so operand access is
//! one indexed load, with a zero register for absent base/index), the arithmetic flags in
//! lazy form, and cached segment bases; everything is written back at the end of the call
//! or at an exception, so the caller always sees architectural state.
//!
//! # Decoding and dispatch
//! iced-x86 decodes; `decode` turns each instruction into an `decode::Insn` (56 bytes):
//! a handler function pointer plus register numbers, the effective-address recipe
//! (base, index, scale, displacement, segment, address-size mask) and immediates. The
//! handler is chosen once per decoded instruction from the exact form: handlers are
//! generic over the operation, the operand width and where each operand lives (register,
//! memory, immediate), so `add r64, [mem]` and `add r8, imm8` are separate monomorphised
//! functions with no operand-kind matching at run time. Only slow paths reach the platform,
//! through a trait object, which keeps handlers non-generic over the platform type and
//! storable as plain function pointers.
//!
//! # Code cache
//! Decoded instructions live in basic blocks (ending at control flow, at anything that can
//! change decoding, at 64 instructions or at the page end) in one arena, keyed by
//! guest-physical address and code size, so aliases of a page share blocks and straight-line
//! code runs without a lookup per instruction. A direct-mapped jump cache maps linear RIP
//! to a block; its entries carry the TLB epoch, so any change of address translation
//! empties it for free. Instructions that cross a page, or code fetched from MMIO, are
//! decoded for one execution and not cached. Coherence has two modes
//! ([`CodeCoherence`]): `Validate` compares a block's bytes with guest memory before use
//! (the KVM fallback: KVM writes guest memory without telling anyone); `Tracked` relies on
//! seeing the writes: every guest-physical page holding decoded code is in a set, TLB
//! fast-path writes are disabled for those pages, and the write slow path queues the page
//! for invalidation and ends the current block, so self-modifying code takes effect at
//! the next instruction. Others' writes are reported with
//! [`Interpreter::invalidate_code_page`]. Decoding allocates; executing does not.
//!
//! # Memory and the software TLB
//! A direct-mapped TLB (256 entries, one array per privilege context so CPL changes do not
//! flush) caches linear page -> guest-physical page, host pointer and effective
//! permissions. Tags include an epoch, so a flush is one increment. A read hits with a tag
//! compare, an in-page check and an atomic load; writes have their own tag, set only for
//! writable, already-dirty RAM pages without code. Misses go to a medium path that
//! re-checks the cached permissions against the current context (SMAP depends on
//! RFLAGS.AC, which `stac`/`clac` flip constantly in Linux) and only then to the page walk:
//! 32-bit, PAE and 4-level paging with present/write/user/NX/SMAP/SMEP/WP checks,
//! architectural #PF error codes, reserved-bit checks, and accessed/dirty bits set with
//! host atomics. Page-crossing accesses are split after translating both pages (a fault
//! on the second page leaves the first untouched); non-RAM guest-physical addresses go to
//! the platform's MMIO callbacks with the access size. The TLB is flushed on CR0/CR3/CR4/
//! EFER writes, `invlpg`, at every call, and after every callback that hands the platform
//! `&mut` (it could change its memory map): that is what keeps host pointers valid, see
//! `hostmem`.
//!
//! # Atomics and ordering
//! Guest memory is shared with other vCPUs and devices. All guest accesses are host
//! atomics (acquire loads, release stores: plain moves on x86, and they keep the compiler
//! from reordering guest accesses); locked read-modify-writes and `xchg` are host
//! compare-exchange loops on the guest's bytes (`cmpxchg16b` is the host instruction), so
//! they are atomic against KVM vCPUs executing natively and against other interpreter
//! threads. Misaligned locked accesses and locked MMIO fall back to a process-wide lock.
//!
//! # Flags
//! Arithmetic instructions store operation, operands, result and width (`flags`); flags
//! are computed when read. Conditional branches are specialised per condition at decode
//! time and have fast paths for the compare/test results compilers branch on.
//!
//! # Floating point
//! Integer SSE is done lane-wise in Rust. Anything MXCSR-dependent (arithmetic, compares,
//! conversions) runs as the same instruction on the host's SSE unit under the guest's
//! MXCSR, all exceptions masked, and the raised flags are applied to the guest MXCSR
//! (unmasked ones raise #XM without writing the result). XSAVE layouts come from the
//! guest's CPUID leaf 0xD.
//!
//! # Unsafe code
//! `hostmem` holds every host pointer into guest RAM (page handles, the TLB, atomics) and
//! argues their validity in one place. The only other `unsafe` is `exec/sse/hostfp`: one
//! asm block per host SSE operation, each reading and writing only local buffers.
//!
//! # Driving blocks (the software CPU)
//! [`Interpreter::run`] already is the block loop: look up or decode the block at RIP,
//! run its handlers back to back, stop on budget, `hlt` or an exception. The emu backend
//! will add, between blocks: pending-interrupt checks (the budget bounds latency),
//! exception/interrupt delivery through the IDT, `iretq`, `syscall`/`sysret`, far
//! transfers and mode switches (handlers end the block when they change decoding, so the
//! next lookup picks up the new mode). For SMP each vCPU thread owns an `Interpreter`;
//! guest RAM is shared and accessed atomically as above; cross-vCPU code invalidation will
//! need the code-page set to become shared (a page-indexed atomic bitmap) with
//! invalidation requests queued to the owning interpreters.
//!
//! # Not implemented (returned as [`Fault::Unsupported`] unless noted)
//! x87 arithmetic (the registers are carried, saved and restored; fninit/fldcw/fnstcw/
//! fnstsw/fnclex/fwait work), MMX, SSE3 and later, AVX/AVX-512 instructions (their state
//! is carried, saved and restored), BMI/ADX, rdrand/rdseed, movbe, far call/jmp/ret,
//! `iret`, `syscall`/`sysret`, `sysenter`, task switches, debug registers, `lldt`/`ltr`,
//! `int1`. Not modelled: segment limit and type checks on ordinary accesses (flat
//! segments assumed), alignment checking (#AC), MXCSR.MM (misaligned SSE), the TSS I/O
//! permission bitmap (port I/O checks CPL <= IOPL only), LA57, XSAVE components other
//! than x87/SSE/AVX/AVX-512/PKRU (saved as init, ignored on restore), and the exact
//! flag state for SIMD exceptions that are unmasked (computed with exceptions masked).

mod cache;
mod decode;
mod exception;
mod exec;
mod flags;
mod hostmem;
mod interp;
mod machine;
mod mmu;
mod platform;
mod state;

pub use exception::{Exception, Fault, UnsupportedInstruction};
pub use iced_x86::Mnemonic;
pub use interp::{CodeCoherence, Interpreter, RunExit, RunOutcome, Stats, StepOutcome};
pub use platform::Platform;
pub use state::{
    CpuMode, CpuState, DescriptorTable, FpuState, Msrs, SegReg, Segment, ctl, gpr, msr, rflags,
};
