//! virtio-balloon (device ID 5): the host asks the guest for memory back (the target,
//! `vessel set NAME balloon=SIZE`), the guest hands over page frames (inflate) and takes
//! them back (deflate), reports its memory statistics, and reports pages it frees
//! (free page reporting). Every page the guest hands over or reports free goes back to
//! the host ([`crate::reclaim`]); the guest reads zeros if it touches one again.
//! Offered: STATS_VQ, DEFLATE_ON_OOM (the guest's OOM handler may take pages back) and
//! REPORTING.

pub mod stats;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{Chain, Cursor, UsedRing, pop_all};
use super::guest_io::GuestRam;
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, finish, publish_and_rearm,
};
use crate::bus::lock;
use crate::reclaim::{PAGE, Reclaimer};
pub use stats::GuestMemoryStats;

pub const QUEUE_SIZE: u16 = 256;
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_REPORTING: u64 = 1 << 5;
/// How often the guest is asked for fresh statistics.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// The largest PFN list read from one inflate request.
const MAX_PFNS: usize = 1 << 16;

/// The balloon as the VMM sees it: the target it sets, what the guest says it gave, the
/// guest's statistics, and what went back to the host.
#[derive(Default)]
pub struct BalloonState {
    /// Pages the host asks for.
    target: AtomicU32,
    /// Pages the guest says the balloon holds (its `actual`).
    actual: AtomicU32,
    stats: Mutex<Option<GuestMemoryStats>>,
    /// Bytes given back to the host by inflation and by free page reporting.
    inflated_bytes: AtomicU64,
    reported_bytes: AtomicU64,
    interrupt: OnceLock<Arc<VirtioInterrupt>>,
}

impl BalloonState {
    /// Asks the guest to hold `bytes` in its balloon (rounded down to pages).
    pub fn set_target(&self, bytes: u64) {
        let pages = (bytes / PAGE).min(u64::from(u32::MAX)) as u32;
        self.target.store(pages, Ordering::Release);
        if let Some(i) = self.interrupt.get() {
            i.signal_config();
        }
    }

    pub fn target_bytes(&self) -> u64 {
        u64::from(self.target.load(Ordering::Acquire)) * PAGE
    }

    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.actual.load(Ordering::Acquire)) * PAGE
    }

    pub fn stats(&self) -> Option<GuestMemoryStats> {
        *lock(&self.stats)
    }

    pub fn inflated_bytes(&self) -> u64 {
        self.inflated_bytes.load(Ordering::Relaxed)
    }

    pub fn reported_bytes(&self) -> u64 {
        self.reported_bytes.load(Ordering::Relaxed)
    }
}

pub struct VirtioBalloon {
    state: Arc<BalloonState>,
    reclaim: Arc<Reclaimer>,
    worker: Option<Worker>,
}

impl VirtioBalloon {
    /// A balloon giving pages back through `reclaim`.
    pub fn new(reclaim: Arc<Reclaimer>) -> Self {
        VirtioBalloon {
            state: Arc::new(BalloonState::default()),
            reclaim,
            worker: None,
        }
    }

    pub fn state(&self) -> Arc<BalloonState> {
        self.state.clone()
    }

