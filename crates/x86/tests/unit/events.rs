//! Exception and interrupt delivery (long mode with and without privilege change, IST,
//! error codes, #PF/CR2, #DF and triple faults, 32-bit protected mode, real mode), iret,
//! syscall/sysret. Frames are checked slot by slot against the SDM's layouts.

use iced_x86::code_asm::*;
use x86::{Event, Exception, Fault, RunExit, SegReg, rflags};

use crate::{CODE, DATA, STACK_TOP, USER, Vm};

/// GDT layout (Linux's): kernel CS/DS, user CS32/DS/CS64, TSS.
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_CS32: u16 = 0x23;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
pub const TSS_SEL: u16 = 0x40;
pub const LDT_SEL: u16 = 0x50;

pub const GDT: u64 = DATA;
pub const TSS: u64 = DATA + 0x200;
/// Top of the IST1 stack (in the DATA pages).
pub const IST1_TOP: u64 = DATA + 0xc00;
pub const IDT: u64 = DATA + 0x1000;
/// Where handlers live: vector v at HANDLERS + 0x10 * v (each `hlt`).
pub const HANDLERS: u64 = CODE + 0x800;

pub fn code64(dpl: u64) -> u64 {
    0x00af_9a00_0000_ffff | (dpl << 45)
}
pub fn code32(dpl: u64) -> u64 {
    0x00cf_9a00_0000_ffff | (dpl << 45)
}
pub fn data(dpl: u64) -> u64 {
    0x00cf_9200_0000_ffff | (dpl << 45)
}

/// A 16-byte system descriptor (TSS type 9, LDT type 2) for long mode.
pub fn system64(base: u64, limit: u64, typ: u64) -> (u64, u64) {
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((0x80 | typ) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

/// A 16-byte IDT gate.
pub fn gate64(sel: u16, off: u64, ist: u64, typ: u64, dpl: u64) -> (u64, u64) {
    let lo = (off & 0xffff)
        | (u64::from(sel) << 16)
        | (ist << 32)
        | ((0x80 | typ | (dpl << 5)) << 40)
        | (((off >> 16) & 0xffff) << 48);
    (lo, off >> 32)
}

pub fn set_gate(vm: &Vm, vector: u8, g: (u64, u64)) {
    let at = IDT + 16 * u64::from(vector);
    vm.p.write_u64(at, g.0);
    vm.p.write_u64(at + 8, g.1);
}

/// A kernel with a GDT, a TSS (RSP0 = STACK_TOP, IST1), an IDT with an interrupt gate per
/// vector to a `hlt` at HANDLERS + 0x10 * v, and the user page mapped for CPL 3 code.
pub fn kernel() -> Vm {
    let mut vm = Vm::long(0);
    let gdt = [0, 0, code64(0), data(0), code32(3), data(3), code64(3), 0];
    for (k, d) in gdt.iter().enumerate() {
        vm.p.write_u64(GDT + 8 * k as u64, *d);
    }
    let (lo, hi) = system64(TSS, 0x67, 9);
    vm.p.write_u64(GDT + u64::from(TSS_SEL), lo);
    vm.p.write_u64(GDT + u64::from(TSS_SEL) + 8, hi);
    vm.cpu.gdtr = x86::DescriptorTable {
        base: GDT,
        limit: 0x6f,
    };
    vm.p.write(TSS, &[0; 0x68]);
    vm.p.write_u64(TSS + 4, STACK_TOP);
    vm.p.write_u64(TSS + 0x24, IST1_TOP);
    vm.cpu.tr = x86::Segment {
        selector: TSS_SEL,
        base: TSS,
        limit: 0x67,
        attr: 0xb | x86::Segment::ATTR_P,
    };
    for v in 0..=255u8 {
        set_gate(
            &vm,
            v,
            gate64(KERNEL_CS, HANDLERS + 0x10 * u64::from(v), 0, 0xe, 0),
        );
    }
    vm.cpu.idtr = x86::DescriptorTable {
        base: IDT,
        limit: 0xfff,
    };
    // Handlers: hlt (the code pages hold 0x2000 bytes, so vectors up to 0x7f).
    vm.code_at(HANDLERS, |a| {
        for _ in 0..0x80 {
            a.hlt()?;
            a.db(&[0x90; 15])?;
        }
        Ok(())
    });
    vm.cpu.rflags |= rflags::IF;
    vm
}

/// Switches the CPU to CPL 3 at USER with a user stack at the top of the USER page.
pub fn enter_user(vm: &mut Vm) {
    vm.cpu.seg[SegReg::Cs as usize] = x86::Segment::flat(USER_CS, 0xb, 3, false, true);
    for s in [SegReg::Ds, SegReg::Es, SegReg::Ss] {
        vm.cpu.seg[s as usize] = x86::Segment::flat(USER_DS, 0x3, 3, true, false);
    }
    vm.cpu.rip = USER;
    vm.cpu.gpr[4] = USER + 0xff8;
}

pub fn user_code(vm: &mut Vm, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) {
    vm.code_at(USER, f);
}

/// Runs until hlt, delivering every exception as the emu vCPU loop would.
pub fn run_delivering(vm: &mut Vm) -> Vec<Exception> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        match vm.run(10_000) {
            Ok(out) if out.exit == RunExit::Halt => return seen,
            Ok(out) => panic!("unexpected exit {out:?}"),
            Err(Fault::Exception(e)) => {
                seen.push(e);
                vm.interp
                    .deliver(&mut vm.cpu, &mut vm.p, Event::Exception(e))
                    .expect("delivery");
            }
            Err(f) => panic!("{f}"),
        }
    }
    panic!("no hlt");
}

