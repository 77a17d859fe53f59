//! A hostile guest: a 64-bit kernel that attacks every device vessel gives it, driven by
//! a xorshift64 generator seeded by the test (so a failing seed replays exactly).
//!
//! Each iteration is one of: random port I/O (8/16/32-bit) over the platform's ports
//! and any other; random MMIO into the virtio BARs (common configuration, ISR, device
//! configuration, notifications, MSI-X table and PBA), the local APIC, the IOAPIC and
//! unassigned addresses; random PCI configuration reads and writes to every function
//! (BARs included), through ports 0xCF8/0xCFC and ECAM; a virtio "driver" round with
//! random features, queue sizes, ring addresses, descriptors and avail indexes, then
//! DRIVER_OK and notifications; or more random buffers posted and notified. At the end
//! the guest prints [`DONE`] with its counts and powers off through ACPI.
//!
//! What the guest keeps out of its own way, since a guest may shoot itself in the foot
//! but that proves nothing about vessel:
//! - writes that end the VM: i8042 command 0xFE, ACPI PM1a_CNT with SLP_EN and S5, the
//!   reset bit of port 0xCF9;
//! - interrupts that cannot be masked: delivery modes other than fixed and lowest
//!   priority are cleared in the local APIC's ICR and LVTs, the IOAPIC's redirection
//!   entries and the MSI-X messages, so no NMI, SMI, INIT or SIPI reaches the CPU (its
//!   interrupts stay disabled throughout);
//! - DMA into itself: every address a device may write (used rings, device-writable
//!   buffers) lies in that device's own area, or far outside guest RAM. Random MMIO
//!   never writes a queue's descriptor or used ring address (the driver rounds set
//!   those), the VIRTIO_PCI_CAP_PCI_CFG window is only aimed through the same filter,
//!   descriptor tables and indirect tables only ever hold descriptors the guest made,
//!   and the balloon's buffers only hold page frame numbers of its own buffer pages or
//!   of no RAM at all (a zeroed page there yields frame 0, which the guest never uses).

use iced_x86::IcedError;
use iced_x86::code_asm::*;

use crate::snippets::{COM1, acpi_power_off, hex32_routine, hex64_routine, print};

/// Starts the line the guest prints when every iteration has run.
pub const DONE: &str = "hostile: done";
/// Starts each line describing a virtio function the guest found.
pub const DEVICE: &str = "hostile: device";
/// Guest RAM the layout below needs.
pub const MEMORY_MIB: u64 = 64;
/// virtio device types (PCI device ID minus 0x1040).
pub const NET: u32 = 1;
pub const BLOCK: u32 = 2;
pub const CONSOLE: u32 = 3;
pub const RNG: u32 = 4;
pub const BALLOON: u32 = 5;
pub const VSOCK: u32 = 19;
pub const FS: u32 = 26;

/// The guest's own state, away from every device's reach; its stack ends at the top.
const DATA: u64 = 0x40_0000;
const STACK_TOP: u64 = 0x41_0000;
/// Fields at DATA (r13 holds DATA).
const COUNT: i32 = 0x00; // virtio functions found
const BYTES: i32 = 0x08; // a value being tamed, byte by byte
const GDTR: i32 = 0x10;
const GDT: i32 = 0x20; // a copy of vessel's boot GDT, out of page 0
const ITERATIONS_DONE: i32 = 0x40;
const PORT_ATTACKS: i32 = 0x48;
const MMIO_ATTACKS: i32 = 0x50;
const PCI_ATTACKS: i32 = 0x58;
const DRIVER_ROUNDS: i32 = 0x60;
const KICKS: i32 = 0x68;
const DEVICES: i32 = 0x1000;
const DEVICE_SIZE: i32 = 0x200;
const MAX_DEVICES: i32 = 8;
/// Fields of one device entry (rbx points at it).
const BAR: i32 = 0x00;
const TYPE: i32 = 0x08;
const QUEUES: i32 = 0x10;
const PCI_CFG_CAP: i32 = 0x18; // config offset of VIRTIO_PCI_CAP_PCI_CFG, 0 if none
const ECAM_FN: i32 = 0x20; // the function's ECAM page
const MAX_SIZE: i32 = 0x28;
const AREA: i32 = 0x30;
const FEATURES: i32 = 0x38;
/// Per queue (up to 8): desc table, avail ring (both in the area), size, avail idx.
const QUEUE_INFO: i32 = 0x40;
const QUEUE_SLOTS: i32 = 8;

/// Each device's area: 8 ring slots of 64 KiB (descriptor table in the first 32 KiB,
/// avail ring at +0x8000, used ring at +0xa000), then its indirect tables, then its
/// buffers. Nothing outside a device's area is ever handed to it.
const AREAS: u64 = 0x100_0000;
const AREA_SHIFT: u32 = 22;
const INDIRECT: i32 = 0x10_0000;
const INDIRECT_DESCRIPTORS: u32 = 512;
const BUFFERS: i32 = 0x20_0000;
const BUFFER_FILL: u32 = 0x8000;
const BALLOON_FILL: u32 = 0x1_0000;

// The guest's state, then every device's area, all in its RAM.
const _: () = {
    assert!(STACK_TOP <= AREAS);
    assert!(AREAS + ((MAX_DEVICES as u64) << AREA_SHIFT) <= MEMORY_MIB << 20);
};

const ECAM: u64 = 0xe000_0000;
const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;
const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_DEVICE_BASE: u32 = 0x1040;
/// Common configuration registers (BAR offsets).
const DEVICE_FEATURE_SELECT: i32 = 0x00;
const DEVICE_FEATURE: i32 = 0x04;
const DRIVER_FEATURE_SELECT: i32 = 0x08;
const DRIVER_FEATURE: i32 = 0x0c;
const CONFIG_MSIX_VECTOR: i32 = 0x10;
const NUM_QUEUES: i32 = 0x12;
const DEVICE_STATUS: i32 = 0x14;
const QUEUE_SELECT: i32 = 0x16;
const QUEUE_SIZE: i32 = 0x18;
const QUEUE_MSIX_VECTOR: i32 = 0x1a;
const QUEUE_ENABLE: i32 = 0x1c;
const QUEUE_DESC: i32 = 0x20;
const QUEUE_DRIVER: i32 = 0x28;
const QUEUE_DEVICE: i32 = 0x30;
const NOTIFY: i32 = 0x3000;

/// Ports worth hitting more often than the rest: the platform's and their neighbours'.
const PORTS: [u16; 64] = [
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x60, 0x61, 0x64, 0x70, 0x71, 0x80, 0x92,
    0x4d0, 0x4d1, 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x440, 0x600, 0x601,
    0x602, 0x603, 0x604, 0x605, 0x606, 0x607, 0x608, 0x609, 0x60a, 0x60b, 0xcf8, 0xcf9, 0xcfa,
    0xcfb, 0xcfc, 0xcfd, 0xcfe, 0xcff, 0x2f8, 0x3e8, 0x2e8, 0x378, 0x510, 0x511, 0xb2, 0xb3, 0x3c0,
    0x3d4, 0x1f0, 0x1f7, 0x170, 0xcf0, 0x0, 0xfffe, 0xffff, 0x5658,
];

/// Where in a virtio BAR random MMIO lands: (base, mask of the random offset added).
const BAR_REGIONS: [(u32, u32); 8] = [
    (0x0000, 0x3f),   // common configuration
    (0x1000, 0x7),    // ISR
    (0x2000, 0xff),   // device configuration
    (0x3000, 0x3f),   // notifications
    (0x4000, 0x7f),   // MSI-X table
    (0x6000, 0xf),    // MSI-X PBA
    (0x0000, 0x7fff), // anywhere
    (0x7ff0, 0xf),    // the BAR's end, and across it
];

/// What the test asks of the guest.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub seed: u64,
    pub iterations: u32,
    /// Drive only the virtio devices of this type (all are still listed).
    pub target: Option<u32>,
    /// Every avail index the guest publishes jumps anywhere (one in 32 otherwise).
    pub avail_jumps: bool,
}

impl Plan {
    /// Every device, `iterations` attacks from `seed`.
    pub fn new(seed: u64, iterations: u32) -> Self {
        Plan {
            seed,
            iterations,
            target: None,
            avail_jumps: false,
        }
    }
}

