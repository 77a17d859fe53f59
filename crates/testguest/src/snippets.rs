//! Building blocks for test guests: serial output, hex numbers, ways to end the VM.

use iced_x86::code_asm::*;

pub const COM1: u16 = 0x3f8;

/// Writes `text` to COM1 (clobbers al, dx).
pub fn print(a: &mut CodeAssembler, text: &str) {
    a.mov(dx, COM1 as u32).unwrap();
    for b in text.bytes() {
        a.mov(al, b as u32).unwrap();
        a.out(dx, al).unwrap();
    }
}

/// A subroutine printing eax as 8 hex digits on COM1 (64-bit code; preserves all but
/// flags). Call it with `call label`.
pub fn hex32_routine(a: &mut CodeAssembler, label: &mut CodeLabel) {
    let mut lp = a.create_label();
    let mut digit = a.create_label();
    a.set_label(label).unwrap();
    a.push(rax).unwrap();
    a.push(rbx).unwrap();
    a.push(rcx).unwrap();
    a.push(rdx).unwrap();
    a.mov(ecx, 8u32).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.set_label(&mut lp).unwrap();
    a.rol(eax, 4u32).unwrap();
    a.mov(ebx, eax).unwrap();
    a.and(ebx, 0xfu32).unwrap();
    a.add(bl, b'0' as u32).unwrap();
    a.cmp(bl, b'9' as u32).unwrap();
    a.jbe(digit).unwrap();
    a.add(bl, (b'a' - b'9' - 1) as u32).unwrap();
    a.set_label(&mut digit).unwrap();
    a.xchg(eax, ebx).unwrap();
    a.out(dx, al).unwrap();
    a.xchg(eax, ebx).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.pop(rdx).unwrap();
    a.pop(rcx).unwrap();
    a.pop(rbx).unwrap();
    a.pop(rax).unwrap();
    a.ret().unwrap();
}

/// Pulses the keyboard controller's reset line, then halts forever.
pub fn i8042_reset(a: &mut CodeAssembler) {
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64u8 as u32, al).unwrap();
    halt_forever(a);
}

/// ACPI S5: SLP_TYP 5 with SLP_EN into PM1a_CNT, then halts forever.
pub fn acpi_power_off(a: &mut CodeAssembler) {
    a.mov(dx, 0x604u32).unwrap();
    a.mov(ax, (5u32 << 10) | (1 << 13)).unwrap();
    a.out(dx, ax).unwrap();
    halt_forever(a);
}

pub fn halt_forever(a: &mut CodeAssembler) {
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.jmp(l).unwrap();
}

/// A guest that prints `count N` (hex) forever, one line per `delay` loop iterations.
pub fn counter(a: &mut CodeAssembler, delay: u32) {
    let mut hex = a.create_label();
    let mut main = a.create_label();
    let mut lp = a.create_label();
    let mut wait = a.create_label();
    a.jmp(main).unwrap();
    hex32_routine(a, &mut hex);
    a.set_label(&mut main).unwrap();
    a.xor(esi, esi).unwrap();
    a.set_label(&mut lp).unwrap();
    print(a, "count ");
    a.mov(eax, esi).unwrap();
    a.call(hex).unwrap();
    print(a, "\n");
    a.inc(esi).unwrap();
    a.mov(ecx, delay).unwrap();
    a.set_label(&mut wait).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(wait).unwrap();
    a.jmp(lp).unwrap();
}

/// The last complete `count N` line a counter guest printed in `log` (the line being
/// written may be cut short).
pub fn last_count(log: &str) -> Option<u32> {
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .find_map(|n| {
            (n.len() == 8)
                .then(|| u32::from_str_radix(n, 16).ok())
                .flatten()
        })
}

/// A subroutine printing rax as 16 hex digits on COM1 (64-bit code; preserves all but
/// flags). Call it with `call label`.
pub fn hex64_routine(a: &mut CodeAssembler, label: &mut CodeLabel) {
    let mut lp = a.create_label();
    let mut digit = a.create_label();
    a.set_label(label).unwrap();
    a.push(rax).unwrap();
    a.push(rbx).unwrap();
    a.push(rcx).unwrap();
    a.push(rdx).unwrap();
    a.mov(ecx, 16u32).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.set_label(&mut lp).unwrap();
    a.rol(rax, 4u32).unwrap();
    a.mov(rbx, rax).unwrap();
    a.and(ebx, 0xfu32).unwrap();
    a.add(bl, b'0' as u32).unwrap();
    a.cmp(bl, b'9' as u32).unwrap();
    a.jbe(digit).unwrap();
    a.add(bl, (b'a' - b'9' - 1) as u32).unwrap();
    a.set_label(&mut digit).unwrap();
    a.xchg(rax, rbx).unwrap();
    a.out(dx, al).unwrap();
    a.xchg(rax, rbx).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.pop(rdx).unwrap();
    a.pop(rcx).unwrap();
    a.pop(rbx).unwrap();
    a.pop(rax).unwrap();
    a.ret().unwrap();
}