fn stack(vm: &Vm, n: usize) -> Vec<u64> {
    (0..n)
        .map(|k| vm.p.read_u64(vm.cpu.gpr[4] + 8 * k as u64))
        .collect()
}

fn handler(v: u8) -> u64 {
    HANDLERS + 0x10 * u64::from(v) + 1
}

#[test]
fn fault_at_cpl0_pushes_a_frame_on_the_same_stack() {
    let mut vm = kernel();
    vm.cpu.gpr[4] = STACK_TOP - 0x18 - 4; // misaligned: delivery aligns to 16
    vm.code(|a| a.ud2());
    assert_eq!(run_delivering(&mut vm), vec![Exception::InvalidOpcode]);
    assert_eq!(vm.cpu.rip, handler(6));
    assert_eq!(
        vm.cpu.gpr[4],
        STACK_TOP - 0x20 - 40,
        "aligned, then five slots"
    );
    let f = stack(&vm, 5);
    assert_eq!(f[0], CODE, "RIP of the faulting instruction");
    assert_eq!(f[1], u64::from(KERNEL_CS));
    assert_ne!(f[2] & rflags::IF, 0, "the old RFLAGS had IF");
    assert_eq!(f[3], STACK_TOP - 0x18 - 4, "old RSP");
    assert_eq!(f[4], u64::from(KERNEL_DS));
    assert_eq!(vm.cpu.rflags & rflags::IF, 0, "interrupt gate clears IF");
    assert_eq!(vm.cpu.seg[SegReg::Cs as usize].selector, KERNEL_CS);
}

#[test]
fn trap_gate_keeps_if_and_int3_returns_after_itself() {
    let mut vm = kernel();
    set_gate(&vm, 3, gate64(KERNEL_CS, handler(3) - 1, 0, 0xf, 0));
    vm.code(|a| {
        a.nop()?;
        a.int3()
    });
    assert_eq!(run_delivering(&mut vm), vec![Exception::Breakpoint]);
    assert_ne!(vm.cpu.rflags & rflags::IF, 0);
    assert_eq!(stack(&vm, 1)[0], CODE + 2, "int3 is a trap");
}

#[test]
fn page_fault_sets_cr2_and_pushes_the_error_code() {
    let mut vm = kernel();
    vm.code(|a| a.mov(rax, qword_ptr(0x7777_0000u64)));
    assert!(matches!(
        run_delivering(&mut vm)[..],
        [Exception::PageFault { .. }]
    ));
    assert_eq!(vm.cpu.cr2, 0x7777_0000);
    assert_eq!(vm.cpu.rip, handler(14));
    let f = stack(&vm, 6);
    assert_eq!(f[0], 0, "error code: not present, read, supervisor");
    assert_eq!(f[1], CODE);
    assert_eq!(f[5], u64::from(KERNEL_DS));
}

