//! The software CPU's translating tier against its interpreter on random code: the
//! guest of `x86_decode.rs` (the same input: mode, where the code starts in its
//! page, 16 register bytes, the code), run by a `Tracked` interpreter with the tier
//! in check mode, every block translated the first time it runs and every
//! translated run repeated by the interpreter from the state it started from.
//! `Interpreter::run`, 64 instructions a call, 16 calls at most; the code runs twice
//! from the same CPU state (memory as the first run left it, the code as the input
//! wrote it): the second time the software TLB is warm, so memory operands run
//! translated rather than leaving the translated code at a TLB miss. Unlike
//! `x86_decode`'s, the code pages hold `hlt` around the code.
//!
//! Checked: nothing panics, and translated code never differs from the interpreter
//! (`Fault::TranslationDiffers`). An exception, an unsupported instruction, `hlt` or
//! the 65th block translated ends a run. The tier translates 64-bit and 32-bit code;
//! real-mode inputs run interpreted unless their code leaves real mode.
//!
//! Known and excused for now: a run in which an instruction reads a flag an earlier
//! one left undefined ends quietly instead of failing (the block is decoded in a
//! straight line from its start to find one). The host and the interpreter disagree
//! there, as two real CPUs may: `shl` by more than one sets OF on this Intel host
//! where the interpreter computes it as for a count of one, and `imul` clears ZF where
//! the interpreter takes it from the result (both found by this target; the inputs
//! are in `fuzz/known/x86_translate/`, replayed with `VESSEL_FUZZ_REPLAY`). The filter is coarse (an earlier such read
//! in a block hides a later, unrelated difference; forward branches are ignored);
//! the fix is for the interpreter to model these flags as the host does, then drop it.

use vm_memory::{Bytes, GuestAddress};
use x86::{CodeCoherence, CpuState, Fault, Interpreter, JitMode, RunExit};

use crate::x86_decode::{CODE, CODE_SPAN, Guest, build_guest, seed};

const HLT: u8 = 0xf4;
/// Instructions per `run` call, and calls per run at most.
const BUDGET: u64 = 64;
const CALLS: usize = 16;
/// Blocks translated in one run at most: code that writes the page it runs from has
/// its blocks translated again after every store (each translation takes up to a few
/// hundred microseconds).
const MAX_BLOCKS: u64 = 64;

/// What one input did, in each of its two runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TranslateRuns {
    /// Instructions completed.
    pub executed: [u64; 2],
    /// Of those, the ones run as translated code.
    pub translated: [u64; 2],
    /// The run ended at `hlt`.
    pub halted: [bool; 2],
    /// Blocks translated in all.
    pub blocks: u64,
}

pub fn x86_translate(data: &[u8]) {
    x86_translate_runs(data);
}

/// One input, run twice.
pub fn x86_translate_runs(data: &[u8]) -> TranslateRuns {
    // Code that runs past its end halts (rather than running 64-instruction blocks of
    // `add [rax], al`, each translated at some cost).
    let (mut guest, start) = build_guest(data, HLT);
    let mut interp = Interpreter::new(CodeCoherence::Tracked);
    interp.set_jit(JitMode::Check, Some(0));
    let mut code = vec![0u8; CODE_SPAN];
    guest
        .mem
        .read_slice(&mut code, GuestAddress(CODE))
        .expect("the code pages");
    let mut runs = TranslateRuns::default();
    for run in 0..2 {
        if run == 1 {
            // Code the first run wrote is put back, and the interpreter told.
            let mut now = vec![0u8; CODE_SPAN];
            guest
                .mem
                .read_slice(&mut now, GuestAddress(CODE))
                .expect("the code pages");
            if now != code {
                guest
                    .mem
                    .write_slice(&code, GuestAddress(CODE))
                    .expect("the code pages");
                for page in (0..CODE_SPAN as u64).step_by(0x1000) {
                    interp.invalidate_code_page(CODE + page);
                }
            }
        }
        let mut cpu = start.clone();
        let before = interp.stats();
        runs.halted[run] = run_once(&mut interp, &mut cpu, &mut guest);
        let after = interp.stats();
        runs.executed[run] = after.instructions - before.instructions;
        runs.translated[run] = after.translated_instructions - before.translated_instructions;
    }
    runs.blocks = interp.stats().blocks_translated;
    runs
}

