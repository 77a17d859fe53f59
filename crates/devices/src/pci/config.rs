//! A type-0 configuration header: bytes plus a write mask, so read-only registers
//! stay read-only whatever a guest writes.

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const CLASS_REVISION: usize = 0x08;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const INTERRUPT_LINE: usize = 0x3c;
/// Standard (non-extended) configuration space size.
pub const SIZE: usize = 256;

#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    writable: [u8; SIZE],
}

impl ConfigSpace {
    /// A function with the given IDs and class code (class << 16 | subclass << 8 | prog-if).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; SIZE],
            writable: [0; SIZE],
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
    }
}
