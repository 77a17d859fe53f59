//! Moving a snapshot between the CPU backends: the software CPU keeps its local APICs,
//! IOAPIC, PICs and PIT in user space, KVM in the kernel; both are converted through
//! the architectural register images (the xAPIC page, the IOAPIC's registers, the
//! 8259A's and the 8254's), and the clocks through the TSC, which both count on from
//! where it was. What the guest saw of the CPU is checked first: a destination that
//! cannot give every feature the guest saw is refused, naming them.

use arch::cpuid::CpuidEntry;
use cpu::BackendVcpu;
use cpu::kvm::KvmVcpuExtra;
use devices::irqchip::{IoApicState, IrqChipState, LapicState, PicRegs, PicState, RunState};
use devices::legacy::pit::{PitChannelRegs, PitState};
use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, kvm_clock_data,
    kvm_ioapic_state, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pic_state,
    kvm_pit_channel_state, kvm_pit_state2, kvm_vcpu_events,
};

use super::{EmuIrqState, IrqState, KvmIrqState, SnapshotBackend, VmSnapshot};

/// CPUID feature bits with names, by (leaf, subleaf, register index).
const FEATURES: &[(u32, u32, usize, u32, &str)] = &[
    (1, 0, 2, 0, "sse3"),
    (1, 0, 2, 1, "pclmulqdq"),
    (1, 0, 2, 9, "ssse3"),
    (1, 0, 2, 12, "fma"),
    (1, 0, 2, 13, "cx16"),
    (1, 0, 2, 19, "sse4.1"),
    (1, 0, 2, 20, "sse4.2"),
    (1, 0, 2, 22, "movbe"),
    (1, 0, 2, 23, "popcnt"),
    (1, 0, 2, 25, "aes"),
    (1, 0, 2, 26, "xsave"),
    (1, 0, 2, 28, "avx"),
    (1, 0, 2, 29, "f16c"),
    (1, 0, 2, 30, "rdrand"),
    (1, 0, 3, 0, "fpu"),
    (1, 0, 3, 25, "sse"),
    (1, 0, 3, 26, "sse2"),
    (7, 0, 1, 0, "fsgsbase"),
    (7, 0, 1, 3, "bmi1"),
    (7, 0, 1, 5, "avx2"),
    (7, 0, 1, 8, "bmi2"),
    (7, 0, 1, 9, "erms"),
    (7, 0, 1, 16, "avx512f"),
    (7, 0, 1, 18, "rdseed"),
    (7, 0, 1, 19, "adx"),
    (7, 0, 1, 20, "smap"),
    (7, 0, 1, 29, "sha"),
    (7, 0, 2, 1, "avx512vbmi"),
    (7, 0, 2, 8, "gfni"),
    (7, 0, 2, 9, "vaes"),
    (7, 0, 3, 24, "amx-tile"),
    (0x8000_0001, 0, 2, 5, "lzcnt"),
    (0x8000_0001, 0, 3, 27, "rdtscp"),
];

fn regs(t: &[CpuidEntry], leaf: u32, sub: u32) -> [u32; 4] {
    cpu::cpuid_lookup(t, leaf, sub)
}

/// The features in `saw` that `can` lacks.
pub fn missing_features(saw: &[CpuidEntry], can: &[CpuidEntry]) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|(leaf, sub, r, bit, _)| {
            let has = |t: &[CpuidEntry]| regs(t, *leaf, *sub)[*r] & (1 << bit) != 0;
            has(saw) && !has(can)
        })
        .map(|f| f.4)
        .collect()
}

/// Makes `s` loadable on `to`, whose vCPUs would see `cpuid`.
pub fn to_backend(
    s: &mut VmSnapshot,
    to: SnapshotBackend,
    cpuid: &[CpuidEntry],
) -> Result<(), String> {
    if s.backend == to {
        return Ok(());
    }
    let missing = missing_features(&s.cpuid, cpuid);
    if !missing.is_empty() {
        return Err(format!(
            "the guest saw CPU features {to} cannot give here: {}",
            missing.join(", ")
        ));
    }
    match to {
        SnapshotBackend::Kvm => emu_to_kvm(s)?,
        SnapshotBackend::Emu => kvm_to_emu(s)?,
    }
    s.backend = to;
    Ok(())
}

