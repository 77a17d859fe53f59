//! The translating tier against the interpreter: the same guest code run interpreted,
//! translated, and translated with every run checked must leave the same registers,
//! flags, memory and instruction counts.

use iced_x86::code_asm::*;
use x86::{Fault, JitMode, RunExit};

use crate::common::{PTE_NX, PTE_W};
use crate::{CODE, DATA, Vm};

/// Runs `code` (which ends in `hlt`) with the tier in `mode` (translating every block
/// the first time it runs) and returns the final GPRs, RFLAGS, RIP, DATA's two pages and
/// the interpreter's counters.
fn run_in(
    mode: JitMode,
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    setup: &dyn Fn(&mut Vm),
    budget: u64,
) -> ([u64; 16], u64, u64, Vec<u8>, x86::Stats, RunExit) {
    let mut vm = Vm::long(0);
    vm.interp.set_jit(mode, Some(0));
    vm.code(code);
    setup(&mut vm);
    let mut left = budget;
    let mut exit = RunExit::Budget;
    while left > 0 {
        let out = vm.run(left).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        left -= out.executed;
        exit = out.exit;
        if exit == RunExit::Halt {
            break;
        }
    }
    let mut data = vec![0u8; 0x2000];
    vm.p.read(DATA, &mut data);
    (
        vm.cpu.gpr,
        vm.cpu.rflags,
        vm.cpu.rip,
        data,
        vm.interp.stats(),
        exit,
    )
}

fn same_everywhere(
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    setup: &dyn Fn(&mut Vm),
    budget: u64,
) -> x86::Stats {
    let off = run_in(JitMode::Off, code, setup, budget);
    let on = run_in(JitMode::On, code, setup, budget);
    let check = run_in(JitMode::Check, code, setup, budget);
    for (name, r) in [("on", &on), ("check", &check)] {
        assert_eq!(r.0, off.0, "{name}: registers");
        assert_eq!(r.1, off.1, "{name}: rflags");
        assert_eq!(r.2, off.2, "{name}: rip");
        assert!(r.3 == off.3, "{name}: memory");
        assert_eq!(r.4.instructions, off.4.instructions, "{name}: instructions");
        assert_eq!(r.5, off.5, "{name}: exit");
    }
    assert!(
        on.4.translated_instructions > 0,
        "nothing ran translated: {:?}",
        on.4
    );
    on.4
}

/// Loads, stores, flags consumed after a memory access, a loop on itself.
fn mixed(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    let mut top = a.create_label();
    let mut skip = a.create_label();
    a.mov(rdi, DATA)?;
    a.mov(ecx, 3000)?;
    a.xor(esi, esi)?;
    a.xor(edx, edx)?;
    a.xor(r9d, r9d)?;
    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(rdi + rsi * 8))?;
    a.add(rax, rdx)?;
    a.xor(rdx, rax)?;
    a.mov(r8, rdx)?;
    a.shr(r8, 7)?;
    a.sub(rdx, r8)?;
    a.inc(rsi)?;
    a.and(rsi, 1023)?;
    a.mov(qword_ptr(rdi + rsi * 8), rdx)?;
    a.cmp(rax, rdx)?;
    a.jae(skip)?;
    a.add(r9, 1)?;
    a.set_label(&mut skip)?;
    a.dec(rcx)?;
    a.jne(top)?;
    a.hlt()
}

fn fill_data(vm: &mut Vm) {
    let bytes: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    vm.p.write(DATA, &bytes);
}

#[test]
fn a_mixed_loop_runs_the_same_translated() {
    let stats = same_everywhere(&mixed, &fill_data, 1_000_000);
    assert!(
        stats.translated_instructions > stats.instructions / 2,
        "{stats:?}"
    );
}

/// Budgets that end in the middle of a loop's iteration stop at exactly the same
/// instruction.
#[test]
fn budgets_end_at_the_same_instruction() {
    for budget in [1, 7, 13, 100, 1001, 4099] {
        let off = run_in(JitMode::Off, &mixed, &fill_data, budget);
        let on = run_in(JitMode::On, &mixed, &fill_data, budget);
        assert_eq!(on.0, off.0, "budget {budget}: registers");
        assert_eq!(on.2, off.2, "budget {budget}: rip");
        assert_eq!(on.4.instructions, budget);
    }
}

