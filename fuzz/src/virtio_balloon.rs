//! virtio-balloon's queues as a guest driver fills them, the handler running in this
//! thread: inflate (0) lists page frames to give back, deflate (1) takes them back,
//! then statistics and free page reporting when the driver accepted those features
//! (numbered in order among those it uses). Checked after every notification: the
//! device wrote only into the used rings and writable buffers, or zeroed pages the
//! inflate requests listed; the inflate, deflate and reporting queues use every chain
//! offered, in order, with length 0, until the first one the device must refuse (and
//! then publish nothing of that pass); no more bytes went back than the pages listed.
//!
//! Input: four queue sizes, features (bit 0 STATS_VQ, bit 1 REPORTING, bit 2
//! EVENT_IDX), then operations: the driver's (see [`crate::driver`]), 6 notify
//! (queue), 7 device reset.

use std::sync::Arc;

use devices::interrupt::NoMsi;
use devices::reclaim::{Backing, PAGE, Reclaimer};
use devices::virtio::balloon::{BalloonQueues, F_REPORTING, F_STATS_VQ, VirtioBalloon};
use devices::virtio::{Chain, QueueHandler, VirtioInterrupt, features};
use vm_memory::GuestMemoryMmap;

use crate::driver::{DRIVER_OPS, GuestDriver, REGIONS, queue_size, ranges};
use crate::ops::{Ops, Program};

const NOTIFY: u8 = DRIVER_OPS;
const INFLATE: usize = 0;
const MAX_PFNS: u64 = 1 << 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Every chain used at once with length 0 (inflate, deflate, reporting).
    Returned,
    /// Held until the next one comes (statistics).
    Stats,
    Unused,
}

struct Balloon {
    driver: GuestDriver,
    balloon: VirtioBalloon,
    queues: BalloonQueues<GuestMemoryMmap>,
    features: u64,
    roles: [Role; 4],
    next_avail: [u16; 4],
    next_used: [u16; 4],
}

impl Balloon {
    fn queues(&self) -> BalloonQueues<GuestMemoryMmap> {
        let interrupt = Arc::new(VirtioInterrupt::new(
            "fuzz-balloon",
            4,
            Arc::new(NoMsi),
            None,
        ));
        let event_idx = self.features & features::RING_EVENT_IDX != 0;
        let queues = (0..4).map(|q| self.driver.queue(q, event_idx)).collect();
        self.balloon
            .queues(self.driver.mem.clone(), self.features, queues, interrupt)
            .expect("four queues and a timerfd")
    }

    fn reset(&mut self) {
        self.driver.reset();
        self.queues = self.queues();
        self.next_avail = [0; 4];
        self.next_used = [0; 4];
    }

    /// Pages of guest RAM the inflate chains offered before the step list, and how
    /// many frames they list. When a list lies under the rings or in a page listed
    /// before it, the device may read other frames than these: then any page may
    /// read zero afterwards.
    fn listed_pages(&self, heads: &[u16], before: &[u8]) -> (Vec<(u64, u64)>, u64) {
        let ram_end = REGIONS[2].0 + REGIONS[2].1 as u64;
        let (mut pages, mut lists, mut listed) = (Vec::new(), Vec::new(), 0u64);
        let mut chain = Chain::new();
        for &head in heads {
            if !self.driver.walk_before(INFLATE, head, &mut chain) {
                break;
            }
            let mut bytes = Vec::new();
            self.driver.read_before(&chain.readable, &mut |b| {
                if (bytes.len() as u64) < 4 * MAX_PFNS {
                    bytes.extend_from_slice(b);
                }
            });
            bytes.truncate((4 * MAX_PFNS) as usize);
            lists.extend(ranges(&chain.readable));
            for pfn in bytes.chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes(pfn.try_into().expect("4 bytes")));
                listed += 1;
                if pfn < ram_end / PAGE {
                    pages.push((pfn * PAGE, (pfn + 1) * PAGE));
                }
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let overlaps = |a: &(u64, u64), b: &(u64, u64)| a.0 < b.1 && b.0 < a.1;
        if self.driver.touches_metadata(&lists, before)
            || lists.iter().any(|l| pages.iter().any(|p| overlaps(l, p)))
        {
            return (vec![(0, ram_end)], u64::MAX / PAGE);
        }
        (pages, listed)
    }

