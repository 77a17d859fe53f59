//! An address space of device windows: one for port I/O, one for MMIO. The dispatcher
//! routes each guest access here; the device sees the offset inside its window.

use std::sync::{Arc, Mutex};
use thiserror::Error;

/// A device behind a bus window. Accesses are 1, 2, 4 or 8 bytes, little-endian.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device window {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device window at {0:#x} is empty or wraps around")]
    BadWindow(u64),
}

struct Window {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Windows sorted by base address; lookups are a binary search.
#[derive(Default)]
pub struct Bus {
    windows: Vec<Window>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::BadWindow(base));
        };
        let at = self.windows.partition_point(|w| w.base < base);
        let clashes_prev = at > 0 && self.windows[at - 1].base + self.windows[at - 1].len > base;
        let clashes_next = at < self.windows.len() && self.windows[at].base < end;
        if clashes_prev || clashes_next {
            return Err(BusError::Overlap { base, len });
        }
        self.windows.insert(at, Window { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let at = self.windows.partition_point(|w| w.base <= addr);
        let w = self.windows.get(at.checked_sub(1)?)?;
        let offset = addr - w.base;
        (offset + size as u64 <= w.len).then_some((&w.device, offset))
    }

    /// Reads from the device at `addr`; false (and all-ones data) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; false when nothing is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned (a panic in another vCPU thread) keeps serving:
/// device state is plain data, and one vCPU's panic must not wedge the others.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Little-endian value of an access of 1..=8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

/// Fills an access of 1..=8 bytes with the low bytes of `value`.
pub fn put_le(data: &mut [u8], value: u64) {
    let n = data.len().min(8);
    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_window_and_reports_offsets() {
        let a = Arc::new(Mutex::new(Echo(vec![])));
        let b = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x70, 2, b.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x71, &[9]));
        assert_eq!(b.lock().unwrap().0, vec![(1, vec![9])]);
        assert!(a.lock().unwrap().0.is_empty());
    }

    #[test]
    fn misses_read_all_ones_and_straddles_miss() {
        let mut bus = Bus::new();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0xff, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.read(0x102, &mut d), "access straddling the window end");
        assert!(!bus.write(0x104, &[1]));
    }

    #[test]
    fn overlapping_or_empty_windows_are_refused() {
        let dev = || Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev()).unwrap();
        assert!(bus.insert(0x10f, 1, dev()).is_err());
        assert!(bus.insert(0xf8, 9, dev()).is_err());
        assert!(bus.insert(0x110, 0, dev()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
        bus.insert(0x110, 1, dev()).unwrap();
        bus.insert(0xf0, 0x10, dev()).unwrap();
    }

    #[test]
    fn le_helpers_round_trip() {
        let mut d = [0u8; 2];
        put_le(&mut d, 0x1234_5678);
        assert_eq!(d, [0x78, 0x56]);
        assert_eq!(le_value(&d), 0x5678);
    }
}
