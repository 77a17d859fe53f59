//! MSI-X: the capability in configuration space, and the vector table and pending-bit
//! array a device exposes in one of its BARs. A vector fires through the [`MsiSink`];
//! while it (or the whole function) is masked it is held in the PBA and sent on unmask.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::interrupt::MsiSink;

pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: address (64), data (32), vector control (32).
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors one function may have (the table size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// One table entry, as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub vector_control: u32,
}

impl Default for MsixEntry {
    /// Vectors come out of reset masked.
    fn default() -> Self {
        MsixEntry {
            address: 0,
            data: 0,
            vector_control: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.vector_control & VECTOR_MASKED != 0
    }

    fn to_bytes(self) -> [u8; ENTRY_SIZE as usize] {
        let mut b = [0u8; ENTRY_SIZE as usize];
        b[0..8].copy_from_slice(&self.address.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.vector_control.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; ENTRY_SIZE as usize]) -> Self {
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        MsixEntry {
            address: u64::from(word(0)) | (u64::from(word(4)) << 32),
            data: word(8),
            vector_control: word(12),
        }
    }
}

/// The MSI-X state of one function, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// What happened to one interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixDelivery {
    Sent,
    /// Masked: recorded in the PBA.
    Pending,
    /// MSI-X is off (the device should use INTx) or the vector does not exist.
    NotDelivered,
}

pub struct MsixTable {
    state: MsixState,
    sink: Arc<dyn MsiSink>,
}

impl MsixTable {
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Self {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        MsixTable {
            state: MsixState {
                entries: vec![MsixEntry::default(); usize::from(vectors)],
                pending: vec![0; usize::from(vectors).div_ceil(64)],
                enabled: false,
                function_masked: false,
            },
            sink,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.state.entries.len() as u16
    }

    /// Bytes of table the BAR must hold.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors()) * ENTRY_SIZE
    }

