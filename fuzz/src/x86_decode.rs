//! The software CPU's decoder and interpreter on random instruction bytes: up to 16
//! single steps (`Interpreter::step`, what the KVM fallback runs) from code the input
//! supplies, in a small guest (4 MiB of RAM, identity-mapped with 2 MiB pages; outside
//! RAM is MMIO), in 64-bit mode at CPL 0 or 3, 32-bit protected mode or real mode
//! (and whatever mode the code then switches to).
//!
//! Checked against iced-x86's own decoder, run on the same bytes in the same mode:
//! nothing panics; an instruction that completes is the one iced decodes there (its
//! mnemonic); one that goes on to the next instruction (iced's flow control `Next`,
//! no REP prefix) leaves RIP just past it, iced's length on, and 64-bit code in
//! 64-bit mode (only far transfers leave it); an instruction the
//! interpreter does not implement, or one that faults (not a trap), leaves the
//! general registers, RIP and RFLAGS as they were (REP string instructions and x87
//! ones aside: those may have done part of their work).
//!
//! Input: mode (u8: 64-bit CPL 0, 64-bit CPL 3, 32-bit, real mode), where the code
//! starts in its page (u8: so that instructions cross into the next page), then 16
//! register values (u8 each: a pointer into RAM, a small number, or 0), then the
//! code.

use iced_x86::{CpuidFeature, Decoder, DecoderOptions, FlowControl, Instruction};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86::{CodeCoherence, CpuState, Exception, Fault, Interpreter, Platform, Segment};

use crate::ops::Ops;

const RAM: usize = 4 << 20;
const PML4: u64 = 0x1000;
/// Where the code goes (a page, then the next one).
pub(crate) const CODE: u64 = 0x10_0000;
/// The code's pages: it starts in the last 0x100 bytes of the first one and takes up to
/// 0x2000 bytes.
pub(crate) const CODE_SPAN: usize = 0x3000;
const DATA: u64 = 0x20_0000;
const STACK: u64 = 0x30_0000;
/// How many instructions one input runs at most.
const STEPS: usize = 16;

/// The guest around the CPU (also `x86_translate`'s).
pub(crate) struct Guest {
    pub(crate) mem: GuestMemoryMmap,
    cpuid: Vec<x86::CpuidLeaf>,
    tsc: u64,
}

impl Platform for Guest {
    type Memory = GuestMemoryMmap;
    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        data.fill(gpa as u8 ^ 0x5a);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        data.fill(port as u8);
    }
    fn io_out(&mut self, _port: u16, _data: &[u8]) {}
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        x86::cpuid_lookup(&self.cpuid, leaf, subleaf)
    }
    fn rdmsr(&mut self, _msr: u32) -> Option<u64> {
        None
    }
    fn wrmsr(&mut self, _msr: u32, _value: u64) -> bool {
        false
    }
    fn tsc(&mut self) -> u64 {
        self.tsc += 1000;
        self.tsc
    }
}

/// The general state the interpreter promises not to touch when it does not complete
/// an instruction.
fn general(cpu: &CpuState) -> ([u64; 16], u64, u64) {
    (cpu.gpr, cpu.rip, cpu.rflags)
}

/// A trap leaves RIP past the instruction; the other exceptions are faults.
fn is_trap(e: &Exception) -> bool {
    matches!(
        e,
        Exception::Debug
            | Exception::Breakpoint
            | Exception::Overflow
            | Exception::SoftwareInterrupt(_)
    )
}

pub fn x86_decode(data: &[u8]) {
    x86_decode_steps(data);
}