fn pic_to_kvm(r: &PicRegs) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: r.last_irr,
        irr: r.irr,
        imr: r.imr,
        isr: r.isr,
        priority_add: r.priority_add,
        irq_base: r.irq_base,
        read_reg_select: r.read_reg_select.into(),
        poll: r.poll.into(),
        special_mask: r.special_mask.into(),
        init_state: r.init_state,
        auto_eoi: r.auto_eoi.into(),
        rotate_on_auto_eoi: r.rotate_on_auto_eoi.into(),
        special_fully_nested_mode: r.special_fully_nested_mode.into(),
        init4: r.init4.into(),
        elcr: r.elcr,
        elcr_mask: 0xff,
    }
}

fn pic_from_kvm(p: &kvm_pic_state) -> PicRegs {
    PicRegs {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select != 0,
        poll: p.poll != 0,
        special_mask: p.special_mask != 0,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi != 0,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi != 0,
        special_fully_nested_mode: p.special_fully_nested_mode != 0,
        init4: p.init4 != 0,
        elcr: p.elcr,
    }
}

fn irqchip(id: u32, chip: kvm_bindings::kvm_irqchip__bindgen_ty_1) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        pad: 0,
        chip,
    }
}

fn emu_to_kvm(s: &mut VmSnapshot) -> Result<(), String> {
    let IrqState::Emu(e) = &s.irq else {
        return Err("the snapshot's interrupt state is not the software CPU's".into());
    };
    let now = e.chip.clock_ns;
    let [master, slave] = e.chip.pic.registers();
    let (id, select, asserted, table) = e.chip.ioapic.registers();
    let mut ioapic = kvm_ioapic_state {
        base_address: arch::layout::IOAPIC_START,
        ioregsel: select,
        id,
        irr: asserted,
        ..Default::default()
    };
    for (slot, entry) in ioapic.redirtbl.iter_mut().zip(table) {
        slot.bits = entry;
    }
    let mut pit = kvm_pit_state2::default();
    for (k, r) in pit.channels.iter_mut().zip(e.pit.registers()) {
        *k = kvm_pit_channel_state {
            count: r.count,
            latched_count: r.latched_count,
            count_latched: r.count_latched,
            status_latched: u8::from(r.status_latched.is_some()),
            status: r.status_latched.unwrap_or(0),
            read_state: r.read_state,
            write_state: r.write_state,
            write_latch: r.write_latch,
            rw_mode: r.rw_mode,
            mode: r.mode,
            bcd: r.bcd.into(),
            gate: r.gate.into(),
            count_load_time: 0,
        };
    }
    let irq = KvmIrqState {
        pic_master: irqchip(
            0,
            kvm_bindings::kvm_irqchip__bindgen_ty_1 {
                pic: pic_to_kvm(&master),
            },
        ),
        pic_slave: irqchip(
            1,
            kvm_bindings::kvm_irqchip__bindgen_ty_1 {
                pic: pic_to_kvm(&slave),
            },
        ),
        ioapic: irqchip(2, kvm_bindings::kvm_irqchip__bindgen_ty_1 { ioapic }),
        pit,
        clock: kvm_clock_data {
            clock: now,
            ..Default::default()
        },
    };
    for (v, lapic) in s.vcpus.iter_mut().zip(&e.chip.lapics) {
        let page = lapic.register_page(now);
        let mut regs = kvm_lapic_state::default();
        for (d, b) in regs.regs.iter_mut().zip(&page) {
            *d = *b as _;
        }
        let mp_state = match lapic.run_state() {
            RunState::WaitForSipi | RunState::Startup { .. } => KVM_MP_STATE_INIT_RECEIVED,
            _ if v.halted => KVM_MP_STATE_HALTED,
            _ => KVM_MP_STATE_RUNNABLE,
        };
        let mut events = kvm_vcpu_events::default();
        events.interrupt.shadow = u8::from(v.cpu.interrupt_shadow);
        events.flags = kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
        v.backend = BackendVcpu::Kvm(Box::new(KvmVcpuExtra {
            lapic: regs,
            events,
            mp_state: kvm_mp_state { mp_state },
            // The software CPU's TSC is its guest nanoseconds.
            tsc: now,
        }));
    }
    s.irq = IrqState::Kvm(Box::new(irq));
    Ok(())
}

