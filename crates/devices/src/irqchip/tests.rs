//! The interrupt system driven as Linux drives it: through the LAPIC page, the
//! IOAPIC window and the PIC ports, across vCPUs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

const SVR_ON: u32 = 0x1ff;

fn chip(vcpus: usize) -> Arc<IrqChip> {
    IrqChip::new(vcpus, GuestClock::manual())
}

/// What setup_local_APIC does that matters here: flat logical ID, TPR 0, enable.
fn linux_lapic_setup(chip: &IrqChip, cpu: usize) {
    let l = chip.lapic(cpu);
    l.write_register(reg::DFR, 0xffff_ffff);
    l.write_register(reg::LDR, 1 << (24 + cpu));
    l.write_register(reg::TPR, 0);
    l.write_register(reg::SVR, SVR_ON);
    l.write_register(reg::LVT_LINT0, LVT_MASKED_EXTINT);
    l.write_register(reg::ESR, 0);
}

const LVT_MASKED_EXTINT: u32 = 0x1_0700;

fn send_ipi(chip: &IrqChip, from: usize, dest: u8, low: u32) {
    let l = chip.lapic(from);
    l.write_register(reg::ICR_HIGH, u32::from(dest) << 24);
    l.write_register(reg::ICR_LOW, low);
    assert_eq!(
        l.read_register(reg::ICR_LOW) & (1 << 12),
        0,
        "delivery idle"
    );
}

fn ioapic_write(dev: &mut IoApicMmio, index: u32, value: u32) {
    dev.write(0, &index.to_le_bytes());
    dev.write(0x10, &value.to_le_bytes());
}

fn ioapic_read(dev: &mut IoApicMmio, index: u32) -> u32 {
    dev.write(0, &index.to_le_bytes());
    let mut d = [0u8; 4];
    dev.read(0x10, &mut d);
    u32::from_le_bytes(d)
}

fn program_pin(dev: &mut IoApicMmio, pin: u32, entry: u64) {
    ioapic_write(dev, 0x11 + 2 * pin, (entry >> 32) as u32);
    ioapic_write(dev, 0x10 + 2 * pin, entry as u32);
}

#[test]
fn lapic_ids_and_enable_through_the_page() {
    let c = chip(2);
    let mut d = [0u8; 4];
    c.lapic(1).mmio_read(0x20, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1 << 24);
    linux_lapic_setup(&c, 1);
    assert_eq!(c.lapic(1).read_register(reg::SVR), SVR_ON);
    assert_eq!(c.lapic(1).read_register(reg::LDR), 2 << 24);
    assert_eq!(c.lapic(1).read_register(reg::ESR), 0);
    c.lapic(0).set_cr8(5);
    assert_eq!(c.lapic(0).read_register(reg::TPR), 0x50);
    assert_eq!(c.lapic(0).cr8(), 5);
}

#[test]
fn fixed_ipi_reaches_the_other_vcpu_and_wakes_it() {
    let c = chip(2);
    linux_lapic_setup(&c, 0);
    linux_lapic_setup(&c, 1);
    c.wake(1).take_attention();
    send_ipi(&c, 0, 1, 0x4000 | 0xfd);
    assert!(c.wake(1).take_attention());
    assert!(c.lapic(1).has_interrupt());
    assert!(!c.lapic(0).has_interrupt());
    assert_eq!(c.lapic(1).ack_interrupt(), Some(0xfd));
    assert!(!c.lapic(1).has_interrupt());
    c.lapic(1).write_register(reg::EOI, 0);
    assert_eq!(c.lapic(1).read_register(reg::ISR + 0x70), 0);
}

#[test]
fn tpr_holds_back_a_low_priority_ipi() {
    let c = chip(2);
    linux_lapic_setup(&c, 1);
    c.lapic(1).write_register(reg::TPR, 0xf0);
    send_ipi(&c, 0, 1, 0x4000 | 0xef);
    assert!(!c.lapic(1).has_interrupt());
    assert_eq!(c.lapic(1).ack_interrupt(), None);
    c.lapic(1).write_register(reg::TPR, 0x00);
    assert!(c.lapic(1).has_interrupt());
}