    fn notify(&mut self, q: usize) {
        let before = self.driver.before_step();
        let offered = self.driver.offered_before(q, self.next_avail[q]);
        let (zeroed, listed) = match (&offered, q) {
            (Some(heads), INFLATE) => self.listed_pages(heads, &before),
            _ => (Vec::new(), 0),
        };
        let state = self.balloon.state();
        let inflated = state.inflated_bytes();
        let result = self.queues.queue_notified(q);
        self.driver.check_writes(&before, &zeroed, "virtio-balloon");
        let role = self.roles[q];
        if role == Role::Unused {
            assert!(
                result.is_ok(),
                "a queue the driver does not use is left alone"
            );
            return;
        }
        let Some(heads) = offered else {
            assert!(result.is_err(), "an available index past the queue size");
            return self.reset();
        };
        let mut chain = Chain::new();
        let mut written = zeroed;
        let mut walks = 0;
        for &head in &heads {
            if !self.driver.walk_before(q, head, &mut chain) {
                break;
            }
            written.extend(ranges(&chain.writable));
            walks += 1;
        }
        if self.driver.touches_metadata(&written, &before)
            || !self.driver.used_ring_trusted(q, self.next_used[q], &before)
            || listed == u64::MAX / PAGE
        {
            // Pages given back under the rings or descriptors: the device walked
            // zeros where the model walks what was there. Only the write check holds.
            return self.reset();
        }
        assert!(
            state.inflated_bytes() - inflated <= listed * PAGE,
            "virtio-balloon: gave back more than the pages listed"
        );
        let refused = walks < heads.len();
        assert_eq!(result.is_err(), refused, "virtio-balloon: {result:?}");
        let (idx, used) = self.driver.used_since(q, self.next_used[q]);
        if refused {
            assert!(used.is_empty(), "a refused pass publishes nothing");
            return self.reset();
        }
        if role == Role::Returned {
            let expected: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 0)).collect();
            assert_eq!(used, expected, "virtio-balloon: queue {q} used ring");
        }
        self.next_used[q] = idx;
        self.next_avail[q] = self.next_avail[q].wrapping_add(heads.len() as u16);
    }
}

pub fn virtio_balloon(data: &[u8]) {
    let mut ops = Ops::new(data);
    let sizes = [(); 4].map(|_| queue_size(ops.u8()));
    let f = ops.u8();
    let mut features = features::VERSION_1;
    for (bit, feature) in [
        (1, F_STATS_VQ),
        (2, F_REPORTING),
        (4, features::RING_EVENT_IDX),
    ] {
        if f & bit != 0 {
            features |= feature;
        }
    }
    let mut roles = vec![Role::Returned, Role::Returned];
    if features & F_STATS_VQ != 0 {
        roles.push(Role::Stats);
    }
    if features & F_REPORTING != 0 {
        roles.push(Role::Returned);
    }
    roles.resize(4, Role::Unused);
    let driver = GuestDriver::new(&sizes);
    let balloon = VirtioBalloon::new(Reclaimer::new(Backing::Private));
    let interrupt = Arc::new(VirtioInterrupt::new(
        "fuzz-balloon",
        4,
        Arc::new(NoMsi),
        None,
    ));
    let event_idx = features & features::RING_EVENT_IDX != 0;
    let queues = balloon
        .queues(
            driver.mem.clone(),
            features,
            (0..4).map(|q| driver.queue(q, event_idx)).collect(),
            interrupt,
        )
        .expect("four queues and a timerfd");
    let mut b = Balloon {
        driver,
        balloon,
        queues,
        features,
        roles: roles.try_into().unwrap_or([Role::Unused; 4]),
        next_avail: [0; 4],
        next_used: [0; 4],
    };
    while ops.next_op() {
        match ops.u8() % (DRIVER_OPS + 2) {
            k if k < DRIVER_OPS => b.driver.op(k, &mut ops),
            NOTIFY => {
                let q = usize::from(ops.u8() % 4);
                b.notify(q);
            }
            _ => b.reset(),
        }
    }
}

/// What the Linux driver does: the statistics buffer posted at probe, an inflate of
/// a run of page frames (and one outside RAM), a deflate of some of them, a free
/// page report of two 4 KiB blocks.
pub fn virtio_balloon_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut p = Program::default();
    p.u8(4).u8(4).u8(4).u8(4).u8(3); // 16 entries each, STATS_VQ and REPORTING
    // Statistics: (tag, value) entries, 10 bytes each.
    let mut stats = Vec::new();
    for (tag, v) in [(5u16, 256u64 << 20), (4, 200 << 20), (6, 220 << 20)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&v.to_le_bytes());
    }
    p.u8(1).u16(0x1800).u8(stats.len() as u8).bytes(&stats);
    chain(&mut p, 2, 0, &[(0x1800, stats.len() as u16, false)]);
    p.u8(NOTIFY).u8(2);
    // Inflate page frames 5..=7 and one far outside RAM.
    let pfns: Vec<u8> = [5u32, 6, 7, 0x40000]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    p.u8(1).u16(0x1900).u8(pfns.len() as u8).bytes(&pfns);
    chain(&mut p, 0, 0, &[(0x1900, pfns.len() as u16, false)]);
    p.u8(NOTIFY).u8(0);
    // Deflate 6 and 7.
    chain(&mut p, 1, 0, &[(0x1904, 8, false)]);
    p.u8(NOTIFY).u8(1);
    // Report free pages 2 and 3 (device-writable).
    chain(
        &mut p,
        3,
        0,
        &[(0x2000, 0x1000, true), (0x3000, 0x1000, true)],
    );
    p.u8(NOTIFY).u8(3);
    vec![("linux-balloon", p.0)]
}

fn chain(p: &mut Program, q: u8, first: u8, bufs: &[(u16, u16, bool)]) {
    p.u8(3).u8(q).u8(first).u8(bufs.len() as u8 - 1);
    for &(addr, len, write) in bufs {
        p.u16(addr).u16(len).u8(u8::from(write));
    }
}