/// The guest's 64-bit code, for [`crate::bzimage`].
pub fn code(plan: Plan) -> Vec<u8> {
    crate::assemble(64, crate::BZIMAGE_ENTRY64, |a| {
        emit(a, plan).expect("the hostile guest assembles")
    })
}

/// The xorshift64 state the guest starts from (never zero).
fn initial_state(seed: u64) -> u64 {
    const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
    match seed ^ MIX {
        0 => MIX,
        s => s,
    }
}

type Asm = Result<(), IcedError>;

/// The guest's subroutines. Registers: r15 is the generator's state, r13 points at
/// DATA, r14 counts iterations; the attacks may clobber everything else, the helpers
/// preserve all but what they return.
struct Routines {
    rand: CodeLabel,
    below: CodeLabel,
    random_value: CodeLabel,
    pick_device: CodeLabel,
    tame: CodeLabel,
    tame_byte: CodeLabel,
    bar_target: CodeLabel,
    make_desc: CodeLabel,
    setup_queue: CodeLabel,
    fill_queue: CodeLabel,
    pci_cfg_window: CodeLabel,
    port_attack: CodeLabel,
    mmio_attack: CodeLabel,
    pci_attack: CodeLabel,
    driver_round: CodeLabel,
    kick: CodeLabel,
    hex32: CodeLabel,
    hex64: CodeLabel,
    ports: CodeLabel,
    bar_regions: CodeLabel,
}

fn emit(a: &mut CodeAssembler, plan: Plan) -> Asm {
    let mut main = a.create_label();
    let mut r = Routines {
        rand: a.create_label(),
        below: a.create_label(),
        random_value: a.create_label(),
        pick_device: a.create_label(),
        tame: a.create_label(),
        tame_byte: a.create_label(),
        bar_target: a.create_label(),
        make_desc: a.create_label(),
        setup_queue: a.create_label(),
        fill_queue: a.create_label(),
        pci_cfg_window: a.create_label(),
        port_attack: a.create_label(),
        mmio_attack: a.create_label(),
        pci_attack: a.create_label(),
        driver_round: a.create_label(),
        kick: a.create_label(),
        hex32: a.create_label(),
        hex64: a.create_label(),
        ports: a.create_label(),
        bar_regions: a.create_label(),
    };
    a.jmp(main)?;
    hex32_routine(a, &mut r.hex32);
    hex64_routine(a, &mut r.hex64);
    rand(a, &mut r)?;
    below(a, &mut r)?;
    random_value(a, &mut r)?;
    pick_device(a, &mut r)?;
    tame(a, &mut r)?;
    tame_byte(a, &mut r)?;
    bar_target(a, &mut r)?;
    make_desc(a, &mut r)?;
    setup_queue(a, &mut r)?;
    fill_queue(a, &mut r, plan.avail_jumps)?;
    pci_cfg_window(a, &mut r)?;
    port_attack(a, &mut r)?;
    mmio_attack(a, &mut r)?;
    pci_attack(a, &mut r)?;
    driver_round(a, &mut r)?;
    kick(a, &mut r)?;
    a.set_label(&mut r.ports)?;
    a.dw(&PORTS)?;
    a.set_label(&mut r.bar_regions)?;
    let regions: Vec<u32> = BAR_REGIONS.iter().flat_map(|(b, m)| [*b, *m]).collect();
    a.dd(&regions)?;

    a.set_label(&mut main)?;
    a.cli()?;
    a.mov(rsp, STACK_TOP)?;
    a.mov(r13, DATA)?;
    a.mov(r15, initial_state(plan.seed))?;
    own_gdt(a)?;
    print(a, "hostile: seed=");
    a.mov(rax, plan.seed)?;
    a.call(r.hex64)?;
    print(a, " iterations=");
    a.mov(eax, plan.iterations)?;
    a.call(r.hex32)?;
    print(a, "\n");
    discover(a, &r, plan.target)?;
    let mut found = a.create_label();
    a.cmp(qword_ptr(r13 + COUNT), 0)?;
    a.jne(found)?;
    print(a, "hostile: no virtio devices\n");
    acpi_power_off(a);
    a.set_label(&mut found)?;
    fill_areas(a, &r)?;
    attack_loop(a, &r, plan.iterations)?;
    report(a, &r)?;
    acpi_power_off(a);
    Ok(())
}

/// Copies vessel's boot GDT out of page 0 (a hostile balloon request may zero that
/// page) and loads the copy; the selectors stay the same.
fn own_gdt(a: &mut CodeAssembler) -> Asm {
    const BOOT_GDT: u64 = 0x500;
    a.mov(rsi, BOOT_GDT)?;
    for i in 0..4 {
        a.mov(rax, qword_ptr(rsi + i * 8))?;
        a.mov(qword_ptr(r13 + GDT + i * 8), rax)?;
    }
    a.mov(word_ptr(r13 + GDTR), 4 * 8 - 1)?;
    a.lea(rax, qword_ptr(r13 + GDT))?;
    a.mov(qword_ptr(r13 + GDTR + 2), rax)?;
    a.lgdt(ptr(r13 + GDTR))
}

/// rax = the next xorshift64 value (only rax and flags change).
fn rand(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    a.set_label(&mut r.rand)?;
    for (left, shift) in [(true, 13u32), (false, 7), (true, 17)] {
        a.mov(rax, r15)?;
        if left {
            a.shl(rax, shift)?;
        } else {
            a.shr(rax, shift)?;
        }
        a.xor(r15, rax)?;
    }
    a.mov(rax, r15)?;
    a.ret()
}

/// rax = a random number below rcx (rcx > 0).
fn below(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    a.set_label(&mut r.below)?;
    a.push(rdx)?;
    a.call(r.rand)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.mov(rax, rdx)?;
    a.pop(rdx)?;
    a.ret()
}

/// rax = a value to write: random half the time, else a random byte, 0, all ones or 1.
fn random_value(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut small = a.create_label();
    let mut not_byte = a.create_label();
    let mut not_zero = a.create_label();
    let mut one = a.create_label();
    a.set_label(&mut r.random_value)?;
    a.call(r.rand)?;
    a.test(al, 4)?;
    a.jz(small)?;
    a.call(r.rand)?;
    a.ret()?;
    a.set_label(&mut small)?;
    a.test(al, 3)?;
    a.jnz(not_byte)?;
    a.shr(eax, 8)?;
    a.and(eax, 0xff)?;
    a.ret()?;
    a.set_label(&mut not_byte)?;
    a.and(al, 3)?;
    a.cmp(al, 1)?;
    a.jne(not_zero)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut not_zero)?;
    a.cmp(al, 2)?;
    a.jne(one)?;
    a.mov(rax, -1i64)?;
    a.ret()?;
    a.set_label(&mut one)?;
    a.mov(eax, 1)?;
    a.ret()
}

/// rbx = a random device entry.
fn pick_device(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    a.set_label(&mut r.pick_device)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.mov(rcx, qword_ptr(r13 + COUNT))?;
    a.call(r.below)?;
    a.shl(rax, DEVICE_SIZE.trailing_zeros())?;
    a.lea(rbx, qword_ptr(r13 + rax + DEVICES))?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.ret()
}

/// Makes the write of rax (ecx bytes) at rdi harmless to the guest itself: each byte
/// goes through `tame_byte` with its own address; r9d is 0 for ports, 1 for MMIO.
fn tame(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut each = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut r.tame)?;
    a.push(rdx)?;
    a.push(rsi)?;
    a.push(r10)?;
    a.mov(qword_ptr(r13 + BYTES), rax)?;
    a.xor(r10d, r10d)?;
    a.set_label(&mut each)?;
    a.cmp(r10d, ecx)?;
    a.jae(done)?;
    a.lea(rsi, qword_ptr(rdi + r10))?;
    a.movzx(edx, byte_ptr(r13 + r10 + BYTES))?;
    a.call(r.tame_byte)?;
    a.mov(byte_ptr(r13 + r10 + BYTES), dl)?;
    a.inc(r10d)?;
    a.jmp(each)?;
    a.set_label(&mut done)?;
    a.mov(rax, qword_ptr(r13 + BYTES))?;
    a.pop(r10)?;
    a.pop(rsi)?;
    a.pop(rdx)?;
    a.ret()
}