#[test]
fn linux_ap_bringup_init_deassert_and_two_sipis() {
    let c = chip(2);
    linux_lapic_setup(&c, 0);
    assert_eq!(c.lapic(1).run_state(), RunState::WaitForSipi);
    let bsp = c.lapic(0);
    bsp.write_register(reg::ESR, 0);
    assert_eq!(bsp.read_register(reg::ESR), 0);
    // INIT assert (level-triggered, asserted), then de-assert.
    send_ipi(&c, 0, 1, 0xc500);
    assert_eq!(c.lapic(1).run_state(), RunState::WaitForSipi);
    send_ipi(&c, 0, 1, 0x8500);
    assert_eq!(c.lapic(1).run_state(), RunState::WaitForSipi);
    for _ in 0..2 {
        bsp.write_register(reg::ESR, 0);
        bsp.read_register(reg::ESR);
        send_ipi(&c, 0, 1, 0x0600 | 0x9a);
        bsp.write_register(reg::ESR, 0);
        assert_eq!(bsp.read_register(reg::ESR) & 0xef, 0, "accept status");
    }
    assert_eq!(c.lapic(1).run_state(), RunState::Startup { vector: 0x9a });
    assert_eq!(c.lapic(1).take_startup(), Some(0x9a));
    assert_eq!(c.lapic(1).run_state(), RunState::Running);
    // An INIT de-assert to all (Linux's sync_Arb_IDs) disturbs nobody.
    send_ipi(&c, 0, 0, 0x0008_8500);
    assert_eq!(c.lapic(1).run_state(), RunState::Running);
    // A running vCPU that gets INIT goes back to waiting, and HLT ends for it.
    c.lapic(1).set_halted();
    send_ipi(&c, 0, 1, 0x4500);
    assert_eq!(c.lapic(1).run_state(), RunState::WaitForSipi);
    assert!(c.lapic(1).halt_ends(false));
}

#[test]
fn shorthands() {
    let c = chip(3);
    (0..3).for_each(|i| linux_lapic_setup(&c, i));
    let irr = |cpu: usize| c.lapic(cpu).read_register(reg::IRR + 0x70);
    // Self.
    send_ipi(&c, 1, 0, 0x0004_0000 | 0xf1);
    assert_eq!((irr(0), irr(1), irr(2)), (0, 1 << 17, 0));
    // All excluding self.
    send_ipi(&c, 1, 0, 0x000c_0000 | 0xf2);
    assert_eq!((irr(0), irr(1), irr(2)), (1 << 18, 1 << 17, 1 << 18));
    // All including self.
    send_ipi(&c, 1, 0, 0x0008_0000 | 0xf3);
    assert_eq!(irr(1), (1 << 17) | (1 << 19));
    assert_eq!(irr(2), (1 << 18) | (1 << 19));
    // Physical broadcast.
    send_ipi(&c, 0, 0xff, 0xf4);
    assert!((0..3).all(|i| irr(i) & (1 << 20) != 0));
}

#[test]
fn logical_flat_and_cluster_destinations() {
    let c = chip(3);
    (0..3).for_each(|i| linux_lapic_setup(&c, i));
    let has = |cpu: usize, v: u8| {
        c.lapic(cpu)
            .read_register(reg::IRR + 0x10 * u32::from(v >> 5))
            & (1 << (v & 31))
            != 0
    };
    // Flat: mask 0b101 is CPUs 0 and 2.
    send_ipi(&c, 0, 0b101, 0x0800 | 0x41);
    assert!(has(0, 0x41) && !has(1, 0x41) && has(2, 0x41));
    // Lowest priority to CPUs 1 and 2: one of them (the lowest-numbered).
    send_ipi(&c, 0, 0b110, 0x0900 | 0x42);
    assert!(has(1, 0x42) && !has(2, 0x42));
    // Cluster model: cluster 1, members 1 and 2.
    for cpu in 0..3 {
        let l = c.lapic(cpu);
        l.write_register(reg::DFR, 0x0fff_ffff);
        l.write_register(reg::LDR, (0x10 | (1 << cpu)) << 24);
    }
    send_ipi(&c, 0, 0x16, 0x0800 | 0x43);
    assert!(!has(0, 0x43) && has(1, 0x43) && has(2, 0x43));
    send_ipi(&c, 0, 0x26, 0x0800 | 0x44);
    assert!(!(0..3).any(|i| has(i, 0x44)), "wrong cluster");
}

