//! What hardware does where a guest steps outside its CPU model, one class of the
//! conformance findings at a time (MSRs, control-register bits, page-table reserved
//! bits, system descriptor bases), and QEMU's debug exit port, on small assembled
//! guests on the software CPU. Each probe prints `NAME:`, then what the #GP, #PF or
//! #UD handler saw (the handler steps over the instruction), then `done`.

mod common;

use std::time::Duration;

use common::{Finished, boot};
use testguest::code_asm::*;
use testguest::snippets::{self, hex64_routine, i8042_reset, idt_gate, print};

const DEADLINE: Duration = Duration::from_secs(60);
const IDT: u64 = 0x30_0000;
const DATA: u64 = 0x31_0000;
/// The length of the probe's instruction, for the handlers to step over it.
const LENGTH: u64 = DATA + 8;
/// Page tables a probe builds.
const TABLES: u64 = 0x32_0000;
/// A GDT a probe builds.
const GDT: u64 = 0x33_0000;

/// Boots a guest whose #UD, #GP and #PF handlers print what they saw and step over
/// the instruction; `probes` runs after them; the guest resets at the end.
fn guest(probes: impl FnOnce(&mut CodeAssembler, CodeLabel), args: &[&str]) -> Finished {
    let code = testguest::assemble(64, testguest::BZIMAGE_ENTRY64, |a| {
        let mut hex = a.create_label();
        let mut main = a.create_label();
        let mut skip = a.create_label();
        a.jmp(main).unwrap();
        hex64_routine(a, &mut hex);
        let mut handlers = Vec::new();
        for (vector, name, code) in [(6u8, "#UD", false), (13, "#GP", true), (14, "#PF", true)] {
            let mut h = a.create_label();
            a.set_label(&mut h).unwrap();
            print(a, &format!(" {name}"));
            if code {
                print(a, " ");
                a.pop(rax).unwrap();
                a.call(hex).unwrap();
            }
            if vector == 14 {
                print(a, " cr2 ");
                a.mov(rax, cr2).unwrap();
                a.call(hex).unwrap();
            }
            a.jmp(skip).unwrap();
            handlers.push((vector, h));
        }
        a.set_label(&mut skip).unwrap();
        a.mov(rax, LENGTH).unwrap();
        a.mov(rax, qword_ptr(rax)).unwrap();
        a.add(qword_ptr(rsp), rax).unwrap();
        a.iretq().unwrap();

        a.set_label(&mut main).unwrap();
        for (vector, h) in handlers {
            idt_gate(a, IDT, vector, h);
        }
        snippets::load_idt(a, IDT, DATA + 0xf00);
        probes(a, hex);
        i8042_reset(a);
    });
    let (_t, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    let mut all = vec!["--accel", "emu", "--memory", "64M"];
    all.extend_from_slice(args);
    boot(&kernel, &all, DEADLINE)
}

/// One probe: `setup` loads registers, then the instruction `bytes` runs.
fn probe(a: &mut CodeAssembler, name: &str, setup: impl FnOnce(&mut CodeAssembler), bytes: &[u8]) {
    print(a, &format!("{name}:"));
    a.mov(rax, LENGTH).unwrap();
    a.mov(qword_ptr(rax), bytes.len() as i32).unwrap();
    setup(a);
    a.db(bytes).unwrap();
}

fn done(a: &mut CodeAssembler) {
    print(a, " done\n");
}

/// Prints ` value ` and edx:eax (what rdmsr gave).
fn value(a: &mut CodeAssembler, hex: CodeLabel) {
    a.shl(rdx, 32u32).unwrap();
    a.mov(eax, eax).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(rbx, rax).unwrap();
    print(a, " value ");
    a.mov(rax, rbx).unwrap();
    a.call(hex).unwrap();
}

const RDMSR: &[u8] = &[0x0f, 0x32];
const WRMSR: &[u8] = &[0x0f, 0x30];
/// mov cr4, rax
const MOV_CR4_RAX: &[u8] = &[0x0f, 0x22, 0xe0];
/// mov rax, [rbx]
const LOAD_RBX: &[u8] = &[0x48, 0x8b, 0x03];
const LTR_AX: &[u8] = &[0x0f, 0x00, 0xd8];
const LLDT_AX: &[u8] = &[0x0f, 0x00, 0xd0];

fn msr(a: &mut CodeAssembler, n: u32, v: u64) {
    a.mov(ecx, n).unwrap();
    a.mov(eax, v as u32).unwrap();
    a.mov(edx, (v >> 32) as u32).unwrap();
}

/// The line a probe printed.
fn line<'a>(r: &'a Finished, name: &str) -> &'a str {
    let start = format!("{name}:");
    r.stdout
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("no {start} line:\n{}", r.dump()))
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