/// The guest an input describes, its code written, and the CPU state to start from
/// (also `x86_translate`'s). Around the code, its pages hold `around` (here 0, as RAM
/// starts).
pub(crate) fn build_guest(data: &[u8], around: u8) -> (Guest, CpuState) {
    let mut ops = Ops::new(data);
    let mode = ops.u8() % 4;
    let start = u64::from(ops.u8());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest RAM");
    // PML4 -> PDPT -> PD with two 2 MiB pages (user-accessible, writable).
    let entry = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).expect("page tables");
    entry(PML4, 0x2000 | 7);
    entry(0x2000, 0x3000 | 7);
    entry(0x3000, 0x87);
    entry(0x3008, 0x20_0000 | 0x87);
    let mut cpu = match mode {
        0 | 1 => CpuState::long_mode(PML4, if mode == 1 { 3 } else { 0 }),
        2 => CpuState::protected_mode32(0),
        _ => {
            let mut c = CpuState::default();
            c.seg[1] = Segment::real_mode((CODE >> 4) as u16);
            c
        }
    };
    let code_base = if mode == 3 { 0 } else { CODE };
    let linear_base = CODE;
    // Near the end of the code page, by the input.
    let offset = 0x1000 - 0x100 + start;
    cpu.rip = code_base + offset;
    for r in 0..16 {
        let b = ops.u8();
        let v = match b >> 6 {
            0 => DATA + u64::from(b & 0x3f) * 0x40,
            1 => u64::from(b & 0x3f),
            2 => STACK - u64::from(b & 0x3f) * 8,
            _ => 0,
        };
        cpu.gpr[r] = if mode == 3 { v & 0xffff } else { v };
    }
    if mode != 3 {
        cpu.gpr[4] = STACK;
    } else {
        cpu.seg[2] = Segment::real_mode(0x3000);
        cpu.gpr[4] = 0xfff0;
    }
    let code = ops.bytes(usize::MAX);
    if around != 0 {
        mem.write_slice(&[around; CODE_SPAN], GuestAddress(CODE))
            .expect("the code pages");
    }
    mem.write_slice(
        &code[..code.len().min(0x2000)],
        GuestAddress(linear_base + offset),
    )
    .expect("the code");
    let guest = Guest {
        mem,
        cpuid: x86::emu_cpuid(0, 1, 1_000_000_000),
        tsc: 0,
    };
    (guest, cpu)
}

