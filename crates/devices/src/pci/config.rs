//! A type-0 configuration header: bytes plus a write mask, so read-only registers
//! stay read-only whatever a guest writes. Memory BARs and the capability list are
//! built on the same mask: a BAR's address bits are writable and its size bits are
//! not, so the guest's sizing (write all-ones, read the mask back, restore) just works.

use serde::{Deserialize, Serialize};

use super::PciError;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const CLASS_REVISION: usize = 0x08;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// Standard (non-extended) configuration space size.
pub const SIZE: usize = 256;
/// Number of BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;

const STATUS_CAPABILITIES_LIST: u8 = 1 << 4;
const FIRST_CAPABILITY: usize = 0x40;
const COMMAND_MEMORY_ENABLE: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// What a BAR decodes. I/O BARs are not offered: vessel's devices are all MMIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Memory32 {
        prefetchable: bool,
    },
    /// Takes two BAR registers (this one and the next).
    Memory64 {
        prefetchable: bool,
    },
}

impl BarKind {
    /// The flag bits in the BAR's low dword.
    fn flags(self) -> u32 {
        match self {
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => (u32::from(prefetchable) << 3) | 0b100,
        }
    }
}

/// One memory BAR as vessel assigned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub index: usize,
    pub kind: BarKind,
    pub address: u64,
    pub size: u64,
}

#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    writable: [u8; SIZE],
    bars: [Option<Bar>; BAR_COUNT],
    /// Where the next capability goes, and the last one added (to link the list).
    next_capability: usize,
    last_capability: Option<usize>,
    /// BAR registers the guest moved away from their assigned address (warned once).
    relocated: u8,
}

impl ConfigSpace {
    /// The configuration registers' bytes (for snapshots).
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Loads saved registers: only the bits the guest may write are taken, so a saved
    /// image cannot change IDs, capabilities or BAR placement.
    pub fn restore(&mut self, saved: &[u8]) {
        for (i, (b, s)) in self.bytes.iter_mut().zip(saved).enumerate() {
            let w = self.writable[i];
            *b = (*b & !w) | (*s & w);
        }
    }

    /// A function with the given IDs and class code (class << 16 | subclass << 8 | prog-if).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; SIZE],
            writable: [0; SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
            relocated: 0,
        };
        c.put(VENDOR_ID, &vendor.to_le_bytes());
        c.put(DEVICE_ID, &device.to_le_bytes());
        c.put(
            CLASS_REVISION,
            &((class << 8) | u32::from(revision)).to_le_bytes(),
        );
        c.put(SUBSYSTEM_VENDOR_ID, &vendor.to_le_bytes());
        // Command: I/O, memory and bus-master enables, interrupt disable.
        c.writable[COMMAND] = 0x07;
        c.writable[COMMAND + 1] = 0x04;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.bytes[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Sets read-only bytes (device-side update; the write mask is not consulted).
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Which bits of `offset..offset + mask.len()` a guest may change.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.put(SUBSYSTEM_VENDOR_ID, &vendor.to_le_bytes());
        self.put(SUBSYSTEM_ID, &device.to_le_bytes());
    }

