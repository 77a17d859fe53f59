//! The virtio 1.x PCI transport ("modern" only). One 64-bit memory BAR holds every
//! structure the driver finds through vendor capabilities:
//!
//! | BAR offset | what |
//! | --- | --- |
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue `i` at `0x3000 + 4 * i` |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending-bit array |

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::{BusDevice, le_value, put_le};
use crate::interrupt::{IrqLine, MsiSink};
use crate::pci::msix::{self, MsixState};
use crate::pci::{Bar, BarAllocator, BarKind, ConfigSpace, PciDevice, PciError};

use super::interrupt::NO_VECTOR;
use super::{
    Activation, DeviceType, GuestMemoryShared, VirtioDevice, VirtioInterrupt, features, status,
};

pub const BAR_SIZE: u64 = 0x8000;
const BAR_INDEX: u8 = 0;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Each queue has its own notification address, so an ioeventfd needs no datamatch.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const MSIX_PBA_END: u64 = 0x7000;
const MAX_QUEUES: usize = (NOTIFY_LEN / NOTIFY_OFF_MULTIPLIER as u64) as usize;

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_DEVICE_BASE: u16 = 0x1040;
/// Subsystem ID QEMU gives modern devices; drivers ignore it.
const VIRTIO_SUBSYSTEM: u16 = 0x1100;
const PCI_CAP_VENDOR: u8 = 0x09;

/// virtio_pci_cap.cfg_type
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// One queue as the driver configured it through the common configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// Where the device resumes in the rings (set by a quiesce, for snapshots).
    #[serde(default)]
    pub next_avail: u16,
    #[serde(default)]
    pub next_used: u16,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
            next_avail: 0,
            next_used: 0,
        }
    }
}

/// A virtio PCI function as plain data: its type, configuration space and transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub config: Vec<u8>,
    pub transport: TransportState,
}

/// The transport's registers as plain data (for snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<QueueConfig>,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub config_generation: u8,
    pub msix: MsixState,
}

pub struct VirtioPciDevice<M> {
    config: ConfigSpace,
    device: Box<dyn VirtioDevice<M>>,
    device_type: DeviceType,
    mem: M,
    bar: Bar,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    config_generation: u8,
    msix_cap: usize,
    pci_cfg_cap: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0}: a device needs 1 to {MAX_QUEUES} queues of a power-of-two size up to 32768")]
    Queues(&'static str),
}

