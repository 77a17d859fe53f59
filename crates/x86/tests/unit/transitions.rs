//! Mode switches (an AP trampoline like Linux's: real -> protected -> long), far
//! transfers, ltr/lldt/str/sldt, lar/lsl, debug registers, the interrupt shadow and the
//! run exits the vCPU loop relies on.

use iced_x86::code_asm::*;
use x86::{
    CodeCoherence, CpuMode, CpuState, Exception, Interpreter, RunExit, RunLimits, SegReg, ctl,
    rflags,
};

use crate::common::{PTE_W, PageTables, TestPlatform};
use crate::events::{GDT, KERNEL_CS, KERNEL_DS, LDT_SEL, TSS, TSS_SEL, USER_DS, kernel};
use crate::{CODE, Vm};

fn asm(bits: u32, at: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).expect("asm");
    f(&mut a).expect("assemble");
    a.assemble(at).expect("assemble")
}

/// What Linux's trampoline_64 does on an AP: from real mode at the SIPI vector, lgdtl/lidtl,
/// CR0.PE via lmsw, ljmpl to 32-bit code, CR4.PAE/PGE, CR3, EFER.LME through wrmsr,
/// CR0.PG, ljmp to a 64-bit segment, then lretq to reload CS as startup_64 does.
#[test]
fn ap_trampoline_real_to_long_mode() {
    let mut p = TestPlatform::new(1 << 20);
    let base = 0x9000u64;
    let mut pt = PageTables::new(&p, 0x20000);
    pt.identity(&p, base, 0x1000, PTE_W);
    // GDT at base + 0x400: null, 0x08 code32, 0x10 data, 0x18 code64.
    let gdt = base + 0x400;
    for (k, d) in [
        0u64,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_9a00_0000_ffff,
    ]
    .iter()
    .enumerate()
    {
        p.write_u64(gdt + 8 * k as u64, *d);
    }
    // Pseudo-descriptors (DS-relative 0x300 and 0x308).
    p.write(base + 0x300, &0x1fu16.to_le_bytes());
    p.write(base + 0x302, &(gdt as u32).to_le_bytes());
    p.write(base + 0x308, &[0; 6]);
    let start32 = base + 0x100;
    let start64 = base + 0x200;
    let mut code16 = asm(16, 0, |a| {
        a.cli()?;
        a.mov(ax, cs)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, 0x800)?;
        // lgdtl [0x300]; lidtl [0x308]
        a.db(&[0x66, 0x0f, 0x01, 0x16, 0x00, 0x03])?;
        a.db(&[0x66, 0x0f, 0x01, 0x1e, 0x08, 0x03])?;
        a.mov(ax, 1)?;
        a.lmsw(ax)
    });
    // ljmpl $0x08, $start32
    code16.extend([0x66, 0xea]);
    code16.extend((start32 as u32).to_le_bytes());
    code16.extend(8u16.to_le_bytes());
    p.write(base, &code16);
    let pml4 = pt.pml4 as u32;
    let mut code32 = asm(32, start32, |a| {
        a.mov(eax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, (base + 0x800) as u32)?;
        a.mov(eax, cr4)?;
        a.or(eax, (ctl::CR4_PAE | ctl::CR4_PGE) as i32)?;
        a.mov(cr4, eax)?;
        a.mov(eax, pml4)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, (ctl::EFER_LME | ctl::EFER_NXE) as i32)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)
    });
    // ljmp $0x18, $start64
    code32.push(0xea);
    code32.extend((start64 as u32).to_le_bytes());
    code32.extend(0x18u16.to_le_bytes());
    p.write(start32, &code32);
    let code64 = asm(64, start64, |a| {
        let mut next = a.create_label();
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.push(0x18)?;
        a.lea(rcx, qword_ptr(next))?;
        a.push(rcx)?;
        a.db(&[0x48, 0xcb])?; // lretq
        a.set_label(&mut next)?;
        a.mov(ebx, 42)?;
        a.hlt()
    });
    p.write(start64, &code64);

    let mut cpu = CpuState::startup_ipi((base >> 12) as u8);
    assert_eq!(cpu.mode(), CpuMode::Real);
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    let out = it.run(&mut cpu, &mut p, 1000).expect("trampoline");
    assert_eq!(out.exit, RunExit::Halt);
    assert_eq!(cpu.mode(), CpuMode::Long64);
    assert_eq!(cpu.gpr[0], 0x1122_3344_5566_7788);
    assert_eq!(cpu.gpr[3], 42);
    assert_ne!(cpu.efer & ctl::EFER_LMA, 0);
    assert_eq!(cpu.seg[SegReg::Cs as usize].selector, 0x18);
    assert_eq!(cpu.seg[SegReg::Ss as usize].selector, 0x10);
    assert_eq!(cpu.gpr[4], base + 0x800);
    assert_eq!(cpu.gdtr.base, gdt);
    // The code descriptors were marked accessed.
    assert_ne!(p.read_u64(gdt + 8) & (1 << 40), 0);
}