    /// INTA#..INTD# as 1..4; 0 for none.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0xff)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_ENABLE != 0
    }

    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Declares memory BAR `index` of `size` bytes (a power of two, at least 16) at
    /// `address` (aligned to `size`), as firmware would have assigned it.
    pub fn set_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        address: u64,
        size: u64,
    ) -> Result<Bar, PciError> {
        let wide = matches!(kind, BarKind::Memory64 { .. });
        let last = index + usize::from(wide);
        if last >= BAR_COUNT
            || self.bars[index].is_some()
            || (index > 0
                && matches!(
                    self.bars[index - 1],
                    Some(Bar {
                        kind: BarKind::Memory64 { .. },
                        ..
                    })
                ))
            || self.bars[last].is_some()
        {
            return Err(PciError::BadBar { index });
        }
        if size < 16 || !size.is_power_of_two() || !address.is_multiple_of(size) {
            return Err(PciError::BadBarSize { index, size });
        }
        if !wide && (size > 1 << 31 || address + size > 1 << 32) {
            return Err(PciError::BadBarSize { index, size });
        }
        let reg = BAR0 + 4 * index;
        let mask = !(size - 1);
        self.put(reg, &((address as u32) | kind.flags()).to_le_bytes());
        self.writable[reg..reg + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if wide {
            self.put(reg + 4, &((address >> 32) as u32).to_le_bytes());
            self.writable[reg + 4..reg + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        let bar = Bar {
            index,
            kind,
            address,
            size,
        };
        self.bars[index] = Some(bar);
        Ok(bar)
    }

    /// The BARs as assigned (not as the guest may have rewritten them).
    pub fn bars(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter().flatten()
    }

    /// Appends a capability: `id`, the link to the next one (filled in here), then
    /// `body`. `writable` is the guest write mask for `body` (shorter means read-only
    /// tail). Returns the capability's offset in configuration space.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciError> {
        let at = self.next_capability;
        let len = 2 + body.len();
        if at + len > SIZE || writable.len() > body.len() {
            return Err(PciError::ConfigSpaceFull);
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.put(at + 2, body);
        self.writable[at + 2..at + 2 + writable.len()].copy_from_slice(writable);
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = at as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = at as u8;
                self.bytes[STATUS] |= STATUS_CAPABILITIES_LIST;
            }
        }
        self.last_capability = Some(at);
        self.next_capability = (at + len).next_multiple_of(4);
        Ok(at)
    }

    /// Reads `data.len()` bytes at `offset`; out of range reads all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// Writes through the write mask; out-of-range writes are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            if at < SIZE {
                let m = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !m) | (b & m);
            }
        }
        let end = offset + data.len();
        if offset < BAR0 + 4 * BAR_COUNT && end > BAR0 {
            self.check_bar_relocation(offset, end);
        }
    }

    /// Relocating BARs is not supported: vessel keeps serving a BAR where it placed
    /// it. A register holding neither its assigned value nor the all-ones sizing
    /// pattern means the guest moved it; say so once.
    fn check_bar_relocation(&mut self, start: usize, end: usize) {
        for reg in 0..BAR_COUNT {
            let at = BAR0 + 4 * reg;
            if at + 4 <= start || at >= end || self.relocated & (1 << reg) != 0 {
                continue;
            }
            let (bar, high) = match (
                self.bars[reg],
                reg.checked_sub(1).and_then(|r| self.bars[r]),
            ) {
                (Some(bar), _) => (bar, false),
                (
                    None,
                    Some(
                        bar @ Bar {
                            kind: BarKind::Memory64 { .. },
                            ..
                        },
                    ),
                ) => (bar, true),
                _ => continue,
            };
            let mask = u32::from_le_bytes(self.writable[at..at + 4].try_into().unwrap_or([0; 4]));
            let value = self.read_u32(at) & mask;
            let assigned = if high {
                (bar.address >> 32) as u32
            } else {
                bar.address as u32
            } & mask;
            if value != assigned && value != mask {
                self.relocated |= 1 << reg;
                crate::guest_warn!(
                    "PCI: the guest moved BAR{} (assigned {:#x}, register now {value:#x}); \
                     relocation is not supported, the BAR stays at its assigned address",
                    bar.index,
                    bar.address
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_reads_the_size_mask_and_restores() {
        let mut c = ConfigSpace::new(1, 2, 0, 0);
        c.set_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            0xc000_4000,
            0x4000,
        )
        .unwrap();
        c.set_bar(
            2,
            BarKind::Memory32 { prefetchable: true },
            0xc010_0000,
            0x1000,
        )
        .unwrap();
        assert_eq!(c.read_u32(BAR0), 0xc000_4004);
        assert_eq!(c.read_u32(BAR0 + 4), 0);
        for reg in [BAR0, BAR0 + 4, BAR0 + 8] {
            c.write(reg, &u32::MAX.to_le_bytes());
        }
        assert_eq!(c.read_u32(BAR0), 0xffff_c004);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 8), 0xffff_f008);
        c.write(BAR0, &0xc000_4000u32.to_le_bytes());
        c.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(c.read_u32(BAR0), 0xc000_4004);
        assert_eq!(c.relocated, 0, "sizing is not a relocation");
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.relocated, 1);
        // Unused BAR registers read zero and ignore writes.
        c.write(BAR0 + 12, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(BAR0 + 12), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = ConfigSpace::new(1, 2, 0, 0);
        assert!(
            c.set_bar(
                5,
                BarKind::Memory64 {
                    prefetchable: false
                },
                0,
                0x1000
            )
            .is_err()
        );
        assert!(
            c.set_bar(
                0,
                BarKind::Memory32 {
                    prefetchable: false
                },
                0x800,
                0x1000
            )
            .is_err()
        );
        assert!(
            c.set_bar(
                0,
                BarKind::Memory32 {
                    prefetchable: false
                },
                0,
                0x1800
            )
            .is_err()
        );
        c.set_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            0,
            0x1000,
        )
        .unwrap();
        assert!(
            c.set_bar(
                1,
                BarKind::Memory32 {
                    prefetchable: false
                },
                0,
                0x1000
            )
            .is_err()
        );
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = ConfigSpace::new(1, 2, 0, 0);
        let a = c.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        let b = c.add_capability(0x09, &[0; 14], &[]).unwrap();
        assert_eq!(c.read_u8(CAPABILITIES_POINTER) as usize, a);
        assert_eq!(
            c.read_u8(STATUS) & STATUS_CAPABILITIES_LIST,
            STATUS_CAPABILITIES_LIST
        );
        assert_eq!(c.read_u8(a + 1) as usize, b);
        assert_eq!(c.read_u8(b + 1), 0);
        assert_eq!(b, 0x4c);
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(c.read_u16(a + 2), 0xc000);
    }
}