#[test]
fn nmi_ipi_is_a_separate_pending_flag() {
    let c = chip(2);
    send_ipi(&c, 0, 1, 0x0400);
    assert!(c.lapic(1).nmi_pending());
    assert!(c.lapic(1).halt_ends(false));
    assert!(c.lapic(1).take_nmi());
    assert!(!c.lapic(1).take_nmi());
    assert!(!c.lapic(1).has_interrupt());
}

#[test]
fn ioapic_level_pin_eoi_broadcast_and_redelivery() {
    let c = chip(2);
    linux_lapic_setup(&c, 0);
    linux_lapic_setup(&c, 1);
    let mut io = IoApicMmio::new(c.clone());
    assert_eq!(ioapic_read(&mut io, 1), 0x0017_0011);
    // Pin 9 (the SCI): level, logical destination CPU 1, vector 0x41.
    program_pin(&mut io, 9, (0x02u64 << 56) | (1 << 15) | (1 << 11) | 0x41);
    let sci = c.irq_line(9);
    sci.set_level(true).unwrap();
    let l1 = c.lapic(1);
    assert_eq!(l1.read_register(reg::TMR + 0x20), 1 << 1, "level sets TMR");
    assert_eq!(l1.ack_interrupt(), Some(0x41));
    assert_ne!(ioapic_read(&mut io, 0x22) & (1 << 14), 0, "remote IRR");
    // Still asserted at the EOI: delivered again.
    l1.write_register(reg::EOI, 0);
    assert_eq!(l1.ack_interrupt(), Some(0x41));
    sci.set_level(false).unwrap();
    l1.write_register(reg::EOI, 0);
    assert_eq!(ioapic_read(&mut io, 0x22) & (1 << 14), 0);
    assert!(!l1.has_interrupt());
    assert!(!c.lapic(0).has_interrupt());
}

#[test]
fn ioapic_edge_pin_and_masking() {
    let c = chip(1);
    linux_lapic_setup(&c, 0);
    let mut io = IoApicMmio::new(c.clone());
    program_pin(&mut io, 4, (1u64 << 56) | (1 << 16) | (1 << 11) | 0x34);
    let com1 = c.irq_line(4);
    com1.trigger().unwrap();
    assert!(!c.lapic(0).has_interrupt(), "masked");
    program_pin(&mut io, 4, (1u64 << 56) | (1 << 11) | 0x34);
    com1.trigger().unwrap();
    assert_eq!(c.lapic(0).ack_interrupt(), Some(0x34));
    assert_eq!(c.lapic(0).read_register(reg::TMR + 0x20), 0);
    c.lapic(0).write_register(reg::EOI, 0);
    assert_eq!(ioapic_read(&mut io, 0x18), (1 << 11) | 0x34);
}

#[test]
fn msi_physical_and_logical() {
    let c = chip(2);
    linux_lapic_setup(&c, 0);
    linux_lapic_setup(&c, 1);
    c.deliver_msi(0xfee0_1000, 0x0051);
    assert_eq!(c.lapic(1).ack_interrupt(), Some(0x51));
    // Logical (DM set, RH clear, as Linux's flat mode sends): mask 0b01 is CPU 0.
    MsiSink::send(&*c, 0xfee0_1004, 0x0052).unwrap();
    assert_eq!(c.lapic(0).ack_interrupt(), Some(0x52));
    assert!(MsiSink::send(&*c, 0xfed0_0000, 0x52).is_err());
}