/// dl = the byte the guest may write at rsi (port if r9d is 0, else MMIO).
fn tame_byte(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut mmio = a.create_label();
    let mut not_i8042 = a.create_label();
    let mut not_pm = a.create_label();
    let mut ioapic = a.create_label();
    let mut msix = a.create_label();
    let mut each = a.create_label();
    let mut next = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut r.tame_byte)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rbx)?;
    a.test(r9d, r9d)?;
    a.jnz(mmio)?;
    // i8042 command 0xFE pulses the reset line.
    a.cmp(rsi, 0x64)?;
    a.jne(not_i8042)?;
    a.cmp(dl, 0xfe)?;
    a.jne(not_i8042)?;
    a.mov(dl, 0xfd)?;
    a.set_label(&mut not_i8042)?;
    // PM1a_CNT's high byte: SLP_TYP 5 (bits 2-4) with SLP_EN (bit 5) powers off.
    a.cmp(rsi, 0x605)?;
    a.jne(not_pm)?;
    a.mov(eax, edx)?;
    a.and(eax, 0x3c)?;
    a.cmp(eax, 0x34)?;
    a.jne(not_pm)?;
    a.and(dl, 0xdf)?;
    a.set_label(&mut not_pm)?;
    // Port 0xCF9: the reset bit.
    a.cmp(rsi, 0xcf9)?;
    a.jne(out)?;
    a.and(dl, 0xfb)?;
    a.jmp(out)?;

    // MMIO: the second byte of the local APIC's ICR and LVTs (0x300-0x370), of the
    // IOAPIC window and of each MSI-X entry's data holds delivery-mode bits 9-10.
    a.set_label(&mut mmio)?;
    a.mov(rax, rsi)?;
    a.and(rax, -0x1000)?;
    a.mov(rcx, LAPIC)?;
    a.cmp(rax, rcx)?;
    a.jne(ioapic)?;
    a.mov(eax, esi)?;
    a.and(eax, 0xfff)?;
    a.mov(ecx, eax)?;
    a.and(ecx, 0xf)?;
    a.cmp(ecx, 1)?;
    a.jne(out)?;
    a.cmp(eax, 0x300)?;
    a.jb(out)?;
    a.cmp(eax, 0x380)?;
    a.jae(out)?;
    a.and(dl, 0xf9)?;
    a.jmp(out)?;
    a.set_label(&mut ioapic)?;
    a.mov(rcx, IOAPIC + 0x11)?;
    a.cmp(rsi, rcx)?;
    a.jne(msix)?;
    a.and(dl, 0xf9)?;
    a.jmp(out)?;
    a.set_label(&mut msix)?;
    a.mov(rcx, qword_ptr(r13 + COUNT))?;
    a.lea(rbx, qword_ptr(r13 + DEVICES))?;
    a.set_label(&mut each)?;
    a.test(rcx, rcx)?;
    a.jz(out)?;
    a.mov(rax, rsi)?;
    a.sub(rax, qword_ptr(rbx + BAR))?;
    a.cmp(rax, 0x4000)?;
    a.jb(next)?;
    a.cmp(rax, 0x6000)?;
    a.jae(next)?;
    a.and(eax, 0xf)?;
    a.cmp(eax, 9)?;
    a.jne(next)?;
    a.and(dl, 0xf9)?;
    a.set_label(&mut next)?;
    a.add(rbx, DEVICE_SIZE)?;
    a.dec(rcx)?;
    a.jmp(each)?;
    a.set_label(&mut out)?;
    a.pop(rbx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.ret()
}

/// For the device at rbx: rsi = a random offset into its BAR, ecx = a width (1, 2, 4
/// or 8), r10d = 1 when the access may be a write (0 when it would touch a queue's
/// descriptor or used ring address, which only the driver rounds set).
fn bar_target(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut unaligned = a.create_label();
    let mut check_used = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut r.bar_target)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.call(r.rand)?;
    a.mov(rdx, rax)?;
    a.mov(eax, edx)?;
    a.and(eax, 7)?;
    a.lea(rsi, ptr(r.bar_regions))?;
    a.mov(ecx, dword_ptr(rsi + rax * 8 + 4))?;
    a.mov(esi, dword_ptr(rsi + rax * 8))?;
    a.mov(rax, rdx)?;
    a.shr(rax, 8)?;
    a.and(rax, rcx)?;
    a.add(rsi, rax)?;
    width_from_bits(a, 24)?;
    // Aligned to the width, but one time in eight.
    a.mov(rax, rdx)?;
    a.shr(rax, 26)?;
    a.test(al, 7)?;
    a.jz(unaligned)?;
    a.mov(rax, rcx)?;
    a.neg(rax)?;
    a.and(rsi, rax)?;
    a.set_label(&mut unaligned)?;
    a.mov(r10d, 1)?;
    read_only_if_touching(a, QUEUE_DESC, check_used)?;
    a.set_label(&mut check_used)?;
    read_only_if_touching(a, QUEUE_DEVICE, done)?;
    a.set_label(&mut done)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.ret()
}

/// r10d = 0 if the access at rsi of rcx bytes touches the 8-byte register at `start`
/// (rax clobbered); jumps to `past` otherwise.
fn read_only_if_touching(a: &mut CodeAssembler, start: i32, past: CodeLabel) -> Asm {
    a.cmp(rsi, start + 8)?;
    a.jae(past)?;
    a.lea(rax, qword_ptr(rsi + rcx))?;
    a.cmp(rax, start)?;
    a.jbe(past)?;
    a.xor(r10d, r10d)
}

/// ecx = 1 << ((rdx >> shift) & 3): an access width of 1, 2, 4 or 8 (rax clobbered).
fn width_from_bits(a: &mut CodeAssembler, shift: u32) -> Asm {
    a.mov(rcx, rdx)?;
    a.shr(rcx, shift)?;
    a.and(ecx, 3)?;
    a.mov(eax, 1)?;
    a.shl(eax, cl)?;
    a.mov(ecx, eax)
}

/// Writes a random descriptor at rdi for the device at rbx: its buffer in the device's
/// buffer area (small ones mostly, with a header of small numbers planted at its start,
/// but not for the balloon), an indirect table in the device's indirect area, or an
/// address and length from anywhere (never guest RAM in practice).
fn make_desc(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut wild = a.create_label();
    let mut indirect = a.create_label();
    let mut large = a.create_label();
    let mut plant = a.create_label();
    let mut flags = a.create_label();
    let mut store = a.create_label();
    let mut chained = a.create_label();
    a.set_label(&mut r.make_desc)?;
    for reg in [rax, rcx, rdx, rsi, r8] {
        a.push(reg)?;
    }
    a.call(r.rand)?;
    a.mov(r8, rax)?;
    a.mov(eax, r8d)?;
    a.and(eax, 15)?;
    a.cmp(eax, 1)?;
    a.jb(wild)?;
    a.je(indirect)?;

    a.call(r.rand)?;
    a.mov(rcx, rax)?;
    a.mov(rsi, qword_ptr(rbx + AREA))?;
    a.add(rsi, BUFFERS)?;
    a.mov(eax, ecx)?;
    a.and(eax, 0x7fff)?;
    a.add(rsi, rax)?;
    a.mov(rdx, rcx)?;
    a.shr(rdx, 16)?;
    a.and(edx, 0x7fff)?;
    a.test(r8d, 0x30)?;
    a.jz(large)?;
    a.and(edx, 0x3ff)?;
    a.set_label(&mut large)?;
    a.cmp(qword_ptr(rbx + TYPE), BALLOON as i32)?;
    a.jne(plant)?;
    // The balloon reads whole page frame numbers: keep its buffers dword-aligned.
    a.and(rsi, -4)?;
    a.and(edx, 0xffff_fffc_u32)?;
    a.jmp(flags)?;
    a.set_label(&mut plant)?;
    // A block request header, or a net/vsock/FUSE header: small type, small sector.
    a.mov(rax, rcx)?;
    a.shr(rax, 32)?;
    a.and(eax, 0x1f)?;
    a.mov(dword_ptr(rsi), eax)?;
    a.mov(dword_ptr(rsi + 4), 0)?;
    a.mov(rax, rcx)?;
    a.shr(rax, 40)?;
    a.and(eax, 0xfff)?;
    a.mov(qword_ptr(rsi + 8), rax)?;
    a.set_label(&mut flags)?;
    a.mov(rax, r8)?;
    a.shr(rax, 8)?;
    a.and(eax, 3)?; // NEXT, WRITE
    a.jmp(store)?;

    a.set_label(&mut wild)?;
    a.call(r.rand)?;
    a.mov(rsi, rax)?;
    a.call(r.rand)?;
    a.mov(edx, eax)?;
    a.mov(rax, r8)?;
    a.shr(rax, 8)?;
    a.and(eax, 7)?; // NEXT, WRITE, INDIRECT
    a.jmp(store)?;

    a.set_label(&mut indirect)?;
    a.call(r.rand)?;
    a.mov(rcx, rax)?;
    a.mov(rsi, qword_ptr(rbx + AREA))?;
    a.add(rsi, INDIRECT)?;
    a.and(eax, 0x0ff0)?;
    a.add(rsi, rax)?;
    a.mov(rdx, rcx)?;
    a.shr(rdx, 16)?;
    a.and(edx, 0x0ff0)?;
    a.mov(rax, r8)?;
    a.shr(rax, 8)?;
    a.and(eax, 3)?;
    a.or(eax, 4)?; // INDIRECT, alone or (wrongly) with NEXT or WRITE

    a.set_label(&mut store)?;
    a.mov(qword_ptr(rdi), rsi)?;
    a.mov(dword_ptr(rdi + 8), edx)?;
    a.mov(word_ptr(rdi + 12), ax)?;
    // next: one of the first 8 mostly, any index one time in 16.
    a.mov(rcx, r8)?;
    a.shr(rcx, 16)?;
    a.and(ecx, 7)?;
    a.mov(rax, r8)?;
    a.shr(rax, 19)?;
    a.test(al, 15)?;
    a.jnz(chained)?;
    a.mov(rcx, r8)?;
    a.shr(rcx, 32)?;
    a.set_label(&mut chained)?;
    a.mov(word_ptr(rdi + 14), cx)?;
    for reg in [r8, rsi, rdx, rcx, rax] {
        a.pop(reg)?;
    }
    a.ret()
}

