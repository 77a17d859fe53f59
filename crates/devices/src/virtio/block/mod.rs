//! virtio-blk over a disk image (raw or qcow2): read, write, flush (durable before
//! completion), get-id, discard and write-zeroes (space goes back to the host).

mod config;
mod disk;
pub mod request;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::EventSet;

pub use config::{BlockConfig, ID_BYTES};
pub use disk::{CHUNK as DISK_CHUNK, Disk, DiskError};
pub use request::{Range, Request, RequestError, RequestKind};

use super::chain::{Chain, UsedRing, pop_all};
use super::guest_io::{GuestAccess, GuestRam, IoVecs};
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, read_config_bytes,
};
use crate::virtio::publish_and_rearm;
pub use crate::virtio::rate_limit::Throttling;
use crate::virtio::rate_limit::{QueueThrottle, RateLimiter};
use request::{SECTOR_SIZE, byte_range, parse_ranges, status};

/// Feature bits (virtio 1.x, 5.2.3).
pub mod feature_bits {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

pub const QUEUE_SIZE: u16 = 256;
/// Ranges per discard / write-zeroes request.
pub const MAX_RANGES: u32 = 32;
/// Sectors per discard / write-zeroes range (2 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Discard granularity in sectors: 4 KiB, the host filesystems' block.
const DISCARD_ALIGNMENT: u32 = 8;

pub struct VirtioBlock {
    disk: Arc<Disk>,
    features: u64,
    config: Vec<u8>,
    worker: Option<Worker>,
    limiter: Option<RateLimiter>,
    throttling: Arc<Throttling>,
}

impl VirtioBlock {
    /// Opens the image `config` names.
    pub fn new(config: &BlockConfig) -> Result<Self, DiskError> {
        Ok(Self::with_disk(Disk::open(config)?))
    }

    pub fn with_disk(disk: Disk) -> Self {
        use feature_bits::*;
        let mut features = features::COMMON | SEG_MAX | BLK_SIZE | FLUSH;
        if disk.image().readonly() {
            features |= RO;
        } else {
            features |= DISCARD | WRITE_ZEROES;
        }
        let mut c = vec![0u8; 0x3c];
        c[0x00..0x08].copy_from_slice(&disk.sectors().to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[0x14..0x18].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[0x22..0x24].copy_from_slice(&1u16.to_le_bytes());
        c[0x24..0x28].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[0x28..0x2c].copy_from_slice(&MAX_RANGES.to_le_bytes());
        c[0x2c..0x30].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
        c[0x30..0x34].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[0x34..0x38].copy_from_slice(&MAX_RANGES.to_le_bytes());
        c[0x38] = 1; // write_zeroes_may_unmap
        VirtioBlock {
            disk: Arc::new(disk),
            features,
            config: c,
            worker: None,
            limiter: None,
            throttling: Arc::default(),
        }
    }

    /// Limits the device's requests (a limiter shared with other disks of a group).
    pub fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = Some(limiter);
    }

    pub fn throttling(&self) -> Arc<Throttling> {
        self.throttling.clone()
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioBlock {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let Activation {
            mem,
            features,
            queues,
            queue_events,
            interrupt,
        } = a;
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::Queues(queue_events.len()));
        };
        let mut handler =
            BlockQueue::new(mem, queue, self.disk.clone(), interrupt.clone(), features);
        if let Some(l) = &self.limiter {
            handler
                .limit(l.clone(), self.throttling.clone())
                .map_err(ActivateError::Worker)?;
        }
        let worker = Worker::spawn(
            "virtio-blk",
            sandbox::ThreadClass::Block,
            handler,
            queue_events,
            interrupt,
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn disk(&self) -> Option<Arc<Disk>> {
        Some(self.disk.clone())
    }

    fn hand_over(&mut self, give: bool) -> Result<(), String> {
        let image = self.disk.image();
        image.hand_over(give).map_err(|e| {
            format!(
                "{}: {} its lock: {e}",
                image.path().display(),
                if give {
                    "cannot release"
                } else {
                    "cannot take back"
                }
            )
        })
    }
}

/// The request queue: what the worker thread runs, and what the benchmark drives.
pub struct BlockQueue<M> {
    mem: M,
    requests: Requests,
}

/// Everything but the memory, so a pass can borrow both.
struct Requests {
    throttle: Option<QueueThrottle>,
    queue: Queue,
    disk: Arc<Disk>,
    interrupt: Arc<VirtioInterrupt>,
    features: u64,
    chain: Chain,
    heads: Vec<u16>,
    used: UsedRing,
    request: Request,
    iovecs: IoVecs,
    ranges: Vec<Range>,
}

impl<M: GuestMemory> BlockQueue<M> {
    pub fn new(
        mem: M,
        queue: Queue,
        disk: Arc<Disk>,
        interrupt: Arc<VirtioInterrupt>,
        features: u64,
    ) -> Self {
        BlockQueue {
            mem,
            requests: Requests {
                throttle: None,
                used: UsedRing::new(&queue),
                heads: Vec::new(),
                queue,
                disk,
                interrupt,
                features,
                chain: Chain::new(),
                request: Request::default(),
                iovecs: IoVecs::default(),
                ranges: Vec::new(),
            },
        }
    }