#[test]
fn extint_through_lint0_takes_the_pic_vector() {
    let c = chip(1);
    linux_lapic_setup(&c, 0);
    let mut master = PicPorts::new(c.clone(), PicPort::Master);
    let mut slave = PicPorts::new(c.clone(), PicPort::Slave);
    for (dev, writes) in [
        (
            &mut master,
            [(0, 0x11), (1, 0x30), (1, 0x04), (1, 0x01), (1, 0xfe)],
        ),
        (
            &mut slave,
            [(0, 0x11), (1, 0x38), (1, 0x02), (1, 0x01), (1, 0xff)],
        ),
    ] {
        for (port, v) in writes {
            dev.write(port, &[v]);
        }
    }
    c.irq_line(0).trigger().unwrap();
    assert!(c.pic_output());
    assert!(!c.lapic(0).has_interrupt(), "LINT0 masked");
    c.wake(0).take_attention();
    c.lapic(0).write_register(reg::LVT_LINT0, 0x700);
    assert!(c.lapic(0).has_interrupt());
    assert_eq!(c.lapic(0).ack_interrupt(), Some(0x30));
    assert!(!c.lapic(0).has_interrupt());
    master.write(0, &[0x0b]);
    let mut d = [0u8];
    master.read(0, &mut d);
    assert_eq!(d, [1], "IRQ0 in service at the PIC");
    master.write(0, &[0x20]);
    // A new edge with LINT0 open sets the vCPU's attention.
    c.irq_line(0).trigger().unwrap();
    assert!(c.wake(0).take_attention());
}

#[test]
fn isa_routing_override() {
    let mut routing = IDENTITY_ISA_ROUTING;
    routing[0] = 2;
    let c = IrqChip::with_isa_routing(1, GuestClock::manual(), routing);
    linux_lapic_setup(&c, 0);
    let mut io = IoApicMmio::new(c.clone());
    program_pin(&mut io, 2, 0x30);
    let mut master = PicPorts::new(c.clone(), PicPort::Master);
    master.write(1, &[0x00]);
    c.isa_irq_line(0).trigger().unwrap();
    assert_eq!(c.lapic(0).ack_interrupt(), Some(0x30), "through pin 2");
    let mut d = [0u8];
    master.read(0, &mut d);
    assert_eq!(d, [1], "and the PIC's IRQ0");
}

#[test]
fn lapic_timer_through_the_chip_with_a_manual_clock() {
    let c = chip(1);
    linux_lapic_setup(&c, 0);
    let l = c.lapic(0);
    l.write_register(reg::TIMER_DIVIDE, 0b1011);
    l.write_register(reg::LVT_TIMER, 0xec);
    l.write_register(reg::TIMER_INITIAL, 1_000_000);
    assert_eq!(l.timer_deadline(), Some(1_000_000));
    assert_eq!(l.next_deadline(), Some(1_000_000));
    c.clock().advance(400_000);
    assert_eq!(l.read_register(reg::TIMER_CURRENT), 600_000);
    l.poll_timers();
    assert!(!l.has_interrupt());
    c.clock().advance(600_000);
    l.poll_timers();
    assert!(l.has_interrupt());
    assert_eq!(l.timer_deadline(), None);
    // TSC deadline through the MSR.
    l.write_register(reg::LVT_TIMER, (2 << 17) | 0xec);
    let tsc = c.clock().tsc();
    l.wrmsr(MSR_TSC_DEADLINE, tsc + 500).unwrap();
    assert_eq!(l.timer_deadline(), Some(tsc + 500));
    assert_eq!(l.rdmsr(MSR_TSC_DEADLINE), Ok(tsc + 500));
    assert_eq!(l.rdmsr(0x10), Err(LapicError::UnknownMsr(0x10)));
}

struct FakeTimer {
    deadline: AtomicU64,
    polls: AtomicUsize,
}

impl PlatformTimer for FakeTimer {
    fn next_event_ns(&self) -> Option<u64> {
        Some(self.deadline.load(Ordering::SeqCst))
    }
    fn poll(&self, now_ns: u64) {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.deadline.store(now_ns + 1000, Ordering::SeqCst);
    }
}

#[test]
fn platform_timers_are_polled_when_due() {
    let c = chip(1);
    let t = Arc::new(FakeTimer {
        deadline: AtomicU64::new(500),
        polls: AtomicUsize::new(0),
    });
    c.set_platform_timers(vec![t.clone()]).unwrap();
    assert!(c.set_platform_timers(vec![]).is_err());
    assert_eq!(c.lapic(0).next_deadline(), Some(500));
    c.lapic(0).poll_timers();
    assert_eq!(t.polls.load(Ordering::SeqCst), 0);
    c.clock().set(500);
    c.lapic(0).poll_timers();
    assert_eq!(t.polls.load(Ordering::SeqCst), 1);
    assert_eq!(c.platform_deadline(), Some(1500));
}

