//! virtio 1.x devices on the PCI transport: block, network, entropy, console, vsock and
//! file system (vhost-user).
//!
//! A [`VirtioPciDevice`] is the transport (configuration space, the BAR with the
//! common, notify, ISR and device configuration structures, MSI-X); it wraps one
//! [`VirtioDevice`]. When the driver sets DRIVER_OK the device starts a worker thread
//! that waits on the queues' notification eventfds (and its backend's descriptors) and
//! processes the split virtqueues through the `virtio-queue` crate. Everything a guest
//! hands over is checked ([`chain`]); a chain that makes no sense puts the device into
//! DEVICE_NEEDS_RESET with a logged reason, never the monitor into a panic.
//!
//! Wiring one device into a VM (what the builder does):
//! 1. build the device (`VirtioBlock::new(&BlockConfig::parse(..)?)`, `VirtioNet::open`,
//!    `VirtioRng::new()`, `VirtioConsole::new(writer)`);
//! 2. wrap it: `VirtioPciDevice::new(Box::new(dev), mem.clone(), &mut bars, msi, None)`,
//!    `bars` being the VM's `BarAllocator::mmio32()` and `msi` its [`MsiSink`];
//! 3. share it: `Arc<Mutex<VirtioPciDevice<_>>>`, then `PciRoot::add_next(dev.clone())`
//!    and `Bus::insert(base, len, dev.clone())` on the MMIO bus with
//!    `(base, len) = bar_window()`;
//! 4. on KVM, register each `notify_events()` pair as an ioeventfd (address, any
//!    length or 2 bytes, no datamatch); on the software CPU, MMIO writes there reach
//!    the device through the bus and signal the same eventfds.
//!
//! [`MsiSink`]: crate::interrupt::MsiSink

pub mod balloon;
pub mod block;
pub mod chain;
pub mod console;
pub mod fs;
pub mod guest_io;
mod interrupt;
pub mod net;
pub mod options;
mod pci;
pub mod rate_limit;
pub mod rng;
pub mod vsock;
mod worker;

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use chain::{Chain, ChainError, Segment};
pub use guest_io::{GuestAccess, GuestRam};
pub use interrupt::VirtioInterrupt;
pub use pci::{
    BAR_SIZE, NOTIFY_OFF_MULTIPLIER, QueueConfig, TransportState, VirtioPciDevice, VirtioPciError,
    VirtioPciState,
};
pub use worker::{QueueHandler, Worker};

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Feature bits shared by every device type.
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    /// What every vessel device offers besides its own bits.
    pub const COMMON: u64 = VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX;
}

/// The virtio device IDs vessel implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    Net = 1,
    Block = 2,
    Console = 3,
    Rng = 4,
    Balloon = 5,
    Vsock = 19,
    Fs = 26,
}

impl DeviceType {
    /// PCI class code (class << 16 | subclass << 8), as QEMU reports them.
    fn pci_class(self) -> u32 {
        match self {
            DeviceType::Net => 0x02_00_00,
            DeviceType::Block => 0x01_00_00,
            DeviceType::Console => 0x07_80_00,
            DeviceType::Rng => 0xff_00_00,
            DeviceType::Balloon => 0x05_00_00,
            DeviceType::Vsock => 0x07_80_00,
            DeviceType::Fs => 0x01_80_00,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Net => "virtio-net",
            DeviceType::Block => "virtio-blk",
            DeviceType::Console => "virtio-console",
            DeviceType::Rng => "virtio-rng",
            DeviceType::Balloon => "virtio-balloon",
            DeviceType::Vsock => "virtio-vsock",
            DeviceType::Fs => "virtio-fs",
        }
    }
}

/// Guest memory a device can take to its worker thread. `GuestMemoryMmap` is one,
/// whatever its dirty bitmap.
pub trait GuestMemoryShared: vm_memory::GuestMemory + Clone + Send + Sync + 'static {}
impl<M: vm_memory::GuestMemory + Clone + Send + Sync + 'static> GuestMemoryShared for M {}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation<M> {
    pub mem: M,
    /// The features the driver accepted.
    pub features: u64,
    /// One per queue the device declared, set up as the driver left them (check
    /// `ready()`: a driver need not enable every queue).
    pub queues: Vec<Queue>,
    /// The queues' notification eventfds (the same files the transport signals and the
    /// VMM may register as ioeventfds).
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
}

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("wrong number of queues: {0}")]
    Queues(usize),
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("backend: {0}")]
    Backend(String),
}

