//! System instructions: cpuid, rdtsc(p), clac/stac, xgetbv/xsetbv, MSRs, control
//! registers, port I/O, hlt, software interrupts, swapgs and fs/gs bases.

use iced_x86::code_asm::*;
use x86::{Exception, Fault, Mnemonic, msr, rflags};

use crate::{CODE, DATA, USER, Vm};

#[test]
fn cpuid_goes_through_the_platform() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.cpuid());
    vm.cpu.gpr[0] = 0xffff_ffff_0000_0007;
    vm.cpu.gpr[1] = 0xdead_0000_0000_0000;
    let out = vm.step().expect("cpuid");
    assert_eq!(out.mnemonic, Mnemonic::Cpuid);
    // (The page walk asks too: the physical address width, for reserved bits.)
    assert_eq!(vm.p.cpuid_calls.last(), Some(&(7, 0)));
    assert_eq!(vm.p.cpuid_calls.iter().filter(|c| c.0 == 7).count(), 1);
    let model = x86::cpuid_lookup(&crate::common::model_cpuid(), 7, 0);
    assert_eq!(vm.cpu.gpr[0], u64::from(model[0]));
    assert_eq!(vm.cpu.gpr[3], u64::from(model[1]));
    assert_eq!(vm.cpu.gpr[1], u64::from(model[2]));
    assert_eq!(vm.cpu.gpr[2], u64::from(model[3]));
    assert_ne!(model[1], 0, "a leaf with something in it");
    assert_eq!(vm.cpu.rip, CODE + 2);
}

/// 64-bit code cannot clear CR0.PG (IA-32e mode is left from compatibility mode):
/// #GP(0), nothing changed. The interpreter once took it, turning paging and
/// protection off under 64-bit code (found by the `x86_decode` fuzz target).
#[test]
fn clearing_paging_in_64_bit_mode_faults() {
    let mut vm = Vm::long(0);
    vm.code(|a| a.mov(cr0, rax));
    for value in [0x10, x86::ctl::CR0_PE | 0x10] {
        vm.cpu.gpr[0] = value;
        let before = vm.cpu.clone();
        assert_eq!(
            vm.exception(),
            Exception::GeneralProtection(0),
            "cr0 <- {value:#x}"
        );
        assert_eq!(vm.cpu, before);
        assert_eq!(vm.cpu.mode(), x86::CpuMode::Long64);
    }
}

#[test]
fn rdtsc_and_rdtscp() {
    let mut vm = Vm::long(3);
    vm.code(|a| {
        a.rdtsc()?;
        a.rdtscp()
    });
    vm.cpu.gpr[0] = u64::MAX;
    vm.cpu.gpr[2] = u64::MAX;
    vm.cpu.msr.tsc_aux = 0x1_0000_0005;
    vm.step().expect("rdtsc");
    // The test platform's TSC starts at 0x1234_5678_9abc and advances 1000 per read.
    assert_eq!(vm.cpu.gpr[0], 0x5678_9ea4);
    assert_eq!(vm.cpu.gpr[2], 0x1234);
    vm.step().expect("rdtscp");
    assert_eq!(vm.cpu.gpr[0], 0x5678_a28c);
    assert_eq!(vm.cpu.gpr[1], 5, "ECX = TSC_AUX[31:0]");
}

#[test]
fn rdtsc_faults_at_cpl3_with_cr4_tsd() {
    let mut vm = Vm::long(3);
    vm.code(|a| a.rdtsc());
    vm.cpu.cr4 |= x86::ctl::CR4_TSD;
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));
    assert_eq!(vm.cpu.rip, CODE);
}

#[test]
fn clac_stac_toggle_ac_in_the_kernel_only() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.stac()?;
        a.clac()
    });
    vm.step().expect("stac");
    assert_ne!(vm.cpu.rflags & rflags::AC, 0);
    vm.step().expect("clac");
    assert_eq!(vm.cpu.rflags & rflags::AC, 0);

    let mut user = Vm::long(3);
    user.code(|a| a.clac());
    assert_eq!(user.exception(), Exception::InvalidOpcode);
}