#[test]
fn user_interrupt_switches_to_the_tss_stack() {
    let mut vm = kernel();
    set_gate(&vm, 0x80, gate64(KERNEL_CS, handler(0x70) - 1, 0, 0xf, 3));
    enter_user(&mut vm);
    user_code(&mut vm, |a| {
        a.mov(eax, 1)?;
        a.int(0x80)
    });
    assert_eq!(
        run_delivering(&mut vm),
        vec![Exception::SoftwareInterrupt(0x80)]
    );
    assert_eq!(vm.cpu.cpl(), 0);
    assert_eq!(vm.cpu.rip, handler(0x70));
    assert_eq!(vm.cpu.gpr[4], STACK_TOP - 40, "RSP0 from the TSS");
    let f = stack(&vm, 5);
    assert_eq!(f[0], USER + 7, "after int 0x80");
    assert_eq!(f[1], u64::from(USER_CS));
    assert_eq!(f[3], USER + 0xff8);
    assert_eq!(f[4], u64::from(USER_DS));
    assert_eq!(vm.cpu.seg[SegReg::Ss as usize].selector, 0, "null SS");
}

#[test]
fn int_through_a_kernel_only_gate_is_a_gp() {
    let mut vm = kernel();
    enter_user(&mut vm);
    user_code(&mut vm, |a| a.int(0x31));
    let seen = run_delivering(&mut vm);
    assert_eq!(seen, vec![Exception::SoftwareInterrupt(0x31)]);
    // The #GP is raised by the delivery and delivered in its place.
    assert_eq!(vm.cpu.rip, handler(13));
    let f = stack(&vm, 2);
    assert_eq!(f[0], (0x31 << 3) | 2, "error code names the IDT entry");
    assert_eq!(f[1], USER, "the #GP is a fault at the int instruction");
}

#[test]
fn external_interrupt_and_nmi_with_ist() {
    let mut vm = kernel();
    set_gate(&vm, 2, gate64(KERNEL_CS, handler(2) - 1, 1, 0xe, 0));
    enter_user(&mut vm);
    user_code(&mut vm, |a| {
        a.nop()?;
        a.nop()
    });
    vm.step().expect("nop");
    vm.interp
        .deliver(&mut vm.cpu, &mut vm.p, Event::Interrupt(0x41))
        .expect("interrupt");
    assert_eq!(vm.cpu.rip, handler(0x41) - 1);
    assert_eq!(vm.cpu.gpr[4], STACK_TOP - 40);
    assert_eq!(
        stack(&vm, 1)[0],
        USER + 1,
        "returns to the next instruction"
    );
    // An NMI on top, through IST1: the IST stack even without a privilege change.
    vm.interp
        .deliver(&mut vm.cpu, &mut vm.p, Event::Nmi)
        .expect("nmi");
    assert_eq!(vm.cpu.rip, handler(2) - 1);
    assert_eq!(vm.cpu.gpr[4], IST1_TOP - 40);
    assert_eq!(stack(&vm, 5)[3], STACK_TOP - 40, "old RSP");
}

#[test]
fn not_present_page_fault_gate_escalates_to_double_fault() {
    let mut vm = kernel();
    let (lo, hi) = gate64(KERNEL_CS, handler(14), 0, 0xe, 0);
    set_gate(&vm, 14, (lo & !(1 << 47), hi));
    vm.code(|a| a.mov(rax, qword_ptr(0x7777_0000u64)));
    run_delivering(&mut vm);
    assert_eq!(vm.cpu.rip, handler(8));
    assert_eq!(stack(&vm, 1)[0], 0, "#DF pushes error code 0");
    assert_eq!(vm.cpu.cr2, 0x7777_0000, "CR2 is set even though #PF failed");

    // Contributory during a contributory exception: #GP whose gate has a bad selector.
    let mut vm = kernel();
    set_gate(&vm, 13, gate64(0x78, handler(13), 0, 0xe, 0));
    vm.code(|a| a.mov(rax, qword_ptr(0x8000_0000_0000_0000u64)));
    run_delivering(&mut vm);
    assert_eq!(vm.cpu.rip, handler(8));

    // A benign exception whose delivery faults: the fault is delivered instead.
    let mut vm = kernel();
    set_gate(&vm, 6, gate64(0x78, handler(6), 0, 0xe, 0));
    vm.code(|a| a.ud2());
    run_delivering(&mut vm);
    assert_eq!(vm.cpu.rip, handler(13));
    assert_eq!(stack(&vm, 1)[0], 0x78 | 1, "the bad selector, EXT set");
}