/// Runs the code until `hlt` (true), a fault, the last call's budget or `MAX_BLOCKS`.
fn run_once(interp: &mut Interpreter, cpu: &mut CpuState, guest: &mut Guest) -> bool {
    let blocks = interp.stats().blocks_translated;
    for _ in 0..CALLS {
        match interp.run(cpu, guest, BUDGET) {
            Ok(out) if out.exit == RunExit::Halt => return true,
            Ok(_) if interp.stats().blocks_translated - blocks > MAX_BLOCKS => return false,
            Ok(_) => {}
            Err(Fault::TranslationDiffers(m)) => {
                // The block's bytes (linear = CS base + RIP; identity-mapped), to decode.
                let linear = cpu.seg[1].base.wrapping_add(m.block);
                let mut bytes = Vec::new();
                for i in 0..32 {
                    let Ok(b) = guest
                        .mem
                        .read_obj::<u8>(GuestAddress(linear.wrapping_add(i)))
                    else {
                        break;
                    };
                    bytes.push(b);
                }
                {
                    use iced_x86::{Decoder, DecoderOptions};
                    let mut buf = [0u8; 1024];
                    let _ = guest.mem.read_slice(&mut buf, GuestAddress(linear));
                    let mut d =
                        Decoder::with_ip(cpu.mode().bitness(), &buf, m.block, DecoderOptions::NONE);
                    let mut undef = 0u32;
                    for _ in 0..=m.executed {
                        let ins = d.decode();
                        if ins.rflags_read() & undef != 0 {
                            return false;
                        }
                        undef = (undef & !ins.rflags_modified()) | ins.rflags_undefined();
                    }
                }
                panic!(
                    "x86: translated code differs from the interpreter ({:?}): {m}; \
                     the block's bytes: {bytes:02x?}",
                    cpu.mode()
                );
            }
            Err(Fault::Exception(_) | Fault::Unsupported(_) | Fault::TripleFault) => return false,
        }
    }
    false
}