#[test]
fn ltr_lldt_str_sldt() {
    let mut vm = kernel();
    // An LDT descriptor (type 2) at LDT_SEL, 16 bytes in long mode.
    let (lo, hi) = crate::events::system64(0x1234_5678_9000, 0xfff, 2);
    vm.p.write_u64(GDT + u64::from(LDT_SEL), lo);
    vm.p.write_u64(GDT + u64::from(LDT_SEL) + 8, hi);
    vm.cpu.gdtr.limit = 0x5f;
    vm.cpu.tr = x86::Segment::default();
    vm.code(|a| {
        a.mov(ax, TSS_SEL as u32)?;
        a.ltr(ax)?;
        a.str(bx)?;
        a.mov(ax, LDT_SEL as u32)?;
        a.lldt(ax)?;
        a.sldt(ecx)?;
        a.mov(ax, TSS_SEL as u32)?;
        a.ltr(ax)
    });
    for _ in 0..6 {
        vm.step().expect("step");
    }
    assert_eq!(vm.cpu.tr.selector, TSS_SEL);
    assert_eq!(vm.cpu.tr.base, TSS);
    assert_eq!(vm.cpu.tr.limit, 0x67);
    assert_eq!(vm.cpu.tr.type_(), 0xb, "busy 64-bit TSS");
    assert_eq!(
        (vm.p.read_u64(GDT + u64::from(TSS_SEL)) >> 40) & 0xff,
        0x8b,
        "marked busy in the GDT"
    );
    assert_eq!(vm.cpu.gpr[3] & 0xffff, u64::from(TSS_SEL));
    assert_eq!(vm.cpu.ldtr.base, 0x1234_5678_9000);
    assert_eq!(vm.cpu.ldtr.limit, 0xfff);
    assert_eq!(vm.cpu.gpr[1], u64::from(LDT_SEL), "sldt r32 zero-extends");
    vm.step().expect("mov");
    assert_eq!(
        vm.exception(),
        Exception::GeneralProtection(TSS_SEL),
        "a busy TSS cannot be loaded"
    );

    let mut user = kernel();
    crate::events::enter_user(&mut user);
    user.code_at(crate::USER, |a| a.ltr(ax));
    assert_eq!(user.exception(), Exception::GeneralProtection(0));
}

#[test]
fn lar_lsl_verr_verw() {
    let mut vm = kernel();
    crate::events::enter_user(&mut vm);
    vm.code_at(crate::USER, |a| {
        a.mov(eax, u32::from(USER_DS))?;
        a.lsl(ebx, eax)?;
        a.lar(ecx, eax)?;
        a.verw(ax)?;
        a.mov(eax, u32::from(KERNEL_CS))?;
        a.lar(edx, eax)
    });
    for _ in 0..4 {
        vm.step().expect("step");
    }
    assert_eq!(vm.cpu.gpr[3], 0xffff_ffff);
    assert_eq!(vm.cpu.gpr[1], 0x00cf_f200, "access rights");
    assert_ne!(
        vm.cpu.rflags & rflags::ZF,
        0,
        "USER_DS is writable at CPL 3"
    );
    vm.cpu.gpr[2] = 77;
    vm.step().expect("mov");
    vm.step().expect("lar");
    assert_eq!(
        vm.cpu.rflags & rflags::ZF,
        0,
        "KERNEL_CS is not visible at CPL 3"
    );
    assert_eq!(vm.cpu.gpr[2], 77);
    let _ = KERNEL_DS;
}