    /// Puts the queue under `limiter`.
    pub fn limit(&mut self, limiter: RateLimiter, stats: Arc<Throttling>) -> std::io::Result<()> {
        self.requests.throttle = Some(QueueThrottle::new(limiter, stats)?);
        Ok(())
    }

    pub fn queue(&self) -> &Queue {
        &self.requests.queue
    }

    /// Serves every available request, then interrupts the driver if it wants to be.
    pub fn process(&mut self) -> Result<(), DeviceError> {
        let ram = GuestRam::new(&self.mem);
        self.requests.process(&ram)
    }
}

impl Requests {
    fn process<M: GuestMemory>(&mut self, ram: &GuestRam<'_, M>) -> Result<(), DeviceError> {
        if !self.queue.ready() {
            return Ok(());
        }
        let served = self.serve(ram);
        // What was completed before a malformed chain still reaches the driver.
        let ring = |reason| DeviceError::Ring { queue: 0, reason };
        self.used.publish(&mut self.queue, ram).map_err(ring)?;
        if self.used.needs_interrupt(&self.queue, ram).map_err(ring)? {
            self.interrupt.signal_queue(0);
        }
        served
    }

    fn serve<M: GuestMemory>(&mut self, ram: &GuestRam<'_, M>) -> Result<(), DeviceError> {
        let mem = ram.memory();
        let chain_err = |source| DeviceError::Chain { queue: 0, source };
        loop {
            self.queue
                .disable_notification(mem)
                .map_err(|e| DeviceError::ring(0, e))?;
            pop_all(&mut self.queue, ram, &mut self.heads).map_err(chain_err)?;
            for i in 0..self.heads.len() {
                let head = self.heads[i];
                self.chain.walk(ram, &self.queue, head).map_err(chain_err)?;
                self.request
                    .parse(&self.chain, ram)
                    .map_err(|e| DeviceError::Request {
                        queue: 0,
                        reason: e.to_string(),
                    })?;
                if !self.admitted() {
                    // This head and the ones after it go back to the driver's side of
                    // the ring, taken again when the timer fires (and by a snapshot,
                    // which reads the used index, as never taken).
                    let back = (self.heads.len() - i) as u16;
                    self.queue
                        .set_next_avail(self.queue.next_avail().wrapping_sub(back));
                    return Ok(());
                }
                let (status, used) = self.execute(ram);
                if !ram.write_from(self.request.status, &[status]) {
                    return Err(DeviceError::Request {
                        queue: 0,
                        reason: "status byte is not guest RAM".into(),
                    });
                }
                self.used.push(head, used);
            }
            if !publish_and_rearm(&mut self.used, &mut self.queue, ram, mem, 0)? {
                return Ok(());
            }
        }
    }

    /// Whether the rate limit lets the parsed request through now; if not, the timer
    /// is set for when it will.
    fn admitted(&mut self) -> bool {
        let bytes = match self.request.kind {
            RequestKind::Read | RequestKind::Write => self.request.data_len,
            _ => 0,
        };
        self.throttle.as_mut().is_none_or(|t| t.admit(bytes))
    }

