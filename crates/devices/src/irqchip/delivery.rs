//! Interrupt messages between the interrupt controllers: what an ICR write, an IOAPIC
//! redirection entry or an MSI asks for, decoded once into one shape.

use serde::{Deserialize, Serialize};

/// Bits 10:8 of an ICR, LVT, redirection entry or MSI data word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    Startup,
    ExtInt,
    Reserved,
}

impl DeliveryMode {
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::Startup,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// ICR bits 19:18.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// One interrupt on its way to local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    pub mode: DeliveryMode,
    /// Logical (LDR/DFR) rather than physical (APIC ID) destination.
    pub logical: bool,
    /// APIC ID or logical destination; 0xFF is a broadcast.
    pub dest: u8,
    pub level_triggered: bool,
    /// The ICR level bit: an INIT with it clear and level trigger is a de-assert.
    pub assert: bool,
    pub shorthand: Shorthand,
    /// The sending local APIC (for shorthands).
    pub source: Option<usize>,
}

/// Where MSI writes land: 0xFEEx_xxxx.
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

impl Message {
    /// An IPI from the ICR (high dword in bits 63:32) of local APIC `source`.
    pub fn from_icr(icr: u64, source: usize) -> Self {
        let low = icr as u32;
        Message {
            vector: low as u8,
            mode: DeliveryMode::from_bits(low >> 8),
            logical: low & (1 << 11) != 0,
            dest: (icr >> 56) as u8,
            level_triggered: low & (1 << 15) != 0,
            assert: low & (1 << 14) != 0,
            shorthand: match (low >> 18) & 3 {
                0 => Shorthand::None,
                1 => Shorthand::SelfOnly,
                2 => Shorthand::AllIncludingSelf,
                _ => Shorthand::AllExcludingSelf,
            },
            source: Some(source),
        }
    }

    /// What an IOAPIC redirection entry sends.
    pub fn from_redirection(entry: u64) -> Self {
        let low = entry as u32;
        Message {
            vector: low as u8,
            mode: DeliveryMode::from_bits(low >> 8),
            logical: low & (1 << 11) != 0,
            dest: (entry >> 56) as u8,
            level_triggered: low & (1 << 15) != 0,
            assert: true,
            shorthand: Shorthand::None,
            source: None,
        }
    }

    /// An MSI: destination ID in address bits 19:12, destination mode in bit 2 (used
    /// whatever the redirection hint says, as KVM and QEMU do and Linux expects), vector
    /// and delivery mode in the data. None when the address is not the MSI window.
    pub fn from_msi(address: u64, data: u32) -> Option<Self> {
        if address & 0xffff_ffff_fff0_0000 != MSI_ADDRESS_BASE {
            return None;
        }
        Some(Message {
            vector: data as u8,
            mode: DeliveryMode::from_bits(data >> 8),
            logical: address & (1 << 2) != 0,
            dest: (address >> 12) as u8,
            // Message-signalled interrupts are edges: nothing to EOI at a source.
            level_triggered: false,
            assert: true,
            shorthand: Shorthand::None,
            source: None,
        })
    }

    pub fn is_init_deassert(&self) -> bool {
        self.mode == DeliveryMode::Init && self.level_triggered && !self.assert
    }
}

/// Whether a local APIC with logical ID register `ldr` and format `dfr` is in the
/// logical destination `mda`: flat model (DFR 0xF...) ANDs the 8-bit masks; cluster
/// model (DFR 0x0...) matches the high nibble and ANDs the low. 0xFF is a broadcast.
pub fn logical_match(ldr: u32, dfr: u32, mda: u8) -> bool {
    if mda == 0xff {
        return true;
    }
    let id = (ldr >> 24) as u8;
    if dfr >> 28 == 0xf {
        id & mda != 0
    } else {
        let cluster_ok = mda >> 4 == id >> 4 || mda >> 4 == 0xf;
        cluster_ok && id & mda & 0xf != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icr_decoding() {
        // Linux's INIT de-assert: level-triggered INIT with the level bit clear.
        let m = Message::from_icr((1u64 << 56) | 0x8500, 0);
        assert!(m.is_init_deassert());
        let m = Message::from_icr((1u64 << 56) | 0xc500, 0);
        assert!(!m.is_init_deassert());
        assert_eq!(m.dest, 1);
        let m = Message::from_icr(0x000c_0000 | 0x0600 | 0x9a, 1);
        assert_eq!(m.mode, DeliveryMode::Startup);
        assert_eq!(m.vector, 0x9a);
        assert_eq!(m.shorthand, Shorthand::AllExcludingSelf);
    }

    #[test]
    fn msi_decoding_uses_the_destination_mode_bit() {
        let m = Message::from_msi(0xfee0_1004, 0x4031).unwrap();
        assert_eq!((m.dest, m.logical, m.vector), (1, true, 0x31));
        assert_eq!(m.mode, DeliveryMode::Fixed);
        assert!(Message::from_msi(0xfec0_0000, 0x31).is_none());
    }

    #[test]
    fn logical_destinations() {
        let flat = 0xffff_ffff;
        assert!(logical_match(0x0200_0000, flat, 0x03));
        assert!(!logical_match(0x0200_0000, flat, 0x01));
        let cluster = 0x0fff_ffff;
        assert!(logical_match(0x1200_0000, cluster, 0x12));
        assert!(!logical_match(0x1200_0000, cluster, 0x22));
        assert!(logical_match(0x1200_0000, cluster, 0xf2));
        assert!(logical_match(0, flat, 0xff));
    }
}