/// Sets up queue r12 of the device at rbx (BAR in rsi) as a driver would, with random
/// choices: size, vector, ring addresses in the queue's slot (sometimes wild or
/// misaligned as the device sees them), enable. Records the slot's rings and the size
/// the device took. Clobbers rax, rcx, rdx, rdi, r8, r9.
fn setup_queue(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut skip = a.create_label();
    let mut size_ok = a.create_label();
    let mut vector_ok = a.create_label();
    let mut dwords = a.create_label();
    let mut enable = a.create_label();
    let mut enable_ok = a.create_label();
    a.set_label(&mut r.setup_queue)?;
    a.call(r.rand)?;
    a.mov(r9, rax)?;
    a.mov(rdi, r12)?;
    a.and(edi, QUEUE_SLOTS - 1)?;
    a.shl(edi, 5)?;
    a.lea(rdi, qword_ptr(rbx + rdi + QUEUE_INFO))?;
    a.mov(qword_ptr(rdi + 16), 0)?;
    a.test(r9b, 7)?;
    a.jz(skip)?; // one queue in eight is left alone
    a.mov(word_ptr(rsi + QUEUE_SELECT), r12w)?;
    // Size: the maximum >> 0..7, or any 16-bit number one time in 16.
    a.mov(rcx, r9)?;
    a.shr(rcx, 8)?;
    a.and(ecx, 7)?;
    a.mov(rax, qword_ptr(rbx + MAX_SIZE))?;
    a.shr(rax, cl)?;
    a.mov(rdx, r9)?;
    a.shr(rdx, 11)?;
    a.test(dl, 15)?;
    a.jnz(size_ok)?;
    a.mov(rax, r9)?;
    a.shr(rax, 16)?;
    a.set_label(&mut size_ok)?;
    a.mov(word_ptr(rsi + QUEUE_SIZE), ax)?;
    // MSI-X vector 0-3, or none.
    a.mov(rax, r9)?;
    a.shr(rax, 32)?;
    a.and(eax, 3)?;
    a.test(r9d, 0x10)?;
    a.jz(vector_ok)?;
    a.mov(eax, 0xffff)?;
    a.set_label(&mut vector_ok)?;
    a.mov(word_ptr(rsi + QUEUE_MSIX_VECTOR), ax)?;
    // The slot: desc at +0..0x3ff0, avail at +0x8000..0x8ffe, used at +0xa000..0xbffc.
    a.mov(r8, r12)?;
    a.and(r8d, QUEUE_SLOTS - 1)?;
    a.shl(r8, 16)?;
    a.add(r8, qword_ptr(rbx + AREA))?;
    a.call(r.rand)?;
    a.mov(rcx, rax)?;
    a.and(eax, 0x3ff0)?;
    a.add(rax, r8)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rdx, rcx)?;
    a.shr(rdx, 16)?;
    a.and(edx, 0xffe)?;
    a.lea(rdx, qword_ptr(r8 + rdx + 0x8000))?;
    a.mov(qword_ptr(rdi + 8), rdx)?;
    a.shr(rcx, 32)?;
    a.and(ecx, 0x1ffc)?;
    a.lea(r8, qword_ptr(r8 + rcx + 0xa000))?;
    a.mov(rcx, qword_ptr(rdi))?;
    // What the device is told: now and then a wild or misaligned ring.
    a.mov(rax, r9)?;
    a.shr(rax, 36)?;
    a.and(eax, 15)?;
    let mut cases = [0; 4].map(|_| a.create_label());
    let mut told = a.create_label();
    for (i, case) in cases.iter().enumerate() {
        a.cmp(eax, i as u32)?;
        a.je(*case)?;
    }
    a.jmp(told)?;
    a.set_label(&mut cases[0])?;
    a.call(r.rand)?;
    a.mov(rcx, rax)?; // descriptor table anywhere
    a.jmp(told)?;
    a.set_label(&mut cases[1])?;
    a.or(ecx, 8)?; // descriptor table misaligned
    a.jmp(told)?;
    a.set_label(&mut cases[2])?;
    a.call(r.rand)?;
    a.mov(rdx, rax)?; // avail ring anywhere
    a.jmp(told)?;
    a.set_label(&mut cases[3])?;
    a.or(r8d, 2)?; // used ring misaligned
    a.set_label(&mut told)?;
    a.bt(r9, 40)?;
    a.jc(dwords)?;
    a.mov(qword_ptr(rsi + QUEUE_DESC), rcx)?;
    a.mov(qword_ptr(rsi + QUEUE_DRIVER), rdx)?;
    a.mov(qword_ptr(rsi + QUEUE_DEVICE), r8)?;
    a.jmp(enable)?;
    a.set_label(&mut dwords)?;
    for (reg, at) in [(rcx, QUEUE_DESC), (rdx, QUEUE_DRIVER), (r8, QUEUE_DEVICE)] {
        a.mov(rax, reg)?;
        a.mov(dword_ptr(rsi + at), eax)?;
        a.shr(rax, 32)?;
        a.mov(dword_ptr(rsi + at + 4), eax)?;
    }
    a.set_label(&mut enable)?;
    // The rings start empty; the size is what the device took.
    a.mov(rax, qword_ptr(rdi + 8))?;
    a.mov(dword_ptr(rax), 0)?;
    a.mov(qword_ptr(rdi + 24), 0)?;
    a.movzx(eax, word_ptr(rsi + QUEUE_SIZE))?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    a.mov(eax, 1)?;
    a.mov(rcx, r9)?;
    a.shr(rcx, 41)?;
    a.test(cl, 15)?;
    a.jnz(enable_ok)?;
    a.mov(rax, r9)?;
    a.shr(rax, 48)?; // queue_enable is only ever 1 from a driver
    a.set_label(&mut enable_ok)?;
    a.mov(word_ptr(rsi + QUEUE_ENABLE), ax)?;
    a.set_label(&mut skip)?;
    a.ret()
}