#[test]
fn debug_registers() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.mov(rax, 0x1000u64)?;
        a.mov(dr0, rax)?;
        a.mov(rbx, dr6)?;
        a.mov(eax, 0x401)?;
        a.mov(dr7, rax)?;
        a.mov(rcx, dr7)?;
        a.mov(rdx, dr0)
    });
    for _ in 0..7 {
        vm.step().expect("step");
    }
    assert_eq!(vm.cpu.dr[0], 0x1000);
    assert_eq!(vm.cpu.gpr[3], 0xffff_0ff0, "DR6 reset value");
    assert_eq!(vm.cpu.gpr[1], 0x401);
    assert_eq!(vm.cpu.gpr[2], 0x1000);
    let mut user = Vm::long(3);
    user.code(|a| a.mov(rax, dr7));
    assert_eq!(user.exception(), Exception::GeneralProtection(0));
}

#[test]
fn sti_and_mov_ss_shadow_one_instruction() {
    let mut vm = kernel();
    vm.cpu.rflags &= !rflags::IF;
    vm.code(|a| {
        a.sti()?;
        a.nop()?;
        a.mov(ax, ss)?;
        a.mov(ss, ax)?;
        a.nop()?;
        a.sti()?; // IF already set: no shadow
        a.nop()
    });
    vm.step().expect("sti");
    assert!(vm.cpu.interrupt_shadow);
    assert_ne!(vm.cpu.rflags & rflags::IF, 0);
    vm.step().expect("nop");
    assert!(!vm.cpu.interrupt_shadow);
    vm.step().expect("mov ax, ss");
    vm.step().expect("mov ss, ax");
    assert!(vm.cpu.interrupt_shadow);
    vm.step().expect("nop");
    assert!(!vm.cpu.interrupt_shadow);
    vm.step().expect("sti");
    assert!(!vm.cpu.interrupt_shadow);
}

#[test]
fn interrupt_window_exit() {
    let mut vm = Vm::long(0);
    vm.cpu.rflags &= !rflags::IF;
    vm.code(|a| {
        a.nop()?;
        a.nop()?;
        a.sti()?;
        a.nop()?; // in the shadow
        a.nop()?;
        a.hlt()
    });
    let limits = RunLimits {
        budget: 1000,
        stop_when_interruptible: true,
    };
    let out = vm
        .interp
        .run_with(&mut vm.cpu, &mut vm.p, limits)
        .expect("run");
    assert_eq!(out.exit, RunExit::InterruptWindow);
    assert_eq!(out.executed, 4, "nop, nop, sti and the one shadowed nop");
    assert_eq!(vm.cpu.rip, CODE + 4);
    assert!(!vm.cpu.interrupt_shadow);
    // Interruptible on entry: nothing runs.
    let out = vm
        .interp
        .run_with(&mut vm.cpu, &mut vm.p, limits)
        .expect("run");
    assert_eq!((out.exit, out.executed), (RunExit::InterruptWindow, 0));

    // sti; hlt stays atomic: the halt is reached with interrupts enabled.
    let mut vm = Vm::long(0);
    vm.cpu.rflags &= !rflags::IF;
    vm.code(|a| {
        a.sti()?;
        a.hlt()
    });
    let out = vm
        .interp
        .run_with(&mut vm.cpu, &mut vm.p, limits)
        .expect("run");
    assert_eq!((out.exit, out.executed), (RunExit::Halt, 2));
    assert_ne!(vm.cpu.rflags & rflags::IF, 0);

    // popf and iretq that set IF end their block: the window opens right after them.
    let mut vm = Vm::long(0);
    vm.cpu.rflags &= !rflags::IF;
    vm.code(|a| {
        a.push(0x202)?;
        a.popfq()?;
        a.nop()?;
        a.hlt()
    });
    let out = vm
        .interp
        .run_with(&mut vm.cpu, &mut vm.p, limits)
        .expect("run");
    assert_eq!((out.exit, out.executed), (RunExit::InterruptWindow, 2));
}

