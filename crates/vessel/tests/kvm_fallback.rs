//! The interpreter as KVM's fallback: a small guest runs instructions KVM's own
//! emulator rejects on hosts without VT-x/AMD-V, and gets the right results through
//! vessel's interpreter; `--stats` counts them by mnemonic. (With VT-x/AMD-V the CPU
//! runs them natively and the results must be the same.)

mod common;

use std::time::Duration;

use common::{boot_kvm, kvm_available};
use testguest::code_asm::*;
use testguest::snippets::{hex64_routine, i8042_reset, idt_gate, load_idt, print};

/// Where the guest keeps its data (identity-mapped RAM, 2 MiB).
const DATA: u64 = 0x20_0000;

fn guest() -> Vec<u8> {
    testguest::assemble(64, testguest::BZIMAGE_ENTRY64, |a| {
        let mut hex = a.create_label();
        let mut main = a.create_label();
        let mut bp_handler = a.create_label();
        let mut after_int3 = a.create_label();
        a.jmp(main).unwrap();
        hex64_routine(a, &mut hex);

        // #BP handler: report, drop the exception frame, continue after the int3.
        a.set_label(&mut bp_handler).unwrap();
        print(a, "bp rip=");
        a.mov(rax, qword_ptr(rsp)).unwrap();
        a.call(hex).unwrap();
        print(a, "\n");
        a.add(rsp, 40i32).unwrap();
        a.jmp(after_int3).unwrap();

        a.set_label(&mut main).unwrap();
        // SSE and XSAVE on: CR4.OSFXSR | OSXMMEXCPT | OSXSAVE.
        a.mov(rax, cr4).unwrap();
        a.or(eax, (1u32 << 9) | (1 << 10) | (1 << 18)).unwrap();
        a.mov(cr4, rax).unwrap();

        print(a, "popcnt=");
        a.mov(rcx, 0xf0f0_0000_0000_0001u64).unwrap();
        a.popcnt(rax, rcx).unwrap();
        a.call(hex).unwrap();

        print(a, "\ncmpxchg16b=");
        a.mov(rdi, DATA).unwrap();
        a.mov(qword_ptr(rdi), 0x1111i32).unwrap();
        a.mov(qword_ptr(rdi + 8), 0x2222i32).unwrap();
        a.mov(eax, 0x1111u32).unwrap();
        a.mov(edx, 0x2222u32).unwrap();
        a.mov(rbx, 0xaaaa_bbbb_cccc_ddddu64).unwrap();
        a.mov(rcx, 0x1234_5678_9abc_def0u64).unwrap();
        a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.call(hex).unwrap();
        print(a, ",");
        a.mov(rax, qword_ptr(rdi)).unwrap();
        a.call(hex).unwrap();
        print(a, ",");
        a.mov(rax, qword_ptr(rdi + 8)).unwrap();
        a.call(hex).unwrap();

        print(a, "\nsqrtsd=");
        a.mov(rax, 2.0f64.to_bits()).unwrap();
        a.movq(xmm0, rax).unwrap();
        a.sqrtsd(xmm0, xmm0).unwrap();
        a.mov(rax, 3.0f64.to_bits()).unwrap();
        a.movq(xmm1, rax).unwrap();
        a.mulsd(xmm0, xmm1).unwrap();
        a.movq(rax, xmm0).unwrap();
        a.call(hex).unwrap();

        print(a, "\nxrstor=");
        a.xor(ecx, ecx).unwrap();
        a.mov(eax, 3u32).unwrap(); // XCR0: x87 | SSE
        a.xor(edx, edx).unwrap();
        a.xsetbv().unwrap();
        a.mov(rax, 0x5eed_5eed_0bad_f00du64).unwrap();
        a.movq(xmm2, rax).unwrap();
        a.mov(rdi, DATA + 0x1000).unwrap();
        a.mov(eax, 3u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.xsave(ptr(rdi)).unwrap();
        a.pxor(xmm2, xmm2).unwrap();
        a.mov(eax, 3u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.xrstor(ptr(rdi)).unwrap();
        a.movq(rax, xmm2).unwrap();
        a.call(hex).unwrap();

        print(a, "\nstac=");
        a.stac().unwrap();
        a.pushfq().unwrap();
        a.pop(rax).unwrap();
        a.clac().unwrap();
        a.pushfq().unwrap();
        a.pop(rbx).unwrap();
        a.shr(rax, 18u32).unwrap(); // AC
        a.and(eax, 1u32).unwrap();
        a.shr(rbx, 18u32).unwrap();
        a.and(ebx, 1u32).unwrap();
        a.shl(eax, 4u32).unwrap();
        a.or(eax, ebx).unwrap();
        a.call(hex).unwrap();

        // An IDT with a #BP gate, then int3.
        print(a, "\n");
        idt_gate(a, DATA + 0x2000, 3, bp_handler);
        load_idt(a, DATA + 0x2000, DATA + 0x3000);
        a.int3().unwrap();
        a.set_label(&mut after_int3).unwrap();
        print(a, "done\n");
        i8042_reset(a);
    })
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

#[test]
fn instructions_kvm_cannot_emulate_run_through_the_interpreter() {
    if !kvm_available() {
        return;
    }
    let code = guest();
    // The int3 sits right before the "done" print; find its address for the check.
    let int3_at = code.iter().rposition(|&b| b == 0xcc).unwrap() as u64;
    let (_t, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    let r = boot_kvm(&kernel, &["--stats"], Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let out = &r.stdout;
    let expect = [
        format!("popcnt={}", hex(9)),
        format!(
            "cmpxchg16b={},{},{}",
            hex(1),
            hex(0xaaaa_bbbb_cccc_dddd),
            hex(0x1234_5678_9abc_def0)
        ),
        format!("sqrtsd={}", hex((2.0f64.sqrt() * 3.0).to_bits())),
        format!("xrstor={}", hex(0x5eed_5eed_0bad_f00d)),
        format!("stac={}", hex(0x10)),
        format!("bp rip={}", hex(testguest::BZIMAGE_ENTRY64 + int3_at + 1)),
        "done".to_string(),
    ];
    for line in &expect {
        assert!(
            out.contains(line.as_str()),
            "missing {line:?}:\n{}",
            r.dump()
        );
    }
    let stats = r
        .stderr
        .lines()
        .find(|l| l.starts_with("vessel: stats: interpreter fallbacks:"))
        .unwrap_or_else(|| panic!("{}", r.dump()));
    eprintln!("{stats}");
    if !cpu::kvm::host_has_hardware_virtualization() {
        // HOST.md: KVM's emulator here rejects at least these.
        for mnemonic in ["popcnt=1", "cmpxchg16b=1", "int3=1", "xrstor=1", "clac=1"] {
            assert!(stats.contains(mnemonic), "{mnemonic} not counted: {stats}");
        }
    }
}

/// With `--no-kvm-fallback` the same guest stops at the first instruction KVM rejects,
/// with its location, as it would under other VMMs.
#[test]
fn without_the_fallback_the_vm_stops_where_kvm_gives_up() {
    if !kvm_available() || cpu::kvm::host_has_hardware_virtualization() {
        eprintln!("skipped: with VT-x/AMD-V the CPU runs these instructions itself");
        return;
    }
    let (_t, kernel) = testguest::temp_path(&testguest::bzimage(&guest()));
    let r = boot_kvm(&kernel, &["--no-kvm-fallback"], Duration::from_secs(120));
    assert_eq!(r.code, Some(1), "{}", r.dump());
    assert!(!r.stdout.contains("done"), "{}", r.dump());
    assert!(
        r.stderr
            .contains("KVM could not emulate an instruction (fallback off) at RIP"),
        "{}",
        r.dump()
    );
}