/// Writes 8 random descriptors into queue r12's table (device at rbx) and posts 0-7
/// random heads, now and then (always, with `avail_jumps`) with a wild avail index.
/// Clobbers rax, rcx, rdx, rsi, rdi, r8, r9, r11.
fn fill_queue(a: &mut CodeAssembler, r: &mut Routines, avail_jumps: bool) -> Asm {
    let mut done = a.create_label();
    let mut descs = a.create_label();
    let mut post = a.create_label();
    let mut head_ok = a.create_label();
    let mut posted = a.create_label();
    let mut idx_ok = a.create_label();
    a.set_label(&mut r.fill_queue)?;
    a.mov(r9, r12)?;
    a.and(r9d, QUEUE_SLOTS - 1)?;
    a.shl(r9d, 5)?;
    a.lea(r9, qword_ptr(rbx + r9 + QUEUE_INFO))?;
    a.mov(r11, qword_ptr(r9 + 16))?;
    a.test(r11, r11)?;
    a.jz(done)?;
    a.dec(r11)?; // index mask: sizes are powers of two
    a.mov(r8d, 8)?;
    a.set_label(&mut descs)?;
    a.call(r.rand)?;
    a.and(rax, r11)?;
    a.shl(rax, 4)?;
    a.mov(rdi, qword_ptr(r9))?;
    a.add(rdi, rax)?;
    a.call(r.make_desc)?;
    a.dec(r8d)?;
    a.jnz(descs)?;
    a.call(r.rand)?;
    a.mov(ecx, eax)?;
    a.and(ecx, 7)?;
    a.mov(rsi, qword_ptr(r9 + 8))?;
    a.mov(rdx, qword_ptr(r9 + 24))?;
    a.set_label(&mut post)?;
    a.test(ecx, ecx)?;
    a.jz(posted)?;
    a.call(r.rand)?;
    a.mov(r8, rax)?;
    a.and(rax, r11)?;
    a.test(r8d, 0xf00)?;
    a.jnz(head_ok)?;
    a.mov(rax, r8)?;
    a.shr(rax, 16)?; // any head one time in 16
    a.set_label(&mut head_ok)?;
    a.mov(rdi, rdx)?;
    a.and(rdi, r11)?;
    a.mov(word_ptr(rsi + rdi * 2 + 4), ax)?;
    a.inc(edx)?;
    a.dec(ecx)?;
    a.jmp(post)?;
    a.set_label(&mut posted)?;
    a.call(r.rand)?;
    if !avail_jumps {
        a.test(al, 31)?;
        a.jnz(idx_ok)?;
    }
    a.mov(rdx, rax)?;
    a.shr(rdx, 8)?; // the index jumps anywhere one time in 32
    a.set_label(&mut idx_ok)?;
    a.and(edx, 0xffff)?;
    a.mov(qword_ptr(r9 + 24), rdx)?;
    a.mov(word_ptr(rsi + 2), dx)?;
    // Flags (NO_INTERRUPT or not) and used_event.
    a.call(r.rand)?;
    a.mov(ecx, eax)?;
    a.and(ecx, 1)?;
    a.mov(word_ptr(rsi), cx)?;
    a.shr(rax, 16)?;
    a.lea(rdi, qword_ptr(r11 + 1))?;
    a.mov(word_ptr(rsi + rdi * 2 + 4), ax)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// Aims the device's (rbx) VIRTIO_PCI_CAP_PCI_CFG window at a BAR access chosen as
/// random MMIO is, and reads or (tamed) writes through it, by ECAM.
fn pci_cfg_window(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut narrow = a.create_label();
    let mut read = a.create_label();
    a.set_label(&mut r.pci_cfg_window)?;
    a.mov(rdi, qword_ptr(rbx + ECAM_FN))?;
    a.add(rdi, qword_ptr(rbx + PCI_CFG_CAP))?;
    a.call(r.bar_target)?;
    a.cmp(ecx, 8)?;
    a.jne(narrow)?;
    a.mov(ecx, 4)?;
    a.set_label(&mut narrow)?;
    a.mov(byte_ptr(rdi + 4), 0)?; // bar
    a.mov(dword_ptr(rdi + 8), esi)?; // offset
    a.mov(dword_ptr(rdi + 12), ecx)?; // length
    a.test(r10d, r10d)?;
    a.jz(read)?;
    a.call(r.rand)?;
    a.test(al, 1)?;
    a.jz(read)?;
    a.push(rdi)?;
    a.mov(rdi, qword_ptr(rbx + BAR))?;
    a.add(rdi, rsi)?;
    a.call(r.random_value)?;
    a.mov(r9d, 1)?;
    a.call(r.tame)?;
    a.pop(rdi)?;
    a.mov(dword_ptr(rdi + 16), eax)?;
    a.ret()?;
    a.set_label(&mut read)?;
    a.mov(eax, dword_ptr(rdi + 16))?;
    a.ret()
}

/// Emits a load or a store of ecx (1, 2, 4 or 8) bytes between rax and [rdi].
fn access_by_width(a: &mut CodeAssembler, store: bool) -> Asm {
    let mut done = a.create_label();
    let mut sizes = [0; 3].map(|_| a.create_label());
    for (i, width) in [1u32, 2, 4].into_iter().enumerate() {
        a.cmp(ecx, width)?;
        a.jne(sizes[i])?;
        match (width, store) {
            (1, true) => a.mov(byte_ptr(rdi), al)?,
            (1, false) => a.mov(al, byte_ptr(rdi))?,
            (2, true) => a.mov(word_ptr(rdi), ax)?,
            (2, false) => a.mov(ax, word_ptr(rdi))?,
            (_, true) => a.mov(dword_ptr(rdi), eax)?,
            (_, false) => a.mov(eax, dword_ptr(rdi))?,
        }
        a.jmp(done)?;
        a.set_label(&mut sizes[i])?;
    }
    match store {
        true => a.mov(qword_ptr(rdi), rax)?,
        false => a.mov(rax, qword_ptr(rdi))?,
    }
    a.set_label(&mut done)
}

/// Emits `in` or `out` of ecx (1, 2 or 4) bytes at port dx.
fn port_by_width(a: &mut CodeAssembler, out: bool) -> Asm {
    let mut done = a.create_label();
    let mut not_byte = a.create_label();
    let mut dword = a.create_label();
    a.cmp(ecx, 1)?;
    a.jne(not_byte)?;
    match out {
        true => a.out(dx, al)?,
        false => a.in_(al, dx)?,
    }
    a.jmp(done)?;
    a.set_label(&mut not_byte)?;
    a.cmp(ecx, 2)?;
    a.jne(dword)?;
    match out {
        true => a.out(dx, ax)?,
        false => a.in_(ax, dx)?,
    }
    a.jmp(done)?;
    a.set_label(&mut dword)?;
    match out {
        true => a.out(dx, eax)?,
        false => a.in_(eax, dx)?,
    }
    a.set_label(&mut done)
}

/// One port access: a platform port three times in four, any port otherwise.
fn port_attack(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut any_port = a.create_label();
    let mut have_port = a.create_label();
    let mut width_ok = a.create_label();
    let mut write = a.create_label();
    let mut read = a.create_label();
    a.set_label(&mut r.port_attack)?;
    a.call(r.rand)?;
    a.mov(r8, rax)?;
    a.test(r8b, 3)?;
    a.jz(any_port)?;
    a.mov(rax, r8)?;
    a.shr(rax, 8)?;
    a.and(eax, (PORTS.len() - 1) as u32)?;
    a.lea(rsi, ptr(r.ports))?;
    a.movzx(edi, word_ptr(rsi + rax * 2))?;
    a.jmp(have_port)?;
    a.set_label(&mut any_port)?;
    a.mov(rdi, r8)?;
    a.shr(rdi, 8)?;
    a.and(edi, 0xffff)?;
    a.set_label(&mut have_port)?;
    a.mov(rdx, r8)?;
    a.mov(rcx, rdx)?;
    a.shr(rcx, 24)?;
    a.and(ecx, 3)?;
    a.cmp(ecx, 3)?;
    a.jne(width_ok)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut width_ok)?;
    a.mov(eax, 1)?;
    a.shl(eax, cl)?;
    a.mov(ecx, eax)?;
    a.bt(r8, 30)?;
    a.jc(read)?;
    // Configuration data writes (0xCFC-0xCFF) are the PCI attack's: it keeps the
    // VIRTIO_PCI_CAP_PCI_CFG window tame.
    a.cmp(edi, 0xcff)?;
    a.ja(write)?;
    a.lea(eax, dword_ptr(rdi + rcx))?;
    a.cmp(eax, 0xcfc)?;
    a.ja(read)?;
    a.set_label(&mut write)?;
    a.call(r.random_value)?;
    a.xor(r9d, r9d)?;
    a.call(r.tame)?;
    a.mov(edx, edi)?;
    port_by_width(a, true)?;
    a.ret()?;
    a.set_label(&mut read)?;
    a.mov(edx, edi)?;
    port_by_width(a, false)?;
    a.ret()
}