#[test]
fn attention_stops_between_blocks() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.jmp(top)
    });
    vm.p.attention = true;
    let out = vm.run(1_000_000).expect("run");
    assert_eq!(out.exit, RunExit::Attention);
    assert_eq!(out.executed, 2, "one block runs first");
    vm.p.attention = false;
    let out = vm.run(1000).expect("run");
    assert_eq!((out.exit, out.executed), (RunExit::Budget, 1000));
    let asked = vm.p.attention_asked.get();
    assert!(
        (4..=6).contains(&asked),
        "asked every 256 instructions, not {asked} times"
    );
}

/// A spin loop (PAUSE then a branch back) ends the run after 256 PAUSEs, as
/// pause-loop exiting does in hardware, with RIP after the last; a loop without PAUSE
/// runs its whole budget.
#[test]
fn a_pause_loop_ends_the_run() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.pause()?;
        a.jmp(top)
    });
    let out = vm.run(1_000_000).expect("run");
    assert_eq!((out.exit, out.executed), (RunExit::PauseLoop, 3 * 256 - 1));
    assert_eq!(vm.cpu.gpr[0], 256);
    let again = vm.run(1_000_000).expect("run");
    assert_eq!((again.exit, again.executed), (RunExit::PauseLoop, 3 * 256));
    assert_eq!(vm.interp.stats().pause_loops, 2);

    let mut vm = Vm::long(0);
    vm.code(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.nop()?;
        a.jmp(top)
    });
    let out = vm.run(30_000).expect("run");
    assert_eq!((out.exit, out.executed), (RunExit::Budget, 30_000));
}

#[test]
fn far_jump_and_call_in_protected_mode() {
    let mut p = TestPlatform::new(1 << 20);
    let gdt = 0x1000u64;
    for (k, d) in [
        0u64,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x008f_9a00_0000_ffff,
    ]
    .iter()
    .enumerate()
    {
        p.write_u64(gdt + 8 * k as u64, *d);
    }
    let mut code = asm(32, 0x2000, |a| {
        a.mov(eax, 1)?;
        Ok(())
    });
    // call far 0x08:0x3000 (9a ptr16:32), then jmp far [m16:32] (ff /5) via 0x2800.
    code.push(0x9a);
    code.extend(0x3000u32.to_le_bytes());
    code.extend(0x08u16.to_le_bytes());
    code.extend([0xff, 0x2d]);
    code.extend(0x2800u32.to_le_bytes());
    p.write(0x2000, &code);
    p.write(0x2800, &0x4000u32.to_le_bytes());
    p.write(0x2804, &0x18u16.to_le_bytes()); // a 16-bit code segment
    p.write(
        0x3000,
        &asm(32, 0x3000, |a| {
            a.mov(ebx, 2)?;
            a.retf()
        }),
    );
    p.write(
        0x4000,
        &asm(16, 0x4000, |a| {
            a.mov(cx, 3)?;
            a.hlt()
        }),
    );
    let mut cpu = CpuState::protected_mode32(0);
    cpu.seg[SegReg::Cs as usize] = x86::Segment::flat(0x08, 0xb, 0, true, false);
    cpu.gdtr = x86::DescriptorTable {
        base: gdt,
        limit: 0x1f,
    };
    cpu.rip = 0x2000;
    cpu.gpr[4] = 0x9000;
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    let out = it.run(&mut cpu, &mut p, 100).expect("run");
    assert_eq!(out.exit, RunExit::Halt);
    assert_eq!(cpu.gpr[3], 2);
    assert_eq!(cpu.gpr[1] & 0xffff, 3);
    assert_eq!(cpu.mode(), CpuMode::Protected16);
    assert_eq!(cpu.seg[SegReg::Cs as usize].selector, 0x18);
    assert_eq!(cpu.gpr[4], 0x9000, "retf popped CS:EIP");
    let _ = KERNEL_CS;
}