#[test]
fn triple_fault() {
    let mut vm = kernel();
    for v in [8u8, 14] {
        let (lo, hi) = gate64(KERNEL_CS, handler(v), 0, 0xe, 0);
        set_gate(&vm, v, (lo & !(1 << 47), hi));
    }
    vm.code(|a| a.mov(rax, qword_ptr(0x7777_0000u64)));
    let e = match vm.run(10) {
        Err(Fault::Exception(e)) => e,
        other => panic!("{other:?}"),
    };
    let r = vm
        .interp
        .deliver(&mut vm.cpu, &mut vm.p, Event::Exception(e));
    assert_eq!(r, Err(Fault::TripleFault));
    assert_eq!(vm.cpu.rip, CODE, "the state is left at the first fault");
}

#[test]
fn iretq_to_cpl3_and_to_cpl0() {
    let mut vm = kernel();
    set_gate(&vm, 0x80, gate64(KERNEL_CS, CODE + 0x400, 0, 0xe, 3));
    // The handler adds 1 to rbx and returns.
    vm.code_at(CODE + 0x400, |a| {
        a.add(rbx, 1)?;
        a.iretq()
    });
    enter_user(&mut vm);
    user_code(&mut vm, |a| {
        a.int(0x80)?;
        a.int(0x80)?;
        a.mov(rcx, rsp)?;
        a.hlt()
    });
    vm.cpu.rflags |= rflags::IF;
    let e = run_delivering_until_gp(&mut vm);
    assert_eq!(e, Exception::GeneralProtection(0), "hlt at CPL 3");
    assert_eq!(vm.cpu.gpr[3], 2);
    assert_eq!(vm.cpu.cpl(), 3);
    assert_eq!(vm.cpu.seg[SegReg::Ss as usize].selector, USER_DS);
    assert_eq!(vm.cpu.gpr[1], USER + 0xff8, "user RSP restored");
    assert_ne!(vm.cpu.rflags & rflags::IF, 0, "RFLAGS restored");

    // Same-privilege iretq (Linux's sync_core does this).
    let mut vm = kernel();
    vm.code(|a| {
        let mut after = a.create_label();
        a.mov(eax, u32::from(KERNEL_DS))?;
        a.push(rax)?;
        a.push(rsp)?;
        a.add(qword_ptr(rsp), 8)?;
        a.pushfq()?;
        a.push(i32::from(KERNEL_CS))?;
        a.lea(rax, qword_ptr(after))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut after)?;
        a.mov(ebx, 7)?;
        a.hlt()
    });
    let old_rsp = vm.cpu.gpr[4];
    run_delivering(&mut vm);
    assert_eq!(vm.cpu.gpr[3], 7);
    assert_eq!(vm.cpu.gpr[4], old_rsp);
    assert_eq!(vm.cpu.cpl(), 0);
}

fn run_delivering_until_gp(vm: &mut Vm) -> Exception {
    for _ in 0..100 {
        match vm.run(10_000) {
            Err(Fault::Exception(e @ Exception::GeneralProtection(_))) => return e,
            Err(Fault::Exception(e)) => vm
                .interp
                .deliver(&mut vm.cpu, &mut vm.p, Event::Exception(e))
                .expect("delivery"),
            other => panic!("{other:?}"),
        }
    }
    panic!("no #GP");
}