/// One MMIO access: a virtio BAR half the time, else the local APIC, the IOAPIC, or
/// an address nothing decodes (below the hole but above RAM, or in the PCI window).
fn mmio_attack(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut bar = a.create_label();
    let mut lapic = a.create_label();
    let mut ioapic = a.create_label();
    let mut ioapic_any = a.create_label();
    let mut ioapic_have = a.create_label();
    let mut low = a.create_label();
    let mut sized = a.create_label();
    let mut go = a.create_label();
    let mut read = a.create_label();
    a.set_label(&mut r.mmio_attack)?;
    a.call(r.rand)?;
    a.mov(r8, rax)?;
    a.mov(eax, r8d)?;
    a.and(eax, 7)?;
    a.cmp(eax, 4)?;
    a.jb(bar)?;
    a.je(lapic)?;
    a.cmp(eax, 5)?;
    a.je(ioapic)?;
    a.call(r.rand)?;
    a.mov(edi, eax)?;
    a.and(edi, 0x0fff_fff0)?;
    a.mov(eax, 0x0800_0000)?;
    a.test(r8b, 8)?;
    a.jz(low)?;
    a.mov(eax, 0xd000_0000u32)?;
    a.set_label(&mut low)?;
    a.add(rdi, rax)?;
    a.jmp(sized)?;
    a.set_label(&mut lapic)?;
    a.call(r.rand)?;
    a.and(eax, 0x3f0)?;
    a.mov(rdi, LAPIC)?;
    a.add(rdi, rax)?;
    a.jmp(sized)?;
    a.set_label(&mut ioapic)?;
    a.call(r.rand)?;
    a.mov(rcx, rax)?;
    a.shr(rcx, 8)?;
    a.test(al, 7)?;
    a.jz(ioapic_any)?;
    a.and(ecx, 0x10)?; // IOREGSEL or IOWIN
    a.jmp(ioapic_have)?;
    a.set_label(&mut ioapic_any)?;
    a.and(ecx, 0xff)?;
    a.set_label(&mut ioapic_have)?;
    a.mov(rdi, IOAPIC)?;
    a.add(rdi, rcx)?;
    a.set_label(&mut sized)?;
    a.mov(rdx, r8)?;
    width_from_bits(a, 8)?;
    a.mov(r10d, 1)?;
    a.mov(rax, r8)?;
    a.shr(rax, 12)?;
    a.test(al, 7)?;
    a.jz(go)?;
    a.mov(rax, rcx)?;
    a.neg(rax)?;
    a.and(rdi, rax)?;
    a.jmp(go)?;
    a.set_label(&mut bar)?;
    a.call(r.pick_device)?;
    a.call(r.bar_target)?;
    a.mov(rdi, qword_ptr(rbx + BAR))?;
    a.add(rdi, rsi)?;
    a.set_label(&mut go)?;
    a.bt(r8, 16)?;
    a.jc(read)?;
    a.test(r10d, r10d)?;
    a.jz(read)?;
    a.call(r.random_value)?;
    a.mov(r9d, 1)?;
    a.call(r.tame)?;
    access_by_width(a, true)?;
    a.ret()?;
    a.set_label(&mut read)?;
    access_by_width(a, false)?;
    a.ret()
}

/// One configuration access to a virtio function (three times in four) or any
/// function of bus 0, any register and width, by ECAM or ports 0xCF8/0xCFC. Writes
/// that touch a virtio function's VIRTIO_PCI_CAP_PCI_CFG fields go through
/// `pci_cfg_window` instead.
fn pci_attack(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut any_fn = a.create_label();
    let mut search = a.create_label();
    let mut search_next = a.create_label();
    let mut have_fn = a.create_label();
    let mut width_ok = a.create_label();
    let mut unaligned = a.create_label();
    let mut by_ecam = a.create_label();
    let mut plain = a.create_label();
    let mut read = a.create_label();
    let mut cf8_write = a.create_label();
    let mut cf8_read = a.create_label();
    let mut select = a.create_label();
    let mut enabled = a.create_label();
    a.set_label(&mut r.pci_attack)?;
    a.call(r.rand)?;
    a.mov(r8, rax)?;
    // r11 = bus 0 device/function (slot << 3 | function); rbx = its entry, or 0.
    a.test(r8b, 3)?;
    a.jz(any_fn)?;
    a.call(r.pick_device)?;
    a.mov(r11, qword_ptr(rbx + ECAM_FN))?;
    a.shr(r11, 12)?;
    a.and(r11d, 0xff)?;
    a.jmp(have_fn)?;
    a.set_label(&mut any_fn)?;
    a.mov(r11, r8)?;
    a.shr(r11, 2)?;
    a.and(r11d, 0xff)?;
    a.xor(ebx, ebx)?;
    a.mov(rcx, qword_ptr(r13 + COUNT))?;
    a.lea(rsi, qword_ptr(r13 + DEVICES))?;
    a.mov(rdx, r11)?;
    a.shl(rdx, 12)?;
    a.mov(rax, ECAM)?;
    a.add(rdx, rax)?;
    a.set_label(&mut search)?;
    a.test(rcx, rcx)?;
    a.jz(have_fn)?;
    a.cmp(qword_ptr(rsi + ECAM_FN), rdx)?;
    a.jne(search_next)?;
    a.mov(rbx, rsi)?;
    a.jmp(have_fn)?;
    a.set_label(&mut search_next)?;
    a.add(rsi, DEVICE_SIZE)?;
    a.dec(rcx)?;
    a.jmp(search)?;
    a.set_label(&mut have_fn)?;
    // rsi = register, ecx = width 1, 2 or 4 (aligned but one time in eight).
    a.mov(rsi, r8)?;
    a.shr(rsi, 10)?;
    a.and(esi, 0xfff)?;
    a.mov(rcx, r8)?;
    a.shr(rcx, 22)?;
    a.and(ecx, 3)?;
    a.cmp(ecx, 3)?;
    a.jne(width_ok)?;
    a.mov(ecx, 2)?;
    a.set_label(&mut width_ok)?;
    a.mov(eax, 1)?;
    a.shl(eax, cl)?;
    a.mov(ecx, eax)?;
    a.mov(rax, r8)?;
    a.shr(rax, 24)?;
    a.test(al, 7)?;
    a.jz(unaligned)?;
    a.mov(rax, rcx)?;
    a.neg(rax)?;
    a.and(rsi, rax)?;
    a.set_label(&mut unaligned)?;
    a.bt(r8, 27)?;
    a.jnc(by_ecam)?;
    a.and(esi, 0xff)?; // ports 0xCF8/0xCFC reach the first 256 bytes
    a.set_label(&mut by_ecam)?;
    a.bt(r8, 28)?;
    a.jc(read)?;
    a.test(rbx, rbx)?;
    a.jz(plain)?;
    a.mov(rax, qword_ptr(rbx + PCI_CFG_CAP))?;
    a.test(rax, rax)?;
    a.jz(plain)?;
    // Touching [cap + 4, cap + 20): bar, offset, length or data of the window.
    a.lea(rdx, qword_ptr(rax + 20))?;
    a.cmp(rsi, rdx)?;
    a.jae(plain)?;
    a.lea(rdx, qword_ptr(rsi + rcx))?;
    a.add(rax, 4)?;
    a.cmp(rdx, rax)?;
    a.jbe(plain)?;
    a.jmp(r.pci_cfg_window)?;
    a.set_label(&mut plain)?;
    a.call(r.random_value)?;
    a.bt(r8, 27)?;
    a.jc(cf8_write)?;
    ecam_address(a)?;
    access_by_width(a, true)?;
    a.ret()?;
    a.set_label(&mut cf8_write)?;
    a.call(select)?;
    port_by_width(a, true)?;
    a.ret()?;
    a.set_label(&mut read)?;
    a.bt(r8, 27)?;
    a.jc(cf8_read)?;
    ecam_address(a)?;
    access_by_width(a, false)?;
    a.ret()?;
    a.set_label(&mut cf8_read)?;
    a.call(select)?;
    port_by_width(a, false)?;
    a.ret()?;
    // Writes the configuration address for r11/rsi to 0xCF8 (without the enable bit
    // one time in 16) and leaves dx at the data port; preserves rax.
    a.set_label(&mut select)?;
    a.push(rax)?;
    a.mov(eax, r11d)?;
    a.shl(eax, 8)?;
    a.mov(edx, esi)?;
    a.and(edx, 0xfc)?;
    a.or(eax, edx)?;
    a.mov(rdx, r8)?;
    a.shr(rdx, 32)?;
    a.test(dl, 15)?;
    a.jz(enabled)?;
    a.or(eax, 0x8000_0000u32)?;
    a.set_label(&mut enabled)?;
    a.mov(edx, 0xcf8)?;
    a.out(dx, eax)?;
    a.mov(edx, esi)?;
    a.and(edx, 3)?;
    a.add(edx, 0xcfc)?;
    a.pop(rax)?;
    a.ret()
}

