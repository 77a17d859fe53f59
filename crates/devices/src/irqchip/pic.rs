//! The 8259A pair of a PC: master at 0x20/0x21, slave at 0xA0/0xA1 cascaded on the
//! master's IRQ2, edge/level per the ELCR (0x4D0/0x4D1). ICW1-4, OCW1-3, poll,
//! auto-EOI, rotation, special mask; INTA returns the vector. The logic follows QEMU's
//! i8259, which Linux's init_8259A and probe_8259A are known to accept.

use serde::{Deserialize, Serialize};

/// IRQs that may be level-triggered (not 0, 1, 2 on the master; not 8, 13 on the slave).
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];
const CASCADE_IRQ: u8 = 2;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Chip {
    /// Input levels last seen (for edge detection).
    last_irr: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    priority_add: u8,
    irq_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init_state: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    init4: bool,
    single_mode: bool,
    elcr: u8,
}

impl Chip {
    fn init_reset(&mut self) {
        let elcr = self.elcr;
        let irr = self.irr & elcr;
        *self = Chip {
            elcr,
            irr,
            ..Chip::default()
        };
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    /// Priority (0 = highest) of the best bit in `mask`, 8 when empty.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IRQ this chip would raise now, if any.
    fn pending_irq(&self, is_master: bool) -> Option<u8> {
        let priority = self.priority(self.irr & !self.imr);
        if priority == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            in_service &= !(1 << CASCADE_IRQ);
        }
        (priority < self.priority(in_service)).then_some((priority + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1
            self.init_reset();
            self.init_state = 1;
            self.init4 = value & 1 != 0;
            self.single_mode = value & 2 != 0;
            if value & 0x08 != 0 {
                tracing::debug!("8259: level-triggered mode by ICW1 not supported");
            }
        } else if value & 0x08 != 0 {
            // OCW3
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 1 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2
            match value >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                cmd @ (1 | 5) => {
                    let priority = self.priority(self.isr);
                    if priority != 8 {
                        let irq = (priority + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << (value & 7)),
                6 => self.priority_add = (value + 1) & 7,
                7 => {
                    let irq = value & 7;
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_state {
            0 => self.imr = value,
            1 => {
                self.irq_base = value & 0xf8;
                self.init_state = match (self.single_mode, self.init4) {
                    (true, true) => 3,
                    (true, false) => 0,
                    (false, _) => 2,
                };
            }
            2 => self.init_state = if self.init4 { 3 } else { 0 },
            _ => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init_state = 0;
            }
        }
    }
}

/// One 8259A's internals as KVM's `kvm_pic_state` names them: how a PIC moves to
/// another backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PicRegs {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: bool,
    pub poll: bool,
    pub special_mask: bool,
    pub init_state: u8,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested_mode: bool,
    pub init4: bool,
    pub elcr: u8,
}

impl PicRegs {
    fn of(c: &Chip) -> Self {
        PicRegs {
            last_irr: c.last_irr,
            irr: c.irr,
            imr: c.imr,
            isr: c.isr,
            priority_add: c.priority_add,
            irq_base: c.irq_base,
            read_reg_select: c.read_isr,
            poll: c.poll,
            special_mask: c.special_mask,
            init_state: c.init_state,
            auto_eoi: c.auto_eoi,
            rotate_on_auto_eoi: c.rotate_on_auto_eoi,
            special_fully_nested_mode: c.special_fully_nested,
            init4: c.init4,
            elcr: c.elcr,
        }
    }

    fn chip(&self) -> Chip {
        Chip {
            last_irr: self.last_irr,
            irr: self.irr,
            imr: self.imr,
            isr: self.isr,
            priority_add: self.priority_add & 7,
            irq_base: self.irq_base & 0xf8,
            read_isr: self.read_reg_select,
            poll: self.poll,
            special_mask: self.special_mask,
            init_state: self.init_state.min(3),
            auto_eoi: self.auto_eoi,
            rotate_on_auto_eoi: self.rotate_on_auto_eoi,
            special_fully_nested: self.special_fully_nested_mode,
            init4: self.init4,
            single_mode: false,
            elcr: self.elcr,
        }
    }
}

/// Master and slave 8259A.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    chips: [Chip; 2],
}

impl PicState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The master's and the slave's registers.
    pub fn registers(&self) -> [PicRegs; 2] {
        [PicRegs::of(&self.chips[0]), PicRegs::of(&self.chips[1])]
    }

    pub fn from_registers(regs: &[PicRegs; 2]) -> Self {
        PicState {
            chips: [regs[0].chip(), regs[1].chip()],
        }
    }

    /// Drives ISA IRQ `irq` (0-15; 2 is the cascade and not an input).
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != CASCADE_IRQ => self.chips[0].set_irq(irq, level),
            8..=15 => self.chips[1].set_irq(irq - 8, level),
            _ => return,
        }
        self.update();
    }

    /// The slave's output is the master's IRQ2 input.
    fn update(&mut self) {
        let slave = self.chips[1].pending_irq(false).is_some();
        self.chips[0].set_irq(CASCADE_IRQ, slave);
    }

    /// The master's INT output: the CPU has an interrupt to acknowledge.
    pub fn output(&self) -> bool {
        self.chips[0].pending_irq(true).is_some()
    }

    /// The interrupt-acknowledge cycle: the vector of the best pending IRQ (a spurious
    /// IRQ 7 or 15 when it went away).
    pub fn inta(&mut self) -> u8 {
        let vector = match self.chips[0].pending_irq(true) {
            Some(CASCADE_IRQ) => {
                let irq = match self.chips[1].pending_irq(false) {
                    Some(irq) => {
                        self.chips[1].intack(irq);
                        irq
                    }
                    None => 7,
                };
                self.chips[0].intack(CASCADE_IRQ);
                self.chips[1].irq_base + irq
            }
            Some(irq) => {
                self.chips[0].intack(irq);
                self.chips[0].irq_base + irq
            }
            None => self.chips[0].irq_base + 7,
        };
        self.update();
        vector
    }

    /// Port access: `chip` 0 = master (0x20/0x21), 1 = slave (0xA0/0xA1); `offset` 0/1.
    pub fn read(&mut self, chip: usize, offset: u64) -> u8 {
        let c = &mut self.chips[chip];
        if c.poll {
            c.poll = false;
            let value = match c.pending_irq(chip == 0) {
                Some(irq) => {
                    c.intack(irq);
                    0x80 | irq
                }
                None => 0,
            };
            self.update();
            return value;
        }
        match (offset & 1, c.read_isr) {
            (0, true) => c.isr,
            (0, false) => c.irr,
            _ => c.imr,
        }
    }

    pub fn write(&mut self, chip: usize, offset: u64, value: u8) {
        let c = &mut self.chips[chip];
        if offset & 1 == 0 {
            c.write_command(value);
        } else {
            c.write_data(value);
        }
        self.update();
    }

    /// The edge/level control registers at 0x4D0 (master) and 0x4D1 (slave).
    pub fn read_elcr(&self, chip: usize) -> u8 {
        self.chips[chip].elcr
    }

    pub fn write_elcr(&mut self, chip: usize, value: u8) {
        self.chips[chip].elcr = value & ELCR_MASK[chip];
        self.update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A(auto_eoi) after probe_8259A, vectors 0x30/0x38.
    fn linux_init(auto_eoi: bool) -> PicState {
        let mut p = PicState::new();
        p.write(1, 1, 0xff);
        p.write(0, 1, 0xfb);
        assert_eq!(p.read(0, 1), 0xfb, "probe_8259A reads its mask back");
        p.write(0, 1, 0xff);
        p.write(1, 1, 0xff);
        p.write(0, 0, 0x11);
        p.write(0, 1, 0x30);
        p.write(0, 1, 1 << 2);
        p.write(0, 1, if auto_eoi { 0x03 } else { 0x01 });
        p.write(1, 0, 0x11);
        p.write(1, 1, 0x38);
        p.write(1, 1, 2);
        p.write(1, 1, 0x01);
        p.write(0, 1, 0xfb);
        p.write(1, 1, 0xff);
        p
    }

    #[test]
    fn init_sequence_and_masking() {
        let mut p = linux_init(false);
        assert_eq!((p.read(0, 1), p.read(1, 1)), (0xfb, 0xff));
        p.set_irq(1, true);
        assert!(!p.output(), "IRQ1 masked");
        assert_eq!(p.read(0, 0), 0x02, "IRR shows it");
        p.write(0, 1, 0xf9);
        assert!(p.output());
        assert_eq!(p.inta(), 0x31);
        assert!(!p.output());
        p.write(0, 0, 0x0b);
        assert_eq!(p.read(0, 0), 0x02, "ISR after OCW3 read-ISR");
        p.write(0, 0, 0x0a);
        assert_eq!(p.read(0, 0), 0, "IRR cleared by INTA (edge)");
        // Linux's mask_and_ack: specific EOI.
        p.write(0, 0, 0x60 + 1);
        p.write(0, 0, 0x0b);
        assert_eq!(p.read(0, 0), 0);
    }

    #[test]
    fn priority_and_non_specific_eoi() {
        let mut p = linux_init(false);
        p.write(0, 1, 0x00);
        p.set_irq(4, true);
        p.set_irq(3, true);
        assert_eq!(p.inta(), 0x33);
        // IRQ4 is of lower priority than IRQ3 in service: held.
        assert!(!p.output());
        p.write(0, 0, 0x20);
        assert_eq!(p.inta(), 0x34);
        p.write(0, 0, 0x20);
        assert!(!p.output());
    }

    #[test]
    fn cascade_through_irq2() {
        let mut p = linux_init(false);
        p.write(1, 1, 0xfe);
        p.set_irq(8, true);
        assert!(p.output());
        assert_eq!(p.inta(), 0x38);
        p.write(1, 0, 0x0b);
        assert_eq!(p.read(1, 0), 0x01);
        p.write(0, 0, 0x0b);
        assert_eq!(p.read(0, 0), 0x04, "master has IRQ2 in service");
        // A second slave IRQ waits for both EOIs.
        p.set_irq(8, false);
        p.set_irq(8, true);
        assert!(!p.output());
        p.write(1, 0, 0x20);
        p.write(0, 0, 0x20);
        assert!(p.output());
        assert_eq!(p.inta(), 0x38);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut p = linux_init(true);
        p.write(0, 1, 0xfa);
        p.set_irq(0, true);
        p.set_irq(0, false);
        assert_eq!(p.inta(), 0x30);
        p.write(0, 0, 0x0b);
        assert_eq!(p.read(0, 0), 0);
        p.set_irq(0, true);
        assert_eq!(p.inta(), 0x30);
    }

    #[test]
    fn elcr_level_irq_follows_the_line() {
        let mut p = linux_init(false);
        p.write_elcr(1, 0xff);
        assert_eq!(p.read_elcr(1), 0xde);
        p.write_elcr(0, 0x07);
        assert_eq!(p.read_elcr(0), 0, "IRQ0-2 are edge only");
        p.write(1, 1, 0xfd);
        p.set_irq(9, true);
        assert_eq!(p.inta(), 0x39);
        p.write(1, 0, 0x20);
        p.write(0, 0, 0x20);
        assert!(p.output(), "still asserted: pending again");
        p.set_irq(9, false);
        // The master latched the cascade edge: the CPU gets the slave's spurious IRQ15.
        assert_eq!(p.inta(), 0x3f);
        p.write(0, 0, 0x20);
        assert!(!p.output());
    }

    #[test]
    fn poll_mode_and_spurious() {
        let mut p = linux_init(false);
        p.write(0, 1, 0xf7);
        assert_eq!(p.inta(), 0x37, "nothing pending: spurious IRQ7");
        p.set_irq(3, true);
        p.write(0, 0, 0x0c);
        assert_eq!(p.read(0, 0), 0x83);
        p.write(0, 0, 0x0c);
        assert_eq!(p.read(0, 0), 0);
    }
}
