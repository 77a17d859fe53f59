//! The software CPU's interrupt system as guests and devices drive it: each vCPU's
//! local APIC page and MSRs, the IOAPIC page, the 8259 pair and ELCR ports, the PIT
//! (IRQ0) as the platform timer, device lines and MSIs, on a guest clock the input
//! moves, with the vCPU loop's side (acknowledge, NMI, HLT, INIT/SIPI) in between.
//!
//! Checked: the lock-free mirrors a vCPU loop reads (interrupt pending, timer
//! deadline) agree with the state under the lock; a vCPU told an interrupt is pending
//! gets one on acknowledge, and one from the local APIC is never a reserved vector
//! (below 16); after a poll every deadline lies after the poll (a deadline in the past
//! would make the vCPU loop spin); CR8 reads back; the whole chip survives a save and a
//! restore, and each LAPIC, the IOAPIC and the PIC survive their KVM register form.
//!
//! Input: vCPU count (1 + byte % 4), then operations, each a byte (bits 0-3 kind,
//! bits 4-5 access width 1/2/4/8, bits 6-7 vCPU) and its fields: 0 LAPIC read
//! (offset u16), 1 LAPIC write (offset, value), 2 IOAPIC read (offset u16), 3 IOAPIC
//! write (offset, value), 4 port read (index, see [`PORTS`]), 5 port write (index,
//! value), 6 a GSI line (gsi u8, level u8), 7 an MSI (address u32, data u32), 8 the
//! clock moves (ns u32) and the vCPU polls its timers, 9 the vCPU acknowledges,
//! 10 NMI injected or taken, 11 HLT / wake / startup, 12 MSR read or write (msr u8,
//! value u64), 13 CR8 write (u8), 14 save and restore.

use std::sync::{Arc, Mutex};

use arch::layout::{IOAPIC_SIZE, IOAPIC_START};
use devices::Bus;
use devices::irqchip::{
    GuestClock, IoApicMmio, IoApicState, IrqChip, LapicState, MSR_APIC_BASE, MSR_TSC_DEADLINE,
    PicPort, PicPorts, PicState,
};
use devices::legacy::pit::{Pit, PitPort61, PitTimer};

use crate::ops::{Ops, Program, access_len};

/// The ports an operation picks from: the PICs, the ELCR, the PIT and port 0x61.
pub const PORTS: [u16; 11] = [
    0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61,
];
const MSRS: [u32; 4] = [MSR_APIC_BASE, MSR_TSC_DEADLINE, 0x10, 0x1b + 0x800];

struct Chip {
    chip: Arc<IrqChip>,
    io: Bus,
    mmio: Bus,
}

impl Chip {
    fn new(vcpus: usize, clock: GuestClock) -> Self {
        let chip = IrqChip::new(vcpus, clock.clone());
        let pit = Arc::new(Mutex::new(Pit::new(chip.isa_irq_line(0), clock)));
        chip.set_platform_timers(vec![PitTimer::new(pit.clone())])
            .expect("timers set once");
        let mut io = Bus::new();
        for (port, which) in [
            (0x20, PicPort::Master),
            (0xa0, PicPort::Slave),
            (0x4d0, PicPort::Elcr),
        ] {
            let ports = PicPorts::new(chip.clone(), which);
            io.insert(port, 2, Arc::new(Mutex::new(ports)))
                .expect("the port map");
        }
        io.insert(0x40, 4, pit.clone()).expect("the port map");
        io.insert(0x61, 1, Arc::new(Mutex::new(PitPort61::new(pit))))
            .expect("the port map");
        let mut mmio = Bus::new();
        mmio.insert(
            IOAPIC_START,
            IOAPIC_SIZE,
            Arc::new(Mutex::new(IoApicMmio::new(chip.clone()))),
        )
        .expect("the IOAPIC page");
        Chip { chip, io, mmio }
    }

    fn check(&self) {
        for i in 0..self.chip.vcpu_count() {
            let lapic = self.chip.lapic(i);
            let s = lapic.state();
            let pending =
                s.deliverable().is_some() || (s.extint_enabled() && self.chip.pic_output());
            assert_eq!(
                lapic.has_interrupt(),
                pending,
                "vCPU {i}: the pending mirror"
            );
            let deadline = s.timer_deadline().map(|d| d.min(u64::MAX - 1));
            assert_eq!(
                lapic.timer_deadline(),
                deadline,
                "vCPU {i}: the timer mirror"
            );
        }
    }

    fn poll(&self, vcpu: usize) {
        let lapic = self.chip.lapic(vcpu);
        let now = lapic.poll_timers();
        if let Some(d) = lapic.timer_deadline() {
            assert!(
                d > now,
                "vCPU {vcpu}: timer due at {d} right after a poll at {now}"
            );
        }
        if let Some(d) = self.chip.platform_deadline() {
            assert!(d > now, "PIT due at {d} right after a poll at {now}");
        }
    }

