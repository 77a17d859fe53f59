//! The CPU state a kernel expects at its first instruction, independent of the
//! backend that will run it (KVM or the software CPU).

use serde::{Deserialize, Serialize};

/// A segment register with its hidden (descriptor-cache) part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Descriptor type nibble (e.g. 0xb = execute/read accessed code).
    pub kind: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operand size (32-bit) for code, big for stack.
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    pub g: bool,
}

impl Segment {
    /// Decodes a GDT descriptor at `index` (selector = index * 8).
    pub fn from_descriptor(index: u16, d: u64) -> Self {
        Segment {
            selector: index * 8,
            base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
            limit: {
                let raw = ((d & 0xffff) | (((d >> 48) & 0xf) << 16)) as u32;
                if (d >> 55) & 1 == 1 {
                    (raw << 12) | 0xfff
                } else {
                    raw
                }
            },
            kind: ((d >> 40) & 0xf) as u8,
            s: (d >> 44) & 1 == 1,
            dpl: ((d >> 45) & 3) as u8,
            present: (d >> 47) & 1 == 1,
            l: (d >> 53) & 1 == 1,
            db: (d >> 54) & 1 == 1,
            g: (d >> 55) & 1 == 1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Registers of the boot CPU at the kernel's entry point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryState {
    pub rip: u64,
    /// The multiboot magic for a multiboot kernel.
    #[serde(default)]
    pub rax: u64,
    pub rsp: u64,
    pub rbp: u64,
    /// boot_params pointer for the 64-bit Linux entry.
    pub rsi: u64,
    /// hvm_start_info pointer for the PVH entry.
    pub rbx: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

pub const CR0_PE: u64 = 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set.
pub const RFLAGS_RESERVED: u64 = 0x2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_flat_64bit_code_descriptor() {
        let s = Segment::from_descriptor(1, 0x00af_9b00_0000_ffff);
        assert_eq!(s.selector, 8);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.kind, 0xb);
        assert!(s.present && s.s && s.l && s.g && !s.db);
    }
}
