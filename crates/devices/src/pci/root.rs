//! The root complex: functions on bus 0 and the two ways to reach their configuration.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, le_value, lock, put_le};

use super::config::ConfigSpace;

/// A PCI function as the root complex sees it: configuration reads and writes.
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// bus 0, device 0, function 0: the host bridge itself.
pub struct HostBridge {
    config: ConfigSpace,
}

/// Red Hat's "QEMU PCIe host bridge" ID: a generic virtual host bridge that every
/// kernel treats as such.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
}

/// (bus, device, function) packed as in a config address: bus << 8 | dev << 3 | fn.
type Bdf = u16;

#[derive(Default)]
pub struct PciRoot {
    functions: BTreeMap<Bdf, Arc<Mutex<dyn PciDevice>>>,
}

impl PciRoot {
    /// A root complex holding its host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut root = PciRoot::default();
        root.add(0, Arc::new(Mutex::new(HostBridge::new())));
        root
    }

    /// Places `device` at bus 0 slot `slot` function 0.
    pub fn add(&mut self, slot: u8, device: Arc<Mutex<dyn PciDevice>>) {
        self.functions.insert(Bdf::from(slot & 0x1f) << 3, device);
    }

    /// The lowest bus-0 slot with nothing in it.
    pub fn free_slot(&self) -> Option<u8> {
        (1..32u8).find(|slot| !self.functions.contains_key(&(Bdf::from(*slot) << 3)))
    }

    /// Places `device` in the lowest free slot and returns that slot.
    pub fn add_next(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, super::PciError> {
        let slot = self.free_slot().ok_or(super::PciError::BusFull)?;
        self.add(slot, device);
        Ok(slot)
    }

    fn read(&self, bdf: Bdf, offset: usize, data: &mut [u8]) {
        match self.functions.get(&bdf) {
            Some(f) => lock(f).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, bdf: Bdf, offset: usize, data: &[u8]) {
        if let Some(f) = self.functions.get(&bdf) {
            lock(f).config_write(offset, data);
        }
    }
}

/// Is this a naturally aligned access of 1, 2 or 4 bytes (what PCI configuration allows)?
fn config_access_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)
}

/// Ports 0xCF8 (address) to 0xCFF (data): configuration mechanism #1. Byte accesses
/// to 0xCF9 reach the reset control register, as on PC chipsets.
pub struct ConfigAddressPort {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    reset_control: Option<Box<dyn BusDevice>>,
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl ConfigAddressPort {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        ConfigAddressPort {
            root,
            address: 0,
            reset_control: None,
        }
    }

    /// Routes byte accesses to port 0xCF9 to `reset_control`.
    pub fn with_reset_control(mut self, reset_control: Box<dyn BusDevice>) -> Self {
        self.reset_control = Some(reset_control);
        self
    }

    /// The addressed function and register, if the address is enabled.
    fn target(&self, data_offset: usize) -> Option<(Bdf, usize)> {
        (self.address & CONFIG_ENABLE != 0).then(|| {
            let bdf = ((self.address >> 8) & 0xffff) as Bdf;
            (bdf, (self.address & 0xfc) as usize + data_offset)
        })
    }
}

impl BusDevice for ConfigAddressPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 if data.len() == 1 && self.reset_control.is_some() => {
                if let Some(r) = &mut self.reset_control {
                    r.read(0, data)
                }
            }
            0 if data.len() == 4 => put_le(data, u64::from(self.address)),
            4..8 => {
                let reg = offset as usize - 4;
                match self.target(reg) {
                    Some((bdf, at)) if config_access_ok(at, data.len()) => {
                        lock(&self.root).read(bdf, at, data)
                    }
                    _ => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            1 if data.len() == 1 => {
                if let Some(r) = &mut self.reset_control {
                    r.write(0, data)
                }
            }
            0 if data.len() == 4 => self.address = le_value(data) as u32,
            4..8 => {
                if let Some((bdf, at)) = self.target(offset as usize - 4)
                    && config_access_ok(at, data.len())
                {
                    lock(&self.root).write(bdf, at, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: bus << 20 | device << 15 | function << 12 | register, memory-mapped.
pub struct Ecam {
    root: Arc<Mutex<PciRoot>>,
}

impl Ecam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Ecam { root }
    }

    fn target(offset: u64) -> (Bdf, usize) {
        (((offset >> 12) & 0xffff) as Bdf, (offset & 0xfff) as usize)
    }
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bdf, reg) = Self::target(offset);
        if config_access_ok(reg, data.len()) {
            lock(&self.root).read(bdf, reg, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bdf, reg) = Self::target(offset);
        if config_access_ok(reg, data.len()) {
            lock(&self.root).write(bdf, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Arc<Mutex<PciRoot>> {
        Arc::new(Mutex::new(PciRoot::new()))
    }

    #[test]
    fn both_mechanisms_see_the_host_bridge() {
        let r = root();
        let mut io = ConfigAddressPort::new(r.clone());
        let mut ecam = Ecam::new(r);
        io.write(0, &CONFIG_ENABLE.to_le_bytes());
        let mut a = [0u8; 4];
        io.read(4, &mut a);
        let mut b = [0u8; 4];
        ecam.read(0, &mut b);
        assert_eq!(a, b);
        assert_eq!(u32::from_le_bytes(a), 0x0008_1b36);
        let mut class = [0u8; 4];
        ecam.read(8, &mut class);
        assert_eq!(u32::from_le_bytes(class) >> 8, CLASS_HOST_BRIDGE);
    }

    #[test]
    fn absent_functions_and_bad_accesses_read_all_ones() {
        let r = root();
        let mut ecam = Ecam::new(r.clone());
        let mut d = [0u8; 4];
        ecam.read(1 << 15, &mut d); // device 1
        assert_eq!(d, [0xff; 4]);
        ecam.read(1, &mut d); // misaligned dword
        assert_eq!(d, [0xff; 4]);
        let mut io = ConfigAddressPort::new(r);
        io.write(0, &0u32.to_le_bytes()); // enable bit clear
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut q = [0u8; 8];
        ecam.read(0, &mut q);
        assert_eq!(q, [0xff; 8]);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let r = root();
        let mut ecam = Ecam::new(r);
        ecam.write(0, &0xdead_beefu32.to_le_bytes());
        let mut d = [0u8; 4];
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        ecam.write(4, &0xffffu16.to_le_bytes());
        let mut cmd = [0u8; 2];
        ecam.read(4, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd), 0x0407);
    }

    #[test]
    fn byte_writes_to_cf9_reach_the_reset_control() {
        let resets = Arc::new(Mutex::new(0));
        let r = resets.clone();
        let reset = crate::legacy::ResetControl::new(Arc::new(move |_| *r.lock().unwrap() += 1));
        let mut io = ConfigAddressPort::new(root()).with_reset_control(Box::new(reset));
        io.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(
            *resets.lock().unwrap(),
            0,
            "dword address writes are not resets"
        );
        io.write(1, &[0x06]);
        assert_eq!(*resets.lock().unwrap(), 1);
    }

    #[test]
    fn config_address_register_reads_back() {
        let mut io = ConfigAddressPort::new(root());
        io.write(0, &0x8000_0810u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0810);
    }
}