/// Flags live across a memory access, carry chains, partial flag writers (inc keeps
/// CF), setcc/cmovcc, shifts by CL (a zero count keeps the flags), byte registers.
#[test]
fn flags_survive_memory_accesses_and_partial_writers() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(r12d, 500)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rdi + 8))?;
        a.add(rax, qword_ptr(rdi + 16))?;
        a.mov(rcx, qword_ptr(rdi + 24))?;
        a.adc(rcx, qword_ptr(rdi + 32))?;
        a.mov(qword_ptr(rdi + 40), rcx)?;
        a.inc(rbx)?;
        a.adc(rbx, 0)?;
        a.setc(dl)?;
        a.movzx(edx, dl)?;
        a.cmp(rax, rcx)?;
        a.mov(r8, qword_ptr(rdi + 48))?;
        a.cmovb(r8, rax)?;
        a.mov(qword_ptr(rdi + 48), r8)?;
        a.mov(ecx, ebx)?;
        a.and(ecx, 3)?;
        a.rol(rax, cl)?;
        a.add(qword_ptr(rdi + 8), rax)?;
        a.add(byte_ptr(rdi + 56), dl)?;
        a.sub(r12d, 1)?;
        a.jnz(top)?;
        a.hlt()
    };
    same_everywhere(&code, &fill_data, 1_000_000);
}

/// Accesses of every size sliding across the boundary between DATA's two pages, the
/// second mapped to a page that is not next to the first (in guest-physical and host
/// memory): the ones that cross leave translated code for the interpreter (with the
/// flags of the `cmp` before them stashed), the others run translated; read-modify-
/// writes too.
#[test]
fn accesses_across_a_page_boundary_leave_for_the_interpreter() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(rdi, DATA + 0x1000 - 12)?;
        a.xor(esi, esi)?;
        a.xor(r9d, r9d)?;
        a.set_label(&mut top)?;
        a.cmp(esi, 7)?;
        a.mov(rax, qword_ptr(rdi + rsi))?;
        a.movzx(ebx, word_ptr(rdi + rsi + 3))?;
        a.mov(ecx, dword_ptr(rdi + rsi + 5))?;
        a.jb(skip)?;
        a.add(r9, rax)?;
        a.set_label(&mut skip)?;
        a.add(r9, rbx)?;
        a.add(r9, rcx)?;
        a.add(qword_ptr(rdi + rsi + 1), r9)?;
        a.xor(dword_ptr(rdi + rsi + 2), ecx)?;
        a.inc(esi)?;
        a.and(esi, 15)?;
        a.jmp(top)?;
        a.hlt()
    };
    let split = |vm: &mut Vm| {
        const ELSEWHERE: u64 = 0x58_0000;
        fill_data(vm);
        vm.pt.map(&vm.p, DATA + 0x1000, ELSEWHERE, PTE_W | PTE_NX);
        let bytes: Vec<u8> = (0..0x1000u32).map(|i| (i * 13 + 5) as u8).collect();
        vm.p.write(ELSEWHERE, &bytes);
    };
    same_everywhere(&code, &split, 200_000);
}

/// 32-bit operations zero the upper half, 8/16-bit ones keep it; sign and zero
/// extension; imul, mul's implicit RDX:RAX, cdq/cqo, bswap, bt/bts.
#[test]
fn widths_and_implicit_registers() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(r13d, 300)?;
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.set_label(&mut top)?;
        a.mov(rbx, rax)?;
        a.add(bx, 0x7fff)?;
        a.mov(esi, ebx)?;
        a.movsx(r10, si)?;
        a.movsxd(r11, esi)?;
        a.imul_3(r10, r11, 33)?;
        a.mul(rbx)?;
        a.cqo()?;
        a.xor(rax, r10)?;
        a.bswap(rax)?;
        a.bts(rax, 17)?;
        a.bt(rax, 5)?;
        a.adc(rax, rdx)?;
        a.lea(r14, qword_ptr(rax + rbx * 4 + 0x40))?;
        a.mov(qword_ptr(rdi + r13 * 8), r14)?;
        a.movzx(r15d, byte_ptr(rdi + r13))?;
        a.add(rax, r15)?;
        a.dec(r13d)?;
        a.jnz(top)?;
        a.hlt()
    };
    same_everywhere(&code, &fill_data, 1_000_000);
}

