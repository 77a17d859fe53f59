//! vessel's x86-64 interpreter: decode (iced-x86) and execute guest instructions against
//! a [`CpuState`] and guest memory reached through the guest's own page tables.
//!
//! Two users, one engine:
//! 1. **KVM fallback** (now): when KVM cannot emulate an instruction, the dispatcher loads
//!    the vCPU state into a [`CpuState`], calls [`Interpreter::step`] once, writes the state
//!    back and resumes KVM. Exceptions come back as [`Fault::Exception`] for the caller to
//!    inject; instructions not implemented come back as [`Fault::Unsupported`] with their
//!    bytes and mnemonic, the state untouched.
//! 2. **Software CPU** (`--accel emu`): one interpreter per vCPU thread runs the whole
//!    guest with [`Interpreter::run_with`] (block after block until a budget, `hlt`, an
//!    exception, an interrupt window or the platform's attention) and delivers exceptions
//!    and interrupts with [`Interpreter::deliver`]; vCPUs and devices share guest RAM and
//!    a [`CodeMap`] (see "Driving blocks" below). [`emu_cpuid`] describes the CPU.
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
//! registers, EFER, XCR0, the MSRs instructions touch, the debug registers, the interrupt
//! shadow, and the x87/SSE/AVX/AVX-512 register file. It is the only thing the caller
//! sees. During a call the interpreter works on a
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
//! storable as plain function pointers. Handlers return `Result<(), Ex>`, an exception
//! packed into eight bytes (`exception::Ex`), so the result comes back in a register and
//! the hot loop tests it with one instruction.
//!
//! # Code cache
//! Decoded instructions live in basic blocks (ending at control flow, at anything that can
//! change decoding, at 64 instructions or at the page end) in one arena, keyed by
//! guest-physical address and code size, so aliases of a page share blocks and straight-line
//! code runs without a lookup per instruction. A direct-mapped jump cache (64Ki entries)
//! maps linear RIP to a block; its entries carry the TLB epoch, so any change of address
//! translation empties it for free. Instructions that cross a page, or code fetched from MMIO, are
//! decoded for one execution and not cached. Coherence has two modes
//! ([`CodeCoherence`]): `Validate` compares a block's bytes with guest memory before use
//! (the KVM fallback: KVM writes guest memory without telling anyone); `Tracked` relies on
//! seeing the writes through a [`CodeMap`]: one `AtomicU32` per page of RAM with a "holds
//! decoded code" bit and a write generation, shared by every interpreter of the VM
//! ([`Interpreter::with_code_map`]) and by devices writing through vm-memory
//! ([`CodeBitmap`], [`guest_memory`]). A block records its page's state when decoded and is
//! used only while it is unchanged (one relaxed load at block entry). Writes to code pages
//! never take the TLB fast path in any interpreter; a page becoming code bumps the map's
//! epoch, and each interpreter drops its fast write entries when it sees a new epoch (once
//! per block). An interpreter's own store to a code page bumps the generation after the
//! store and ends the current block, so self-modifying code takes effect at the next
//! instruction; without a shared map an interpreter builds a private one over the
//! platform's RAM, and [`Interpreter::invalidate_code_page`] reports other writes.
//! Decoding allocates; executing does not.
//!
//! # Memory and the software TLB
//! A direct-mapped TLB (1024 entries, one array per privilege context so CPL changes do not
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
//! the platform's MMIO callbacks with the access size. The TLB is flushed on CR0/CR4/EFER
//! writes that change paging; a CR3 write forgets only non-global entries (a bitmap of
//! them per set, so the flush costs what was cached) and a CR8 write nothing; `invlpg`
//! forgets one page (all of a large page's pieces, tracked as a short list; when the list
//! overflows, everything).
//! 64-bit instructions whose memory operand is a plain base + displacement (with flat
//! segments) compute it without the general effective-address path, and 64-bit `push`/
//! `pop`/`call`/`ret` have handlers specialised for a flat 64-bit stack. A block's jump
//! target cache is validated by the TLB's fetch tag for the target's page plus the code
//! map's write counter, so a taken branch to a known block skips the block lookup. A `Tracked`
//! interpreter keeps its TLB across calls that find the same control registers, and
//! across platform callbacks, as long as guest RAM is mapped at the same host addresses
//! (`platform::Layout`, compared exactly): that is what keeps host pointers valid, see
//! `hostmem`. `Validate` interpreters flush at every call (KVM changes page tables).
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
//! guest's CPUID leaf 0xD. x87 instructions (arithmetic, loads/stores of every format,
//! compares, transcendentals, environment images) run as the same instruction on the
//! host's x87 unit: the guest state goes in with `fxrstor64`, comes out with `fxsave64`,
//! memory operands through a buffer, and the last-instruction/operand pointers are
//! translated back to guest addresses (`exec/fpu/host`, a table of one stub per opcode
//! and ModRM). Pending unmasked x87 exceptions raise #MF before a waiting instruction, so
//! the host never takes one. MMX arithmetic runs the same way (normalised to `mm0, mm1`);
//! MMX moves, shuffles and inserts are done in Rust.
//!
//! # Unsafe code
//! `hostmem` holds every host pointer into guest RAM (page handles, the TLB, atomics, the
//! host `rep movs`/`rep stos` that bulk string instructions become within a page) and
//! argues their validity in one place. The only other `unsafe` is host FPU execution:
//! `exec/sse/hostfp` (one asm block per host SSE operation on local buffers) and
//! `exec/fpu/host` (the x87/MMX stub table, each stub touching only the frame it is given
//! and restoring the host's FPU state).
//!
//! # Driving blocks (the software CPU)
//! [`Interpreter::run_with`] is the block loop: look up or decode the block at RIP, run its
//! handlers back to back, and between blocks check the stop conditions of [`RunLimits`]
//! (budget, and with `stop_when_interruptible` an open interrupt window: IF = 1 and no
//! interrupt shadow) and [`Platform::attention`] (every 256 instructions). Blocks end after
//! anything that changes IF, CPL, the mode, CR0/CR3/CR4/EFER or the code being executed.
//! `sti` (enabling interrupts) and `mov ss`/`pop ss` set [`CpuState::interrupt_shadow`],
//! which lasts exactly one more instruction (with `stop_when_interruptible` that one runs
//! alone). [`Interpreter::deliver`] delivers an [`Event`] (exception, external interrupt,
//! NMI): 16-byte IDT gates in IA-32e mode (privilege change to the TSS's RSPn, IST stacks,
//! 16-byte alignment, SS:RSP always pushed), 8-byte gates in protected mode (the TSS's
//! SSn:ESPn), the IVT in real mode; #PF sets CR2; a fault while delivering combines into
//! #DF as the SDM's table says, and a fault while delivering #DF is
//! [`Fault::TripleFault`]. `iret`, `syscall`/`sysret`, far `jmp`/`call`/`ret` through code
//! segments, `ltr`/`lldt`, descriptor probes and the control/debug registers complete
//! the system instructions Linux uses; `rep movs`/`rep stos` over RAM run as host bulk
//! copies page by page, restarting after 64 KiB so interrupts are not held off. Each vCPU
//! thread owns an `Interpreter` (it is `Send`); guest RAM is shared and accessed
//! atomically as above.
//!
//! # Not implemented (returned as [`Fault::Unsupported`] unless noted)
//! (The software CPU raises #UD for those whose feature its CPUID does not offer, as
//! hardware does: [`offered`].)
//! SSE3 and later, AVX/AVX-512 instructions (their state is carried, saved and restored),
//! BMI/ADX, rdrand/rdseed, movbe, MMX-SSE conversions (cvtpi2ps & co), `sysenter`/
//! `sysexit`, call gates, task gates and task switches (#GP), virtual-8086 mode (#GP),
//! `int1`, breakpoints in the debug registers (stored only). Not modelled: segment limit
//! and type checks on ordinary accesses (flat segments assumed), alignment checking (#AC),
//! MXCSR.MM (misaligned SSE), LA57, XSAVE components other than x87/SSE/AVX/AVX-512/PKRU
//! (saved as init, ignored on restore), and the exact flag state for SIMD exceptions that
//! are unmasked (computed with exceptions masked). Port I/O checks CPL <= IOPL and then the
//! TSS I/O permission bitmap.

mod cache;
mod code;
mod cpuid;
mod decode;
mod exception;
mod exec;
mod flags;
mod hostmem;
mod interp;
mod jit;
mod machine;
mod mmu;
mod offered;
mod platform;
mod reserved;
mod state;

pub use code::{CodeBitmap, CodeMap, guest_memory, guest_memory_from_file, guest_memory_shared};
pub use cpuid::{CpuidLeaf, cpuid_lookup, emu_cpuid};
pub use exception::{Event, Exception, Fault, UnsupportedInstruction};
pub use iced_x86::Mnemonic;
pub use interp::{CodeCoherence, Interpreter, RunExit, RunLimits, RunOutcome, Stats, StepOutcome};
pub use jit::{JitMode, Mismatch, MismatchKind};
pub use offered::offered;
pub use platform::Platform;
pub use state::{
    CpuMode, CpuState, DescriptorTable, FpuState, Msrs, SegReg, Segment, ctl, dr, gpr, msr, rflags,
};