/// One run; how many instructions completed.
pub fn x86_decode_steps(data: &[u8]) -> usize {
    let mut done = 0;
    let (mut guest, mut cpu) = build_guest(data, 0);
    let mut interp = Interpreter::new(CodeCoherence::Validate);
    for _ in 0..STEPS {
        // What iced makes of the bytes at RIP (linear = CS base + RIP; identity-mapped).
        let linear = cpu.seg[1].base.wrapping_add(cpu.rip);
        let mut window = [0u8; 15];
        if guest
            .mem
            .read_slice(&mut window, GuestAddress(linear))
            .is_err()
        {
            return done;
        }
        // In the mode the CPU is in now (an instruction may have changed it).
        let bits = cpu.mode().bitness();
        let mut decoder = Decoder::with_ip(bits, &window, cpu.rip, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        decoder.decode_out(&mut insn);
        let before = cpu.clone();
        let result = interp.step(&mut cpu, &mut guest);
        if insn.is_invalid() {
            // Nothing to compare with; the interpreter must not have taken it.
            assert!(
                result.is_err(),
                "x86: {:02x?} ran, iced does not decode it ({bits}-bit)",
                &window[..]
            );
            return done;
        }
        let partial = insn.has_rep_prefix()
            || insn.has_repne_prefix()
            || insn.is_string_instruction()
            || is_x87(&insn);
        match result {
            Ok(out) => {
                assert_eq!(
                    out.mnemonic,
                    insn.mnemonic(),
                    "x86: {:02x?} ({bits}-bit) ran as another instruction",
                    &window[..insn.len()]
                );
                if insn.flow_control() == FlowControl::Next && bits == 64 {
                    // 64-bit code leaves 64-bit mode only by a far transfer.
                    assert_eq!(
                        cpu.mode(),
                        x86::CpuMode::Long64,
                        "x86: {:02x?} ({:?}) left 64-bit mode",
                        &window[..insn.len()],
                        insn.mnemonic()
                    );
                }
                if insn.flow_control() == FlowControl::Next && !partial {
                    let next = insn.next_ip() & mask(bits);
                    assert_eq!(
                        cpu.rip & mask(bits),
                        next,
                        "x86: after {:02x?} ({bits}-bit, {:?}), RIP is not past it",
                        &window[..insn.len()],
                        insn.mnemonic()
                    );
                }
                done += 1;
                if out.halted {
                    return done;
                }
            }
            Err(Fault::Unsupported(_)) => {
                assert!(
                    partial || general(&cpu) == general(&before),
                    "x86: {:02x?} ({bits}-bit, {:?}) is unsupported but changed the state",
                    &window[..insn.len()],
                    insn.mnemonic()
                );
                return done;
            }
            Err(Fault::Exception(e)) => {
                if !is_trap(&e) && !partial {
                    assert!(
                        general(&cpu) == general(&before),
                        "x86: {:02x?} ({bits}-bit, {:?}) raised {e} but changed the state",
                        &window[..insn.len()],
                        insn.mnemonic()
                    );
                }
                return done;
            }
            Err(Fault::TripleFault) => return done,
            Err(Fault::TranslationDiffers(m)) => panic!("x86: the tier is off here: {m}"),
        }
    }
    done
}

fn mask(bits: u32) -> u64 {
    match bits {
        64 => u64::MAX,
        32 => u64::from(u32::MAX),
        _ => 0xffff,
    }
}

/// x87 and MMX instructions (their state may be updated on the way to an exception).
fn is_x87(insn: &Instruction) -> bool {
    insn.cpuid_features().iter().any(|f| {
        matches!(
            f,
            CpuidFeature::FPU | CpuidFeature::FPU287 | CpuidFeature::FPU387 | CpuidFeature::MMX
        )
    })
}

/// A seed: mode, start in the page, register bytes (all pointing at the data page when
/// 0), code.
pub(crate) fn seed(mode: u8, start: u8, regs: [u8; 16], code: &[u8]) -> Vec<u8> {
    let mut v = vec![mode, start];
    v.extend(regs);
    v.extend(code);
    v
}

/// Code as compilers and firmware write it: a 64-bit function body, string and system
/// instructions, SSE and x87, a privileged instruction at CPL 3, 32-bit code, real-mode
/// firmware, an instruction across a page boundary, and what the interpreter refuses.
pub fn x86_decode_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const HLT: u8 = 0xf4;
    let body64: &[u8] = &[
        0x55, 0x48, 0x89, 0xe5, 0x41, 0x57, 0x41, 0x56, 0x53, 0x48, 0x83, 0xec, 0x18, 0x48, 0x8b,
        0x07, 0x48, 0x89, 0x45, 0xe8, 0x31, 0xc0, 0x48, 0x85, 0xff, 0x48, 0x8d, 0x0d, 0x10, 0x00,
        0x00, 0x00, 0x0f, 0xb6, 0x16, 0x6b, 0xc2, 0x1f, HLT,
    ];
    let mut small = [0u8; 16];
    small[1] = 0x45; // rcx = 5
    let strings: &[u8] = &[
        0x0f, 0xa2, // cpuid
        0x0f, 0x31, // rdtsc
        0xf3, 0xa4, // rep movsb
        0xf0, 0x0f, 0xc1, 0x07, // lock xadd [rdi], eax
        0x48, 0x87, 0x1e, // xchg [rsi], rbx
        0x0f, 0xc8, // bswap eax
        0x0f, 0x94, 0xc1, // sete cl
        0x48, 0x0f, 0x4f, 0xc3, // cmovg rax, rbx
        0x48, 0x0f, 0xa3, 0xc8, // bt rax, rcx
        0x48, 0xab, // stosq
        HLT,
    ];
    let simd: &[u8] = &[
        0x66, 0x0f, 0xef, 0xc0, // pxor xmm0, xmm0
        0x0f, 0x28, 0xc8, // movaps xmm1, xmm0
        0xf2, 0x0f, 0x58, 0xc1, // addsd xmm0, xmm1
        0xd9, 0xe8, // fld1
        0xd9, 0xc0, // fld st(0)
        0xde, 0xc1, // faddp
        0xdd, 0x1f, // fstp qword [rdi]
        0x0f, 0x11, 0x07, // movups [rdi], xmm0
        HLT,
    ];
    let code32: &[u8] = &[
        0x89, 0xc8, // mov eax, ecx
        0x8b, 0x03, // mov eax, [ebx]
        0x66, 0x89, 0x07, // mov [edi], ax
        0x0f, 0xb7, 0x0e, // movzx ecx, word [esi]
        0xc1, 0xe0, 0x04, // shl eax, 4
        0x99, // cdq
        0xf7, 0xf9, // idiv ecx
        HLT,
    ];
    let mut regs32 = [0u8; 16];
    regs32[1] = 0x47; // ecx = 7
    let real: &[u8] = &[
        0xb8, 0x00, 0x10, // mov ax, 0x1000
        0x8e, 0xd8, // mov ds, ax
        0xbe, 0x00, 0x01, // mov si, 0x100
        0xac, // lodsb
        0xe6, 0x80, // out 0x80, al
        0xe4, 0x61, // in al, 0x61
        0x9c, // pushf
        0x9d, // popf
        0xcd, 0x10, // int 0x10
        HLT,
    ];
    vec![
        ("linux-64-function", seed(0, 0x10, [0; 16], body64)),
        ("system-and-strings-64", seed(0, 0x40, small, strings)),
        ("sse-and-x87-64", seed(0, 0x80, [0; 16], simd)),
        ("privileged-at-cpl3", seed(1, 0, [0; 16], &[0xfa, HLT])),
        ("protected-32", seed(2, 0x20, regs32, code32)),
        ("real-mode-firmware", seed(3, 0, [0x41; 16], real)),
        (
            "across-a-page",
            seed(0, 0xfc, [0; 16], &[0x48, 0x8b, 0x84, 0x24, 0, 1, 0, 0, HLT]),
        ),
        (
            "refused",
            seed(0, 0, [0; 16], &[0xc4, 0xe2, 0x7d, 0x58, 0xc0, 0x0f, 0x0b]),
        ),
    ]
}