/// Code the tier translates, as compilers write it: loops of arithmetic, loads and
/// stores with flags live across them, the stack, multiply and carry chains, bit tests,
/// in 64-bit mode (at CPL 0 and 3) and 32-bit mode, one loop across a page boundary.
pub fn x86_translate_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let loop64: &[u8] = &[
        0xb9, 0x64, 0x00, 0x00, 0x00, // mov ecx, 100
        0x01, 0xc8, // 1: add eax, ecx
        0x31, 0xc2, // xor edx, eax
        0xc1, 0xe2, 0x03, // shl edx, 3
        0x48, 0x01, 0xc2, // add rdx, rax
        0xff, 0xc9, // dec ecx
        0x75, 0xf2, // jnz 1b
        HLT,
    ];
    let memory64: &[u8] = &[
        0xb9, 0x3c, 0x00, 0x00, 0x00, // mov ecx, 60
        0x48, 0x8b, 0x07, // 1: mov rax, [rdi]
        0x48, 0x01, 0xc8, // add rax, rcx
        0x48, 0x89, 0x47, 0x08, // mov [rdi+8], rax
        0x48, 0x39, 0xf0, // cmp rax, rsi
        0x48, 0x8b, 0x57, 0x08, // mov rdx, [rdi+8]
        0x72, 0x03, // jb 2f
        0x01, 0x57, 0x10, // add [rdi+0x10], edx
        0x48, 0x2b, 0x5f, 0x10, // 2: sub rbx, [rdi+0x10]
        0x0f, 0x92, 0x47, 0x18, // setb [rdi+0x18]
        0x44, 0x0f, 0xb6, 0x47, 0x18, // movzx r8d, byte [rdi+0x18]
        0xff, 0xc9, // dec ecx
        0x75, 0xd9, // jnz 1b
        HLT,
    ];
    let stack64: &[u8] = &[
        0xb9, 0x28, 0x00, 0x00, 0x00, // mov ecx, 40
        0x51, // 1: push rcx
        0x50, // push rax
        0xe8, 0x07, 0x00, 0x00, 0x00, // call 2f
        0x58, // pop rax
        0x59, // pop rcx
        0xff, 0xc9, // dec ecx
        0x75, 0xf3, // jnz 1b
        HLT, 0x48, 0x8b, 0x44, 0x24, 0x08, // 2: mov rax, [rsp+8]
        0x48, 0x01, 0xc8, // add rax, rcx
        0x48, 0x89, 0x44, 0x24, 0x08, // mov [rsp+8], rax
        0xc3, // ret
    ];
    let multiply64: &[u8] = &[
        0xb9, 0x32, 0x00, 0x00, 0x00, // mov ecx, 50
        0xbb, 0x07, 0x00, 0x00, 0x00, // mov ebx, 7
        0x48, 0x0f, 0xaf, 0xc3, // 1: imul rax, rbx
        0x69, 0xd0, 0x67, 0x45, 0x23, 0x01, // imul edx, eax, 0x1234567
        0x48, 0x01, 0xd0, // add rax, rdx
        0x48, 0x11, 0xc3, // adc rbx, rax
        0x48, 0x13, 0x16, // adc rdx, [rsi]
        0x48, 0xf7, 0xe1, // mul rcx
        0x48, 0x19, 0xd3, // sbb rbx, rdx
        0x48, 0x11, 0x5e, 0x08, // adc [rsi+8], rbx
        0xff, 0xc9, // dec ecx
        0x75, 0xdf, // jnz 1b
        HLT,
    ];
    let mut small = [0u8; 16];
    small[0] = 0x45; // rax = 5
    let bits32: &[u8] = &[
        0xb9, 0x40, 0x00, 0x00, 0x00, // mov ecx, 64
        0x31, 0xdb, // xor ebx, ebx
        0x0f, 0xab, 0xc8, // 1: bts eax, ecx
        0x73, 0x01, // jae 2f
        0x43, // inc ebx
        0x0f, 0xba, 0x2f, 0x05, // 2: bts dword [edi], 5
        0x73, 0x03, // jae 3f
        0x83, 0xc3, 0x02, // add ebx, 2
        0x0f, 0xba, 0xf0, 0x03, // 3: btr eax, 3
        0x0f, 0x92, 0xc2, // setb dl
        0x0f, 0xba, 0x7f, 0x04, 0x09, // btc dword [edi+4], 9
        0xf5, // cmc
        0x83, 0xd3, 0x00, // adc ebx, 0
        0x49, // dec ecx
        0x75, 0xde, // jnz 1b
        HLT,
    ];
    let memory32: &[u8] = &[
        0xb9, 0x50, 0x00, 0x00, 0x00, // mov ecx, 80
        0x8b, 0x06, // 1: mov eax, [esi]
        0x8d, 0x54, 0x88, 0x03, // lea edx, [eax+ecx*4+3]
        0x89, 0x56, 0x04, // mov [esi+4], edx
        0x39, 0xc2, // cmp edx, eax
        0x8b, 0x5e, 0x08, // mov ebx, [esi+8]
        0x0f, 0x42, 0xda, // cmovb ebx, edx
        0x31, 0x1e, // xor [esi], ebx
        0xc1, 0xcb, 0x05, // ror ebx, 5
        0x66, 0x01, 0x5e, 0x0c, // add word [esi+12], bx
        0x49, // dec ecx
        0x75, 0xe3, // jnz 1b
        HLT,
    ];
    vec![
        ("loop-64", seed(0, 0x10, [0; 16], loop64)),
        ("loads-and-stores-64", seed(0, 0x40, [0; 16], memory64)),
        ("loads-and-stores-cpl3", seed(1, 0x40, [0; 16], memory64)),
        ("stack-64", seed(0, 0x80, [0; 16], stack64)),
        (
            "multiply-and-carry-across-a-page-64",
            seed(0, 0xf0, small, multiply64),
        ),
        ("bit-test-32", seed(2, 0x20, [0; 16], bits32)),
        ("loads-and-stores-32", seed(2, 0x60, [0; 16], memory32)),
    ]
}