impl<M: GuestMemoryShared> VirtioPciDevice<M> {
    /// Wraps `device`, taking its BAR from `bars`. `msi` delivers MSI-X messages;
    /// `intx`, when given, is the legacy line used while MSI-X is disabled.
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        bars: &mut BarAllocator,
        msi: Arc<dyn MsiSink>,
        intx: Option<Arc<dyn IrqLine>>,
    ) -> Result<Self, VirtioPciError> {
        let device_type = device.device_type();
        let sizes = device.queue_max_sizes();
        if sizes.is_empty()
            || sizes.len() > MAX_QUEUES
            || sizes
                .iter()
                .any(|s| *s == 0 || *s > 32768 || !s.is_power_of_two())
        {
            return Err(VirtioPciError::Queues(device_type.name()));
        }
        let address = bars.allocate(BAR_SIZE)?;
        let mut config = ConfigSpace::new(
            VIRTIO_VENDOR,
            VIRTIO_DEVICE_BASE + device_type as u16,
            device_type.pci_class(),
            1,
        );
        config.set_subsystem(VIRTIO_VENDOR, VIRTIO_SUBSYSTEM);
        if intx.is_some() {
            config.set_interrupt_pin(1);
        }
        let bar = config.set_bar(
            usize::from(BAR_INDEX),
            BarKind::Memory64 {
                prefetchable: false,
            },
            address,
            BAR_SIZE,
        )?;
        let interrupt = Arc::new(VirtioInterrupt::new(
            device_type.name(),
            sizes.len(),
            msi,
            intx,
        ));
        let (msix_body, msix_mask) = interrupt.msix().capability(
            BAR_INDEX,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &msix_body, &msix_mask)?;
        let device_cfg_len = DEVICE_CFG_LEN as u32;
        for (cfg_type, offset, len, extra) in [
            (CAP_COMMON, COMMON_OFFSET, COMMON_LEN as u32, None),
            (
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                (sizes.len() as u32) * NOTIFY_OFF_MULTIPLIER,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            (CAP_ISR, ISR_OFFSET, ISR_LEN as u32, None),
            (CAP_DEVICE, DEVICE_CFG_OFFSET, device_cfg_len, None),
        ] {
            let body = vendor_cap_body(cfg_type, offset as u32, len, extra);
            config.add_capability(PCI_CAP_VENDOR, &body, &[])?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BAR through configuration space.
        // bar, offset, length and data are the driver's to write.
        let body = vendor_cap_body(CAP_PCI_CFG, 0, 0, Some(0));
        let mut mask = [0u8; 18];
        mask[2] = 0xff; // bar
        mask[6..18].fill(0xff); // offset, length, data
        let pci_cfg_cap = config.add_capability(PCI_CAP_VENDOR, &body, &mask)?;

        let queue_events = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        Ok(VirtioPciDevice {
            config,
            device_features: device.features() | features::VERSION_1,
            device,
            device_type,
            mem,
            bar,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues: sizes.iter().map(|s| QueueConfig::new(*s)).collect(),
            queue_events,
            interrupt,
            config_generation: 0,
            msix_cap,
            pci_cfg_cap,
        })
    }
}

impl<M: GuestMemoryShared> VirtioPciDevice<M> {
    /// The BAR window to register on the MMIO bus: (guest-physical base, length).
    pub fn bar_window(&self) -> (u64, u64) {
        (self.bar.address, self.bar.size)
    }

    /// Each queue's notification address and eventfd, for KVM ioeventfds. The driver
    /// writes 16 bits (the queue index) there; any width works for the MMIO path.
    pub fn notify_events(&self) -> Vec<(u64, &EventFd)> {
        self.queue_events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    self.bar.address + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    e,
                )
            })
            .collect()
    }

    pub fn device_type(&self) -> DeviceType {
        self.device_type
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    pub fn device_status(&self) -> u8 {
        self.interrupt.device_status()
    }

    pub fn state(&self) -> TransportState {
        TransportState {
            device_status: self.interrupt.device_status(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            config_vector: self.interrupt.config_vector(),
            queue_vectors: (0..self.queues.len())
                .map(|q| self.interrupt.queue_vector(q))
                .collect(),
            config_generation: self.config_generation,
            msix: self.interrupt.msix().state().clone(),
        }
    }

    /// Stops the device's worker (its requests in flight complete first) and records
    /// where each queue stands, read back from the used rings: once the worker has
    /// stopped, every chain it took is in the used ring. For a snapshot; `resume` (or a
    /// restore elsewhere) carries on from there.
    pub fn quiesce(&mut self) {
        if self.interrupt.device_status() & status::DRIVER_OK == 0 {
            return;
        }
        self.device.pause();
        for q in self.queues.iter_mut().filter(|q| q.ready) {
            let idx = vm_memory::Bytes::read_obj::<u16>(&self.mem, GuestAddress(q.device + 2))
                .unwrap_or(0);
            q.next_used = idx;
            q.next_avail = idx;
        }
    }

    /// Starts the worker again after `quiesce`, unless the device needs a reset (it
    /// stopped, or never started): only the driver's reset brings it back.
    pub fn resume(&mut self) {
        let s = self.interrupt.device_status();
        if s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0 {
            self.activate();
        }
    }

    /// See [`VirtioDevice::hand_over`] (the function quiesced).
    pub fn hand_over(&mut self, give: bool) -> Result<(), String> {
        self.device.hand_over(give)
    }

    /// See [`VirtioDevice::disk`].
    pub fn disk(&self) -> Option<std::sync::Arc<super::block::Disk>> {
        self.device.disk()
    }

    /// See [`VirtioDevice::announce`].
    pub fn announce(&mut self) {
        self.device.announce();
    }

    /// Whether a snapshot can hold this function.
    pub fn saveable(&self) -> Result<(), String> {
        self.device.saveable()
    }

    /// Everything about this function a snapshot needs (after `quiesce`).
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            device_type: self.device_type as u32,
            config: self.config.save(),
            transport: self.state(),
        }
    }

    /// Loads a saved function into this one (same device type and queues) and, if the
    /// driver had it running, starts its worker where the queues stood.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), String> {
        let t = &s.transport;
        if s.device_type != self.device_type as u32 || t.queues.len() != self.queues.len() {
            return Err(format!(
                "a saved {} device with {} queues does not match this {} with {}",
                s.device_type,
                t.queues.len(),
                self.device_type.name(),
                self.queues.len()
            ));
        }
        self.config.restore(&s.config);
        self.device_feature_select = t.device_feature_select;
        self.driver_feature_select = t.driver_feature_select;
        self.driver_features = t.driver_features & self.device_features;
        self.queue_select = t.queue_select;
        for (q, saved) in self.queues.iter_mut().zip(&t.queues) {
            let max_size = q.max_size;
            *q = *saved;
            q.max_size = max_size;
        }
        self.config_generation = t.config_generation;
        self.interrupt
            .restore(t.device_status, t.config_vector, &t.queue_vectors, &t.msix);
        self.resume();
        Ok(())
    }

    /// The device configuration changed (a link came up, a disk was resized): bump
    /// the generation and interrupt the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config();
    }

    fn reset(&mut self) {
        self.device.reset();
        self.interrupt.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for e in &self.queue_events {
            let _ = e.read();
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// Queue registers may change until the queue is enabled and before DRIVER_OK.
    fn queue_writable(&mut self) -> Option<&mut QueueConfig> {
        let running = self.interrupt.device_status() & status::DRIVER_OK != 0;
        self.selected_queue().filter(|q| !q.ready && !running)
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let sel = usize::from(self.queue_select);
        let v: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupt.config_vector()),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.interrupt.device_status()),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => u64::from(if q.is_some() {
                self.interrupt.queue_vector(sel)
            } else {
                NO_VECTOR
            }),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (0x1e, 2) => q.map_or(0, |_| sel as u64),
            (0x20..0x38, 4 | 8) if offset.is_multiple_of(data.len() as u64) => {
                let q = q.unwrap_or(QueueConfig::new(0));
                let full = match offset & !7 {
                    0x20 => q.desc,
                    0x28 => q.driver,
                    _ => q.device,
                };
                if offset & 4 != 0 { full >> 32 } else { full }
            }
            _ => 0,
        };
        put_le(data, v);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            // Features are fixed once FEATURES_OK is set.
            (0x0c, 4) if self.interrupt.device_status() & status::FEATURES_OK == 0 => {
                let v = v & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            (0x10, 2) => self.interrupt.set_config_vector(v as u16),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) => {
                if let Some(q) = self.queue_writable() {
                    let size = v as u16;
                    if size != 0 && size.is_power_of_two() && size <= q.max_size {
                        q.size = size;
                    } else {
                        tracing::debug!("virtio: queue size {size} refused (max {})", q.max_size);
                    }
                }
            }
            (0x1a, 2) => {
                let sel = usize::from(self.queue_select);
                self.interrupt.set_queue_vector(sel, v as u16);
            }
            (0x1c, 2) => {
                // Drivers must not write 0; only enabling has a meaning.
                if v == 1
                    && let Some(q) = self.queue_writable()
                {
                    q.ready = true;
                }
            }
            (0x20..0x38, 4 | 8) if offset.is_multiple_of(data.len() as u64) => {
                let Some(q) = self.queue_writable() else {
                    return;
                };
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = match (data.len(), offset & 4) {
                    (8, _) => v,
                    (_, 0) => (*field & !0xffff_ffff) | v,
                    _ => (*field & 0xffff_ffff) | (v << 32),
                };
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.interrupt.device_status();
        let mut value = value;
        if value & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & features::VERSION_1 == 0 {
                crate::guest_warn!(
                    "{}: driver features {:#x} refused (offered {:#x}; VERSION_1 is required)",
                    self.device_type.name(),
                    self.driver_features,
                    self.device_features
                );
                value &= !status::FEATURES_OK;
            }
        }
        self.interrupt.set_driver_status(value);
        if value & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if value & status::FEATURES_OK == 0 {
                self.interrupt.set_needs_reset(
                    "DRIVER_OK without FEATURES_OK (legacy drivers are not supported)",
                );
                return;
            }
            self.activate();
        }
    }

    fn isr_read(&mut self, data: &mut [u8]) {
        put_le(data, u64::from(self.interrupt.read_isr()));
    }

    fn notify(&mut self, offset: u64) {
        let queue = (offset / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
        if let Some(evt) = self.queue_events.get(queue)
            && let Err(e) = evt.write(1)
        {
            crate::guest_warn!(
                "{}: queue {queue} notification lost: {e}",
                self.device_type.name()
            );
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                if o == ISR_OFFSET {
                    self.isr_read(data)
                } else {
                    data.fill(0)
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .msix()
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..MSIX_PBA_END).contains(&o) => {
                self.interrupt.msix().read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                self.notify(o - NOTIFY_OFFSET)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .msix()
                .write_table(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: (offset, length) of the BAR access it
    /// currently describes, if it is a valid one into our BAR.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + 4);
        let offset = u64::from(self.config.read_u32(cap + 8));
        let len = self.config.read_u32(cap + 12) as usize;
        (bar == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= BAR_SIZE)
            .then_some((offset, len))
    }
}

impl<M: GuestMemoryShared> VirtioPciDevice<M> {
    fn activate(&mut self) {
        // Whoever asks (DRIVER_OK, a resume, a restore), a device starts only on
        // features it accepted: FEATURES_OK set, nothing it did not offer, VERSION_1.
        let negotiated = self.driver_features;
        if self.interrupt.device_status() & status::FEATURES_OK == 0
            || negotiated & !self.device_features != 0
            || negotiated & features::VERSION_1 == 0
        {
            self.interrupt.set_needs_reset(&format!(
                "not started on features {negotiated:#x} it did not accept (offered {:#x})",
                self.device_features
            ));
            return;
        }
        let name = self.device_type.name();
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            match build_queue(q, event_idx, &self.mem) {
                Ok(queue) => queues.push(queue),
                Err(reason) => {
                    self.interrupt
                        .set_needs_reset(&format!("queue {i}: {reason}"));
                    return;
                }
            }
        }
        let queue_events = match self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(e) => e,
            Err(e) => {
                self.interrupt
                    .set_needs_reset(&format!("cannot share queue eventfds: {e}"));
                return;
            }
        };
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        if let Err(e) = self.device.activate(activation) {
            self.interrupt
                .set_needs_reset(&format!("activation failed: {e}"));
        } else {
            tracing::debug!(
                "{name}: activated with features {:#x}",
                self.driver_features
            );
        }
    }
}

/// A `virtio_queue::Queue` from the driver's settings, checked: alignment, and every
/// ring entirely inside guest RAM.
fn build_queue<M: GuestMemory>(q: &QueueConfig, event_idx: bool, mem: &M) -> Result<Queue, String> {
    let mut queue = Queue::new(q.max_size).map_err(|e| e.to_string())?;
    if !q.ready {
        return Ok(queue);
    }
    queue.try_set_size(q.size).map_err(|e| e.to_string())?;
    queue
        .try_set_desc_table_address(GuestAddress(q.desc))
        .map_err(|e| e.to_string())?;
    queue
        .try_set_avail_ring_address(GuestAddress(q.driver))
        .map_err(|e| e.to_string())?;
    queue
        .try_set_used_ring_address(GuestAddress(q.device))
        .map_err(|e| e.to_string())?;
    let n = u64::from(q.size);
    for (what, addr, len, access) in [
        ("descriptor table", q.desc, 16 * n, Permissions::Read),
        ("available ring", q.driver, 6 + 2 * n, Permissions::Read),
        ("used ring", q.device, 6 + 8 * n, Permissions::Write),
    ] {
        if !mem.check_range(GuestAddress(addr), len as usize, access) {
            return Err(format!("{what} {addr:#x}+{len:#x} is not guest RAM"));
        }
    }
    if q.driver == 0 {
        // virtio-queue treats an available ring at 0 as "not set up".
        return Err("available ring at address 0".into());
    }
    queue.set_event_idx(event_idx);
    queue.set_next_avail(q.next_avail);
    queue.set_next_used(q.next_used);
    queue.set_ready(true);
    Ok(queue)
}

/// A virtio_pci_cap after its ID and next bytes: cap_len, cfg_type, bar, id, padding,
/// offset, length, then the notify multiplier or the PCI_CFG data window.
fn vendor_cap_body(cfg_type: u8, offset: u32, length: u32, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![cap_len, cfg_type, BAR_INDEX, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl<M: GuestMemoryShared> PciDevice for VirtioPciDevice<M> {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset >= window
            && offset + data.len() <= window + 4
            && let Some((bar_offset, len)) = self.pci_cfg_target()
        {
            let mut buf = [0u8; 4];
            self.bar_read(bar_offset, &mut buf[..len]);
            let at = offset - window;
            data.copy_from_slice(&buf[at..at + data.len()]);
            return;
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let end = offset + data.len();
        let control = self.msix_cap + 2;
        if offset < control + 2 && end > control {
            let value = self.config.read_u16(control);
            self.interrupt.msix().set_control(value);
        }
        let window = self.pci_cfg_cap + 16;
        if offset < window + 4
            && end > window
            && let Some((bar_offset, len)) = self.pci_cfg_target()
        {
            let mut buf = [0u8; 4];
            self.config.read(window, &mut buf);
            self.bar_write(bar_offset, &buf[..len]);
        }
    }
}

impl<M: GuestMemoryShared> BusDevice for VirtioPciDevice<M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }
}
