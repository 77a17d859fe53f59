//! 32-bit kernels as QEMU's `-kernel` loads them (test kernels and small operating
//! systems are built this way): a multiboot ELF, a multiboot binary that gives its
//! load addresses, and an i386 ELF with a PVH note. Each checks what its protocol
//! promises at the entry and prints what it was given.

mod common;

use std::time::Duration;

use common::{Finished, boot, boot_kvm, kvm_available};
use testguest::code_asm::*;
use testguest::kernel32::{self, ENTRY32, MULTIBOOT_BINARY_ENTRY};
use testguest::snippets::{i8042_reset, print};

const DEADLINE: Duration = Duration::from_secs(60);

/// 32-bit code at `ip` that checks the multiboot entry: EAX the magic, paging off,
/// then prints the command line, the module count and its first byte, and whether
/// mem_upper is the guest's 64 MiB less the first one, from the information at EBX.
fn multiboot_checks(ip: u64) -> Vec<u8> {
    testguest::assemble(32, ip, |a| {
        let mut bad = a.create_label();
        let mut line = a.create_label();
        let mut line_end = a.create_label();
        let mut no_module = a.create_label();
        let mut end = a.create_label();
        a.cmp(eax, 0x2bad_b002u32).unwrap();
        a.jne(bad).unwrap();
        a.mov(eax, cr0).unwrap();
        a.test(eax, 0x8000_0000u32).unwrap();
        a.jnz(bad).unwrap();
        print(a, "multiboot ok\ncmdline: ");
        a.mov(esi, dword_ptr(ebx + 16)).unwrap();
        a.set_label(&mut line).unwrap();
        a.mov(al, byte_ptr(esi)).unwrap();
        a.test(al, al).unwrap();
        a.jz(line_end).unwrap();
        a.out(dx, al).unwrap();
        a.inc(esi).unwrap();
        a.jmp(line).unwrap();
        a.set_label(&mut line_end).unwrap();
        print(a, "\nmodules: ");
        a.mov(al, byte_ptr(ebx + 20)).unwrap();
        a.add(al, b'0' as u32).unwrap();
        a.out(dx, al).unwrap();
        a.cmp(dword_ptr(ebx + 20), 0u32).unwrap();
        a.je(no_module).unwrap();
        // The module's first byte, as a letter.
        print(a, " first ");
        a.mov(esi, dword_ptr(ebx + 24)).unwrap();
        a.mov(esi, dword_ptr(esi)).unwrap();
        a.mov(al, byte_ptr(esi)).unwrap();
        a.out(dx, al).unwrap();
        a.set_label(&mut no_module).unwrap();
        a.cmp(dword_ptr(ebx + 8), (63u32 << 20) >> 10).unwrap();
        a.jne(end).unwrap();
        print(a, "\nmem_upper ok");
        a.jmp(end).unwrap();
        a.set_label(&mut bad).unwrap();
        print(a, "wrong entry state");
        a.set_label(&mut end).unwrap();
        print(a, "\n");
        i8042_reset(a);
    })
}

fn run(kernel: &[u8], extra: &[&str], kvm: bool) -> Finished {
    let (_t, path) = testguest::temp_path(kernel);
    let mut args = vec!["--memory", "64M"];
    args.extend_from_slice(extra);
    if kvm {
        boot_kvm(&path, &args, DEADLINE)
    } else {
        let mut emu = vec!["--accel", "emu"];
        emu.extend_from_slice(&args);
        boot(&path, &emu, DEADLINE)
    }
}

fn assert_multiboot(r: &Finished, cmdline: &str, module: Option<char>) {
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("multiboot ok"), "{}", r.dump());
    assert!(
        r.stdout.contains(&format!("cmdline: {cmdline}\n")),
        "{}",
        r.dump()
    );
    let modules = match module {
        Some(c) => format!("modules: 1 first {c}"),
        None => "modules: 0".into(),
    };
    assert!(r.stdout.contains(&modules), "{}", r.dump());
    assert!(r.stdout.contains("mem_upper ok"), "{}", r.dump());
}

#[test]
fn a_multiboot_elf_boots_with_its_command_line_and_module() {
    let kernel = kernel32::multiboot_elf(&multiboot_checks(ENTRY32));
    let (_i, initrd) = testguest::temp_path(b"Module bytes");
    let initrd = initrd.display().to_string();
    let r = run(
        &kernel,
        &["--cmdline", "hello multiboot", "--initrd", &initrd],
        false,
    );
    assert_multiboot(&r, "hello multiboot", Some('M'));
}

#[test]
fn a_multiboot_binary_loads_where_its_header_says() {
    let kernel = kernel32::multiboot_binary(&multiboot_checks(MULTIBOOT_BINARY_ENTRY));
    let r = run(&kernel, &["--cmdline", "flat"], false);
    assert_multiboot(&r, "flat", None);
}

#[test]
fn a_multiboot_kernel_boots_on_kvm() {
    if !kvm_available() {
        return;
    }
    let kernel = kernel32::multiboot_elf(&multiboot_checks(ENTRY32));
    let r = run(&kernel, &["--cmdline", "on kvm"], true);
    assert_multiboot(&r, "on kvm", None);
}

#[test]
fn an_i386_elf_with_a_pvh_note_gets_start_info() {
    let code = testguest::assemble(32, ENTRY32, |a| {
        let mut bad = a.create_label();
        a.cmp(dword_ptr(ebx), 0x336e_c578u32).unwrap();
        a.jne(bad).unwrap();
        print(a, "pvh32 ok\n");
        a.set_label(&mut bad).unwrap();
        i8042_reset(a);
    });
    let r = run(&kernel32::pvh_elf32(&code), &[], false);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("pvh32 ok"), "{}", r.dump());
}

#[test]
fn bad_32_bit_kernels_are_refused_in_one_line() {
    // A multiboot header asking for a video mode; one whose load end lies past the
    // file; an i386 ELF with neither a PVH note nor a multiboot header.
    let mut video = kernel32::multiboot_binary(&[0xf4]);
    let flags = u32::from_le_bytes(video[4..8].try_into().unwrap()) | 1 << 2;
    video[4..8].copy_from_slice(&flags.to_le_bytes());
    let sum = 0u32.wrapping_sub(0x1bad_b002).wrapping_sub(flags);
    video[8..12].copy_from_slice(&sum.to_le_bytes());
    let mut past_end = kernel32::multiboot_binary(&[0xf4]);
    past_end[20..24].copy_from_slice(&0x20_0000u32.to_le_bytes());
    let mut plain = kernel32::pvh_elf32(&[0xf4]);
    let note_type = 52 + 2 * 32 + 8;
    plain[note_type] = 17;
    for (kernel, says) in [
        (video, "video mode"),
        (past_end, "past the end of the file"),
        (plain, "no PVH entry note"),
    ] {
        let r = run(&kernel, &[], false);
        assert_eq!(r.code, Some(2), "{}", r.dump());
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}", r.dump());
        assert!(lines[0].contains(says), "{}", r.dump());
    }
}