/// Why a device stopped processing its queues (it then needs a reset).
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("queue {queue}: {source}")]
    Chain { queue: usize, source: ChainError },
    #[error("queue {queue}: {reason}")]
    Request { queue: usize, reason: String },
    #[error("queue {queue}: ring access failed: {reason}")]
    Ring { queue: usize, reason: String },
}

impl DeviceError {
    pub(crate) fn ring(queue: usize, e: virtio_queue::Error) -> Self {
        DeviceError::Ring {
            queue,
            reason: e.to_string(),
        }
    }

    /// A chain whose buffers point the wrong way for its queue (`what`, e.g.
    /// "device-readable" on a receive queue).
    pub(crate) fn direction(queue: usize, head: u16, what: &str) -> Self {
        DeviceError::Request {
            queue,
            reason: format!("chain (head {head}) has {what} buffers"),
        }
    }
}

/// A virtio device type behind the transport.
pub trait VirtioDevice<M>: Send {
    fn device_type(&self) -> DeviceType;
    /// The maximum size of each queue (a power of two up to 32768).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features the device offers, [`features::VERSION_1`] included.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration (little-endian); beyond its end reads zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Most devices' configuration is read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing (DRIVER_OK).
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues; the device may be activated again.
    fn reset(&mut self);
    /// Stops processing for a while (a snapshot): the device is activated again on
    /// the same queues and keeps what its backend holds. Most devices hold nothing
    /// beyond their queues.
    fn pause(&mut self) {
        self.reset();
    }
    /// Whether a snapshot can hold this device (a device whose state lives in another
    /// process cannot).
    fn saveable(&self) -> Result<(), String> {
        Ok(())
    }
    /// Lets another process take over what the device's backend holds exclusively (a
    /// disk's lock, at a migration's end), once the device is paused; `false` takes it
    /// back.
    fn hand_over(&mut self, _give: bool) -> Result<(), String> {
        Ok(())
    }
    /// A disk's image (a migration that copies disks reads it and logs its writes).
    fn disk(&self) -> Option<std::sync::Arc<block::Disk>> {
        None
    }
    /// Tells the network the device is here now (a NIC, after a restore or a
    /// migration: switches learn where its MAC address went).
    fn announce(&mut self) {}
}

/// Copies from a configuration image; bytes beyond it read zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < config.len() {
        let n = data.len().min(config.len() - offset);
        data[..n].copy_from_slice(&config[offset..offset + n]);
    }
}

/// At the end of a pass over queue `index`: publishes the completions (through `ram`)
/// and turns the driver's notifications back on. False when the driver made nothing
/// new available meanwhile (the pass is over), true when another pass is due.
pub(crate) fn publish_and_rearm<A, M>(
    used: &mut chain::UsedRing,
    queue: &mut Queue,
    ram: &A,
    mem: &M,
    index: usize,
) -> Result<bool, DeviceError>
where
    A: guest_io::GuestAccess + ?Sized,
    M: vm_memory::GuestMemory,
{
    used.publish(queue, ram)
        .map_err(|reason| DeviceError::Ring {
            queue: index,
            reason,
        })?;
    virtio_queue::QueueT::enable_notification(queue, mem).map_err(|e| DeviceError::ring(index, e))
}

/// After serving a queue: publish the completions and interrupt the driver if it
/// wants to be.
pub(crate) fn finish<M: vm_memory::GuestMemory>(
    used: &mut chain::UsedRing,
    queue: &mut Queue,
    mem: &M,
    interrupt: &VirtioInterrupt,
    index: usize,
) -> Result<(), DeviceError> {
    let ring = |reason| DeviceError::Ring {
        queue: index,
        reason,
    };
    used.publish(queue, mem).map_err(ring)?;
    if used.needs_interrupt(queue, mem).map_err(ring)? {
        interrupt.signal_queue(index);
    }
    Ok(())
}
