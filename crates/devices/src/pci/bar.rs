//! Places BARs in the host bridge's windows, as firmware would before the kernel
//! starts. Linux keeps a firmware assignment that lies inside a bridge window.

use super::PciError;

/// A bump allocator over one window; every BAR is naturally aligned.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    start: u64,
    end: u64,
    next: u64,
}

/// The smallest BAR vessel hands out: a page, so KVM can map and trap BARs per page.
pub const MIN_BAR_SIZE: u64 = 0x1000;

impl BarAllocator {
    /// A window of `size` bytes at `start`.
    pub fn new(start: u64, size: u64) -> Self {
        BarAllocator {
            start,
            end: start.saturating_add(size),
            next: start,
        }
    }

    /// The 32-bit window below 4 GiB (the DSDT's PCI0 declares it).
    pub fn mmio32() -> Self {
        Self::new(
            arch::layout::PCI_MMIO32_START,
            arch::layout::PCI_MMIO32_SIZE,
        )
    }

    /// The 64-bit window above a guest of `ram_size` bytes.
    pub fn mmio64(ram_size: u64) -> Self {
        Self::new(
            arch::layout::pci_mmio64_start(ram_size),
            arch::layout::PCI_MMIO64_SIZE,
        )
    }

    /// Space for a BAR of `size` bytes (rounded up to a power of two and a page),
    /// aligned to its size.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        let size = size
            .max(MIN_BAR_SIZE)
            .checked_next_power_of_two()
            .ok_or(PciError::WindowFull { size })?;
        let base = self
            .next
            .checked_next_multiple_of(size)
            .filter(|b| b.checked_add(size).is_some_and(|end| end <= self.end))
            .ok_or(PciError::WindowFull { size })?;
        self.next = base + size;
        Ok(base)
    }

    /// The window as (start, size).
    pub fn window(&self) -> (u64, u64) {
        (self.start, self.end - self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_naturally_aligned_and_stay_in_the_window() {
        let mut a = BarAllocator::new(0xc000_0000, 0x10_0000);
        assert_eq!(a.allocate(0x100).unwrap(), 0xc000_0000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xc000_8000);
        assert_eq!(a.allocate(0x1000).unwrap(), 0xc001_0000);
        assert_eq!(a.allocate(0x8_0000).unwrap(), 0xc008_0000);
        assert!(a.allocate(0x8_0000).is_err());
        assert!(a.allocate(u64::MAX).is_err());
        let (start, size) = BarAllocator::mmio32().window();
        assert_eq!((start, size), (0xc000_0000, 0x2000_0000));
    }
}
