//! Port, MMIO and local APIC accesses recorded from a real guest boot under KVM (the
//! kernel's `kvm:kvm_pio`, `kvm:kvm_mmio` and `kvm:kvm_apic` tracepoints; how to
//! record one is in docs/fuzzing.md), turned into seeds for the harnesses that take
//! bus accesses. Time between accesses becomes clock steps.

use crate::ops::Program;
use crate::{irqchip, legacy, virtio_pci};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Port,
    Mmio,
    /// A local APIC register (offset in the xAPIC page).
    Lapic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub vcpu: u8,
    /// Host time of the access, in ns.
    pub ns: u64,
    pub space: Space,
    pub write: bool,
    pub addr: u64,
    pub len: usize,
    pub value: u64,
}

/// Operations in one seed, at most (what a harness runs of an input).
const OPS_PER_SEED: usize = 480;
/// Seeds per target, at most: chunks that touch the same addresses are alike.
const SEEDS_PER_TARGET: usize = 6;

const LAPIC_REGISTERS: [(&str, u64); 26] = [
    ("APIC_ID", 0x20),
    ("APIC_LVR", 0x30),
    ("APIC_TASKPRI", 0x80),
    ("APIC_ARBPRI", 0x90),
    ("APIC_PROCPRI", 0xa0),
    ("APIC_EOI", 0xb0),
    ("APIC_RRR", 0xc0),
    ("APIC_LDR", 0xd0),
    ("APIC_DFR", 0xe0),
    ("APIC_SPIV", 0xf0),
    ("APIC_ISR", 0x100),
    ("APIC_TMR", 0x180),
    ("APIC_IRR", 0x200),
    ("APIC_ESR", 0x280),
    ("APIC_LVTCMCI", 0x2f0),
    ("APIC_ICR", 0x300),
    ("APIC_ICR2", 0x310),
    ("APIC_LVTT", 0x320),
    ("APIC_LVTTHMR", 0x330),
    ("APIC_LVTPC", 0x340),
    ("APIC_LVT0", 0x350),
    ("APIC_LVT1", 0x360),
    ("APIC_LVTERR", 0x370),
    ("APIC_TMICT", 0x380),
    ("APIC_TMCCT", 0x390),
    ("APIC_TDCR", 0x3e0),
];

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// One line of `/sys/kernel/tracing/trace`, if it is an access.
fn parse_line(line: &str) -> Option<Access> {
    let mut words = line.split_whitespace();
    let task = words.next()?;
    let vcpu = task.strip_prefix("vcpu")?.split('-').next()?.parse().ok()?;
    let _cpu = words.next()?;
    let _flags = words.next()?;
    let seconds: f64 = words.next()?.trim_end_matches(':').parse().ok()?;
    let event = words.next()?;
    let w: Vec<&str> = words.collect();
    let ns = (seconds * 1e9) as u64;
    let access = |space, write, addr, len, value| {
        Some(Access {
            vcpu,
            ns,
            space,
            write,
            addr,
            len,
            value,
        })
    };
    match (event, w.as_slice()) {
        // pio_write at 0x3f8 size 1 count 1 val 0x41
        ("kvm_pio:", [dir, "at", port, "size", size, "count", "1", "val", val, ..]) => access(
            Space::Port,
            *dir == "pio_write",
            hex(port)?,
            size.parse().ok()?,
            hex(val)?,
        ),
        // mmio write len 4 gpa 0xfec00000 val 0x0
        (
            "kvm_mmio:",
            [
                "mmio",
                dir @ ("read" | "write"),
                "len",
                len,
                "gpa",
                gpa,
                "val",
                val,
            ],
        ) => access(
            Space::Mmio,
            *dir == "write",
            hex(gpa)?,
            len.parse().ok()?,
            hex(val)?,
        ),
        // apic_write APIC_ICR = 0x10000c500
        ("kvm_apic:", [dir, reg, "=", val]) => {
            let offset = LAPIC_REGISTERS
                .iter()
                .find(|(name, _)| name == reg)
                .map(|(_, o)| *o)
                .or_else(|| hex(reg))?;
            access(Space::Lapic, *dir == "apic_write", offset, 4, hex(val)?)
        }
        _ => None,
    }
}

pub fn parse(text: &str) -> Vec<Access> {
    text.lines().filter_map(parse_line).collect()
}

/// Chunks of operations as seeds, skipping chunks that touch the same addresses as
/// one already taken.
fn chunked(prefix: &[u8], ops: Vec<(Vec<u8>, u64)>) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    let mut seeds = Vec::new();
    for chunk in ops.chunks(OPS_PER_SEED) {
        let mut places: Vec<u64> = chunk.iter().map(|(_, place)| *place).collect();
        places.sort_unstable();
        places.dedup();
        if seen.contains(&places) || seeds.len() == SEEDS_PER_TARGET {
            continue;
        }
        seen.push(places);
        let mut seed = prefix.to_vec();
        for (op, _) in chunk {
            seed.extend_from_slice(op);
        }
        seeds.push(seed);
    }
    seeds
}