#[test]
fn xgetbv_and_xsetbv() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.xgetbv()?;
        a.xsetbv()?;
        a.xgetbv()
    });
    vm.cpu.xcr0 = 3;
    vm.cpu.gpr[1] = 0;
    vm.step().expect("xgetbv");
    assert_eq!((vm.cpu.gpr[0], vm.cpu.gpr[2]), (3, 0));
    // Enable AVX (x87 | SSE | AVX), which the test CPU model offers.
    vm.cpu.gpr[0] = 7;
    vm.cpu.gpr[2] = 0;
    vm.step().expect("xsetbv");
    assert_eq!(vm.cpu.xcr0, 7);
    vm.cpu.gpr[1] = 2;
    assert_eq!(
        vm.exception(),
        Exception::GeneralProtection(0),
        "ECX=2 is not an XCR"
    );

    // x87 cannot be disabled.
    let mut vm = Vm::long(0);
    vm.code(|a| a.xsetbv());
    vm.cpu.gpr[0] = 2;
    vm.cpu.gpr[1] = 0;
    vm.cpu.gpr[2] = 0;
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));

    let mut vm = Vm::long(0);
    vm.code(|a| a.xgetbv());
    vm.cpu.cr4 &= !x86::ctl::CR4_OSXSAVE;
    assert_eq!(vm.exception(), Exception::InvalidOpcode);
}

#[test]
fn msrs_owned_by_the_state_and_by_the_platform() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.wrmsr()?;
        a.rdmsr()?;
        a.rdmsr()?;
        a.rdmsr()
    });
    vm.cpu.gpr[1] = u64::from(msr::LSTAR);
    vm.cpu.gpr[0] = 0x8765_4321;
    vm.cpu.gpr[2] = 0xffff_ffff;
    vm.step().expect("wrmsr lstar");
    assert_eq!(vm.cpu.msr.lstar, 0xffff_ffff_8765_4321);
    vm.cpu.gpr[0] = 0;
    vm.cpu.gpr[2] = 0;
    vm.step().expect("rdmsr lstar");
    assert_eq!((vm.cpu.gpr[0], vm.cpu.gpr[2]), (0x8765_4321, 0xffff_ffff));
    // An MSR the platform owns.
    vm.p.msrs.insert(0x1b, 0xfee0_0900);
    vm.cpu.gpr[1] = 0x1b;
    vm.step().expect("rdmsr apic base");
    assert_eq!((vm.cpu.gpr[0], vm.cpu.gpr[2]), (0xfee0_0900, 0));
    // One nobody owns.
    vm.cpu.gpr[1] = 0x1234;
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));
}

#[test]
fn wrmsr_rejects_non_canonical_bases_and_user_mode() {
    let mut vm = Vm::long(0);
    vm.code(|a| a.wrmsr());
    vm.cpu.gpr[1] = u64::from(msr::FS_BASE);
    vm.cpu.gpr[0] = 0;
    vm.cpu.gpr[2] = 0x0000_8000;
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));

    let mut vm = Vm::long(3);
    vm.code(|a| a.rdmsr());
    vm.cpu.gpr[1] = u64::from(msr::LSTAR);
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));
}

#[test]
fn fs_base_applies_to_fs_overrides() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.wrmsr()?;
        a.mov(rax, qword_ptr(0x10).fs())
    });
    vm.p.write_u64(DATA + 0x10, 0x1122_3344_5566_7788);
    vm.cpu.gpr[1] = u64::from(msr::FS_BASE);
    vm.cpu.gpr[0] = DATA;
    vm.cpu.gpr[2] = 0;
    vm.step().expect("wrmsr fs base");
    vm.step().expect("mov from fs:");
    assert_eq!(vm.cpu.gpr[0], 0x1122_3344_5566_7788);
}

#[test]
fn swapgs_exchanges_gs_base() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.swapgs()?;
        a.mov(rbx, qword_ptr(8).gs())
    });
    vm.cpu.msr.kernel_gs_base = DATA;
    vm.cpu.seg[x86::SegReg::Gs as usize].base = 0x1234;
    vm.p.write_u64(DATA + 8, 42);
    vm.step().expect("swapgs");
    assert_eq!(vm.cpu.seg[x86::SegReg::Gs as usize].base, DATA);
    assert_eq!(vm.cpu.msr.kernel_gs_base, 0x1234);
    vm.step().expect("mov from gs:");
    assert_eq!(vm.cpu.gpr[3], 42);
}