/// rdi = the ECAM address of function r11, register rsi (rax preserved).
fn ecam_address(a: &mut CodeAssembler) -> Asm {
    a.mov(rdi, r11)?;
    a.shl(rdi, 12)?;
    a.add(rdi, rsi)?;
    a.push(rax)?;
    a.mov(rax, ECAM)?;
    a.add(rdi, rax)?;
    a.pop(rax)
}

/// A driver's bring-up of a random device, with random choices at every step: reset
/// (mostly), ACKNOWLEDGE | DRIVER, a random subset of its features (VERSION_1 mostly,
/// garbage one time in 16), FEATURES_OK, a config vector, each queue set up and filled,
/// DRIVER_OK (or a random status), notifications.
fn driver_round(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut no_reset = a.create_label();
    let mut no_version = a.create_label();
    let mut features_ok = a.create_label();
    let mut skip_features_ok = a.create_label();
    let mut queues = [0; 3].map(|_| a.create_label());
    let mut queues_done = [0; 3].map(|_| a.create_label());
    let mut odd_status = a.create_label();
    let mut notify = a.create_label();
    let mut skip_notify = a.create_label();
    a.set_label(&mut r.driver_round)?;
    a.call(r.pick_device)?;
    a.mov(rsi, qword_ptr(rbx + BAR))?;
    a.call(r.rand)?;
    a.test(al, 7)?;
    a.jz(no_reset)?;
    a.mov(byte_ptr(rsi + DEVICE_STATUS), 0)?;
    a.set_label(&mut no_reset)?;
    a.mov(byte_ptr(rsi + DEVICE_STATUS), 1)?;
    a.mov(byte_ptr(rsi + DEVICE_STATUS), 3)?;
    a.call(r.rand)?;
    a.and(rax, qword_ptr(rbx + FEATURES))?;
    a.mov(rcx, rax)?;
    a.call(r.rand)?;
    a.test(al, 3)?;
    a.jz(no_version)?;
    a.bts(rcx, 32)?;
    a.set_label(&mut no_version)?;
    a.test(al, 0xf0)?;
    a.jnz(features_ok)?;
    a.call(r.rand)?;
    a.mov(rcx, rax)?;
    a.set_label(&mut features_ok)?;
    a.mov(dword_ptr(rsi + DRIVER_FEATURE_SELECT), 0)?;
    a.mov(dword_ptr(rsi + DRIVER_FEATURE), ecx)?;
    a.mov(dword_ptr(rsi + DRIVER_FEATURE_SELECT), 1)?;
    a.shr(rcx, 32)?;
    a.mov(dword_ptr(rsi + DRIVER_FEATURE), ecx)?;
    a.call(r.rand)?;
    a.test(al, 15)?;
    a.jz(skip_features_ok)?;
    a.mov(byte_ptr(rsi + DEVICE_STATUS), 0xb)?;
    a.set_label(&mut skip_features_ok)?;
    a.shr(eax, 8)?;
    a.and(eax, 3)?;
    a.mov(word_ptr(rsi + CONFIG_MSIX_VECTOR), ax)?;
    // Each queue set up, then each filled.
    for (i, routine) in [r.setup_queue, r.fill_queue].into_iter().enumerate() {
        a.xor(r12d, r12d)?;
        a.set_label(&mut queues[i])?;
        a.cmp(r12, qword_ptr(rbx + QUEUES))?;
        a.jae(queues_done[i])?;
        a.cmp(r12d, QUEUE_SLOTS as u32)?;
        a.jae(queues_done[i])?;
        a.mov(rsi, qword_ptr(rbx + BAR))?;
        a.call(routine)?;
        a.inc(r12d)?;
        a.jmp(queues[i])?;
        a.set_label(&mut queues_done[i])?;
    }
    a.mov(rsi, qword_ptr(rbx + BAR))?;
    a.call(r.rand)?;
    a.test(al, 15)?;
    a.jz(odd_status)?;
    a.mov(byte_ptr(rsi + DEVICE_STATUS), 0xf)?;
    a.jmp(notify)?;
    a.set_label(&mut odd_status)?;
    a.shr(eax, 8)?;
    a.mov(byte_ptr(rsi + DEVICE_STATUS), al)?;
    a.set_label(&mut notify)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut queues[2])?;
    a.cmp(r12, qword_ptr(rbx + QUEUES))?;
    a.jae(queues_done[2])?;
    a.cmp(r12d, QUEUE_SLOTS as u32)?;
    a.jae(queues_done[2])?;
    a.call(r.rand)?;
    a.test(al, 3)?;
    a.jz(skip_notify)?;
    a.mov(word_ptr(rsi + r12 * 4 + NOTIFY), r12w)?;
    a.set_label(&mut skip_notify)?;
    a.inc(r12d)?;
    a.jmp(queues[2])?;
    a.set_label(&mut queues_done[2])?;
    a.ret()
}

/// More random buffers on a random queue of a random device, and a notification
/// (to that queue mostly, to any notify offset with any value otherwise).
fn kick(a: &mut CodeAssembler, r: &mut Routines) -> Asm {
    let mut few = a.create_label();
    let mut wild = a.create_label();
    let mut none = a.create_label();
    a.set_label(&mut r.kick)?;
    a.call(r.pick_device)?;
    a.mov(rcx, qword_ptr(rbx + QUEUES))?;
    a.test(rcx, rcx)?;
    a.jz(none)?;
    a.cmp(rcx, QUEUE_SLOTS)?;
    a.jbe(few)?;
    a.mov(ecx, QUEUE_SLOTS as u32)?;
    a.set_label(&mut few)?;
    a.call(r.below)?;
    a.mov(r12, rax)?;
    a.call(r.fill_queue)?;
    a.mov(rsi, qword_ptr(rbx + BAR))?;
    a.call(r.rand)?;
    a.test(al, 7)?;
    a.jz(wild)?;
    a.mov(word_ptr(rsi + r12 * 4 + NOTIFY), r12w)?;
    a.ret()?;
    a.set_label(&mut wild)?;
    a.shr(rax, 8)?;
    a.mov(ecx, eax)?;
    a.and(ecx, 0xffc)?;
    a.mov(dword_ptr(rsi + rcx + NOTIFY), eax)?;
    a.set_label(&mut none)?;
    a.ret()
}

