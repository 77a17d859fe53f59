//! Faulting instructions: the exception, and an unchanged state with RIP at the
//! instruction.

use iced_x86::code_asm::*;
use x86::Exception;

use crate::{CODE, DATA, STACK_TOP, Vm};

fn pf(address: u64, error_code: u32) -> Exception {
    Exception::PageFault {
        address,
        error_code,
    }
}

/// Steps one faulting instruction and checks nothing but the exception changed.
fn faults_cleanly(vm: &mut Vm, want: Exception) {
    let before = vm.cpu.clone();
    assert_eq!(vm.exception(), want);
    assert_eq!(vm.cpu, before, "state must be untouched by a fault");
}

#[test]
fn divide_errors() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.div(rbx));
    vm.cpu.gpr[0] = 5;
    vm.cpu.gpr[2] = 0;
    vm.cpu.gpr[3] = 0;
    faults_cleanly(&mut vm, Exception::DivideError);

    // Quotient too large: 2^64 / 1.
    let mut vm = Vm::long(3);
    vm.code(|a| a.div(rbx));
    vm.cpu.gpr[0] = 0;
    vm.cpu.gpr[2] = 1;
    vm.cpu.gpr[3] = 1;
    faults_cleanly(&mut vm, Exception::DivideError);

    // INT_MIN / -1 overflows idiv.
    let mut vm = Vm::long(3);
    vm.code(|a| a.idiv(ecx));
    vm.cpu.gpr[0] = 0x8000_0000;
    vm.cpu.gpr[2] = 0xffff_ffff;
    vm.cpu.gpr[1] = 0xffff_ffff;
    faults_cleanly(&mut vm, Exception::DivideError);

    // The most negative 128-bit dividend by -1.
    let mut vm = Vm::long(3);
    vm.code(|a| a.idiv(rcx));
    vm.cpu.gpr[0] = 0;
    vm.cpu.gpr[2] = 0x8000_0000_0000_0000;
    vm.cpu.gpr[1] = u64::MAX;
    faults_cleanly(&mut vm, Exception::DivideError);

    // 8-bit: AX / BL with quotient 256.
    let mut vm = Vm::long(3);
    vm.code(|a| a.div(bl));
    vm.cpu.gpr[0] = 0x200;
    vm.cpu.gpr[3] = 2;
    faults_cleanly(&mut vm, Exception::DivideError);
}

#[test]
fn page_fault_error_codes() {
    // User read of an unmapped page: not present, user.
    let mut vm = Vm::long(3);
    vm.code(|a| a.mov(rax, qword_ptr(0x90_0000)));
    faults_cleanly(&mut vm, pf(0x90_0000, 0b100));

    // Supervisor write to an unmapped page: not present, write.
    let mut vm = Vm::long(0);
    vm.code(|a| a.mov(qword_ptr(0x90_0008), rax));
    faults_cleanly(&mut vm, pf(0x90_0008, 0b010));

    // User write to a read-only user page: present, write, user.
    let mut vm = Vm::long(3);
    vm.code(|a| a.mov(qword_ptr(CODE + 0x100), rax));
    faults_cleanly(&mut vm, pf(CODE + 0x100, 0b111));

    // User access to a supervisor page: present, user.
    let mut vm = Vm::long(3);
    vm.pt.identity(&vm.p, 0xa0_0000, 0x1000, common_w());
    vm.code(|a| a.mov(eax, dword_ptr(0xa0_0010)));
    faults_cleanly(&mut vm, pf(0xa0_0010, 0b101));
}

fn common_w() -> u64 {
    crate::common::PTE_W
}

#[test]
fn nx_fetch_fault() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.jmp(DATA));
    vm.step().expect("jmp into the data page");
    assert_eq!(vm.cpu.rip, DATA);
    // Instruction fetch from an NX user page: present, user, instruction fetch.
    faults_cleanly(&mut vm, pf(DATA, 0b10101));
}

#[test]
fn fault_on_the_second_page_of_a_split_write_writes_nothing() {
    let mut vm = Vm::long(0);
    // DATA+0x1000 is mapped; make it read-only, then write 8 bytes across the boundary.
    vm.pt.map(&vm.p, DATA + 0x1000, DATA + 0x1000, 0);
    vm.code(|a| a.mov(qword_ptr(DATA + 0xffc), rax));
    vm.cpu.gpr[0] = u64::MAX;
    vm.p.write_u64(DATA + 0xff8, 0);
    faults_cleanly(&mut vm, pf(DATA + 0x1000, 0b011));
    assert_eq!(vm.p.read_u64(DATA + 0xff8), 0, "first page untouched");
}