#[test]
fn wrfsbase_needs_cr4_fsgsbase() {
    let mut vm = Vm::long(3);
    vm.code(|a| {
        a.wrfsbase(rax)?;
        a.rdgsbase(ecx)
    });
    vm.cpu.gpr[0] = USER;
    assert_eq!(vm.exception(), Exception::InvalidOpcode);
    vm.cpu.cr4 |= x86::ctl::CR4_FSGSBASE;
    vm.step().expect("wrfsbase");
    assert_eq!(vm.cpu.seg[x86::SegReg::Fs as usize].base, USER);
    vm.cpu.seg[x86::SegReg::Gs as usize].base = 0xffff_8000_0000_1234;
    vm.cpu.gpr[1] = u64::MAX;
    vm.step().expect("rdgsbase ecx");
    assert_eq!(
        vm.cpu.gpr[1], 0x1234,
        "32-bit form zero-extends the low half"
    );
}

#[test]
fn control_registers() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.mov(rax, cr3)?;
        a.mov(cr3, rbx)?;
        a.mov(cr4, rcx)
    });
    let old_cr3 = vm.cpu.cr3;
    vm.step().expect("mov rax, cr3");
    assert_eq!(vm.cpu.gpr[0], old_cr3);
    vm.cpu.gpr[3] = old_cr3 | (1 << 63);
    vm.step().expect("mov cr3, rbx");
    assert_eq!(vm.cpu.cr3, old_cr3, "bit 63 (no-flush) is not stored");
    // Clearing PAE in long mode is refused.
    vm.cpu.gpr[1] = vm.cpu.cr4 & !x86::ctl::CR4_PAE;
    assert_eq!(vm.exception(), Exception::GeneralProtection(0));

    let mut user = Vm::long(3);
    user.code(|a| a.mov(rax, cr0));
    assert_eq!(user.exception(), Exception::GeneralProtection(0));
}

#[test]
fn port_io_goes_to_the_platform() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.out(0x80, al)?;
        a.in_(eax, dx)?;
        a.out(dx, ax)
    });
    vm.cpu.gpr[0] = 0xffff_ffff_ffff_ff5a;
    vm.cpu.gpr[2] = 0x3f8;
    vm.step().expect("out imm8, al");
    vm.step().expect("in eax, dx");
    // The test platform answers port p with bytes p, p+1, ... (low byte of the port).
    assert_eq!(vm.cpu.gpr[0], 0xfbfa_f9f8);
    vm.step().expect("out dx, ax");
    assert_eq!(
        vm.p.io_out,
        vec![(0x80, vec![0x5a]), (0x3f8, vec![0xf8, 0xf9])]
    );
    assert_eq!(vm.p.io_in, vec![(0x3f8, 4)]);

    let mut user = Vm::long(3);
    user.code(|a| a.in_(al, dx));
    assert_eq!(
        user.exception(),
        Exception::GeneralProtection(0),
        "IOPL 0 < CPL 3"
    );
}

/// A user-mode kernel-style TSS whose I/O permission bitmap (at offset 0x68, 32 bytes
/// covering ports 0-0xff) denies everything but port 0x80; `limit` is the TSS limit.
fn user_with_io_bitmap(limit: u32) -> Vm {
    use crate::events::{TSS, enter_user, kernel};
    let mut vm = kernel();
    vm.p.write(TSS + 0x66, &0x68u16.to_le_bytes());
    let mut bitmap = [0xffu8; 33];
    bitmap[0x80 / 8] &= !1;
    vm.p.write(TSS + 0x68, &bitmap);
    vm.cpu.tr.limit = limit;
    enter_user(&mut vm);
    vm
}