#[test]
fn syscall_and_sysret_round_trip() {
    let mut vm = kernel();
    vm.cpu.msr.star = (u64::from(USER_CS32 - 3) << 48) | (u64::from(KERNEL_CS) << 32);
    vm.cpu.msr.lstar = CODE + 0x400;
    vm.cpu.msr.sfmask = rflags::IF | rflags::DF | rflags::TF;
    vm.code_at(CODE + 0x400, |a| {
        a.mov(rdx, rsp)?; // still the user stack
        a.add(rbx, 10)?;
        a.sysretq()
    });
    enter_user(&mut vm);
    user_code(&mut vm, |a| {
        a.std()?;
        a.syscall()?;
        a.int3()
    });
    vm.cpu.rflags |= rflags::IF;
    vm.step().expect("std");
    vm.step().expect("syscall");
    assert_eq!(vm.cpu.cpl(), 0);
    assert_eq!(vm.cpu.rip, CODE + 0x400);
    assert_eq!(vm.cpu.gpr[1], USER + 3, "RCX = return address");
    assert_ne!(vm.cpu.gpr[11] & rflags::IF, 0, "R11 = old RFLAGS");
    assert_eq!(
        vm.cpu.rflags & (rflags::IF | rflags::DF),
        0,
        "SFMASK applied"
    );
    assert_eq!(vm.cpu.seg[SegReg::Cs as usize].selector, KERNEL_CS);
    assert_eq!(vm.cpu.seg[SegReg::Ss as usize].selector, KERNEL_DS);
    assert!(vm.cpu.seg[SegReg::Cs as usize].long());
    vm.step().expect("mov");
    vm.step().expect("add");
    vm.step().expect("sysret");
    assert_eq!(vm.cpu.cpl(), 3);
    assert_eq!(vm.cpu.rip, USER + 3);
    assert_eq!(vm.cpu.seg[SegReg::Cs as usize].selector, USER_CS);
    assert_eq!(vm.cpu.seg[SegReg::Ss as usize].selector, USER_DS);
    assert_ne!(vm.cpu.rflags & (rflags::IF | rflags::DF), 0);
    assert_eq!(vm.cpu.gpr[3], 10);
    assert_eq!(vm.cpu.gpr[2], USER + 0xff8);

    // sysret to a non-canonical RCX faults in the kernel; syscall without EFER.SCE is #UD.
    vm.cpu.gpr[1] = 0x8000_0000_0000_0000;
    vm.cpu.seg = kernel().cpu.seg;
    let l1 = crate::insn_len(&vm, CODE + 0x400);
    let l2 = crate::insn_len(&vm, CODE + 0x400 + l1);
    vm.cpu.rip = CODE + 0x400 + l1 + l2;
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));
    vm.cpu.efer &= !x86::ctl::EFER_SCE;
    enter_user(&mut vm);
    vm.cpu.rip = USER + 1;
    assert_eq!(vm.exception(), Exception::InvalidOpcode);
}

/// 32-bit protected mode: 8-byte gates, a privilege change through the 32-bit TSS's
/// SS0:ESP0, and iretd back.
#[test]
fn protected_mode_delivery_with_privilege_change() {
    use crate::common::TestPlatform;
    use x86::{CodeCoherence, CpuState, Interpreter, Segment};
    let mut p = TestPlatform::new(1 << 20);
    let gdt: u64 = 0x1000;
    let idt: u64 = 0x2000;
    let tss: u64 = 0x3000;
    // 0x08 code32 DPL0, 0x10 data DPL0, 0x18 code32 DPL3, 0x20 data DPL3, 0x28 TSS32.
    let tss_desc = 0x67 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40);
    for (k, d) in [0, code32(0), data(0), code32(3), data(3), tss_desc]
        .iter()
        .enumerate()
    {
        p.write_u64(gdt + 8 * k as u64, *d);
    }
    // TSS: ESP0 = 0x9000, SS0 = 0x10.
    p.write(tss, &[0; 0x68]);
    p.write(tss + 4, &0x9000u32.to_le_bytes());
    p.write(tss + 8, &0x10u16.to_le_bytes());
    // Gate 0x30: 32-bit interrupt gate, DPL 3, to 0x8:0x5000.
    let gate = 0x5000u64 | (0x8 << 16) | (0xeeu64 << 40);
    p.write_u64(idt + 0x30 * 8, gate);
    let handler = {
        let mut a = CodeAssembler::new(32).expect("asm");
        a.mov(ebx, esp).expect("asm");
        a.iretd().expect("asm");
        a.assemble(0x5000).expect("asm")
    };
    p.write(0x5000, &handler);
    let user = {
        let mut a = CodeAssembler::new(32).expect("asm");
        a.int(0x30).expect("asm");
        a.mov(ecx, 5).expect("asm");
        a.assemble(0x6000).expect("asm")
    };
    p.write(0x6000, &user);
    let mut cpu = CpuState::protected_mode32(3);
    cpu.seg[SegReg::Cs as usize] = Segment::flat(0x1b, 0xb, 3, true, false);
    for s in [SegReg::Ss, SegReg::Ds, SegReg::Es] {
        cpu.seg[s as usize] = Segment::flat(0x23, 0x3, 3, true, false);
    }
    cpu.gdtr = x86::DescriptorTable {
        base: gdt,
        limit: 0x2f,
    };
    cpu.idtr = x86::DescriptorTable {
        base: idt,
        limit: 0x7ff,
    };
    cpu.tr = Segment {
        selector: 0x28,
        base: tss,
        limit: 0x67,
        attr: 0xb | Segment::ATTR_P,
    };
    cpu.rip = 0x6000;
    cpu.gpr[4] = 0x8000;
    cpu.rflags |= rflags::IF;
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    let e = match it.step(&mut cpu, &mut p) {
        Err(Fault::Exception(e)) => e,
        other => panic!("{other:?}"),
    };
    it.deliver(&mut cpu, &mut p, Event::Exception(e))
        .expect("deliver");
    assert_eq!(cpu.rip, 0x5000);
    assert_eq!(cpu.cpl(), 0);
    assert_eq!(cpu.gpr[4], 0x9000 - 20);
    let mut f = [0u8; 20];
    p.read(0x9000 - 20, &mut f);
    let w = |k: usize| u32::from_le_bytes(f[4 * k..4 * k + 4].try_into().unwrap());
    assert_eq!(w(0), 0x6002, "EIP after int");
    assert_eq!(w(1), 0x1b);
    assert_ne!(w(2) & rflags::IF as u32, 0);
    assert_eq!(w(3), 0x8000, "old ESP");
    assert_eq!(w(4), 0x23, "old SS");
    assert_eq!(cpu.rflags & rflags::IF, 0);
    it.step(&mut cpu, &mut p).expect("mov");
    it.step(&mut cpu, &mut p).expect("iretd");
    assert_eq!(cpu.cpl(), 3);
    assert_eq!(cpu.rip, 0x6002);
    assert_eq!(cpu.gpr[4], 0x8000);
    it.step(&mut cpu, &mut p).expect("mov");
    assert_eq!(cpu.gpr[1], 5);
}