/// A clock step of `ns` as an operation, if time passed.
fn clock_step(
    last: &mut Option<u64>,
    ns: u64,
    step: impl Fn(&mut Program, u32),
) -> Option<Vec<u8>> {
    let gap = ns.saturating_sub(last.replace(ns).unwrap_or(ns));
    (gap >= 1000).then(|| {
        let mut p = Program::default();
        step(&mut p, gap.min(u64::from(u32::MAX)) as u32);
        p.0
    })
}

/// The legacy devices' port traffic: COM1, keyboard controller, CMOS, ACPI, PIT.
pub fn legacy_seeds(accesses: &[Access]) -> Vec<Vec<u8>> {
    let mut ops = Vec::new();
    let mut last = None;
    for a in accesses.iter().filter(|a| a.space == Space::Port) {
        let mut p = Program::default();
        if legacy::access(&mut p, a.write, a.addr as u16, a.len, a.value).is_none() {
            continue;
        }
        if let Some(step) = clock_step(&mut last, a.ns, |p, ns| {
            p.u8(2).u32(ns);
        }) {
            ops.push((step, u64::MAX));
        }
        ops.push((p.0, a.addr));
    }
    chunked(&[], ops)
}

/// PCI configuration traffic (0xCF8-0xCFF, ECAM) and virtio BAR accesses.
pub fn pci_seeds(accesses: &[Access]) -> Vec<Vec<u8>> {
    use arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_START};
    let mut ops = Vec::new();
    for a in accesses {
        let mut p = Program::default();
        let kind = u8::from(a.write);
        match a.space {
            Space::Port if (0xcf8..0xd00).contains(&a.addr) => {
                virtio_pci::op(&mut p, kind, a.len).u8((a.addr - 0xcf8) as u8);
            }
            Space::Mmio if (PCI_ECAM_START..PCI_ECAM_START + PCI_ECAM_SIZE).contains(&a.addr) => {
                virtio_pci::op(&mut p, 2 + kind, a.len).u32((a.addr - PCI_ECAM_START) as u32);
            }
            Space::Mmio if (PCI_MMIO32_START..PCI_MMIO32_START + 0x8000).contains(&a.addr) => {
                let offset = a.addr - PCI_MMIO32_START;
                // The structure's selector (see `bar_offset`) and the offset inside it.
                const STRUCTURES: [(u64, u16); 6] = [
                    (0x0000, 0),
                    (0x1000, 1),
                    (0x2000, 2),
                    (0x3000, 3),
                    (0x4000, 4),
                    (0x6000, 5),
                ];
                let field = STRUCTURES
                    .iter()
                    .rev()
                    .find(|&&(base, _)| offset >= base)
                    .map(|&(base, sel)| (sel << 13) | (offset - base) as u16)
                    .unwrap_or_default();
                virtio_pci::op(&mut p, 4 + kind, a.len).u16(field);
            }
            _ => continue,
        }
        if a.write {
            p.value(a.len, a.value);
        }
        ops.push((p.0, a.addr));
    }
    let mut seeds = chunked(&[], ops);
    for (i, s) in seeds.iter_mut().enumerate() {
        s.insert(0, i as u8); // the device behind the function
    }
    seeds
}

/// The interrupt controllers' traffic: PIC and PIT ports, the IOAPIC page, every
/// vCPU's local APIC (a 64-bit ICR write as the xAPIC driver does it: ICR2, then ICR).
pub fn irqchip_seeds(accesses: &[Access]) -> Vec<Vec<u8>> {
    use arch::layout::{IOAPIC_SIZE, IOAPIC_START};
    let mut ops = Vec::new();
    let mut last = None;
    for a in accesses {
        let mut p = Program::default();
        let kind = u8::from(a.write);
        match a.space {
            Space::Port => {
                let Some(index) = irqchip::PORTS.iter().position(|&x| u64::from(x) == a.addr)
                else {
                    continue;
                };
                irqchip::op(&mut p, 4 + kind, a.len, a.vcpu).u8(index as u8);
            }
            Space::Mmio if (IOAPIC_START..IOAPIC_START + IOAPIC_SIZE).contains(&a.addr) => {
                irqchip::op(&mut p, 2 + kind, a.len, a.vcpu).u16((a.addr - IOAPIC_START) as u16);
            }
            Space::Lapic if a.addr == 0x300 && a.write && a.value >> 32 != 0 => {
                irqchip::op(&mut p, 1, 4, a.vcpu)
                    .u16(0x310)
                    .u32(((a.value >> 32) as u32) << 24);
                irqchip::op(&mut p, 1, 4, a.vcpu)
                    .u16(0x300)
                    .u32(a.value as u32);
                ops.push((p.0, a.addr | 1 << 40));
                continue;
            }
            Space::Lapic => {
                irqchip::op(&mut p, kind, 4, a.vcpu).u16(a.addr as u16);
            }
            _ => continue,
        }
        if a.write {
            p.value(a.len, a.value);
        }
        if let Some(step) = clock_step(&mut last, a.ns, |p, ns| {
            irqchip::op(p, 8, 4, a.vcpu).u32(ns);
        }) {
            ops.push((step, u64::MAX));
        }
        ops.push((p.0, a.addr | u64::from(a.space == Space::Lapic) << 40));
    }
    chunked(&[1], ops)
}
