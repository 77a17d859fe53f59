//! The BIOS e820 memory map handed to the kernel (boot_params or PVH start_info).

use crate::layout::{self, RamRange};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The map for a guest of `ram_size` bytes: low RAM minus the EBDA/BIOS area (which
/// holds the ACPI tables), the ECAM window reserved (Linux wants MMCONFIG in e820),
/// and RAM above 4 GiB when the guest is large.
pub fn memory_map(ram_size: u64) -> Vec<E820Entry> {
    let ranges = layout::ram_ranges(ram_size);
    let low = ranges[0];
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: layout::HIMEM_START,
            size: low.end() - layout::HIMEM_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: layout::PCI_ECAM_START,
            size: layout::PCI_ECAM_SIZE,
            kind: E820Kind::Reserved,
        },
    ];
    map.extend(ranges.iter().skip(1).map(|r: &RamRange| E820Entry {
        addr: r.start,
        size: r.size,
        kind: E820Kind::Ram,
    }));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_bytes(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for size in [32 << 20, 512 << 20, 3 << 30, 6 << 30] {
            let map = memory_map(size);
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:?}");
            }
        }
    }

    #[test]
    fn ram_adds_up_to_the_guest_size_minus_the_bios_area() {
        let bios = layout::HIMEM_START - layout::EBDA_START;
        assert_eq!(ram_bytes(&memory_map(512 << 20)), (512 << 20) - bios);
        assert_eq!(ram_bytes(&memory_map(6 << 30)), (6 << 30) - bios);
    }

    #[test]
    fn nothing_usable_in_the_mmio_hole() {
        for e in memory_map(8 << 30) {
            if e.kind == E820Kind::Ram {
                let end = e.addr + e.size;
                assert!(end <= layout::MMIO_HOLE_START || e.addr >= layout::FOUR_GIB);
            }
        }
    }
}