/// Real mode: the IVT's far pointer, FLAGS/CS/IP pushed, IF cleared, iret back.
#[test]
fn real_mode_interrupt_and_iret() {
    use crate::common::TestPlatform;
    use x86::{CodeCoherence, CpuState, Interpreter};
    let mut p = TestPlatform::new(1 << 20);
    // IVT entry 0x10 -> 0x2000:0x0100.
    p.write(0x40, &[0x00, 0x01, 0x00, 0x20]);
    let handler = {
        let mut a = CodeAssembler::new(16).expect("asm");
        a.mov(bx, 0x1234).expect("asm");
        a.iret().expect("asm");
        a.assemble(0x100).expect("asm")
    };
    p.write(0x20100, &handler);
    let code = {
        let mut a = CodeAssembler::new(16).expect("asm");
        a.int(0x10).expect("asm");
        a.mov(cx, 1).expect("asm");
        a.assemble(0).expect("asm")
    };
    p.write(0x10000, &code);
    let mut cpu = CpuState::default();
    cpu.seg[SegReg::Cs as usize] = x86::Segment {
        selector: 0x1000,
        base: 0x10000,
        ..cpu.seg[SegReg::Cs as usize]
    };
    cpu.rip = 0;
    cpu.gpr[4] = 0x800;
    cpu.rflags |= rflags::IF;
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    let e = match it.step(&mut cpu, &mut p) {
        Err(Fault::Exception(e)) => e,
        other => panic!("{other:?}"),
    };
    it.deliver(&mut cpu, &mut p, Event::Exception(e))
        .expect("deliver");
    assert_eq!(cpu.seg[SegReg::Cs as usize].base, 0x20000);
    assert_eq!(cpu.rip, 0x100);
    assert_eq!(cpu.gpr[4], 0x800 - 6);
    let mut f = [0u8; 6];
    p.read(0x800 - 6, &mut f);
    assert_eq!(u16::from_le_bytes([f[0], f[1]]), 2, "IP after int 0x10");
    assert_eq!(u16::from_le_bytes([f[2], f[3]]), 0x1000);
    assert_ne!(u16::from_le_bytes([f[4], f[5]]) & 0x200, 0, "IF was set");
    assert_eq!(cpu.rflags & rflags::IF, 0);
    it.step(&mut cpu, &mut p).expect("mov");
    it.step(&mut cpu, &mut p).expect("iret");
    assert_eq!(cpu.rip, 2);
    assert_eq!(cpu.seg[SegReg::Cs as usize].base, 0x10000);
    assert_ne!(cpu.rflags & rflags::IF, 0);
    assert_eq!(cpu.gpr[3] & 0xffff, 0x1234);
}