    /// Runs the parsed request: (status, bytes written into the chain).
    fn execute<M: GuestMemory>(&mut self, ram: &GuestRam<'_, M>) -> (u8, u32) {
        let req = &self.request;
        let disk = &*self.disk;
        if !req.directions_ok {
            return (status::IOERR, 1);
        }
        match req.kind {
            RequestKind::Read | RequestKind::Write => {
                let read = req.kind == RequestKind::Read;
                if !read && disk.image().readonly() {
                    return (status::IOERR, 1);
                }
                if !req.data_len.is_multiple_of(SECTOR_SIZE) {
                    return (status::IOERR, 1);
                }
                let Some(offset) = byte_range(req.sector, req.data_len, disk.image().size()) else {
                    return (status::IOERR, 1);
                };
                if !self.iovecs.fill(ram, &req.data, read) {
                    self.iovecs.clear();
                    return (status::IOERR, 1);
                }
                let r = if read {
                    disk.image().read_at(self.iovecs.as_mut_slice(), offset)
                } else {
                    let r = disk.image().write_at(self.iovecs.as_mut_slice(), offset);
                    disk.note_write(offset, req.data_len);
                    r
                };
                self.iovecs.clear();
                if read {
                    ram.mark_written(&req.data);
                }
                match r {
                    Ok(()) if read => (status::OK, req.data_len as u32 + 1),
                    Ok(()) => (status::OK, 1),
                    Err(e) => {
                        tracing::debug!("virtio-blk: I/O at sector {} failed: {e}", req.sector);
                        (status::IOERR, 1)
                    }
                }
            }
            RequestKind::Flush => match disk.image().flush() {
                Ok(()) => (status::OK, 1),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (status::IOERR, 1)
                }
            },
            RequestKind::GetId => {
                let n = (req.data_len as usize).min(ID_BYTES);
                let mut cursor = super::chain::Cursor::new(&req.data);
                let written = cursor.write(ram, &disk.id()[..n]);
                (status::OK, written as u32 + 1)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let discard = req.kind == RequestKind::Discard;
                let wanted = if discard {
                    feature_bits::DISCARD
                } else {
                    feature_bits::WRITE_ZEROES
                };
                if self.features & wanted == 0 {
                    return (status::UNSUPP, 1);
                }
                if disk.image().readonly() {
                    return (status::IOERR, 1);
                }
                if let Err(s) =
                    parse_ranges(ram, &req.data, req.data_len, MAX_RANGES, &mut self.ranges)
                {
                    return (s, 1);
                }
                (self.zero_ranges(discard), 1)
            }
            RequestKind::Unsupported(_) => (status::UNSUPP, 1),
        }
    }

    fn zero_ranges(&self, discard: bool) -> u8 {
        let disk = &*self.disk;
        for r in &self.ranges {
            // Discard has no flags; write-zeroes knows only "unmap".
            let allowed = if discard {
                0
            } else {
                request::RANGE_FLAG_UNMAP
            };
            if r.flags & !allowed != 0 {
                return status::UNSUPP;
            }
            let len = u64::from(r.sectors) * SECTOR_SIZE;
            let Some(offset) = byte_range(r.sector, len, disk.image().size()) else {
                return status::IOERR;
            };
            if r.sectors > MAX_RANGE_SECTORS {
                return status::IOERR;
            }
            if len == 0 {
                continue;
            }
            let result = if discard {
                disk.image().discard(offset, len)
            } else {
                disk.image()
                    .write_zeroes(offset, len, r.flags & request::RANGE_FLAG_UNMAP != 0)
            };
            disk.note_write(offset, len);
            match result {
                Ok(()) => {}
                // Discard is a hint: a filesystem that cannot punch holes loses nothing.
                Err(_) if discard => {}
                Err(e) => {
                    tracing::debug!(
                        "virtio-blk: write-zeroes at sector {} failed: {e}",
                        r.sector
                    );
                    return status::IOERR;
                }
            }
        }
        status::OK
    }
}

impl<M: GuestMemoryShared> QueueHandler for BlockQueue<M> {
    fn queue_notified(&mut self, _index: usize) -> Result<(), DeviceError> {
        // While throttled, the timer (not the driver's kick) says when to go on.
        if self
            .requests
            .throttle
            .as_ref()
            .is_some_and(QueueThrottle::waiting)
        {
            return Ok(());
        }
        self.process()
    }

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        match &self.requests.throttle {
            Some(t) => vec![(t.timer_fd(), EventSet::IN)],
            None => Vec::new(),
        }
    }

    fn fd_ready(&mut self, _which: usize, _events: EventSet) -> Result<(), DeviceError> {
        if let Some(t) = &mut self.requests.throttle {
            t.timer_expired();
        }
        self.process()
    }
}