#[test]
fn user_port_io_follows_the_tss_io_bitmap() {
    let mut vm = user_with_io_bitmap(0x88);
    crate::events::user_code(&mut vm, |a| {
        a.out(0x80, al)?;
        a.out(0x81, al)?;
        a.out(dx, ax)
    });
    vm.step().expect("port 0x80 is allowed by the bitmap");
    assert_eq!(vm.p.io_out.len(), 1);
    assert_eq!(
        vm.exception(),
        Exception::GeneralProtection(0),
        "0x81 denied"
    );

    // A 2-byte access needs both ports' bits clear: 0x7f is denied.
    let mut vm = user_with_io_bitmap(0x88);
    vm.cpu.gpr[2] = 0x7f;
    crate::events::user_code(&mut vm, |a| a.out(dx, ax));
    assert_eq!(vm.exception(), Exception::GeneralProtection(0), "0x7f-0x80");

    // The bitmap bytes for a port must lie inside the TSS limit.
    let mut vm = user_with_io_bitmap(0x70);
    crate::events::user_code(&mut vm, |a| a.out(0x80, al));
    assert_eq!(
        vm.exception(),
        Exception::GeneralProtection(0),
        "beyond limit"
    );
    assert!(vm.p.io_out.is_empty());
}

#[test]
fn hlt_stops_in_the_kernel_and_faults_in_user_mode() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.nop()?;
        a.hlt()?;
        a.nop()
    });
    let out = vm.run(100).expect("run to hlt");
    assert_eq!(out.exit, x86::RunExit::Halt);
    assert_eq!(out.executed, 2);
    assert_eq!(vm.cpu.rip, CODE + 2, "RIP after hlt");

    let mut user = Vm::long(3);
    user.code(|a| a.hlt());
    assert_eq!(user.exception(), Exception::GeneralProtection(0));
}

#[test]
fn software_interrupts_are_traps() {
    let mut vm = Vm::long(3);
    vm.code(|a| {
        a.int3()?;
        a.int(0x80)?;
        a.ud2()
    });
    assert_eq!(vm.exception(), Exception::Breakpoint);
    assert_eq!(vm.cpu.rip, CODE + 1, "int3 reports the next instruction");
    assert_eq!(vm.exception(), Exception::SoftwareInterrupt(0x80));
    assert_eq!(vm.cpu.rip, CODE + 3);
    assert_eq!(vm.exception(), Exception::InvalidOpcode);
    assert_eq!(vm.cpu.rip, CODE + 3, "#UD is a fault: RIP stays");
    assert_eq!(Exception::SoftwareInterrupt(0x80).vector(), 0x80);
    assert_eq!(
        Exception::PageFault {
            address: 1,
            error_code: 6
        }
        .error_code(),
        Some(6)
    );
    assert_eq!(Exception::Breakpoint.error_code(), None);
}

#[test]
fn unsupported_instructions_report_bytes_and_change_nothing() {
    let mut vm = Vm::long(3);
    // vaddps ymm0, ymm1, ymm2 (AVX is not implemented).
    vm.bytes(&[0xc5, 0xf4, 0x58, 0xc2]);
    let before = vm.cpu.clone();
    match vm.step() {
        Err(Fault::Unsupported(u)) => {
            assert_eq!(u.rip, CODE);
            assert_eq!(u.bytes(), &[0xc5, 0xf4, 0x58, 0xc2]);
            assert_eq!(u.mnemonic, Mnemonic::Vaddps);
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert_eq!(vm.cpu, before);
}

/// rdrand/rdseed: a value from the host's getrandom with CF set and the other
/// arithmetic flags clear; two draws differ (a 2^-64 chance of a false failure).
#[test]
fn rdrand_and_rdseed_give_host_randomness() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.rdrand(rax)?;
        a.rdseed(rbx)?;
        a.rdrand(cx)
    });
    vm.cpu.rflags |= rflags::ZF | rflags::OF | rflags::SF;
    vm.cpu.gpr[1] = 0xdead_beef_dead_beef;
    for _ in 0..3 {
        vm.step().expect("random");
        assert_eq!(vm.cpu.rflags & 0x8d5, rflags::CF, "CF only");
    }
    assert_ne!(vm.cpu.gpr[0], vm.cpu.gpr[3], "two 64-bit draws");
    assert_eq!(
        vm.cpu.gpr[1] >> 16,
        0xdead_beef_dead,
        "a 16-bit draw keeps the rest"
    );
}
