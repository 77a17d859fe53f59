//! The decoded-code cache: self-modifying code, code changed behind the interpreter's
//! back, explicit invalidation, budgets and counters.

use iced_x86::code_asm::*;
use x86::{CodeCoherence, Interpreter, RunExit};

use crate::{CODE, DATA, Vm};

/// A loop that rewrites the immediate of an instruction later in the same block: the
/// rewritten instruction must run with the new immediate on the same pass.
#[test]
fn self_modifying_code_in_the_current_block() {
    let mut vm = Vm::long(0);
    // Make the code page writable for the kernel.
    vm.pt.identity(&vm.p, CODE, 0x1000, crate::common::PTE_W);
    vm.code(|a| {
        // mov byte [CODE + 10], 42: 8 bytes, then a nop, so `mov al, 7` sits at CODE + 9
        // and its imm8 at CODE + 10.
        a.mov(byte_ptr(CODE + 10), 42)?;
        a.nop()?;
        a.mov(al, 7)?;
        a.hlt()
    });
    assert_eq!(crate::insn_len(&vm, CODE), 8);
    let out = vm.run(100).expect("run");
    assert_eq!(out.exit, RunExit::Halt);
    assert_eq!(vm.cpu.gpr[0] & 0xff, 42);
    assert!(vm.interp.stats().blocks_invalidated >= 1);
}

/// With `Validate`, bytes changed by someone else (KVM running the guest) are noticed.
#[test]
fn validation_notices_external_changes() {
    let mut vm = Vm::long(3);
    vm.interp = Interpreter::new(CodeCoherence::Validate);
    vm.code(|a| a.mov(eax, 1));
    vm.step().expect("first");
    assert_eq!(vm.cpu.gpr[0], 1);
    vm.cpu.rip = CODE;
    vm.code(|a| a.mov(eax, 2));
    vm.step().expect("second");
    assert_eq!(vm.cpu.gpr[0], 2);
}

/// With `Tracked`, external writes need `invalidate_code_page`.
#[test]
fn tracked_mode_uses_explicit_invalidation() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.mov(eax, 1));
    vm.step().expect("first");
    vm.cpu.rip = CODE;
    vm.code(|a| a.mov(eax, 2));
    vm.step().expect("stale");
    assert_eq!(
        vm.cpu.gpr[0], 1,
        "the cached block is used until invalidated"
    );
    vm.interp.invalidate_code_page(CODE + 0x10);
    vm.cpu.rip = CODE;
    vm.step().expect("fresh");
    assert_eq!(vm.cpu.gpr[0], 2);
}

/// Writes through this interpreter to a page holding code invalidate it, even from
/// another block.
#[test]
fn interpreter_writes_invalidate_other_blocks() {
    let mut vm = Vm::long(0);
    vm.pt.identity(&vm.p, CODE, 0x1000, crate::common::PTE_W);
    vm.code_at(CODE + 0x100, |a| {
        a.mov(eax, 1)?;
        a.ret()
    });
    vm.code(|a| {
        a.call(CODE + 0x100)?;
        // Patch the imm32 of `mov eax, 1` to 5.
        a.mov(dword_ptr(CODE + 0x101), 5)?;
        a.call(CODE + 0x100)?;
        a.hlt()
    });
    vm.run(10).expect("run");
    assert_eq!(vm.cpu.gpr[0], 5);
}

#[test]
fn budgets_are_exact() {
    let mut vm = Vm::long(3);
    vm.code(|a| {
        for _ in 0..20 {
            a.inc(rax)?;
        }
        Ok(())
    });
    let out = vm.run(7).expect("run");
    assert_eq!((out.executed, out.exit), (7, RunExit::Budget));
    assert_eq!(vm.cpu.gpr[0], 7);
    assert_eq!(vm.cpu.rip, CODE + 7 * 3);
    let out = vm.run(5).expect("run");
    assert_eq!(out.executed, 5);
    assert_eq!(vm.cpu.gpr[0], 12);
    assert_eq!(vm.interp.stats().instructions, 12);
}

#[test]
fn run_reports_exceptions_with_the_instruction_count() {
    let mut vm = Vm::long(3);
    vm.code(|a| {
        a.inc(rax)?;
        a.mov(rbx, qword_ptr(0x90_0000))
    });
    match vm.run(10) {
        Err(x86::Fault::Exception(x86::Exception::PageFault { address, .. })) => {
            assert_eq!(address, 0x90_0000)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.cpu.gpr[0], 1);
    assert_eq!(vm.cpu.rip, CODE + 3);
    assert_eq!(vm.interp.stats().instructions, 1);
}

#[test]
fn loops_run_from_the_cache() {
    let mut vm = Vm::long(3);
    let mut a = CodeAssembler::new(64).expect("asm");
    let mut top = a.create_label();
    (|| -> Result<(), IcedError> {
        a.mov(ecx, 1000)?;
        a.set_label(&mut top)?;
        a.add(qword_ptr(DATA), rcx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.int3()
    })()
    .expect("assemble");
    vm.p.write(CODE, &a.assemble(CODE).expect("assemble"));
    assert!(matches!(
        vm.run(1_000_000),
        Err(x86::Fault::Exception(x86::Exception::Breakpoint))
    ));
    assert_eq!(vm.p.read_u64(DATA), 1000 * 1001 / 2);
    let s = vm.interp.stats();
    // The int3 trap completed too.
    assert_eq!(s.instructions, 1 + 3 * 1000 + 1);
    assert!(s.blocks_decoded <= 3, "{s:?}");
}
