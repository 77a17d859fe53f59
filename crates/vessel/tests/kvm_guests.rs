//! Small guests assembled in the test, booted by the real `vessel` binary on the real
//! /dev/kvm. On hosts without VT-x/AMD-V KVM emulates every instruction, so the guests
//! stay short.

mod common;

use std::time::Duration;

use common::{Finished, boot_kvm, kvm_available};
use testguest::code_asm::*;
use testguest::snippets::{acpi_power_off, halt_forever, hex32_routine, i8042_reset, print};

const DEADLINE: Duration = Duration::from_secs(60);

fn boot64(build: impl FnOnce(&mut CodeAssembler), args: &[&str]) -> Finished {
    let code = testguest::assemble(64, testguest::BZIMAGE_ENTRY64, build);
    let (_t, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    boot_kvm(&kernel, args, DEADLINE)
}

#[test]
fn serial_output_arrives_and_keyboard_reset_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    let r = boot64(
        |a| {
            print(a, "hello from a 64-bit guest\n");
            i8042_reset(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains("hello from a 64-bit guest\n"),
        "{}",
        r.dump()
    );
    assert!(r.stderr.contains("vessel: guest reset"), "{}", r.dump());
}

#[test]
fn pvh_entry_starts_in_32bit_protected_mode_without_paging() {
    if !kvm_available() {
        return;
    }
    let code = testguest::assemble(32, testguest::PVH_ENTRY, |a| {
        let mut paging_off = a.create_label();
        // EBX points at hvm_start_info; its first word is the PVH magic.
        a.cmp(dword_ptr(ebx), 0x336e_c578u32).unwrap();
        a.jne(paging_off).unwrap(); // wrong magic: skip the "ok" line
        a.mov(eax, cr0).unwrap();
        a.test(eax, 0x8000_0000u32).unwrap();
        a.jnz(paging_off).unwrap();
        print(a, "pvh ok\n");
        a.set_label(&mut paging_off).unwrap();
        acpi_power_off(a);
    });
    let (_t, kernel) = testguest::temp_path(&testguest::pvh_elf(&code));
    let r = boot_kvm(&kernel, &[], DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("pvh ok"), "{}", r.dump());
    assert!(
        r.stderr.contains("vessel: guest powered off"),
        "{}",
        r.dump()
    );
}

#[test]
fn port_io_and_mmio_reach_the_right_device() {
    if !kvm_available() {
        return;
    }
    let r = boot64(
        |a| {
            let mut hex = a.create_label();
            let mut main = a.create_label();
            a.jmp(main).unwrap();
            hex32_routine(a, &mut hex);
            a.set_label(&mut main).unwrap();
            // PCI 00:00.0 vendor/device through configuration mechanism #1 (port I/O).
            print(a, "cf8=");
            a.mov(dx, 0xcf8u32).unwrap();
            a.mov(eax, 0x8000_0000u32).unwrap();
            a.out(dx, eax).unwrap();
            a.mov(dx, 0xcfcu32).unwrap();
            a.in_(eax, dx).unwrap();
            a.call(hex).unwrap();
            // The same register through ECAM (MMIO).
            print(a, " ecam=");
            a.mov(rbx, 0xe000_0000u64).unwrap();
            a.mov(eax, dword_ptr(rbx)).unwrap();
            a.call(hex).unwrap();
            // CMOS status register D through ports 0x70/0x71: "valid RAM and time".
            print(a, " cmos=");
            a.mov(al, 0x0du32).unwrap();
            a.out(0x70u32, al).unwrap();
            a.in_(al, 0x71u32).unwrap();
            a.movzx(eax, al).unwrap();
            a.call(hex).unwrap();
            // Nothing at this MMIO address: reads all-ones.
            print(a, " none=");
            a.mov(rbx, 0xd000_0000u64).unwrap();
            a.mov(eax, dword_ptr(rbx)).unwrap();
            a.call(hex).unwrap();
            print(a, "\n");
            i8042_reset(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout
            .contains("cf8=00081b36 ecam=00081b36 cmos=00000080 none=ffffffff"),
        "{}",
        r.dump()
    );
}

#[test]
fn acpi_s5_powers_off_and_the_reset_register_resets() {
    if !kvm_available() {
        return;
    }
    let r = boot64(acpi_power_off, &[]);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stderr.contains("vessel: guest powered off"),
        "{}",
        r.dump()
    );

    let r = boot64(
        |a| {
            a.mov(dx, 0xcf9u32).unwrap();
            a.mov(al, 0x06u32).unwrap();
            a.out(dx, al).unwrap();
            halt_forever(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stderr.contains("vessel: guest reset"), "{}", r.dump());
}

#[test]
fn triple_fault_reports_reason_rip_and_bytes() {
    if !kvm_available() {
        return;
    }
    let r = boot64(
        |a| {
            // No usable IDT: #UD cannot be delivered, then neither can #DF.
            a.ud2().unwrap();
        },
        &[],
    );
    assert_eq!(r.code, Some(1), "{}", r.dump());
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("triple fault"))
        .unwrap_or_else(|| panic!("{}", r.dump()));
    assert!(
        line.contains(&format!("RIP {:#x}", testguest::BZIMAGE_ENTRY64)),
        "{line}"
    );
    assert!(line.contains("bytes [0f 0b"), "{line}");
}

#[test]
fn boot_timer_port_logs_time_since_start() {
    if !kvm_available() {
        return;
    }
    let r = boot64(
        |a| {
            a.mov(dx, 0x440u32).unwrap();
            a.mov(al, 0x2au32).unwrap();
            a.out(dx, al).unwrap();
            i8042_reset(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("boot-timer:"))
        .unwrap_or_else(|| panic!("{}", r.dump()));
    let ms: f64 = line
        .split("boot-timer:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(ms > 0.0 && ms < r.elapsed.as_secs_f64() * 1000.0, "{line}");
    assert!(line.contains("0x2a"), "{line}");
}

#[test]
fn cmos_gives_the_real_date() {
    if !kvm_available() {
        return;
    }
    let today = || {
        let out = std::process::Command::new("date")
            .args(["-u", "+%y%m%d"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let before = today();
    let r = boot64(
        |a| {
            let mut hex = a.create_label();
            let mut main = a.create_label();
            a.jmp(main).unwrap();
            hex32_routine(a, &mut hex);
            a.set_label(&mut main).unwrap();
            // Year, month, day in BCD packed into one word: 0x00YYMMDD.
            a.xor(ebx, ebx).unwrap();
            for reg in [9u32, 8, 7] {
                a.mov(al, reg).unwrap();
                a.out(0x70u32, al).unwrap();
                a.in_(al, 0x71u32).unwrap();
                a.shl(ebx, 8u32).unwrap();
                a.mov(bl, al).unwrap();
            }
            print(a, "date=");
            a.mov(eax, ebx).unwrap();
            a.call(hex).unwrap();
            print(a, "\n");
            i8042_reset(a);
        },
        &[],
    );
    let after = today();
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains(&format!("date=00{before}"))
            || r.stdout.contains(&format!("date=00{after}")),
        "host says {before}: {}",
        r.dump()
    );
}

/// The application processors start in real mode at the SIPI vector, as Linux brings
/// them up: each prints the APIC ID its own CPUID reports.
#[test]
fn every_vcpu_reports_its_own_apic_id() {
    if !kvm_available() {
        return;
    }
    let (_t, kernel) =
        testguest::temp_path(&testguest::bzimage(&testguest::snippets::smp_guest(3)));
    let r = boot_kvm(&kernel, &["--cpus", "4"], DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let mut ids: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("apic "))
        .collect();
    ids.sort();
    assert_eq!(ids, ["0", "1", "2", "3"], "{}", r.dump());
    assert!(r.stdout.contains("all up"), "{}", r.dump());
}

/// Host input reaches the guest's UART: the guest polls the line status register and
/// echoes what it reads; Ctrl-A x on the console quits with exit code 0.
#[test]
fn console_input_reaches_the_guest_and_ctrl_a_x_quits() {
    if !kvm_available() {
        return;
    }
    let code = testguest::assemble(64, testguest::BZIMAGE_ENTRY64, |a| {
        let mut poll = a.create_label();
        print(a, "type:\n");
        a.set_label(&mut poll).unwrap();
        a.mov(dx, 0x3fdu32).unwrap(); // line status: bit 0 = data ready
        a.in_(al, dx).unwrap();
        a.test(al, 1u32).unwrap();
        a.jz(poll).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.in_(al, dx).unwrap();
        a.xor(al, 0x20u32).unwrap(); // echo with the case flipped
        a.out(dx, al).unwrap();
        a.jmp(poll).unwrap();
    });
    let (_t, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    let mut cmd = common::vessel();
    cmd.arg("run").arg("--kernel").arg(&kernel);
    let r = common::run_interactive(cmd, &[("type:", b"vessel"), ("VESSEL", b"\x01x")], DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("type:\nVESSEL"), "{}", r.dump());
    assert!(
        r.stderr.contains("vessel: quit from the console"),
        "{}",
        r.dump()
    );
}

/// `--rng` puts a virtio-rng function on the PCI bus (00:01.0, vendor 0x1af4, device
/// 0x1044), with its BAR in the 32-bit window.
#[test]
fn virtio_devices_appear_on_the_pci_bus() {
    if !kvm_available() {
        return;
    }
    let r = boot64(
        |a| {
            let mut hex = a.create_label();
            let mut main = a.create_label();
            a.jmp(main).unwrap();
            hex32_routine(a, &mut hex);
            a.set_label(&mut main).unwrap();
            a.mov(rbx, 0xe000_8000u64).unwrap(); // ECAM: bus 0, device 1, function 0
            print(a, "id=");
            a.mov(eax, dword_ptr(rbx)).unwrap();
            a.call(hex).unwrap();
            print(a, " bar0=");
            a.mov(eax, dword_ptr(rbx + 0x10)).unwrap();
            a.call(hex).unwrap();
            print(a, "\n");
            i8042_reset(a);
        },
        &["--rng"],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("id="))
        .unwrap_or_default();
    assert!(line.starts_with("id=10441af4 bar0="), "{}", r.dump());
    let bar0 = u32::from_str_radix(&line[17..25], 16).unwrap();
    assert!(
        (0xc000_0000..0xe000_0000).contains(&(bar0 & !0xf)),
        "{line}"
    );
}

/// A tiny virtio driver on KVM: the queue notify reaches the device through a KVM
/// ioeventfd, the completion comes back as an MSI-X interrupt into KVM's local APIC
/// (through an irqfd and the GSI route vessel adds for that message). Then COM1's
/// interrupt, through the IOAPIC: the legacy lines stay routed beside the MSI route.
#[test]
fn a_virtio_queue_works_on_kvm_with_ioeventfd_and_msix() {
    if !kvm_available() {
        return;
    }
    let r = boot64(
        |a| {
            testguest::snippets::virtio_rng_driver(a, 0x20_0000, 0x21_0000, 0x50);
            com1_interrupt_through_the_ioapic(a, 0x21_0000, 0x51, 0x20_0800);
            i8042_reset(a);
        },
        &["--rng"],
    );
    assert!(r.stdout.contains("com1 irq ok\n"), "{}", r.dump());
    let line = r.rng_driver_line();
    assert!(
        !line.ends_with(&format!("data={:016x}", 0)),
        "random bytes: {line}"
    );
}

/// Routes IOAPIC pin 4 (COM1) to `vector` on APIC 0 with the 8259s masked, enables the
/// UART's transmitter-empty interrupt, sends a byte, waits in HLT for the interrupt
/// (counted at `flag`) and prints `com1 irq ok`.
fn com1_interrupt_through_the_ioapic(a: &mut CodeAssembler, idt: u64, vector: u8, flag: u64) {
    let (mut handler, mut main) = (a.create_label(), a.create_label());
    let (mut wait, mut done) = (a.create_label(), a.create_label());
    a.jmp(main).unwrap();
    a.set_label(&mut handler).unwrap();
    a.push(rax).unwrap();
    a.push(rdx).unwrap();
    a.mov(rax, flag).unwrap();
    a.inc(qword_ptr(rax)).unwrap();
    a.mov(dx, 0x3fau32).unwrap(); // IIR: reading it acknowledges the UART
    a.in_(al, dx).unwrap();
    a.mov(rax, 0xfee0_00b0u64).unwrap(); // EOI
    a.mov(dword_ptr(rax), 0u32).unwrap();
    a.pop(rdx).unwrap();
    a.pop(rax).unwrap();
    a.iretq().unwrap();

    a.set_label(&mut main).unwrap();
    testguest::snippets::idt_gate(a, idt, vector, handler);
    a.mov(al, 0xffu32).unwrap();
    a.out(0x21u32, al).unwrap();
    a.out(0xa1u32, al).unwrap();
    a.mov(rax, 0xfec0_0000u64).unwrap(); // IOREGSEL / IOWIN
    a.mov(dword_ptr(rax), 0x18u32).unwrap(); // redirection entry 4, low: fixed, edge
    a.mov(dword_ptr(rax + 0x10), u32::from(vector)).unwrap();
    a.mov(dword_ptr(rax), 0x19u32).unwrap(); // high: APIC 0
    a.mov(dword_ptr(rax + 0x10), 0u32).unwrap();
    a.mov(rax, flag).unwrap();
    a.mov(qword_ptr(rax), 0i32).unwrap();
    a.mov(dx, 0x3fcu32).unwrap(); // MCR: OUT2 gates the IRQ line on a PC
    a.mov(al, 0x08u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(dx, 0x3f9u32).unwrap(); // IER: transmitter empty
    a.mov(al, 0x02u32).unwrap();
    a.out(dx, al).unwrap();
    print(a, "com1 irq ");
    a.set_label(&mut wait).unwrap();
    a.cli().unwrap();
    a.mov(rax, flag).unwrap();
    a.cmp(qword_ptr(rax), 0i32).unwrap();
    a.jne(done).unwrap();
    a.sti().unwrap(); // sti; hlt: no interrupt slips in between
    a.hlt().unwrap();
    a.jmp(wait).unwrap();
    a.set_label(&mut done).unwrap();
    a.mov(dx, 0x3f9u32).unwrap();
    a.mov(al, 0u32).unwrap();
    a.out(dx, al).unwrap();
    print(a, "ok\n");
}