#[test]
fn non_canonical_addresses() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.mov(rax, qword_ptr(rbx)));
    vm.cpu.gpr[3] = 0x0000_8000_0000_0000;
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));

    // The stack raises #SS instead.
    let mut vm = Vm::long(3);
    vm.code(|a| a.push(rax));
    vm.cpu.gpr[4] = 0x0000_8000_0000_0008;
    faults_cleanly(&mut vm, Exception::StackFault(0));

    // A jump to a non-canonical target faults at the jump.
    let mut vm = Vm::long(3);
    vm.code(|a| a.jmp(rcx));
    vm.cpu.gpr[1] = 0x1234_5678_0000_0000;
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));

    // ret to a non-canonical address: RSP is not popped.
    let mut vm = Vm::long(3);
    vm.code(|a| a.ret());
    vm.cpu.gpr[4] = STACK_TOP - 8;
    vm.p.write_u64(STACK_TOP - 8, 0xdead_0000_0000_0000);
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));
}

#[test]
fn alignment_faults() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.movaps(xmm0, xmmword_ptr(DATA + 8)));
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));

    let mut vm = Vm::long(3);
    vm.code(|a| a.lock().cmpxchg16b(xmmword_ptr(DATA + 8)));
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));

    let mut vm = Vm::long(3);
    vm.code(|a| a.fxsave64(ptr(DATA + 8)));
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));
}

#[test]
fn sse_availability() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.addps(xmm0, xmm1));
    vm.cpu.cr0 |= x86::ctl::CR0_TS;
    faults_cleanly(&mut vm, Exception::DeviceNotAvailable);

    let mut vm = Vm::long(3);
    vm.code(|a| a.paddd(xmm0, xmm1));
    vm.cpu.cr4 &= !x86::ctl::CR4_OSFXSR;
    faults_cleanly(&mut vm, Exception::InvalidOpcode);
}

#[test]
fn unmasked_simd_exception() {
    // 1.0 / 0.0 with ZE unmasked: #XM, destination unchanged, ZE flag recorded.
    let mut vm = Vm::long(3);
    vm.code(|a| a.divss(xmm0, xmm1));
    vm.cpu.fpu.xmm[0] = u128::from(1.0f32.to_bits());
    vm.cpu.fpu.xmm[1] = 0;
    vm.cpu.fpu.mxcsr = 0x1f80 & !(1 << 9);
    assert_eq!(vm.exception(), Exception::SimdFloatingPoint);
    assert_eq!(vm.cpu.fpu.xmm[0], u128::from(1.0f32.to_bits()));
    assert_eq!(vm.cpu.fpu.mxcsr & 0x3f, 1 << 2);
    assert_eq!(vm.cpu.rip, CODE);

    // Masked: infinity and the flag.
    let mut vm = Vm::long(3);
    vm.code(|a| a.divss(xmm0, xmm1));
    vm.cpu.fpu.xmm[0] = u128::from(1.0f32.to_bits());
    vm.cpu.fpu.xmm[1] = 0;
    vm.step().expect("masked divide by zero");
    assert_eq!(vm.cpu.fpu.xmm[0], u128::from(f32::INFINITY.to_bits()));
    assert_eq!(vm.cpu.fpu.mxcsr, 0x1f80 | (1 << 2));
}

#[test]
fn ldmxcsr_reserved_bits() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.ldmxcsr(dword_ptr(DATA)));
    vm.p.write(DATA, &0x0004_0000u32.to_le_bytes());
    faults_cleanly(&mut vm, Exception::GeneralProtection(0));
}

#[test]
fn instruction_crossing_into_an_unmapped_page() {
    let mut vm = Vm::long(3);
    // mov rax, imm64 (10 bytes) starting 4 bytes before the end of the last code page.
    let at = CODE + 0x2000 - 4;
    vm.code_at(at - 0x10, |a| {
        a.nop()?;
        Ok(())
    });
    vm.p.write(at, &[0x48, 0xb8, 1, 2]);
    vm.cpu.rip = at;
    faults_cleanly(&mut vm, pf(CODE + 0x2000, 0b10100));
}

#[test]
fn instruction_crossing_a_page_executes() {
    let mut vm = Vm::long(3);
    let at = CODE + 0x1000 - 3;
    vm.code_at(at, |a| a.mov(rax, 0x1122_3344_5566_7788u64));
    vm.cpu.rip = at;
    vm.step().expect("split mov");
    assert_eq!(vm.cpu.gpr[0], 0x1122_3344_5566_7788);
    assert_eq!(vm.cpu.rip, at + 10);
}
