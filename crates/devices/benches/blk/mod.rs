//! The virtio-blk driver loop the block benchmarks share: requests laid out in guest
//! memory as a driver would, served by the same `BlockQueue::process` the device's
//! worker thread runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devices::interrupt::NoMsi;
use devices::virtio::block::request::types;
use devices::virtio::block::{BlockQueue, Disk};
use devices::virtio::{VirtioInterrupt, features};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{self, DriverQueue, Mem, Rng};

pub const QUEUE: u16 = 256;
/// Guest memory: the rings, request headers, status bytes, data buffers.
pub const RING: u64 = 0x1_0000;
pub const HEADERS: u64 = 0x10_0000;
pub const STATUS: u64 = 0x18_0000;
pub const DATA: u64 = 0x20_0000;
/// Measurements per path and case (interleaved); the best of each is reported.
pub const ROUNDS: usize = 5;

#[derive(Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub size: usize,
    pub random: bool,
    pub write: bool,
    /// Requests per notification: a driver with a queue depth of 32 (4 KiB) or 4
    /// (1 MiB). The direct path does the same number of calls per round.
    pub depth: usize,
}

pub const CASES: [Case; 4] = [
    Case {
        name: "4k-random-read",
        size: 4096,
        random: true,
        write: false,
        depth: 32,
    },
    Case {
        name: "4k-random-write",
        size: 4096,
        random: true,
        write: true,
        depth: 32,
    },
    Case {
        name: "1m-sequential-read",
        size: 1 << 20,
        random: false,
        write: false,
        depth: 4,
    },
    Case {
        name: "1m-sequential-write",
        size: 1 << 20,
        random: false,
        write: true,
        depth: 4,
    },
];

/// The offsets a case visits, the same for both paths.
pub struct Offsets {
    rng: Rng,
    next: u64,
    case: Case,
    file_size: u64,
}

impl Offsets {
    pub fn new(case: Case, file_size: u64) -> Self {
        Offsets {
            rng: Rng::new(42),
            next: 0,
            case,
            file_size,
        }
    }

    pub fn next(&mut self) -> u64 {
        let size = self.case.size as u64;
        if self.case.random {
            self.rng.below(self.file_size / size) * size
        } else {
            let at = self.next;
            self.next = (self.next + size) % self.file_size;
            at
        }
    }
}

/// Throughput through virtio-blk: (device path only, end to end with the driver's
/// side). Each round makes `depth` requests available, notifies once (a call to the
/// queue handler, as the worker thread does on a notification), and collects the
/// completions. The driver's side is kept lean (fixed descriptors, one write for the
/// available ring) since in a VM it is the guest's work, not the monitor's.
pub fn virtio(mem: &Mem, disk: &Arc<Disk>, case: Case, secs: f64) -> (f64, f64) {
    virtio_rounds(mem, disk, case, secs, u64::MAX)
}

/// As [`virtio`], stopping after `max_rounds` notifications even before `secs`.
pub fn virtio_rounds(
    mem: &Mem,
    disk: &Arc<Disk>,
    case: Case,
    secs: f64,
    max_rounds: u64,
) -> (f64, f64) {
    let q = DriverQueue::new(mem, RING, QUEUE);
    let interrupt = Arc::new(VirtioInterrupt::new("bench", 1, Arc::new(NoMsi), None));
    let feats = features::COMMON | (1 << 9);
    let mut blk = BlockQueue::new(
        mem.clone(),
        q.device_queue(true),
        disk.clone(),
        interrupt,
        feats,
    );
    let ty = if case.write { types::OUT } else { types::IN };
    let depth = case.depth as u64;
    for i in 0..depth {
        let hdr = HEADERS + i * 16;
        mem.write_obj(ty, GuestAddress(hdr)).unwrap();
        let (n, w) = (common::DESC_F_NEXT, common::DESC_F_WRITE);
        let data_flags = if case.write { n } else { n | w };
        let d = (3 * i) as u16;
        q.write_desc(mem, q.desc, d, (hdr, 16, n, d + 1));
        q.write_desc(
            mem,
            q.desc,
            d + 1,
            (
                DATA + i * case.size as u64,
                case.size as u32,
                data_flags,
                d + 2,
            ),
        );
        q.write_desc(mem, q.desc, d + 2, (STATUS + i, 1, w, 0));
    }
    let heads: Vec<u8> = (0..depth)
        .flat_map(|i| ((3 * i) as u16).to_le_bytes())
        .collect();
    let mut avail_idx = 0u16;
    let mut offsets = Offsets::new(case, disk.image().size());
    let mut statuses = vec![0u8; case.depth];
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut in_device = Duration::ZERO;
    let mut rounds = 0;
    while start.elapsed().as_secs_f64() < secs && rounds < max_rounds {
        rounds += 1;
        for i in 0..depth {
            let sector = offsets.next() / 512;
            mem.write_obj(sector, GuestAddress(HEADERS + i * 16 + 8))
                .unwrap();
        }
        // QUEUE is a multiple of every depth, so a round never wraps the ring.
        let slot = u64::from(avail_idx % QUEUE);
        mem.write_slice(&heads, GuestAddress(q.avail + 4 + 2 * slot))
            .unwrap();
        avail_idx = avail_idx.wrapping_add(depth as u16);
        mem.write_obj(
            avail_idx.wrapping_sub(1),
            GuestAddress(q.avail + 4 + 2 * u64::from(QUEUE)),
        )
        .unwrap();
        mem.store(avail_idx, GuestAddress(q.avail + 2), Ordering::Release)
            .unwrap();
        let t = Instant::now();
        blk.process().unwrap();
        in_device += t.elapsed();
        assert_eq!(q.used_idx(mem), avail_idx);
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert!(statuses.iter().all(|s| *s == 0));
        bytes += (case.size * case.depth) as u64;
    }
    let mb = bytes as f64 / 1e6;
    (
        mb / in_device.as_secs_f64(),
        mb / start.elapsed().as_secs_f64(),
    )
}
