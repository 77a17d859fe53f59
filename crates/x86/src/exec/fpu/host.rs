//! x87 and MMX instructions executed on the host's own FPU.
//!
//! The x87 unit's results (80-bit rounding, precision control, denormals, transcendental
//! approximations, stack faults, condition codes) are the host's, so each guest instruction
//! runs as the same host instruction against the guest's x87 state. A table of stubs, one
//! per instruction encoding (opcode byte and a ModRM whose memory form always addresses
//! `[rax]`), is assembled once below; each stub:
//!
//! 1. loads RFLAGS from the frame (the condition fcmov reads),
//! 2. saves the host's x87/SSE state (`fxsave64`) in the frame and loads the guest's image
//!    (`fxrstor64`),
//! 3. points RAX at the frame's memory-operand buffer and executes the one instruction,
//! 4. saves the resulting image back into the frame, restores the host state, and stores
//!    RFLAGS (the flags fcomi writes) into the frame.
//!
//! # Why this is sound
//! A stub touches only the `Frame` passed in RDI (its image, host save area, operand
//! buffer and flag words), clobbers RAX and the flags (declared), pushes only below the
//! stack pointer (the asm block is not `nostack`), and leaves the host's x87, MMX and SSE
//! state (including MXCSR and the XMM registers the compiler may hold values in) exactly as
//! it found it, because it restores the image it saved. The guest instruction cannot trap:
//! unmasked x87 exceptions are only *recorded* by arithmetic instructions and raised by
//! the next waiting instruction, and the handlers never run a waiting instruction while
//! the guest image has one pending (they raise #MF instead); nothing after the instruction
//! in a stub waits (`fxsave64`/`fxrstor64` do not). The instruction's only memory operand
//! is `[rax]`, inside the frame's 128-byte buffer, and the largest x87 operand (the
//! 108-byte `fnsave` image) fits in it.

use std::arch::{asm, global_asm};

/// Everything one stub reads and writes.
#[repr(C, align(64))]
pub(crate) struct Frame {
    /// The guest's FXSAVE64 image, in and out.
    pub img: [u8; 512],
    /// The host's state while the guest's is loaded.
    host: [u8; 512],
    /// The memory operand (`[rax]`).
    pub mem: [u8; 128],
    /// RFLAGS loaded before the instruction (only CF/PF/ZF are taken from the guest).
    pub flags_in: u64,
    /// RFLAGS after the instruction.
    pub flags_out: u64,
}

impl Frame {
    pub(crate) fn new() -> Frame {
        Frame {
            img: [0; 512],
            host: [0; 512],
            mem: [0; 128],
            flags_in: 0x202,
            flags_out: 0,
        }
    }
}

/// Stub slots: 8 x87 opcodes x (8 memory forms + 64 register forms), the 16-bit
/// environment forms, then MMX opcodes x (register form, memory form).
pub(crate) const X87_STUBS: usize = 8 * 72;
/// `66 d9 /4` (fldenv m14), `66 d9 /6` (fnstenv m14), `66 dd /4` (frstor m94),
/// `66 dd /6` (fnsave m94), `0f 77` (emms).
pub(crate) const ENV16_STUBS: usize = 5;
/// The MMX opcodes (the byte after 0F) with stubs, in table order (the same list as the
/// `.irp` below).
pub(crate) const MMX_OPCODES: [u8; 55] = [
    0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x74, 0x75, 0x76, 0xd1,
    0xd2, 0xd3, 0xd4, 0xd5, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xe1, 0xe2, 0xe3,
    0xe4, 0xe5, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xef, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6,
    0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe,
];
pub(crate) const STUBS: usize = X87_STUBS + ENV16_STUBS + 2 * MMX_OPCODES.len();