    fn acknowledge(&self, vcpu: usize) {
        let lapic = self.chip.lapic(vcpu);
        let pending = lapic.has_interrupt();
        let extint = lapic.state().extint_enabled() && self.chip.pic_output();
        let vector = lapic.ack_interrupt();
        if pending {
            assert!(
                vector.is_some(),
                "vCPU {vcpu}: pending, yet nothing to acknowledge"
            );
        }
        if let Some(v) = vector
            && !extint
        {
            assert!(
                v >= 16,
                "vCPU {vcpu}: reserved vector {v} from the local APIC"
            );
        }
    }

    fn round_trip(&self) {
        let now = self.chip.clock().now_ns();
        let saved = self.chip.save();
        let other = Chip::new(self.chip.vcpu_count(), GuestClock::manual());
        other.chip.clock().set(saved.clock_ns);
        other.chip.restore(&saved).expect("as many vCPUs");
        assert_eq!(
            other.chip.save(),
            saved,
            "the interrupt state restores differently"
        );
        for (i, s) in saved.lapics.iter().enumerate() {
            let page = s.register_page(now);
            let back = LapicState::from_register_page(i, s.apic_base(), &page, s.run_state(), now);
            assert_eq!(
                back.register_page(now),
                page,
                "LAPIC {i}: its register page"
            );
        }
        let (sel, id, arb, redirs) = saved.ioapic.registers();
        let ioapic = IoApicState::from_registers(sel, id, arb, redirs);
        assert_eq!(
            ioapic.registers(),
            saved.ioapic.registers(),
            "IOAPIC registers"
        );
        let pic = PicState::from_registers(&saved.pic.registers());
        assert_eq!(pic.registers(), saved.pic.registers(), "PIC registers");
    }
}

/// An MSI address from 32 bits: mostly the local APIC window.
fn msi_address(v: u32) -> u64 {
    if v & 1 == 0 {
        0xfee0_0000 | u64::from(v & 0x000f_fff0)
    } else {
        u64::from(v)
    }
}

pub fn irqchip(data: &[u8]) {
    let mut ops = Ops::new(data);
    let vcpus = 1 + usize::from(ops.u8() % 4);
    let c = Chip::new(vcpus, GuestClock::manual());
    let mut buf = [0u8; 8];
    while ops.next_op() {
        let op = ops.u8();
        let len = access_len(op >> 4);
        let vcpu = usize::from(op >> 6) % vcpus;
        let lapic = c.chip.lapic(vcpu);
        match op & 0xf {
            0 => lapic.mmio_read(u64::from(ops.u16() & 0xfff), &mut buf[..len]),
            1 => {
                let offset = u64::from(ops.u16() & 0xfff);
                let v = ops.value(len);
                lapic.mmio_write(offset, &v.to_le_bytes()[..len]);
            }
            2 => {
                let offset = u64::from(ops.u16()) % IOAPIC_SIZE;
                c.mmio.read(IOAPIC_START + offset, &mut buf[..len]);
            }
            3 => {
                let offset = u64::from(ops.u16()) % IOAPIC_SIZE;
                let v = ops.value(len);
                c.mmio.write(IOAPIC_START + offset, &v.to_le_bytes()[..len]);
            }
            4 => {
                let port = PORTS[usize::from(ops.u8()) % PORTS.len()];
                c.io.read(u64::from(port), &mut buf[..len]);
            }
            5 => {
                let port = PORTS[usize::from(ops.u8()) % PORTS.len()];
                let v = ops.value(len);
                c.io.write(u64::from(port), &v.to_le_bytes()[..len]);
            }
            6 => {
                let (gsi, level) = (ops.u8(), ops.u8());
                c.chip.set_gsi(u32::from(gsi), level & 1 != 0);
            }
            7 => {
                let (address, data) = (msi_address(ops.u32()), ops.u32());
                c.chip.deliver_msi(address, data);
            }
            8 => {
                c.chip.clock().advance(u64::from(ops.u32()));
                c.poll(vcpu);
            }
            9 => c.acknowledge(vcpu),
            10 => match ops.u8() & 1 {
                0 => c.chip.inject_nmi(vcpu),
                _ => {
                    lapic.take_nmi();
                }
            },
            11 => match ops.u8() % 4 {
                0 => lapic.set_halted(),
                1 => lapic.set_running(),
                2 => {
                    lapic.take_startup();
                }
                _ => {
                    lapic.halt_ends(true);
                }
            },
            12 => {
                let msr = MSRS[usize::from(ops.u8()) % MSRS.len()];
                let v = ops.u64();
                match op & 0x10 {
                    0 => {
                        let _ = lapic.rdmsr(msr);
                    }
                    _ => {
                        let _ = lapic.wrmsr(msr, v);
                    }
                }
            }
            13 => {
                let v = u64::from(ops.u8());
                lapic.set_cr8(v);
                assert_eq!(lapic.cr8(), v & 0xf, "CR8 reads back");
            }
            14 => c.round_trip(),
            _ => {}
        }
        c.check();
    }
}

/// An operation as [`irqchip`] reads it.
pub fn op(p: &mut Program, kind: u8, len: usize, vcpu: u8) -> &mut Program {
    let width = [1, 2, 4, 8].iter().position(|&l| l == len).unwrap_or(2) as u8;
    p.u8(kind | width << 4 | (vcpu & 3) << 6)
}
