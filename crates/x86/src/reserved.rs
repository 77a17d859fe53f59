//! Bits the guest's CPUID makes reserved: a control register bit for a feature it is
//! not offered raises #GP when set, and a page-table entry with an address bit above
//! the physical address width raises #PF with RSVD, as on hardware.

use crate::state::ctl;

/// CR4 bits and a CPUID bit (leaf, subleaf, register 0 eax ... 3 edx, bit) that offers
/// each (CET twice: shadow stacks or indirect-branch tracking); the bits before UMIP
/// are the original ones, always there.
const CR4_FEATURES: [(u64, (u32, u32, usize, u32)); 14] = [
    (ctl::CR4_UMIP, (7, 0, 2, 2)),
    (ctl::CR4_LA57, (7, 0, 2, 16)),
    (1 << 13, (1, 0, 2, 5)), // VMXE
    (1 << 14, (1, 0, 2, 6)), // SMXE
    (ctl::CR4_FSGSBASE, (7, 0, 1, 0)),
    (ctl::CR4_PCIDE, (1, 0, 2, 17)),
    (ctl::CR4_OSXSAVE, (1, 0, 2, 26)),
    (ctl::CR4_SMEP, (7, 0, 1, 7)),
    (ctl::CR4_SMAP, (7, 0, 1, 20)),
    (1 << 22, (7, 0, 2, 3)),  // PKE
    (1 << 23, (7, 0, 2, 7)),  // CET (shadow stacks)
    (1 << 23, (7, 0, 3, 20)), // CET (IBT)
    (1 << 24, (7, 0, 2, 31)), // PKS
    (1 << 28, (7, 1, 0, 26)), // LAM_SUP
];

/// VME through OSXMMEXCPT.
const CR4_ALWAYS: u64 = (1 << 11) - 1;

/// The CR4 bits the guest may not set: those of features its CPUID does not offer,
/// and those no feature has.
pub(crate) fn cr4_reserved(mut lookup: impl FnMut(u32, u32) -> [u32; 4]) -> u64 {
    let offered = CR4_FEATURES
        .iter()
        .filter(|(_, (leaf, sub, reg, bit))| lookup(*leaf, *sub)[*reg] >> bit & 1 != 0)
        .fold(CR4_ALWAYS, |all, (cr4, _)| all | cr4);
    !offered
}

/// The guest's physical address width (CPUID 0x8000_0008 EAX[7:0]; 36 without it).
pub(crate) fn phys_bits(mut lookup: impl FnMut(u32, u32) -> [u32; 4]) -> u32 {
    let max = lookup(0x8000_0000, 0)[0];
    match lookup(0x8000_0008, 0)[0] & 0xff {
        bits @ 32..=52 if max >= 0x8000_0008 => bits,
        _ => 36,
    }
}

/// The address bits of a 64-bit page-table entry at and above `phys_bits` (to bit 51).
pub(crate) fn pte_reserved(phys_bits: u32) -> u64 {
    ((1u64 << 52) - 1) & !((1u64 << phys_bits) - 1)
}

/// What the guest's CPUID reserves, each part asked the first time a call into the
/// interpreter needs it.
#[derive(Clone, Copy, Default)]
pub(crate) struct Reserved {
    pub cr4: Option<u64>,
    pub pte: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emu(leaf: u32, sub: u32) -> [u32; 4] {
        crate::cpuid_lookup(&crate::emu_cpuid(0, 1, 1_000_000_000), leaf, sub)
    }

    #[test]
    fn the_software_cpu_reserves_what_it_does_not_offer() {
        let r = cr4_reserved(emu);
        assert_eq!(r & ctl::CR4_SMEP, 0, "SMEP is offered");
        assert_eq!(r & ctl::CR4_PAE, 0);
        for bit in [ctl::CR4_OSXSAVE, ctl::CR4_LA57, 1 << 22, 1 << 28, 1 << 15] {
            assert_ne!(r & bit, 0, "{bit:#x}");
        }
        assert_eq!(phys_bits(emu), 40);
        assert_eq!(pte_reserved(40), 0x000f_ff00_0000_0000);
    }
}