#[test]
fn msrs_answer_as_hardware_does() {
    // (name, MSR, value, a write?), in order; the reads print what they got.
    let probes: [(&str, u32, u64, bool); 9] = [
        ("mcg_cap", 0x179, 0, false),
        ("mcg_cap.write", 0x179, 0, true),
        ("mcg_status.clear", 0x17a, 0, true),
        ("misc_enable.write", 0x1a0, 0x0085_0089, true),
        ("misc_enable", 0x1a0, 0, false),
        // Not offered by the software CPU's CPUID: no such MSR.
        ("spec_ctrl.write", 0x48, 1, true),
        ("pred_cmd.write", 0x49, 1, true),
        ("flush_cmd.write", 0x10b, 1, true),
        ("tsc_adjust", 0x3b, 0, false),
    ];
    let r = guest(
        |a, hex| {
            for (name, n, v, write) in probes {
                probe(a, name, |a| msr(a, n, v), if write { WRMSR } else { RDMSR });
                if !write {
                    value(a, hex);
                }
                done(a);
            }
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let gp = format!(" #GP {}", hex(0));
    assert_eq!(
        line(&r, "mcg_cap"),
        format!("mcg_cap: value {} done", hex(0))
    );
    assert_eq!(
        line(&r, "mcg_cap.write"),
        format!("mcg_cap.write:{gp} done")
    );
    assert_eq!(line(&r, "mcg_status.clear"), "mcg_status.clear: done");
    assert_eq!(line(&r, "misc_enable.write"), "misc_enable.write: done");
    assert_eq!(
        line(&r, "misc_enable"),
        format!("misc_enable: value {} done", hex(0x0085_0089))
    );
    for name in ["spec_ctrl.write", "pred_cmd.write", "flush_cmd.write"] {
        assert_eq!(line(&r, name), format!("{name}:{gp} done"));
    }
    assert!(line(&r, "tsc_adjust").starts_with(&format!("tsc_adjust:{gp}")));
}

#[test]
fn cr4_bits_of_features_not_offered_raise_gp() {
    // (LA57 would also fault for changing in long mode.)
    let bits: [(&str, u64); 7] = [
        ("osxsave", 1 << 18),
        ("pke", 1 << 22),
        ("la57", 1 << 12),
        ("lam_sup", 1 << 28),
        ("pcide", 1 << 17),
        ("vmxe", 1 << 13),
        ("bit15", 1 << 15),
    ];
    let r = guest(
        |a, _| {
            a.mov(rbx, cr4).unwrap();
            // The value the boot left is one the CPU takes back; an offered bit.
            probe(a, "cr4.same", |a| a.mov(rax, rbx).unwrap(), MOV_CR4_RAX);
            done(a);
            let fsgsbase = |a: &mut CodeAssembler| {
                a.mov(rax, 1u64 << 16).unwrap();
                a.or(rax, rbx).unwrap();
            };
            probe(a, "cr4.fsgsbase", fsgsbase, MOV_CR4_RAX);
            done(a);
            for (name, bit) in bits {
                probe(
                    a,
                    &format!("cr4.{name}"),
                    |a| {
                        a.mov(rax, bit).unwrap();
                        a.or(rax, rbx).unwrap();
                    },
                    MOV_CR4_RAX,
                );
                done(a);
            }
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert_eq!(line(&r, "cr4.same"), "cr4.same: done");
    assert_eq!(line(&r, "cr4.fsgsbase"), "cr4.fsgsbase: done");
    for (name, _) in bits {
        assert_eq!(
            line(&r, &format!("cr4.{name}")),
            format!("cr4.{name}: #GP {} done", hex(0))
        );
    }
}

/// Page tables mapping the first GiB with 2 MiB pages, the last two entries spoiled:
/// one with address bit 51 set (above the 40 physical address bits offered), one with
/// a bit between PAT and the 2 MiB frame.
#[test]
fn reserved_page_table_bits_raise_pf_with_rsvd() {
    const PD: u64 = TABLES + 0x2000;
    let r = guest(
        |a, _| {
            let mut fill = a.create_label();
            a.mov(rdi, TABLES).unwrap();
            a.xor(eax, eax).unwrap();
            a.mov(ecx, 3 * 512u32).unwrap();
            a.rep().stosq().unwrap();
            a.mov(rdi, TABLES).unwrap();
            a.mov(rax, (TABLES + 0x1000) | 3).unwrap();
            a.mov(qword_ptr(rdi), rax).unwrap();
            a.mov(rax, PD | 3).unwrap();
            a.mov(qword_ptr(rdi + 0x1000), rax).unwrap();
            a.mov(rdi, PD).unwrap();
            a.mov(eax, 0x83u32).unwrap();
            a.mov(ecx, 510u32).unwrap();
            a.set_label(&mut fill).unwrap();
            a.mov(qword_ptr(rdi), rax).unwrap();
            a.add(rdi, 8i32).unwrap();
            a.add(rax, 0x20_0000i32).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(fill).unwrap();
            a.mov(rax, (510u64 << 21) | (1 << 13) | 0x83).unwrap();
            a.mov(qword_ptr(rdi), rax).unwrap();
            a.mov(rax, (511u64 << 21) | (1 << 51) | 0x83).unwrap();
            a.mov(qword_ptr(rdi + 8), rax).unwrap();
            a.mov(rax, TABLES).unwrap();
            a.mov(cr3, rax).unwrap();
            probe(
                a,
                "pte.mapped",
                |a| a.mov(rbx, 0x20_0000u64).unwrap(),
                LOAD_RBX,
            );
            done(a);
            probe(
                a,
                "pte.frame-bit",
                |a| a.mov(rbx, 510u64 << 21).unwrap(),
                LOAD_RBX,
            );
            done(a);
            probe(
                a,
                "pte.bit51",
                |a| a.mov(rbx, 511u64 << 21).unwrap(),
                LOAD_RBX,
            );
            done(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert_eq!(line(&r, "pte.mapped"), "pte.mapped: done");
    // Present, read, supervisor, reserved bit: error code 0b1001.
    for (name, at) in [("pte.frame-bit", 510u64 << 21), ("pte.bit51", 511 << 21)] {
        assert_eq!(
            line(&r, name),
            format!("{name}: #PF {} cr2 {} done", hex(9), hex(at))
        );
    }
}

/// A 16-byte system descriptor: `kind` (9 TSS, 2 LDT), limit 0x67, at `base`.
fn system_descriptor(kind: u64, base: u64) -> [u64; 2] {
    let low = 0x67 | (base & 0xff_ffff) << 16 | (0x80 | kind) << 40 | (base >> 24 & 0xff) << 56;
    [low, base >> 32]
}

#[test]
fn system_descriptors_with_non_canonical_bases_raise_gp() {
    const SCRATCH: u64 = DATA + 0x100;
    let descriptors = [
        (0x100u16, system_descriptor(9, 0x8000_0000_0000_1000)),
        (0x110, system_descriptor(2, 0x8000_0000_0000_1000)),
        (0x120, system_descriptor(9, 0x1000)),
    ];
    let r = guest(
        |a, _| {
            // The boot's GDT, copied, with the three descriptors after it.
            a.mov(rsi, SCRATCH).unwrap();
            a.sgdt(ptr(rsi)).unwrap();
            a.movzx(ecx, word_ptr(rsi)).unwrap();
            a.inc(ecx).unwrap();
            a.mov(rsi, qword_ptr(rsi + 2)).unwrap();
            a.mov(rdi, GDT).unwrap();
            a.rep().movsb().unwrap();
            for (sel, [low, high]) in descriptors {
                a.mov(rdi, GDT + u64::from(sel)).unwrap();
                a.mov(rax, low).unwrap();
                a.mov(qword_ptr(rdi), rax).unwrap();
                a.mov(rax, high).unwrap();
                a.mov(qword_ptr(rdi + 8), rax).unwrap();
            }
            a.mov(rsi, SCRATCH).unwrap();
            a.mov(word_ptr(rsi), 0x12fu32).unwrap();
            a.mov(rax, GDT).unwrap();
            a.mov(qword_ptr(rsi + 2), rax).unwrap();
            a.lgdt(ptr(rsi)).unwrap();
            probe(
                a,
                "ltr.non-canonical",
                |a| a.mov(eax, 0x100u32).unwrap(),
                LTR_AX,
            );
            done(a);
            probe(
                a,
                "lldt.non-canonical",
                |a| a.mov(eax, 0x110u32).unwrap(),
                LLDT_AX,
            );
            done(a);
            probe(
                a,
                "ltr.canonical",
                |a| a.mov(eax, 0x120u32).unwrap(),
                LTR_AX,
            );
            done(a);
        },
        &[],
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    for (name, sel) in [("ltr.non-canonical", 0x100), ("lldt.non-canonical", 0x110)] {
        assert_eq!(line(&r, name), format!("{name}: #GP {} done", hex(sel)));
    }
    assert_eq!(line(&r, "ltr.canonical"), "ltr.canonical: done");
}

/// QEMU's isa-debug-exit: with `--debug-exit`, a guest's write of V to port 0xf4 ends
/// vessel with status (V << 1) | 1; without it the port is not there (the guest goes
/// on to reset, status 0). (The vCPU may run on for an instant before it stops, as
/// when the guest powers off.)
#[test]
fn the_debug_exit_port_ends_the_vm_with_the_status_asked_for() {
    let write = |a: &mut CodeAssembler, _| {
        print(a, "exiting\n");
        a.mov(eax, 0x10u32).unwrap();
        a.out(0xf4u32, eax).unwrap();
        print(a, "still here\n");
    };
    let r = guest(write, &["--debug-exit"]);
    assert_eq!(r.code, Some(0x21), "{}", r.dump());
    assert!(r.stderr.contains("status 33"), "{}", r.dump());
    let r = guest(write, &[]);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("still here"), "{}", r.dump());
}