/// A load that faults in the middle of a translated block leaves precise state: the
/// instructions before it done, RIP at it, CR2 set.
#[test]
fn a_fault_in_the_middle_is_precise() {
    let mut vm = Vm::long(0);
    vm.interp.set_jit(JitMode::On, Some(0));
    vm.code(|a| {
        let mut top = a.create_label();
        a.mov(ecx, 10)?;
        a.mov(rsi, DATA)?;
        a.set_label(&mut top)?;
        a.add(rax, 3)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.add(rsi, 0x800)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    // DATA maps two pages: the fifth iteration's load is at DATA + 0x2000, unmapped.
    let r = vm.run(1000);
    let Err(Fault::Exception(e)) = r else {
        panic!("expected a page fault, got {r:?}");
    };
    assert!(
        matches!(e, x86::Exception::PageFault { address, .. } if address == DATA + 0x2000),
        "{e:?}"
    );
    assert_eq!(vm.cpu.gpr[0], 15, "five adds done");
    assert_eq!(vm.cpu.gpr[6], DATA + 0x2000);
    let mut b = [0u8; 15];
    vm.p.read(vm.cpu.rip, &mut b);
    let at =
        iced_x86::Decoder::with_ip(64, &b, vm.cpu.rip, iced_x86::DecoderOptions::NONE).decode();
    assert_eq!(at.mnemonic(), iced_x86::Mnemonic::Mov, "RIP at the load");
    assert_eq!(at.op1_kind(), iced_x86::OpKind::Memory, "RIP at the load");
    assert!(vm.interp.stats().translated_instructions > 0);
}

/// Self-modifying code: a translated loop that stores into its own code page goes
/// through the interpreter, and the new code runs.
#[test]
fn stores_to_code_leave_translated_code() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        let mut patched = a.create_label();
        a.mov(ecx, 50)?;
        a.set_label(&mut top)?;
        a.add(ebx, 1)?;
        a.set_label(&mut patched)?;
        // `add eax, imm32`: its immediate is rewritten every iteration.
        a.add(eax, 0x1000)?;
        a.mov(dword_ptr(CODE + 0x100), ebx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    };
    let setup = |vm: &mut Vm| {
        vm.pt.identity(&vm.p, CODE, 0x1000, crate::common::PTE_W);
    };
    let off = run_in(JitMode::Off, &code, &setup, 100_000);
    let on = run_in(JitMode::On, &code, &setup, 100_000);
    let check = run_in(JitMode::Check, &code, &setup, 100_000);
    assert_eq!(on.0, off.0);
    assert_eq!(check.0, off.0);
}

/// The tier refuses to run what it must not: system and stack instructions, locked
/// operations, divisions stay interpreted (they are correct either way; this shows
/// they do not crash the host process).
#[test]
fn untranslated_instructions_stay_interpreted() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        a.mov(ecx, 100)?;
        a.mov(rdi, DATA)?;
        a.set_label(&mut top)?;
        a.add(r10, rcx)?;
        a.xor(r11, r10)?;
        a.add(r11, qword_ptr(rdi + 8))?;
        a.mov(qword_ptr(rdi + 16), r11)?;
        a.push(rcx)?;
        a.lock().add(qword_ptr(rdi), 1)?;
        a.mov(eax, 1000)?;
        a.xor(edx, edx)?;
        a.div(ecx)?;
        a.pop(rcx)?;
        a.add(r8, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    };
    let setup = |vm: &mut Vm| {
        fill_data(vm);
    };
    same_everywhere(&code, &setup, 1_000_000);
}

/// A block that starts with a partial flag writer (inc keeps CF) takes the guest's CF
/// in, and hands it on at an exit in its middle.
#[test]
fn carry_in_through_inc_to_an_exit() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut body = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(rsi, DATA + 0x1000)?;
        a.stc()?;
        a.jmp(body)?;
        a.set_label(&mut body)?;
        a.inc(dword_ptr(rdi))?;
        a.mov(rbp, qword_ptr(rdi + 8))?;
        a.add(rbp, qword_ptr(rsi))?;
        a.mov(rdi, rbp)?;
        a.hlt()
    };
    same_everywhere(&code, &fill_data, 100);
}

/// The same, with the carry written in full later in the block: an exit before that
/// still hands on the guest's carry.
#[test]
fn carry_in_through_inc_to_an_exit_before_a_full_writer() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut body = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(rsi, DATA + 0x1000)?;
        a.stc()?;
        a.jmp(body)?;
        a.set_label(&mut body)?;
        a.inc(dword_ptr(rdi))?;
        a.mov(rbp, qword_ptr(rdi + 8))?;
        a.add(rbp, qword_ptr(rsi))?;
        a.mov(rdi, rbp)?;
        a.hlt()
    };
    // The first run leaves at the add's TLB miss with inc's flags and the carry.
    let check = run_in(JitMode::Check, &code, &fill_data, 4);
    let off = run_in(JitMode::Off, &code, &fill_data, 4);
    assert_eq!(check.1, off.1);
}