// The stub table. Every stub is 64-byte aligned and shorter than 64 bytes, so stub `n`
// starts at `vessel_fpu_stubs + 64 * n`.
global_asm!(
    ".macro vessel_fpu_stub b0, b1, b2, b3",
    ".balign 64",
    "push qword ptr [rdi + 1152]",
    "popfq",
    "fxsave64 [rdi + 512]",
    "fxrstor64 [rdi]",
    "lea rax, [rdi + 1024]",
    ".byte \\b0, \\b1",
    ".if \\b3",
    ".byte \\b2",
    ".endif",
    "fxsave64 [rdi]",
    "fxrstor64 [rdi + 512]",
    "pushfq",
    "pop qword ptr [rdi + 1160]",
    "ret",
    ".endm",
    ".pushsection .text.vessel_fpu_stubs,\"ax\",@progbits",
    ".balign 64",
    ".globl vessel_fpu_stubs",
    ".hidden vessel_fpu_stubs",
    "vessel_fpu_stubs:",
    // x87: opcodes d8-df; ModRM /0-/7 with [rax], then c0-ff.
    ".set vessel_fpu_op, 0xd8",
    ".rept 8",
    ".set vessel_fpu_r, 0",
    ".rept 8",
    "vessel_fpu_stub vessel_fpu_op, (vessel_fpu_r << 3), 0, 0",
    ".set vessel_fpu_r, vessel_fpu_r + 1",
    ".endr",
    ".set vessel_fpu_r, 0xc0",
    ".rept 64",
    "vessel_fpu_stub vessel_fpu_op, vessel_fpu_r, 0, 0",
    ".set vessel_fpu_r, vessel_fpu_r + 1",
    ".endr",
    ".set vessel_fpu_op, vessel_fpu_op + 1",
    ".endr",
    // 16-bit environment forms.
    "vessel_fpu_stub 0x66, 0xd9, 0x20, 1",
    "vessel_fpu_stub 0x66, 0xd9, 0x30, 1",
    "vessel_fpu_stub 0x66, 0xdd, 0x20, 1",
    "vessel_fpu_stub 0x66, 0xdd, 0x30, 1",
    "vessel_fpu_stub 0x0f, 0x77, 0, 0",
    // MMX: 0f op with mm0, mm1 (ModRM c1), then mm0, [rax] (ModRM 00).
    ".irp op, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x74, 0x75, 0x76, 0xd1, 0xd2, 0xd3, 0xd4, 0xd5, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xef, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe",
    "vessel_fpu_stub 0x0f, \\op, 0xc1, 1",
    "vessel_fpu_stub 0x0f, \\op, 0x00, 1",
    ".endr",
    ".balign 64",
    ".globl vessel_fpu_stubs_end",
    ".hidden vessel_fpu_stubs_end",
    "vessel_fpu_stubs_end:",
    ".popsection",
);

/// Runs stub `index` against `f` (see the module documentation for what it does).
pub(crate) fn run(index: usize, f: &mut Frame) {
    assert!(index < STUBS, "no such FPU stub");
    // The stub only accesses `*f` through RDI, clobbers RAX and the flags, uses the stack
    // below RSP for its call frame and flag pushes, and restores the host FPU/SSE state.
    // SAFETY: `index` names a stub of the table (checked above) that behaves as stated.
    unsafe {
        asm!(
            "lea {t}, [rip + vessel_fpu_stubs]",
            "shl {i}, 6",
            "add {t}, {i}",
            "call {t}",
            t = out(reg) _,
            i = inout(reg) index => _,
            in("rdi") std::ptr::from_mut(f),
            out("rax") _,
        );
    }
}

/// Stub index of an x87 instruction: opcode byte d8-df and its ModRM (a memory form's
/// mod/rm bits are ignored).
pub(crate) fn x87_index(opcode: u8, modrm: u8) -> usize {
    let op = usize::from(opcode - 0xd8);
    let slot = if modrm >= 0xc0 {
        8 + usize::from(modrm & 0x3f)
    } else {
        usize::from((modrm >> 3) & 7)
    };
    op * 72 + slot
}

/// Stub index of the 16-bit environment forms (0 fldenv, 1 fnstenv, 2 frstor, 3 fnsave)
/// and of emms (4).
pub(crate) fn env16_index(k: usize) -> usize {
    X87_STUBS + k
}

/// Stub index of MMX opcode `op` (0f op) in its register (`mm0, mm1`) or memory
/// (`mm0, [rax]`) form.
pub(crate) fn mmx_index(op: u8, mem: bool) -> Option<usize> {
    let k = MMX_OPCODES.iter().position(|&o| o == op)?;
    Some(X87_STUBS + ENV16_STUBS + 2 * k + usize::from(mem))
}
