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
    hex_routine(a, label, false);
}

/// A subroutine printing rax as 16 hex digits on COM1 (64-bit code; preserves all but
/// flags). Call it with `call label`.
pub fn hex64_routine(a: &mut CodeAssembler, label: &mut CodeLabel) {
    hex_routine(a, label, true);
}

fn hex_routine(a: &mut CodeAssembler, label: &mut CodeLabel, wide: bool) {
    let mut lp = a.create_label();
    let mut digit = a.create_label();
    a.set_label(label).unwrap();
    a.push(rax).unwrap();
    a.push(rbx).unwrap();
    a.push(rcx).unwrap();
    a.push(rdx).unwrap();
    a.mov(ecx, if wide { 16u32 } else { 8 }).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.set_label(&mut lp).unwrap();
    if wide {
        a.rol(rax, 4u32).unwrap();
    } else {
        a.rol(eax, 4u32).unwrap();
    }
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

/// Writes a 64-bit interrupt gate for `vector` into the IDT at `idt`, pointing at
/// `handler` through vessel's boot code selector 0x08 (clobbers rax, rdi).
pub fn idt_gate(a: &mut CodeAssembler, idt: u64, vector: u8, handler: CodeLabel) {
    a.lea(rax, ptr(handler)).unwrap();
    a.mov(rdi, idt + u64::from(vector) * 16).unwrap();
    a.mov(word_ptr(rdi), ax).unwrap();
    a.mov(word_ptr(rdi + 2), 0x08u32).unwrap();
    a.mov(word_ptr(rdi + 4), 0x8e00u32).unwrap();
    a.shr(rax, 16u32).unwrap();
    a.mov(word_ptr(rdi + 6), ax).unwrap();
    a.shr(rax, 16u32).unwrap();
    a.mov(dword_ptr(rdi + 8), eax).unwrap();
}

/// Loads the 256-entry IDT at `idt`, building its descriptor at `scratch` (clobbers
/// rax, rsi).
pub fn load_idt(a: &mut CodeAssembler, idt: u64, scratch: u64) {
    a.mov(rsi, scratch).unwrap();
    a.mov(word_ptr(rsi), (256 * 16 - 1) as u32).unwrap();
    a.mov(rax, idt).unwrap();
    a.mov(qword_ptr(rsi + 2), rax).unwrap();
    a.lidt(ptr(rsi)).unwrap();
}

/// A guest that brings up `aps` application processors with INIT/SIPI, each starting
/// in real mode at 0x10000 and printing `apic N` (its CPUID APIC ID) under a spinlock;
/// the boot CPU prints `all up` once they have all reported, then resets.
pub fn smp_guest(aps: u8) -> Vec<u8> {
    const TRAMPOLINE: u32 = 0x1_0000;
    const LOCK: u32 = 0x800; // offsets from the trampoline segment
    const COUNT: u32 = 0x801;
    let ap = crate::assemble(16, 0, |a| {
        let mut acquire = a.create_label();
        a.cli().unwrap();
        a.mov(ax, TRAMPOLINE >> 4).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(eax, 1u32).unwrap();
        a.cpuid().unwrap();
        a.shr(ebx, 24u32).unwrap();
        a.set_label(&mut acquire).unwrap();
        a.mov(al, 1u32).unwrap();
        a.xchg(byte_ptr(LOCK), al).unwrap();
        a.test(al, al).unwrap();
        a.jnz(acquire).unwrap();
        print(a, "apic ");
        a.mov(al, bl).unwrap();
        a.add(al, b'0' as u32).unwrap();
        a.out(dx, al).unwrap();
        print(a, "\n");
        a.mov(byte_ptr(LOCK), 0u32).unwrap();
        a.lock().inc(byte_ptr(COUNT)).unwrap();
        halt_forever(a);
    });
    crate::assemble(64, crate::BZIMAGE_ENTRY64, |a| {
        let mut blob = a.create_label();
        let mut wait = a.create_label();
        a.lea(rsi, ptr(blob)).unwrap();
        a.mov(edi, TRAMPOLINE).unwrap();
        a.mov(ecx, ap.len() as u32).unwrap();
        a.rep().movsb().unwrap();
        a.mov(eax, 1u32).unwrap();
        a.cpuid().unwrap();
        a.shr(ebx, 24u32).unwrap();
        print(a, "apic ");
        a.mov(al, bl).unwrap();
        a.add(al, b'0' as u32).unwrap();
        a.out(dx, al).unwrap();
        print(a, "\n");
        // Software-enable the local APIC, then INIT and SIPI to all but self.
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap();
        a.mov(dword_ptr(rbx + 0x300), 0x000c_4500u32).unwrap();
        a.mov(dword_ptr(rbx + 0x300), 0x000c_4600u32 | (TRAMPOLINE >> 12))
            .unwrap();
        a.set_label(&mut wait).unwrap();
        a.pause().unwrap();
        a.cmp(byte_ptr(u64::from(TRAMPOLINE + COUNT)), u32::from(aps))
            .unwrap();
        a.jne(wait).unwrap();
        print(a, "all up\n");
        i8042_reset(a);
        a.set_label(&mut blob).unwrap();
        a.db(&ap).unwrap();
    })
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

/// Writes `value` to 16-bit port `port` `times` times.
pub fn repeat_out16(a: &mut CodeAssembler, port: u16, value: u16, times: u32) {
    let mut lp = a.create_label();
    a.mov(ecx, times).unwrap();
    a.set_label(&mut lp).unwrap();
    a.mov(dx, u32::from(port)).unwrap();
    a.mov(ax, u32::from(value)).unwrap();
    a.out(dx, ax).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
}

pub fn halt_forever(a: &mut CodeAssembler) {
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.jmp(l).unwrap();
}

/// Where [`counter`] keeps its count, in guest memory (a snapshot carries it).
pub const COUNT_AT: u64 = 0x5000;

/// A guest that prints `count N` (hex) forever, one line per `delay` loop iterations;
/// N is kept in memory at [`COUNT_AT`].
pub fn counter(a: &mut CodeAssembler, delay: u32) {
    let mut hex = a.create_label();
    let mut main = a.create_label();
    let mut lp = a.create_label();
    let mut wait = a.create_label();
    a.jmp(main).unwrap();
    hex32_routine(a, &mut hex);
    a.set_label(&mut main).unwrap();
    a.mov(dword_ptr(COUNT_AT), 0u32).unwrap();
    a.set_label(&mut lp).unwrap();
    print(a, "count ");
    a.mov(eax, dword_ptr(COUNT_AT)).unwrap();
    a.call(hex).unwrap();
    print(a, "\n");
    a.inc(dword_ptr(COUNT_AT)).unwrap();
    a.mov(ecx, delay).unwrap();
    a.set_label(&mut wait).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(wait).unwrap();
    a.jmp(lp).unwrap();
}

/// A [`counter`] that also writes every page of `[base, base + size)` on each count:
/// sweep N first checks that each page still holds N - 1 (what sweep N - 1 wrote), then
/// writes N, then spins `delay` times (setting how fast it dirties memory). A page that
/// lost a write (a migration that missed a dirty page) stops the guest with `lost page
/// <address>`. The range must be identity mapped RAM.
pub fn dirtier(a: &mut CodeAssembler, base: u64, size: u64, delay: u32) {
    let mut hex = a.create_label();
    let mut hex64 = a.create_label();
    let mut main = a.create_label();
    let mut lp = a.create_label();
    let mut sweep = a.create_label();
    let mut fresh = a.create_label();
    let mut lost = a.create_label();
    let mut spin = a.create_label();
    a.jmp(main).unwrap();
    hex32_routine(a, &mut hex);
    hex64_routine(a, &mut hex64);
    a.set_label(&mut main).unwrap();
    a.mov(dword_ptr(COUNT_AT), 0u32).unwrap();
    a.set_label(&mut lp).unwrap();
    print(a, "count ");
    a.mov(eax, dword_ptr(COUNT_AT)).unwrap();
    a.call(hex).unwrap();
    print(a, "\n");
    a.mov(eax, dword_ptr(COUNT_AT)).unwrap();
    a.lea(ebx, dword_ptr(rax - 1)).unwrap();
    a.mov(rdi, base).unwrap();
    a.mov(rsi, base + size).unwrap();
    a.set_label(&mut sweep).unwrap();
    a.test(eax, eax).unwrap();
    a.jz(fresh).unwrap();
    a.cmp(dword_ptr(rdi), ebx).unwrap();
    a.jne(lost).unwrap();
    a.set_label(&mut fresh).unwrap();
    a.mov(dword_ptr(rdi), eax).unwrap();
    a.mov(ecx, delay.max(1)).unwrap();
    a.set_label(&mut spin).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(spin).unwrap();
    a.add(rdi, 4096).unwrap();
    a.cmp(rdi, rsi).unwrap();
    a.jb(sweep).unwrap();
    a.inc(dword_ptr(COUNT_AT)).unwrap();
    a.jmp(lp).unwrap();
    a.set_label(&mut lost).unwrap();
    print(a, "lost page ");
    a.mov(rax, rdi).unwrap();
    a.call(hex64).unwrap();
    print(a, "\n");
    halt_forever(a);
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

/// A minimal virtio-pci driver for the entropy device at 00:01.0 (the first device
/// `vessel run --rng` adds): negotiates VERSION_1, sets up queue 0 (8 entries) with
/// MSI-X vector 0 -> IDT vector `vector` on APIC 0, posts one 16-byte buffer at
/// `data + 0x100`, notifies, and waits in HLT until its interrupt handler has run.
/// Memory used: `data` .. `data + 0x1000` (rings at +0x200/+0x300/+0x400, IDT at
/// `idt`). Prints `rng used=N len=L irq=I` with the used index, the used length and
/// how many interrupts arrived, and leaves interrupts disabled; the caller ends the VM.
pub fn virtio_rng_driver(a: &mut CodeAssembler, data: u64, idt: u64, vector: u8) {
    let ecam = 0xe000_8000u64; // bus 0, device 1, function 0
    let (buf, desc, avail, used, flag) =
        (data + 0x100, data + 0x200, data + 0x300, data + 0x400, data);
    let mut hex = a.create_label();
    let mut main = a.create_label();
    let mut handler = a.create_label();
    let mut find_cap = a.create_label();
    let mut found = a.create_label();
    let mut wait = a.create_label();
    a.jmp(main).unwrap();
    hex64_routine(a, &mut hex);

    a.set_label(&mut handler).unwrap();
    a.push(rax).unwrap();
    a.mov(rax, flag).unwrap();
    a.inc(qword_ptr(rax)).unwrap();
    a.mov(rax, 0xfee0_00b0u64).unwrap(); // EOI
    a.mov(dword_ptr(rax), 0u32).unwrap();
    a.pop(rax).unwrap();
    a.iretq().unwrap();

    a.set_label(&mut main).unwrap();
    // IDT gate for `vector`, then LAPIC on.
    idt_gate(a, idt, vector, handler);
    load_idt(a, idt, data + 0xf00);
    a.mov(rax, 0xfee0_00f0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1ffu32).unwrap();

    // PCI: memory space and bus mastering; BAR0 (64-bit) -> rbx.
    a.mov(rdi, ecam).unwrap();
    a.mov(word_ptr(rdi + 4), 0x6u32).unwrap();
    a.mov(ebx, dword_ptr(rdi + 0x10)).unwrap();
    a.and(ebx, 0xffff_fff0u32).unwrap();
    a.mov(eax, dword_ptr(rdi + 0x14)).unwrap();
    a.shl(rax, 32u32).unwrap();
    a.or(rbx, rax).unwrap();
    // MSI-X capability (ID 0x11): walk the list from 0x34; enable it (control bit 15).
    a.movzx(ecx, byte_ptr(rdi + 0x34)).unwrap();
    a.set_label(&mut find_cap).unwrap();
    a.cmp(byte_ptr(rdi + rcx), 0x11u32).unwrap();
    a.je(found).unwrap();
    a.movzx(ecx, byte_ptr(rdi + rcx + 1)).unwrap();
    a.jmp(find_cap).unwrap();
    a.set_label(&mut found).unwrap();
    a.mov(word_ptr(rdi + rcx + 2), 0x8000u32).unwrap();
    // MSI-X table entry 0 (BAR0 + 0x4000): APIC 0, `vector`, unmasked.
    a.mov(dword_ptr(rbx + 0x4000), 0xfee0_0000u32).unwrap();
    a.mov(dword_ptr(rbx + 0x4004), 0u32).unwrap();
    a.mov(dword_ptr(rbx + 0x4008), u32::from(vector)).unwrap();
    a.mov(dword_ptr(rbx + 0x400c), 0u32).unwrap();

    // Common configuration (BAR0 + 0): reset, ACKNOWLEDGE | DRIVER, VERSION_1 (bit 32).
    a.mov(byte_ptr(rbx + 0x14), 0u32).unwrap();
    a.mov(byte_ptr(rbx + 0x14), 3u32).unwrap();
    a.mov(dword_ptr(rbx + 0x08), 1u32).unwrap();
    a.mov(dword_ptr(rbx + 0x0c), 1u32).unwrap();
    a.mov(dword_ptr(rbx + 0x08), 0u32).unwrap();
    a.mov(dword_ptr(rbx + 0x0c), 0u32).unwrap();
    a.mov(byte_ptr(rbx + 0x14), 0xbu32).unwrap(); // | FEATURES_OK
    a.mov(word_ptr(rbx + 0x10), 0xffffu32).unwrap(); // no config-change vector
    a.mov(word_ptr(rbx + 0x16), 0u32).unwrap(); // queue 0
    a.mov(word_ptr(rbx + 0x18), 8u32).unwrap(); // 8 entries
    a.mov(word_ptr(rbx + 0x1a), 0u32).unwrap(); // MSI-X vector 0
    for (reg, addr) in [(0x20, desc), (0x28, avail), (0x30, used)] {
        a.mov(rax, addr).unwrap();
        a.mov(qword_ptr(rbx + reg), rax).unwrap();
    }
    a.mov(word_ptr(rbx + 0x1c), 1u32).unwrap(); // enable
    a.mov(byte_ptr(rbx + 0x14), 0xfu32).unwrap(); // | DRIVER_OK

    // Descriptor 0: 16 device-writable bytes; avail ring: idx 1, ring[0] = 0.
    a.mov(rdi, desc).unwrap();
    a.mov(rax, buf).unwrap();
    a.mov(qword_ptr(rdi), rax).unwrap();
    a.mov(dword_ptr(rdi + 8), 16u32).unwrap();
    a.mov(word_ptr(rdi + 12), 2u32).unwrap(); // VIRTQ_DESC_F_WRITE
    a.mov(rdi, avail).unwrap();
    a.mov(word_ptr(rdi + 4), 0u32).unwrap();
    a.mov(word_ptr(rdi + 2), 1u32).unwrap();
    a.sti().unwrap();
    a.mov(word_ptr(rbx + 0x3000), 0u32).unwrap(); // notify queue 0

    a.set_label(&mut wait).unwrap();
    a.hlt().unwrap();
    a.mov(rax, flag).unwrap();
    a.cmp(qword_ptr(rax), 0i32).unwrap();
    a.je(wait).unwrap();
    a.cli().unwrap();
    print(a, "rng used=");
    a.mov(rdi, used).unwrap();
    a.movzx(eax, word_ptr(rdi + 2)).unwrap();
    a.call(hex).unwrap();
    print(a, " len=");
    a.mov(rdi, used).unwrap();
    a.mov(eax, dword_ptr(rdi + 8)).unwrap();
    a.call(hex).unwrap();
    print(a, " irq=");
    a.mov(rax, flag).unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    a.call(hex).unwrap();
    print(a, " data=");
    a.mov(rax, buf).unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    a.call(hex).unwrap();
    print(a, "\n");
}

/// Marks the boot timer, makes `outs` port-I/O exits to an unassigned port (0x80),
/// marks it again and resets: the two marks time the exits.
pub fn timed_out_loop(a: &mut CodeAssembler, outs: u32) {
    let mut lp = a.create_label();
    a.mov(dx, 0x440u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(ecx, outs).unwrap();
    a.set_label(&mut lp).unwrap();
    a.out(0x80u32, al).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.mov(dx, 0x440u32).unwrap();
    a.out(dx, al).unwrap();
    i8042_reset(a);
}
