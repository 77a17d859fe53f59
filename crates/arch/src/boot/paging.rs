//! The boot GDT and the identity-mapping page tables the 64-bit entry runs on.

use crate::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::BootError;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_LARGE: u64 = 1 << 7;

/// Flat descriptors: null, 64-bit code, data, TSS (long mode).
pub const GDT_LONG_MODE: [u64; layout::GDT_ENTRIES] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];
/// Flat descriptors: null, 32-bit code, data, 32-bit busy TSS (PVH protected mode).
pub const GDT_PROTECTED_MODE: [u64; layout::GDT_ENTRIES] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

pub fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<(), BootError> {
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::GDT_START + i as u64 * 8))
            .map_err(|_| BootError::NoRoomForBootStructures)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|_| BootError::NoRoomForBootStructures)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: enough for the kernel, its
/// boot_params, command line and initrd wherever they sit in low memory.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, BootError> {
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|_| BootError::NoRoomForBootStructures)
    };
    w(
        layout::PDPT_START | PTE_PRESENT | PTE_WRITABLE,
        layout::PML4_START,
    )?;
    for gib in 0..4u64 {
        let pd = layout::PD_START + gib * 0x1000;
        w(
            pd | PTE_PRESENT | PTE_WRITABLE,
            layout::PDPT_START + gib * 8,
        )?;
        for entry in 0..512u64 {
            let frame = (gib << 30) | (entry << 21);
            w(
                frame | PTE_PRESENT | PTE_WRITABLE | PDE_LARGE,
                pd + entry * 8,
            )?;
        }
    }
    Ok(layout::PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        // Walk a few addresses by hand: PML4 -> PDPT -> PD (2 MiB page).
        for addr in [0u64, 0x1234_5678, 0xbfff_ffff, 0xfee0_0000] {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(cr3 + ((addr >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((addr >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & PDE_LARGE, PDE_LARGE);
            assert_eq!(
                (pde & !0x1f_ffff & ((1 << 52) - 1)) | (addr & 0x1f_ffff),
                addr
            );
        }
    }
}