fn kvm_to_emu(s: &mut VmSnapshot) -> Result<(), String> {
    let IrqState::Kvm(k) = &s.irq else {
        return Err("the snapshot's interrupt state is not KVM's".into());
    };
    // The software CPU's clock is its TSC: it counts on from vCPU 0's.
    let now = match s.vcpus.first().map(|v| &v.backend) {
        Some(BackendVcpu::Kvm(x)) => x.tsc,
        _ => return Err("the snapshot's vCPUs are not KVM's".into()),
    };
    // SAFETY: KVM_GET_IRQCHIP filled chips 0 and 1 as PICs and chip 2 as the IOAPIC
    // (their chip_id says which union member is meaningful; checked here).
    let (master, slave, ioapic) = unsafe {
        if (k.pic_master.chip_id, k.pic_slave.chip_id, k.ioapic.chip_id) != (0, 1, 2) {
            return Err("the snapshot's KVM interrupt controllers are out of order".into());
        }
        (
            k.pic_master.chip.pic,
            k.pic_slave.chip.pic,
            k.ioapic.chip.ioapic,
        )
    };
    // SAFETY: every redirection entry is a plain u64 in either view of the union.
    let table: [u64; 24] = std::array::from_fn(|i| unsafe { ioapic.redirtbl[i].bits });
    let mut lapics = Vec::with_capacity(s.vcpus.len());
    for v in &mut s.vcpus {
        let BackendVcpu::Kvm(x) = &v.backend else {
            return Err("the snapshot mixes backends".into());
        };
        let page: Vec<u8> = x.lapic.regs.iter().map(|b| *b as u8).collect();
        let run_state = match x.mp_state.mp_state {
            KVM_MP_STATE_INIT_RECEIVED => RunState::WaitForSipi,
            _ => RunState::Running,
        };
        let base = devices::irqchip::APIC_BASE_ENABLE
            | arch::layout::LAPIC_START
            | if v.index == 0 {
                devices::irqchip::APIC_BASE_BSP
            } else {
                0
            };
        lapics.push(LapicState::from_register_page(
            usize::from(v.index),
            base,
            &page,
            run_state,
            now,
        ));
        v.halted = x.mp_state.mp_state == KVM_MP_STATE_HALTED;
        v.cpu.interrupt_shadow = x.events.interrupt.shadow != 0;
        v.backend = BackendVcpu::Emu;
    }
    let pit_regs: [PitChannelRegs; 3] = std::array::from_fn(|i| {
        let c = &k.pit.channels[i];
        PitChannelRegs {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: (c.status_latched != 0).then_some(c.status),
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd != 0,
            gate: c.gate != 0,
        }
    });
    let chip = IrqChipState {
        clock_ns: now,
        lapics,
        ioapic: IoApicState::from_registers(ioapic.id, ioapic.ioregsel, ioapic.irr, table),
        pic: PicState::from_registers(&[pic_from_kvm(&master), pic_from_kvm(&slave)]),
    };
    s.irq = IrqState::Emu(Box::new(EmuIrqState {
        chip,
        pit: PitState::from_registers(&pit_regs, now),
    }));
    s.guest_ns = now;
    Ok(())
}
