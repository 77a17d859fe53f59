//! The part of a virtio PCI function its worker thread shares with the transport:
//! device status (the worker may set DEVICE_NEEDS_RESET), the ISR, the MSI-X table and
//! the vector each queue and the configuration interrupt use.

use std::sync::atomic::{AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::interrupt::{IrqLine, MsiSink};
use crate::pci::{MsixDelivery, MsixTable};

use super::status;

/// "No vector": the driver did not assign one (or asked for one that does not exist).
pub const NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

pub struct VirtioInterrupt {
    name: String,
    status: AtomicU8,
    isr: AtomicU8,
    msix: Mutex<MsixTable>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: Option<Arc<dyn IrqLine>>,
}

impl VirtioInterrupt {
    /// For a device called `name` (for log lines) with `queues` queues: MSI-X with one
    /// vector per queue plus one for configuration changes. `intx`, when given, is the
    /// line used while the driver has MSI-X disabled.
    pub fn new(
        name: &str,
        queues: usize,
        sink: Arc<dyn MsiSink>,
        intx: Option<Arc<dyn IrqLine>>,
    ) -> Self {
        let vectors = (queues + 1).min(usize::from(crate::pci::msix::MAX_VECTORS)) as u16;
        VirtioInterrupt {
            name: name.to_string(),
            status: AtomicU8::new(0),
            isr: AtomicU8::new(0),
            msix: Mutex::new(MsixTable::new(vectors, sink)),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the driver that queue `queue` has used buffers.
    pub fn signal_queue(&self, queue: usize) {
        let vector = self
            .queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.signal(vector, ISR_QUEUE);
    }

    /// Tells the driver that the device configuration (or status) changed.
    pub fn signal_config(&self) {
        self.signal(self.config_vector.load(Ordering::Acquire), ISR_CONFIG);
    }

    fn signal(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        let delivered = {
            let mut msix = lock(&self.msix);
            if msix.enabled() {
                if vector != NO_VECTOR {
                    msix.notify(vector);
                }
                MsixDelivery::Sent
            } else {
                MsixDelivery::NotDelivered
            }
        };
        if delivered == MsixDelivery::NotDelivered
            && let Some(line) = &self.intx
            && let Err(e) = line.set_level(true)
        {
            tracing::warn!("{}: INTx not raised: {e}", self.name);
        }
    }

    /// Puts the device into DEVICE_NEEDS_RESET and tells the driver.
    pub fn set_needs_reset(&self, reason: &str) {
        crate::guest_warn!("{}: device needs reset: {reason}", self.name);
        self.status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        self.signal_config();
    }

    pub fn device_status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    /// A driver write to device status: the driver's bits, keeping DEVICE_NEEDS_RESET
    /// (which only the device sets, and only reset clears).
    pub(crate) fn set_driver_status(&self, value: u8) {
        let _ = self
            .status
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some((value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET))
            });
    }

    /// Device reset: status, ISR and vector assignments back to zero/none. The MSI-X
    /// table itself belongs to the PCI function and survives a virtio reset.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        if let Some(line) = &self.intx {
            let _ = line.set_level(false);
        }
    }

    /// Reading the ISR clears it (and lowers INTx).
    pub(crate) fn read_isr(&self) -> u8 {
        let isr = self.isr.swap(0, Ordering::AcqRel);
        if let Some(line) = &self.intx {
            let _ = line.set_level(false);
        }
        isr
    }

    pub(crate) fn msix(&self) -> std::sync::MutexGuard<'_, MsixTable> {
        lock(&self.msix)
    }

    /// Loads saved registers (snapshot restore); vectors the table lacks are dropped.
    pub(crate) fn restore(
        &self,
        status: u8,
        config_vector: u16,
        queue_vectors: &[u16],
        msix: &crate::pci::msix::MsixState,
    ) {
        self.msix().restore(msix);
        self.status.store(status, Ordering::Release);
        self.config_vector
            .store(self.valid_vector(config_vector), Ordering::Release);
        for (v, saved) in self.queue_vectors.iter().zip(queue_vectors) {
            v.store(self.valid_vector(*saved), Ordering::Release);
        }
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix().vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// Assigns the configuration vector; a vector the table does not have reads back
    /// as NO_VECTOR, which is how the driver learns it failed.
    pub(crate) fn set_config_vector(&self, vector: u16) {
        self.config_vector
            .store(self.valid_vector(vector), Ordering::Release);
    }

    pub(crate) fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(crate) fn set_queue_vector(&self, queue: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(queue) {
            v.store(self.valid_vector(vector), Ordering::Release);
        }
    }
}