/// bts writes CF and leaves ZF alone: a branch taken after it hands on the guest's ZF
/// from before the block.
#[test]
fn a_taken_branch_after_a_partial_writer_keeps_the_other_flags() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut body = a.create_label();
        let mut out = a.create_label();
        a.mov(rdx, DATA)?;
        a.xor(eax, eax)?;
        a.jmp(body)?;
        a.set_label(&mut body)?;
        a.bts(qword_ptr(rdx), 0)?;
        a.jae(out)?;
        a.xor(r8d, r8d)?;
        a.and(bh, 2)?;
        a.set_label(&mut out)?;
        a.setz(cl)?;
        a.hlt()
    };
    let setup = |vm: &mut Vm| vm.p.write(DATA, &[0u8; 8]);
    let off = run_in(JitMode::Off, &code, &setup, 100);
    let check = run_in(JitMode::Check, &code, &setup, 100);
    let on = run_in(JitMode::On, &code, &setup, 100);
    assert_eq!(off.0[1] & 0xff, 1, "ZF from xor eax, eax");
    assert_eq!(check.0, off.0);
    assert_eq!(on.0, off.0);
}

/// One code page at two linear addresses (a library in two processes): each address
/// runs code translated for it (translations hold their guest addresses).
#[test]
fn code_at_two_addresses_gets_a_translation_each() {
    const ALIAS: u64 = 0x80_0000;
    let mut vm = Vm::long(0);
    vm.interp.set_jit(JitMode::On, Some(0));
    vm.pt.map(&vm.p, ALIAS, CODE, 0);
    vm.code(|a| {
        let mut top = a.create_label();
        a.mov(ecx, 5)?;
        a.set_label(&mut top)?;
        a.lea(rax, qword_ptr(top))?;
        a.add(rbx, 1)?;
        a.add(rdx, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for base in [CODE, ALIAS, CODE, ALIAS] {
        vm.cpu.rip = base;
        vm.cpu.gpr[2] = 0;
        let out = vm.run(1000).expect("run");
        assert_eq!(out.exit, RunExit::Halt);
        assert_eq!(
            vm.cpu.gpr[0],
            base + 5,
            "lea of its own address at {base:#x}"
        );
        assert_eq!(vm.cpu.gpr[2], 5 * (base + 5));
    }
    assert!(vm.interp.stats().blocks_translated >= 2);
}

/// Calls, returns, pushes and pops run translated: a loop calling a function that saves
/// and restores registers on the stack; and a return to a non-canonical address raises
/// #GP at the ret.
#[test]
fn calls_returns_and_the_stack() {
    let code = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        let mut func = a.create_label();
        a.mov(ecx, 300)?;
        a.mov(rdi, DATA)?;
        a.set_label(&mut top)?;
        a.push(rcx)?;
        a.mov(rsi, rcx)?;
        a.call(func)?;
        a.pop(rcx)?;
        a.add(r12, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()?;
        a.set_label(&mut func)?;
        a.push(rbx)?;
        a.push(rbp)?;
        a.mov(rbx, rsi)?;
        a.imul_2(rbx, rbx)?;
        a.mov(rbp, qword_ptr(rdi + 8))?;
        a.lea(rax, qword_ptr(rbx + rbp))?;
        a.mov(qword_ptr(rdi + 16), rax)?;
        a.pop(rbp)?;
        a.pop(rbx)?;
        a.ret()
    };
    let stats = same_everywhere(&code, &fill_data, 1_000_000);
    assert!(
        stats.translated_instructions > stats.instructions / 2,
        "{stats:?}"
    );

    let mut vm = Vm::long(0);
    vm.interp.set_jit(JitMode::On, Some(0));
    vm.code(|a| {
        a.mov(rax, 0x8000_0000_0000u64)?;
        a.push(rax)?;
        a.add(rbx, 1)?;
        a.add(rbx, 2)?;
        a.ret()
    });
    let r = vm.run(100);
    assert!(
        matches!(
            r,
            Err(Fault::Exception(x86::Exception::GeneralProtection(0)))
        ),
        "{r:?}"
    );
    assert_eq!(vm.cpu.gpr[3], 3);
    assert_eq!(vm.cpu.gpr[4], crate::STACK_TOP - 8, "the ret did not pop");
}
