//! The guest-physical address map: where RAM, firmware tables, boot structures and
//! device windows live. One place, so the allocator, the loaders and ACPI agree.

/// Real-mode interrupt vector table and BIOS data area end here; free low RAM starts.
pub const GDT_START: u64 = 0x500;
/// The boot GDT holds 4 descriptors (null, code64, data, tss/code32).
pub const GDT_ENTRIES: usize = 4;
pub const IDT_START: u64 = 0x520;
/// hvm_start_info for the PVH entry, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux "zero page" (struct boot_params) for the 64-bit bzImage entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the boot CPU (grows down from here).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then 4 PDs (first 4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line (the x86 COMMAND_LINE_SIZE is 2048).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area and BIOS ROM region; reserved in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where a kernel also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// The 16-byte VM generation ID the VMGENID device points the guest at, in the last
/// page of the BIOS area (the tables stay below it).
pub const VMGENID_ADDR: u64 = 0xff000;
/// bzImage protected-mode kernels load here (the boot protocol's code32_start).
pub const HIMEM_START: u64 = 0x100000;

/// Low RAM stops here; the 32-bit MMIO hole spans [MMIO_HOLE_START, 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// PCI 32-bit BAR window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM), 1 MiB per bus.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_BUSES: u64 = 1;
pub const PCI_ECAM_SIZE: u64 = PCI_ECAM_BUSES << 20;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM on Intel wants three pages for its real-mode TSS, below the BIOS reset vector.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// Size of the 64-bit PCI BAR window placed above the top of RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Legacy I/O ports (the device model's port map).
pub mod ports {
    pub const PIC_MASTER: u16 = 0x20;
    pub const PIT: u16 = 0x40;
    /// NMI status and control (PIT channel 2 gate, speaker).
    pub const NMI_STATUS: u16 = 0x61;
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    pub const CMOS: u16 = 0x70;
    pub const PIC_SLAVE: u16 = 0xa0;
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    /// vessel's boot timer: the guest writes any byte; the VMM logs the time since start.
    pub const BOOT_TIMER: u16 = 0x440;
    /// ACPI fixed hardware: PM1a event (status+enable), PM1a control, PM timer.
    pub const ACPI_PM1A_EVT: u16 = 0x600;
    pub const ACPI_PM1A_EVT_LEN: u8 = 4;
    pub const ACPI_PM1A_CNT: u16 = 0x604;
    pub const ACPI_PM1A_CNT_LEN: u8 = 2;
    pub const ACPI_PM_TMR: u16 = 0x608;
    pub const ACPI_PM_TMR_LEN: u8 = 4;
    pub const ACPI_SCI_IRQ: u32 = 9;
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
    /// The reset control register; the FADT names it as the ACPI reset register too.
    pub const RESET_CONTROL: u16 = 0xcf9;
    pub const RESET_VALUE: u8 = 0x06;
}

// The device windows must sit inside the 32-bit hole and not overlap each other.
const _: () = {
    assert!(PCI_MMIO32_START >= MMIO_HOLE_START);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
    assert!(IOAPIC_START + IOAPIC_SIZE <= LAPIC_START);
    assert!(LAPIC_START + 0x1000 <= KVM_TSS_START);
    assert!(KVM_TSS_START + 3 * 0x1000 <= FOUR_GIB);
};

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `size` bytes of guest RAM around the 32-bit MMIO hole: up to 3 GiB low,
/// the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if size > low {
        ranges.push(RamRange {
            start: FOUR_GIB,
            size: size - low,
        });
    }
    ranges
}

/// The first address above all RAM (and above the 32-bit hole).
pub fn ram_top(size: u64) -> u64 {
    ram_ranges(size)
        .last()
        .map(RamRange::end)
        .unwrap_or(0)
        .max(FOUR_GIB)
}

/// The 64-bit PCI window: 1 GiB-aligned above the top of RAM.
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    ram_top(ram_size).next_multiple_of(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_low_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                start: 0,
                size: 512 << 20
            }]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
        assert_eq!(r[1].start, FOUR_GIB);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
        assert_eq!(ram_top(4 << 30), FOUR_GIB + (1 << 30));
    }
}