    /// What the worker thread runs on the four queues for a driver that accepted
    /// `features` (the fuzz harnesses run it in their own thread).
    pub fn queues<M: GuestMemory>(
        &self,
        mem: M,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<BalloonQueues<M>, ActivateError> {
        let n = queues.len();
        if n != 4 {
            return Err(ActivateError::Queues(n));
        }
        let stats = features & F_STATS_VQ != 0;
        let reporting = features & F_REPORTING != 0;
        // Queues are numbered in order among those the driver uses.
        let roles = [
            Some(Role::Inflate),
            Some(Role::Deflate),
            stats.then_some(Role::Stats),
            reporting.then_some(Role::Reporting),
        ];
        let mut roles = roles.into_iter().flatten().collect::<Vec<_>>();
        roles.resize(4, Role::Unused);
        let timer = TimerFd::new().map_err(|e| ActivateError::Worker(e.into()))?;
        Ok(BalloonQueues {
            used: queues.iter().map(UsedRing::new).collect(),
            queues,
            roles,
            mem,
            interrupt,
            state: self.state.clone(),
            reclaim: self.reclaim.clone(),
            chain: Chain::new(),
            heads: Vec::new(),
            held_stats: None,
            timer,
            buf: Vec::new(),
        })
    }
}

impl BalloonState {
    /// The transport's interrupt (set once the device is attached).
    pub fn attach(&self, interrupt: Arc<VirtioInterrupt>) {
        let _ = self.interrupt.set(interrupt);
    }
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioBalloon {
    fn device_type(&self) -> DeviceType {
        DeviceType::Balloon
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // inflate, deflate, stats, reporting (the driver numbers only those it uses).
        vec![QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        features::COMMON | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages, actual (le32 each); free page hints and poison are not offered.
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&self.state.target.load(Ordering::Acquire).to_le_bytes());
        config[4..].copy_from_slice(&self.state.actual.load(Ordering::Acquire).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4-7) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            self.state.actual.store(v, Ordering::Release);
        }
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let handler = self.queues(a.mem, a.features, a.queues, a.interrupt.clone())?;
        self.worker = Some(
            Worker::spawn(
                "virtio-balloon",
                sandbox::ThreadClass::Balloon,
                handler,
                a.queue_events,
                a.interrupt,
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
    Unused,
}

pub struct BalloonQueues<M> {
    mem: M,
    queues: Vec<Queue>,
    used: Vec<UsedRing>,
    roles: Vec<Role>,
    interrupt: Arc<VirtioInterrupt>,
    state: Arc<BalloonState>,
    reclaim: Arc<Reclaimer>,
    chain: Chain,
    heads: Vec<u16>,
    /// The stats buffer the driver last filled, held until fresh statistics are due.
    held_stats: Option<(usize, u16)>,
    timer: TimerFd,
    buf: Vec<u8>,
}

impl<M: GuestMemory> BalloonQueues<M> {
    fn serve(&mut self, index: usize) -> Result<(), DeviceError> {
        let role = self.roles.get(index).copied().unwrap_or(Role::Unused);
        let Some(queue) = self.queues.get_mut(index) else {
            return Ok(());
        };
        if !queue.ready() || role == Role::Unused {
            return Ok(());
        }
        let chain_err = |source| DeviceError::Chain {
            queue: index,
            source,
        };
        loop {
            queue
                .disable_notification(&self.mem)
                .map_err(|e| DeviceError::ring(index, e))?;
            pop_all(queue, &self.mem, &mut self.heads).map_err(chain_err)?;
            for &head in &self.heads {
                self.chain.walk(&self.mem, queue, head).map_err(chain_err)?;
                let ram = GuestRam::new(&self.mem);
                match role {
                    Role::Inflate => {
                        let freed = inflate(&ram, &self.reclaim, &self.chain, &mut self.buf);
                        self.state
                            .inflated_bytes
                            .fetch_add(freed, Ordering::Relaxed);
                        self.used[index].push(head, 0);
                    }
                    Role::Deflate => self.used[index].push(head, 0),
                    Role::Reporting => {
                        let mut freed = 0;
                        for seg in &self.chain.writable {
                            if self.reclaim.discard(&ram, seg.addr, u64::from(seg.len)) {
                                freed += u64::from(seg.len);
                            }
                        }
                        self.state
                            .reported_bytes
                            .fetch_add(freed, Ordering::Relaxed);
                        self.used[index].push(head, 0);
                    }
                    Role::Stats => {
                        let len = (self.chain.readable_len() as usize)
                            .min(stats::ENTRY * stats::MAX_ENTRIES);
                        self.buf.resize(len, 0);
                        if Cursor::new(&self.chain.readable).read(&self.mem, &mut self.buf) {
                            *lock(&self.state.stats) = Some(GuestMemoryStats::parse(&self.buf));
                        }
                        // Held: returning it is how fresh statistics are asked for.
                        if let Some((_, old)) = self.held_stats.replace((index, head)) {
                            self.used[index].push(old, 0);
                        }
                    }
                    Role::Unused => self.used[index].push(head, 0),
                }
            }
            if !publish_and_rearm(&mut self.used[index], queue, &self.mem, &self.mem, index)? {
                break;
            }
        }
        finish(
            &mut self.used[index],
            queue,
            &self.mem,
            &self.interrupt,
            index,
        )
    }

    /// Hands the held stats buffer back: the driver refills it with fresh figures.
    fn ask_for_stats(&mut self) -> Result<(), DeviceError> {
        let _ = self.timer.wait();
        if let Some((index, head)) = self.held_stats.take() {
            self.used[index].push(head, 0);
            finish(
                &mut self.used[index],
                &mut self.queues[index],
                &self.mem,
                &self.interrupt,
                index,
            )?;
        }
        Ok(())
    }
}

/// Frees the pages an inflate request lists (le32 page frame numbers of 4 KiB); frames
/// outside guest RAM are skipped. Returns the bytes freed.
fn inflate<M: GuestMemory>(
    ram: &GuestRam<'_, M>,
    reclaim: &Reclaimer,
    chain: &Chain,
    buf: &mut Vec<u8>,
) -> u64 {
    let len = (chain.readable_len() as usize).min(MAX_PFNS * 4) / 4 * 4;
    buf.resize(len, 0);
    if !Cursor::new(&chain.readable).read(ram, buf) {
        return 0;
    }
    let mut freed = 0;
    // Runs of consecutive frames go back in one call.
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: Option<(u64, u64)>, freed: &mut u64| {
        if let Some((first, count)) = run
            && reclaim.discard(ram, GuestAddress(first * PAGE), count * PAGE)
        {
            *freed += count * PAGE;
        }
    };
    for pfn in buf
        .chunks_exact(4)
        .map(|b| u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))))
    {
        run = match run {
            Some((first, count)) if first + count == pfn => Some((first, count + 1)),
            other => {
                flush(other, &mut freed);
                Some((pfn, 1))
            }
        };
    }
    flush(run, &mut freed);
    freed
}

impl<M: GuestMemoryShared> QueueHandler for BalloonQueues<M> {
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceError> {
        if index == 0 {
            // The worker starts: fresh statistics every STATS_EVERY.
            let _ = self.timer.reset(STATS_EVERY, Some(STATS_EVERY));
        }
        self.serve(index)
    }

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.timer.as_raw_fd(), EventSet::IN)]
    }

    fn fd_ready(&mut self, _which: usize, _events: EventSet) -> Result<(), DeviceError> {
        self.ask_for_stats()
    }
}