    /// Bytes of PBA the BAR must hold (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.state.pending.len() as u64 * 8
    }

    /// The capability body (after ID and next pointer) and its write mask: message
    /// control (enable and function mask writable), table and PBA offset/BIR.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 2]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        (body, [0x00, 0xc0])
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    pub fn state(&self) -> &MsixState {
        &self.state
    }

    /// Loads a saved table of the same size (extra entries are ignored, missing ones
    /// stay masked).
    pub fn restore(&mut self, saved: &MsixState) {
        for (e, s) in self.state.entries.iter_mut().zip(&saved.entries) {
            *e = *s;
        }
        for (p, s) in self.state.pending.iter_mut().zip(&saved.pending) {
            *p = *s;
        }
        self.state.enabled = saved.enabled;
        self.state.function_masked = saved.function_masked;
    }

    /// Back to power-on: disabled, every vector masked, nothing pending.
    pub fn reset(&mut self) {
        let vectors = self.vectors();
        let sink = self.sink.clone();
        *self = MsixTable::new(vectors, sink);
    }

    /// The guest wrote the capability's message control register.
    pub fn set_control(&mut self, control: u16) {
        let was_blocked = !self.state.enabled || self.state.function_masked;
        self.state.enabled = control & CONTROL_ENABLE != 0;
        self.state.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if was_blocked && self.state.enabled && !self.state.function_masked {
            for v in 0..self.vectors() {
                self.deliver_pending(v);
            }
        }
    }

    /// Raises `vector`.
    pub fn notify(&mut self, vector: u16) -> MsixDelivery {
        let Some(entry) = self.state.entries.get(usize::from(vector)).copied() else {
            return MsixDelivery::NotDelivered;
        };
        if !self.state.enabled {
            return MsixDelivery::NotDelivered;
        }
        if self.state.function_masked || entry.masked() {
            self.set_pending(vector, true);
            return MsixDelivery::Pending;
        }
        self.send(entry);
        MsixDelivery::Sent
    }

    fn send(&self, entry: MsixEntry) {
        if let Err(e) = self.sink.send(entry.address, entry.data) {
            crate::guest_warn!(
                "MSI-X: message {:#x} to {:#x} not delivered: {e}",
                entry.data,
                entry.address
            );
        }
    }

    fn set_pending(&mut self, vector: u16, on: bool) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        if on {
            self.state.pending[word] |= 1 << bit;
        } else {
            self.state.pending[word] &= !(1 << bit);
        }
    }

    fn deliver_pending(&mut self, vector: u16) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        let entry = self.state.entries[usize::from(vector)];
        if self.state.pending[word] & (1 << bit) != 0 && !entry.masked() {
            self.set_pending(vector, false);
            self.send(entry);
        }
    }

    /// A guest read of the table at `offset` (accesses of 4 or 8 bytes, aligned;
    /// anything else reads zero, as the spec leaves it undefined).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !access_ok(offset, data.len()) {
            return;
        }
        let index = (offset / ENTRY_SIZE) as usize;
        let at = (offset % ENTRY_SIZE) as usize;
        if let Some(entry) = self.state.entries.get(index) {
            data.copy_from_slice(&entry.to_bytes()[at..at + data.len()]);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !access_ok(offset, data.len()) {
            return;
        }
        let index = (offset / ENTRY_SIZE) as usize;
        let at = (offset % ENTRY_SIZE) as usize;
        let Some(entry) = self.state.entries.get_mut(index) else {
            return;
        };
        let mut bytes = entry.to_bytes();
        bytes[at..at + data.len()].copy_from_slice(data);
        let updated = MsixEntry::from_bytes(&bytes);
        // Only the mask bit of vector control is defined; the rest is reserved.
        *entry = MsixEntry {
            vector_control: updated.vector_control & VECTOR_MASKED,
            ..updated
        };
        if self.state.enabled && !self.state.function_masked {
            self.deliver_pending(index as u16);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !access_ok(offset, data.len()) {
            return;
        }
        if let Some(word) = self.state.pending.get((offset / 8) as usize) {
            let at = (offset % 8) as usize;
            data.copy_from_slice(&word.to_le_bytes()[at..at + data.len()]);
        }
    }
}

fn access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Recorder {
        fn send(&self, address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    fn program(t: &mut MsixTable, v: u64, address: u64, data: u32, masked: bool) {
        t.write_table(v * 16, &(address as u32).to_le_bytes());
        t.write_table(v * 16 + 4, &((address >> 32) as u32).to_le_bytes());
        t.write_table(v * 16 + 8, &data.to_le_bytes());
        t.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let rec = Arc::new(Recorder::default());
        let mut t = MsixTable::new(3, rec.clone());
        assert_eq!(t.notify(0), MsixDelivery::NotDelivered, "disabled");
        t.set_control(CONTROL_ENABLE);
        program(&mut t, 1, 0xfee0_0000, 0x41, true);
        assert_eq!(t.notify(1), MsixDelivery::Pending);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        t.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(*rec.0.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);
        t.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        assert_eq!(t.notify(1), MsixDelivery::Sent);
        assert_eq!(t.notify(7), MsixDelivery::NotDelivered);
        // Function mask holds everything; clearing it delivers.
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(t.notify(1), MsixDelivery::Pending);
        t.set_control(CONTROL_ENABLE);
        assert_eq!(rec.0.lock().unwrap().len(), 3);
        let mut e = [0u8; 8];
        t.read_table(16, &mut e);
        assert_eq!(u64::from_le_bytes(e), 0xfee0_0000);
        t.read_table(17, &mut e[..4]);
        assert_eq!(e[..4], [0; 4], "misaligned reads read zero");
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let t = MsixTable::new(5, Arc::new(crate::interrupt::NoMsi));
        let (body, mask) = t.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 4);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(mask, [0, 0xc0]);
        assert_eq!(t.table_len(), 80);
        assert_eq!(t.pba_len(), 8);
    }
}
