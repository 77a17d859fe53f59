//! The I/O APIC (version 0x11, 24 pins) at 0xFEC00000: IOREGSEL/IOWIN, redirection
//! entries, edge and level pins with remote IRR cleared by the local APICs' EOI
//! broadcast. Plain data: deliveries go out through a callback.

use serde::{Deserialize, Serialize};

use super::delivery::Message;

pub const IOAPIC_PINS: usize = 24;
/// Version 0x11, maximum redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);
/// MMIO offsets.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION: u32 = 0x10;

const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL_TRIGGERED: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Writable bits: everything but delivery status and remote IRR; the destination.
const WRITABLE: u64 = 0xff00_0000_0001_afff;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicState {
    id: u32,
    select: u32,
    redirection: [u64; IOAPIC_PINS],
    /// Input pins currently asserted.
    asserted: u32,
}

impl Default for IoApicState {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApicState {
    pub fn new() -> Self {
        IoApicState {
            id: 0,
            select: 0,
            redirection: [MASKED; IOAPIC_PINS],
            asserted: 0,
        }
    }

    /// The registers as the architecture (and KVM's `kvm_ioapic_state`) has them: the ID,
    /// the selected register, the asserted pins, the redirection table.
    pub fn registers(&self) -> (u32, u32, u32, [u64; IOAPIC_PINS]) {
        (self.id, self.select, self.asserted, self.redirection)
    }

    pub fn from_registers(
        id: u32,
        select: u32,
        asserted: u32,
        redirection: [u64; IOAPIC_PINS],
    ) -> Self {
        IoApicState {
            id: id & 0xf,
            select: select & 0xff,
            redirection: redirection.map(|e| e & (WRITABLE | REMOTE_IRR | DELIVERY_STATUS)),
            asserted,
        }
    }

    pub fn redirection(&self, pin: usize) -> u64 {
        self.redirection[pin]
    }