#[test]
fn halted_vcpu_thread_wakes_on_an_interrupt_from_another_thread() {
    let c = IrqChip::new(2, GuestClock::new());
    linux_lapic_setup(&c, 0);
    let chip = c.clone();
    let vcpu = std::thread::spawn(move || {
        let l = chip.lapic(0);
        l.set_halted();
        assert!(!l.halt_ends(true));
        while !l.halt_ends(true) {
            l.wait();
        }
        l.set_running();
        l.ack_interrupt()
    });
    std::thread::sleep(Duration::from_millis(20));
    c.deliver_msi(0xfee0_0000, 0x61);
    assert_eq!(vcpu.join().unwrap(), Some(0x61));
    assert_eq!(c.lapic(0).run_state(), RunState::Running);
}

#[test]
fn halted_vcpu_wakes_for_its_timer() {
    let c = IrqChip::new(1, GuestClock::new());
    linux_lapic_setup(&c, 0);
    let l = c.lapic(0);
    l.write_register(reg::TIMER_DIVIDE, 0b1011);
    l.write_register(reg::LVT_TIMER, 0xec);
    l.write_register(reg::TIMER_INITIAL, 5_000_000);
    let start = c.clock().now_ns();
    while !l.halt_ends(true) {
        l.wait();
    }
    assert!(c.clock().now_ns() - start >= 4_000_000);
    assert_eq!(l.ack_interrupt(), Some(0xec));
}

#[test]
fn save_and_restore() {
    let c = chip(2);
    linux_lapic_setup(&c, 0);
    linux_lapic_setup(&c, 1);
    send_ipi(&c, 0, 1, 0x31);
    let mut io = IoApicMmio::new(c.clone());
    program_pin(&mut io, 3, 0x33);
    let saved = c.save();
    let d = chip(2);
    d.restore(&saved).unwrap();
    assert_eq!(d.save().lapics, saved.lapics);
    assert_eq!(d.ioapic_state(), saved.ioapic);
    assert!(d.lapic(1).has_interrupt(), "mirrors refreshed");
    assert_eq!(
        chip(1).restore(&saved),
        Err(IrqChipError::VcpuCount { saved: 2, vcpus: 1 })
    );
}

#[test]
fn state_types_are_serde() {
    fn serde<T: Serialize + for<'de> Deserialize<'de>>() {}
    serde::<IrqChipState>();
    serde::<crate::legacy::pit::PitState>();
}

#[test]
fn nmi_from_the_vmm() {
    let c = chip(2);
    c.wake(1).take_attention();
    c.inject_nmi(1);
    assert!(c.wake(1).take_attention());
    assert!(c.lapic(1).take_nmi());
}

/// IPIs both ways, a level line and EOI broadcasts from three threads at once: the
/// lock order holds (no deadlock) and nothing is lost for good.
#[test]
fn concurrent_ipis_and_level_eois_do_not_deadlock() {
    let c = IrqChip::new(2, GuestClock::new());
    linux_lapic_setup(&c, 0);
    linux_lapic_setup(&c, 1);
    let mut io = IoApicMmio::new(c.clone());
    program_pin(&mut io, 10, (0x03u64 << 56) | (1 << 15) | (1 << 11) | 0x4a);
    let vcpu = |cpu: usize| {
        let c = c.clone();
        std::thread::spawn(move || {
            let l = c.lapic(cpu);
            let mut taken = 0;
            for _ in 0..20_000 {
                send_ipi(&c, cpu, (1 - cpu) as u8, 0xe0);
                while let Some(_v) = l.ack_interrupt() {
                    taken += 1;
                    l.write_register(reg::EOI, 0);
                }
            }
            taken
        })
    };
    let (a, b) = (vcpu(0), vcpu(1));
    let line = c.irq_line(10);
    for i in 0..20_000 {
        line.set_level(i % 2 == 0).unwrap();
    }
    line.set_level(false).unwrap();
    assert!(a.join().unwrap() > 0);
    assert!(b.join().unwrap() > 0);
    // Drain what is left: every EOI went to the IOAPIC, so remote IRR is clear.
    for cpu in 0..2 {
        while c.lapic(cpu).ack_interrupt().is_some() {
            c.lapic(cpu).write_register(reg::EOI, 0);
        }
    }
    assert_eq!(ioapic_read(&mut io, 0x24) & (1 << 14), 0);
}