/// Finds the virtio functions on bus 0 (by ECAM, before anything was scrambled),
/// enables their memory space and bus mastering, prints each one and records it (only
/// those of the `target` type, if one is given).
fn discover(a: &mut CodeAssembler, r: &Routines, target: Option<u32>) -> Asm {
    let mut slot = a.create_label();
    let mut next = a.create_label();
    let mut cap = a.create_label();
    let mut cap_next = a.create_label();
    let mut cap_done = a.create_label();
    a.mov(r12d, 1)?;
    a.lea(rbx, qword_ptr(r13 + DEVICES))?;
    a.set_label(&mut slot)?;
    a.mov(rdi, r12)?;
    a.shl(rdi, 15)?;
    a.mov(rax, ECAM)?;
    a.add(rdi, rax)?;
    a.cmp(word_ptr(rdi), VIRTIO_VENDOR)?;
    a.jne(next)?;
    a.cmp(qword_ptr(r13 + COUNT), MAX_DEVICES)?;
    a.jae(next)?;
    a.mov(qword_ptr(rbx + ECAM_FN), rdi)?;
    a.movzx(eax, word_ptr(rdi + 2))?;
    a.sub(eax, VIRTIO_DEVICE_BASE)?;
    a.mov(qword_ptr(rbx + TYPE), rax)?;
    a.mov(word_ptr(rdi + 4), 6)?; // memory space, bus master
    a.mov(eax, dword_ptr(rdi + 0x10))?;
    a.and(eax, 0xffff_fff0u32)?;
    a.mov(ecx, dword_ptr(rdi + 0x14))?;
    a.shl(rcx, 32)?;
    a.or(rax, rcx)?;
    a.mov(qword_ptr(rbx + BAR), rax)?;
    // The capability list: the vendor capability (0x09) of cfg_type 5 is PCI_CFG.
    a.movzx(ecx, byte_ptr(rdi + 0x34))?;
    a.set_label(&mut cap)?;
    a.test(ecx, ecx)?;
    a.jz(cap_done)?;
    a.cmp(byte_ptr(rdi + rcx), 0x09)?;
    a.jne(cap_next)?;
    a.cmp(byte_ptr(rdi + rcx + 3), 5)?;
    a.jne(cap_next)?;
    a.mov(qword_ptr(rbx + PCI_CFG_CAP), rcx)?;
    a.jmp(cap_done)?;
    a.set_label(&mut cap_next)?;
    a.movzx(ecx, byte_ptr(rdi + rcx + 1))?;
    a.jmp(cap)?;
    a.set_label(&mut cap_done)?;
    a.mov(rsi, qword_ptr(rbx + BAR))?;
    a.movzx(eax, word_ptr(rsi + NUM_QUEUES))?;
    a.mov(qword_ptr(rbx + QUEUES), rax)?;
    a.mov(word_ptr(rsi + QUEUE_SELECT), 0)?;
    a.movzx(eax, word_ptr(rsi + QUEUE_SIZE))?;
    a.mov(qword_ptr(rbx + MAX_SIZE), rax)?;
    a.mov(dword_ptr(rsi + DEVICE_FEATURE_SELECT), 1)?;
    a.mov(eax, dword_ptr(rsi + DEVICE_FEATURE))?;
    a.shl(rax, 32)?;
    a.mov(dword_ptr(rsi + DEVICE_FEATURE_SELECT), 0)?;
    a.mov(ecx, dword_ptr(rsi + DEVICE_FEATURE))?;
    a.or(rax, rcx)?;
    a.mov(qword_ptr(rbx + FEATURES), rax)?;
    a.mov(rax, qword_ptr(r13 + COUNT))?;
    a.shl(rax, AREA_SHIFT)?;
    a.mov(rcx, AREAS)?;
    a.add(rax, rcx)?;
    a.mov(qword_ptr(rbx + AREA), rax)?;
    print(a, "hostile: device slot=");
    a.mov(eax, r12d)?;
    a.call(r.hex32)?;
    for (label, field) in [(" type=", TYPE), (" queues=", QUEUES), (" max=", MAX_SIZE)] {
        print(a, label);
        a.mov(rax, qword_ptr(rbx + field))?;
        a.call(r.hex32)?;
    }
    for (label, field) in [(" bar=", BAR), (" features=", FEATURES)] {
        print(a, label);
        a.mov(rax, qword_ptr(rbx + field))?;
        a.call(r.hex64)?;
    }
    print(a, "\n");
    if let Some(t) = target {
        a.cmp(qword_ptr(rbx + TYPE), t as i32)?;
        a.jne(next)?;
    }
    a.inc(qword_ptr(r13 + COUNT))?;
    a.add(rbx, DEVICE_SIZE)?;
    a.set_label(&mut next)?;
    a.inc(r12d)?;
    a.cmp(r12d, 32)?;
    a.jb(slot)
}

/// Fills each device's indirect area with descriptors and its buffer area with random
/// bytes; the balloon's with page frame numbers: of its own buffer pages, or (top bit
/// set) of no RAM at all.
fn fill_areas(a: &mut CodeAssembler, r: &Routines) -> Asm {
    let mut device = a.create_label();
    let mut indirect = a.create_label();
    let mut bytes = a.create_label();
    let mut balloon = a.create_label();
    let mut frame = a.create_label();
    let mut own = a.create_label();
    let mut store = a.create_label();
    let mut next = a.create_label();
    a.mov(r12, qword_ptr(r13 + COUNT))?;
    a.lea(rbx, qword_ptr(r13 + DEVICES))?;
    a.set_label(&mut device)?;
    a.mov(rdi, qword_ptr(rbx + AREA))?;
    a.add(rdi, INDIRECT)?;
    a.mov(ecx, INDIRECT_DESCRIPTORS)?;
    a.set_label(&mut indirect)?;
    a.call(r.make_desc)?;
    a.add(rdi, 16)?;
    a.dec(ecx)?;
    a.jnz(indirect)?;
    a.mov(rdi, qword_ptr(rbx + AREA))?;
    a.add(rdi, BUFFERS)?;
    a.cmp(qword_ptr(rbx + TYPE), BALLOON as i32)?;
    a.je(balloon)?;
    a.mov(ecx, BUFFER_FILL / 8)?;
    a.set_label(&mut bytes)?;
    a.call(r.rand)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(bytes)?;
    a.jmp(next)?;
    a.set_label(&mut balloon)?;
    a.mov(r9, rdi)?;
    a.shr(r9, 12)?; // the first buffer page's frame number
    a.mov(ecx, BALLOON_FILL / 4)?;
    a.set_label(&mut frame)?;
    a.call(r.rand)?;
    a.test(al, 1)?;
    a.jz(own)?;
    a.shr(rax, 32)?;
    a.or(eax, 0x8000_0000u32)?;
    a.jmp(store)?;
    a.set_label(&mut own)?;
    a.shr(rax, 32)?;
    a.and(eax, BALLOON_FILL / 0x1000 - 1)?;
    a.add(eax, r9d)?;
    a.set_label(&mut store)?;
    a.mov(dword_ptr(rdi), eax)?;
    a.add(rdi, 4)?;
    a.dec(ecx)?;
    a.jnz(frame)?;
    a.set_label(&mut next)?;
    a.add(rbx, DEVICE_SIZE)?;
    a.dec(r12)?;
    a.jnz(device)
}

/// The main loop: `iterations` attacks, each chosen at random (ports 4/16, MMIO 3/16,
/// PCI configuration 3/16, driver rounds 2/16, kicks 4/16), each one counted.
fn attack_loop(a: &mut CodeAssembler, r: &Routines, iterations: u32) -> Asm {
    let mut top = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.mov(r14d, iterations)?;
    a.test(r14d, r14d)?;
    a.jz(done)?;
    a.set_label(&mut top)?;
    a.call(r.rand)?;
    a.and(eax, 15)?;
    let attacks = [
        (4, PORT_ATTACKS, r.port_attack),
        (7, MMIO_ATTACKS, r.mmio_attack),
        (10, PCI_ATTACKS, r.pci_attack),
        (12, DRIVER_ROUNDS, r.driver_round),
        (16, KICKS, r.kick),
    ];
    for (below, counter, routine) in attacks {
        let mut not_this = a.create_label();
        if below < 16 {
            a.cmp(eax, below)?;
            a.jae(not_this)?;
        }
        a.inc(qword_ptr(r13 + counter))?;
        a.call(routine)?;
        if below < 16 {
            a.jmp(next)?;
            a.set_label(&mut not_this)?;
        }
    }
    a.set_label(&mut next)?;
    a.inc(qword_ptr(r13 + ITERATIONS_DONE))?;
    a.dec(r14d)?;
    a.jnz(top)?;
    a.set_label(&mut done)
}

/// Puts COM1 back to 8N1 without loopback (the attacks may have changed it), then
/// prints the DONE line with the counts.
fn report(a: &mut CodeAssembler, r: &Routines) -> Asm {
    for (register, value) in [(3u16, 0x03u32), (4, 0x03), (1, 0x00)] {
        a.mov(dx, u32::from(COM1 + register))?;
        a.mov(al, value)?;
        a.out(dx, al)?;
    }
    print(a, "\n");
    print(a, DONE);
    for (label, counter) in [
        (" iterations=", ITERATIONS_DONE),
        (" ports=", PORT_ATTACKS),
        (" mmio=", MMIO_ATTACKS),
        (" pci=", PCI_ATTACKS),
        (" rounds=", DRIVER_ROUNDS),
        (" kicks=", KICKS),
    ] {
        print(a, label);
        a.mov(rax, qword_ptr(r13 + counter))?;
        a.call(r.hex32)?;
    }
    print(a, "\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_assembles_and_seeds_differ() {
        let a = code(Plan::new(1, 10));
        let b = code(Plan::new(2, 10));
        assert!(!a.is_empty());
        assert_ne!(a, b);
        assert_ne!(initial_state(0x9e37_79b9_7f4a_7c15), 0);
    }
}