    /// A 32-bit (or narrower) MMIO read.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => self.select,
            IOWIN => self.read_register(self.select),
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u64, value: u32, deliver: &mut dyn FnMut(&Message)) {
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(self.select, value, deliver),
            _ => {}
        }
    }

    fn read_register(&self, index: u32) -> u32 {
        match index {
            REG_ID | REG_ARBITRATION => self.id << 24,
            REG_VERSION => IOAPIC_VERSION,
            i if (REG_REDIRECTION..REG_REDIRECTION + 2 * IOAPIC_PINS as u32).contains(&i) => {
                let entry = self.redirection[((i - REG_REDIRECTION) / 2) as usize];
                if i & 1 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, index: u32, value: u32, deliver: &mut dyn FnMut(&Message)) {
        match index {
            REG_ID => self.id = (value >> 24) & 0xf,
            i if (REG_REDIRECTION..REG_REDIRECTION + 2 * IOAPIC_PINS as u32).contains(&i) => {
                let pin = ((i - REG_REDIRECTION) / 2) as usize;
                let old = self.redirection[pin];
                let new = if i & 1 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | u64::from(value) << 32
                };
                let mut entry = (old & (REMOTE_IRR | DELIVERY_STATUS)) | (new & WRITABLE);
                // An edge entry has no remote IRR: Linux clears a stuck one this way.
                if entry & LEVEL_TRIGGERED == 0 {
                    entry &= !REMOTE_IRR;
                }
                self.redirection[pin] = entry;
                // Unmasking a level pin that is still asserted delivers it now.
                if entry & LEVEL_TRIGGERED != 0 {
                    self.service(pin, deliver);
                }
            }
            _ => {}
        }
    }

    /// Drives input `pin` (asserted = true, whatever the entry's polarity: devices
    /// speak of asserted lines, as with KVM's irq lines).
    pub fn set_level(&mut self, pin: usize, asserted: bool, deliver: &mut dyn FnMut(&Message)) {
        if pin >= IOAPIC_PINS {
            return;
        }
        let mask = 1u32 << pin;
        let was = self.asserted & mask != 0;
        if asserted {
            self.asserted |= mask;
        } else {
            self.asserted &= !mask;
        }
        let entry = self.redirection[pin];
        if entry & LEVEL_TRIGGERED != 0 {
            if asserted {
                self.service(pin, deliver);
            }
        } else if asserted && !was && entry & MASKED == 0 {
            // Edges on a masked pin are lost, as on hardware.
            deliver(&Message::from_redirection(entry));
        }
    }

    /// Delivers a level pin if it is asserted, unmasked and not already in service.
    fn service(&mut self, pin: usize, deliver: &mut dyn FnMut(&Message)) {
        let entry = self.redirection[pin];
        if entry & (MASKED | REMOTE_IRR) != 0 || self.asserted & (1 << pin) == 0 {
            return;
        }
        self.redirection[pin] |= REMOTE_IRR;
        deliver(&Message::from_redirection(entry));
    }

    /// A local APIC's EOI of a level-triggered `vector`: clears remote IRR of the pins
    /// with that vector and delivers again those still asserted.
    pub fn eoi(&mut self, vector: u8, deliver: &mut dyn FnMut(&Message)) {
        for pin in 0..IOAPIC_PINS {
            let entry = self.redirection[pin];
            if entry as u8 == vector && entry & REMOTE_IRR != 0 {
                self.redirection[pin] &= !REMOTE_IRR;
                self.service(pin, deliver);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_entry(io: &mut IoApicState, pin: u32, entry: u64, out: &mut Vec<Message>) {
        let mut d = |m: &Message| out.push(*m);
        io.write(IOREGSEL, 0x11 + 2 * pin, &mut d);
        io.write(IOWIN, (entry >> 32) as u32, &mut d);
        io.write(IOREGSEL, 0x10 + 2 * pin, &mut d);
        io.write(IOWIN, entry as u32, &mut d);
    }

    fn read_reg(io: &mut IoApicState, index: u32) -> u32 {
        io.write(IOREGSEL, index, &mut |_| {});
        io.read(IOWIN)
    }

    #[test]
    fn identification_registers() {
        let mut io = IoApicState::new();
        assert_eq!(read_reg(&mut io, 1), 0x0017_0011);
        io.write(IOREGSEL, 0, &mut |_| {});
        io.write(IOWIN, 0x0200_0000, &mut |_| {});
        assert_eq!(read_reg(&mut io, 0), 0x0200_0000);
        assert_eq!(read_reg(&mut io, 2), 0x0200_0000);
        assert_eq!(io.read(IOREGSEL), 2);
        assert_eq!(read_reg(&mut io, 0x10), MASKED as u32, "pins start masked");
    }

    #[test]
    fn redirection_entries_read_back_without_status_bits_set() {
        let mut io = IoApicState::new();
        let mut out = vec![];
        let entry = 0x0300_0000_0000_0000 | 0x1_0000 | 0x0800 | 0x41 | REMOTE_IRR | DELIVERY_STATUS;
        write_entry(&mut io, 5, entry, &mut out);
        assert_eq!(read_reg(&mut io, 0x1a), 0x0001_0841);
        assert_eq!(read_reg(&mut io, 0x1b), 0x0300_0000);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edges_only_when_unmasked() {
        let mut io = IoApicState::new();
        let mut out = vec![];
        write_entry(&mut io, 4, 0x34 | MASKED, &mut out);
        io.set_level(4, true, &mut |m| out.push(*m));
        io.set_level(4, false, &mut |m| out.push(*m));
        assert!(out.is_empty(), "masked edge is lost");
        write_entry(&mut io, 4, 0x0100_0000_0000_0034, &mut out);
        assert!(out.is_empty());
        io.set_level(4, true, &mut |m| out.push(*m));
        io.set_level(4, true, &mut |m| out.push(*m));
        io.set_level(4, false, &mut |m| out.push(*m));
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].vector, out[0].dest), (0x34, 1));
        assert!(!out[0].level_triggered);
    }

    #[test]
    fn level_pin_with_remote_irr_and_eoi() {
        let mut io = IoApicState::new();
        let mut out = vec![];
        write_entry(&mut io, 9, LEVEL_TRIGGERED | 0x49, &mut out);
        io.set_level(9, true, &mut |m| out.push(*m));
        assert_eq!(out.len(), 1);
        assert!(out[0].level_triggered);
        assert_ne!(read_reg(&mut io, 0x22) as u64 & REMOTE_IRR, 0);
        // Still asserted, remote IRR set: nothing more until the EOI.
        io.set_level(9, true, &mut |m| out.push(*m));
        assert_eq!(out.len(), 1);
        io.eoi(0x49, &mut |m| out.push(*m));
        assert_eq!(out.len(), 2, "EOI with the line still high delivers again");
        io.set_level(9, false, &mut |m| out.push(*m));
        io.eoi(0x49, &mut |m| out.push(*m));
        assert_eq!(out.len(), 2);
        assert_eq!(read_reg(&mut io, 0x22) as u64 & REMOTE_IRR, 0);
        // An unrelated vector's EOI changes nothing.
        io.set_level(9, true, &mut |m| out.push(*m));
        io.eoi(0x50, &mut |m| out.push(*m));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut io = IoApicState::new();
        let mut out = vec![];
        write_entry(&mut io, 9, LEVEL_TRIGGERED | MASKED | 0x49, &mut out);
        io.set_level(9, true, &mut |m| out.push(*m));
        assert!(out.is_empty());
        write_entry(&mut io, 9, LEVEL_TRIGGERED | 0x49, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut io = IoApicState::new();
        let mut out = vec![];
        write_entry(&mut io, 3, LEVEL_TRIGGERED | 0x33, &mut out);
        io.set_level(3, true, &mut |m| out.push(*m));
        // Linux's EOI for IOAPICs without an EOI register: mask, edge, then level again.
        write_entry(&mut io, 3, MASKED | 0x33, &mut out);
        assert_eq!(read_reg(&mut io, 0x16) as u64 & REMOTE_IRR, 0);
        write_entry(&mut io, 3, LEVEL_TRIGGERED | 0x33, &mut out);
        assert_eq!(out.len(), 2, "still asserted: delivered again");
    }
}
