//! The software CPU (`--accel emu`) on small assembled guests: interrupt and
//! exception delivery through the guest's IDT, the local APIC timer waking HLT, page
//! faults with CR2 and error codes, and application processors started by INIT/SIPI.
//! No /dev/kvm needed.

mod common;

use std::time::Duration;

use common::{Finished, boot};
use testguest::code_asm::*;
use testguest::snippets::{self, hex64_routine, i8042_reset, idt_gate, print};

const DEADLINE: Duration = Duration::from_secs(60);
/// Where the guests keep their IDT and data (identity-mapped RAM).
const IDT: u64 = 0x30_0000;
const DATA: u64 = 0x31_0000;

fn emu(build: impl FnOnce(&mut CodeAssembler), args: &[&str]) -> Finished {
    let code = testguest::assemble(64, testguest::BZIMAGE_ENTRY64, build);
    let (_t, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    let mut all = vec!["--accel", "emu", "--memory", "64M"];
    all.extend_from_slice(args);
    boot(&kernel, &all, DEADLINE)
}

fn set_gate(a: &mut CodeAssembler, vector: u8, handler: CodeLabel) {
    idt_gate(a, IDT, vector, handler);
}

fn load_idt(a: &mut CodeAssembler) {
    snippets::load_idt(a, IDT, DATA + 0xf00);
}

#[test]
fn the_apic_timer_wakes_hlt_through_the_idt() {
    let r = emu(
        |a| {
            let mut hex = a.create_label();
            let mut main = a.create_label();
            let mut timer = a.create_label();
            let mut wait = a.create_label();
            a.jmp(main).unwrap();
            hex64_routine(a, &mut hex);
            // The timer handler: count, EOI, return.
            a.set_label(&mut timer).unwrap();
            a.push(rax).unwrap();
            a.mov(rax, DATA).unwrap();
            a.inc(qword_ptr(rax)).unwrap();
            a.mov(rax, 0xfee0_00b0u64).unwrap(); // EOI
            a.mov(dword_ptr(rax), 0u32).unwrap();
            a.pop(rax).unwrap();
            a.iretq().unwrap();

            a.set_label(&mut main).unwrap();
            set_gate(a, 0x40, timer);
            load_idt(a);
            a.mov(rbx, 0xfee0_0000u64).unwrap();
            a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap(); // SVR: enable
            a.mov(dword_ptr(rbx + 0x3e0), 0xbu32).unwrap(); // divide by 1
            a.mov(dword_ptr(rbx + 0x320), 0x2_0040u32).unwrap(); // periodic, vector 0x40
            a.mov(dword_ptr(rbx + 0x380), 1_000_000u32).unwrap(); // 1 ms at 1 GHz
            a.sti().unwrap();
            // Sleep until five ticks have come in.
            a.set_label(&mut wait).unwrap();
            a.hlt().unwrap();
            a.mov(rax, DATA).unwrap();
            a.cmp(qword_ptr(rax), 5i32).unwrap();
            a.jb(wait).unwrap();
            a.cli().unwrap();
            print(a, "ticks=");
            a.mov(rax, DATA).unwrap();
            a.mov(rax, qword_ptr(rax)).unwrap();
            a.call(hex).unwrap();
            print(a, "\n");
            i8042_reset(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains(&format!("ticks={:016x}", 5)),
        "{}",
        r.dump()
    );
    // Five 1 ms periods: the guest slept through them rather than spinning for ever.
    assert!(r.elapsed < Duration::from_secs(30), "{}", r.dump());
}

#[test]
fn a_page_fault_reaches_its_handler_with_cr2_and_error_code() {
    let r = emu(
        |a| {
            let mut hex = a.create_label();
            let mut main = a.create_label();
            let mut pf = a.create_label();
            a.jmp(main).unwrap();
            hex64_routine(a, &mut hex);
            a.set_label(&mut pf).unwrap();
            print(a, "pf cr2=");
            a.mov(rax, cr2).unwrap();
            a.call(hex).unwrap();
            print(a, " code=");
            a.mov(rax, qword_ptr(rsp)).unwrap();
            a.call(hex).unwrap();
            print(a, "\n");
            i8042_reset(a);

            a.set_label(&mut main).unwrap();
            set_gate(a, 14, pf);
            load_idt(a);
            // A write above the 4 GiB vessel identity-maps: not present.
            a.mov(rax, 0x1_2345_6788u64).unwrap();
            a.mov(qword_ptr(rax), 1i32).unwrap();
            print(a, "no fault\n");
            i8042_reset(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    // Error code 2: a write to a not-present page in supervisor mode.
    assert!(
        r.stdout
            .contains(&format!("pf cr2={:016x} code={:016x}", 0x1_2345_6788u64, 2)),
        "{}",
        r.dump()
    );
}

#[test]
fn a_fault_without_a_handler_is_a_triple_fault() {
    let r = emu(|a| a.ud2().unwrap(), &[]);
    assert_eq!(r.code, Some(1), "{}", r.dump());
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("triple fault"))
        .unwrap_or_default();
    assert!(line.contains("bytes [0f 0b"), "{}", r.dump());
}

/// As on KVM: APs start in real mode at the SIPI vector and report their APIC IDs.
#[test]
fn application_processors_start_on_sipi() {
    let (_t, kernel) =
        testguest::temp_path(&testguest::bzimage(&testguest::snippets::smp_guest(2)));
    let r = boot(
        &kernel,
        &["--accel", "emu", "--memory", "64M", "--cpus", "3"],
        DEADLINE,
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let mut ids: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("apic "))
        .collect();
    ids.sort();
    assert_eq!(ids, ["0", "1", "2"], "{}", r.dump());
    assert!(r.stdout.contains("all up"), "{}", r.dump());
}

/// The same tiny virtio driver on the software CPU: the notify is an MMIO write to the
/// device, the completion an MSI into vessel's local APIC.
#[test]
fn a_virtio_queue_works_on_the_software_cpu() {
    let r = emu(
        |a| {
            testguest::snippets::virtio_rng_driver(a, DATA + 0x1_0000, IDT, 0x50);
            testguest::snippets::i8042_reset(a);
        },
        &["--rng"],
    );
    r.rng_driver_line();
}

/// `--stats` on the software CPU counts what the interpreter did: a loop of 1000
/// iterations of three instructions is at least 3000 instructions, decoded once.
#[test]
fn stats_count_the_software_cpus_instructions() {
    let r = emu(
        |a| {
            let mut top = a.create_label();
            a.mov(ecx, 1000u32).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(eax, ecx).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            i8042_reset(a);
        },
        &["--stats"],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let line = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("vessel: stats: software CPU: "))
        .unwrap_or_else(|| panic!("{}", r.dump()));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line:?}"))
    };
    assert!(field("instructions") >= 3000, "{line}");
    assert!(field("blocks_decoded") < 50, "{line}");
}

/// Instructions of features the guest's CPUID does not offer (VMX's vmcall, INVPCID,
/// AMD's rdpru) raise #UD in the guest, as on hardware, instead of stopping the VM.
#[test]
fn instructions_the_cpu_model_does_not_offer_raise_ud() {
    let r = emu(
        |a| {
            let mut hex = a.create_label();
            let mut main = a.create_label();
            let mut ud = a.create_label();
            a.jmp(main).unwrap();
            hex64_routine(a, &mut hex);
            // #UD: say where, then step over the instruction (its length at DATA + 8).
            a.set_label(&mut ud).unwrap();
            print(a, "#UD at ");
            a.mov(rax, qword_ptr(rsp)).unwrap();
            a.call(hex).unwrap();
            print(a, "\n");
            a.mov(rax, DATA + 8).unwrap();
            a.mov(rax, qword_ptr(rax)).unwrap();
            a.add(qword_ptr(rsp), rax).unwrap();
            a.iretq().unwrap();

            a.set_label(&mut main).unwrap();
            set_gate(a, 6, ud);
            load_idt(a);
            for (name, code) in [
                ("vmcall", &[0x0f, 0x01, 0xc1][..]),
                ("invpcid", &[0x66, 0x0f, 0x38, 0x82, 0x01]),
                ("rdpru", &[0x0f, 0x01, 0xfd]),
            ] {
                a.mov(rax, DATA + 8).unwrap();
                a.mov(qword_ptr(rax), code.len() as i32).unwrap();
                a.xor(ecx, ecx).unwrap();
                a.db(code).unwrap();
                print(a, &format!("after {name}\n"));
            }
            i8042_reset(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert_eq!(r.stdout.matches("#UD at ").count(), 3, "{}", r.dump());
    for name in ["vmcall", "invpcid", "rdpru"] {
        assert!(r.stdout.contains(&format!("after {name}")), "{}", r.dump());
    }
}
