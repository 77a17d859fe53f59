//! virtio-rng's request queue as a guest driver fills it: the device's handler runs
//! in this thread on every notification (as its worker would), and after each one the
//! used ring must say what the model says: every chain offered since the last
//! notification, in order, up to the first one the device must refuse (a walk error or
//! a device-readable buffer), each used with `min(writable bytes, 64 KiB)`.
//!
//! Input: queue size, flags (bit 0 EVENT_IDX), then operations: the driver's
//! (see [`crate::driver`]), 6 notify, 7 device reset.

use std::sync::Arc;

use devices::interrupt::NoMsi;
use devices::virtio::rng::{MAX_REQUEST, RngQueue};
use devices::virtio::{Chain, VirtioInterrupt};
use vm_memory::GuestMemoryMmap;

use crate::driver::{DRIVER_OPS, GuestDriver, queue_size, ranges};
use crate::ops::{Ops, Program};

const NOTIFY: u8 = DRIVER_OPS;

struct Rng {
    driver: GuestDriver,
    device: RngQueue<GuestMemoryMmap>,
    event_idx: bool,
    /// Where the device stands in the rings, as the model follows it.
    next_avail: u16,
    next_used: u16,
}

impl Rng {
    fn device(driver: &GuestDriver, event_idx: bool) -> RngQueue<GuestMemoryMmap> {
        let interrupt = Arc::new(VirtioInterrupt::new("fuzz-rng", 1, Arc::new(NoMsi), None));
        RngQueue::new(driver.mem.clone(), driver.queue(0, event_idx), interrupt)
    }

    fn reset(&mut self) {
        self.driver.reset();
        self.device = Self::device(&self.driver, self.event_idx);
        self.next_avail = 0;
        self.next_used = 0;
    }

    fn notify(&mut self) {
        let before = self.driver.before_step();
        let offered = self.driver.offered_before(0, self.next_avail);
        let result = self.device.process();
        self.driver.check_writes(&before, &[], "virtio-rng");
        let Some(heads) = offered else {
            assert!(result.is_err(), "an available index past the queue size");
            return self.reset();
        };
        let (mut expected, mut segs, mut refused) = (Vec::new(), Vec::new(), false);
        let mut chain = Chain::new();
        for &head in &heads {
            if !self.driver.walk_before(0, head, &mut chain) || !chain.readable.is_empty() {
                refused = true;
                break;
            }
            let len = chain.writable_len().min(MAX_REQUEST as u64) as u32;
            expected.push((head, len));
            segs.extend(ranges(&chain.writable));
        }
        if self.driver.aliased(&segs, &before)
            || !self.driver.used_ring_trusted(0, self.next_used, &before)
        {
            // Buffers over the rings or descriptors: the walks above may not be the
            // device's. Only the write check holds.
            return self.reset();
        }
        assert_eq!(result.is_err(), refused, "virtio-rng: {result:?}");
        let (idx, used) = self.driver.used_since(0, self.next_used);
        assert_eq!(used, expected, "virtio-rng: used ring");
        if refused {
            return self.reset();
        }
        self.next_used = idx;
        self.next_avail = self.next_avail.wrapping_add(heads.len() as u16);
    }
}

pub fn virtio_rng(data: &[u8]) {
    let mut ops = Ops::new(data);
    let driver = GuestDriver::new(&[queue_size(ops.u8())]);
    let event_idx = ops.u8() & 1 != 0;
    let mut rng = Rng {
        device: Rng::device(&driver, event_idx),
        driver,
        event_idx,
        next_avail: 0,
        next_used: 0,
    };
    while ops.next_op() {
        match ops.u8() % (DRIVER_OPS + 2) {
            k if k < DRIVER_OPS => rng.driver.op(k, &mut ops),
            NOTIFY => rng.notify(),
            _ => rng.reset(),
        }
    }
}

/// The Linux driver's traffic: one 64-byte buffer offered and notified, again and
/// again (hwrng reads in small requests), then one large request.
pub fn virtio_rng_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut p = Program::default();
    p.u8(4).u8(1); // 16 entries, EVENT_IDX
    for i in 0..20u16 {
        chain(
            &mut p,
            (i % 16) as u8,
            &[(0x1000 + 0x40 * (i % 16), 64, true)],
        );
        p.u8(NOTIFY);
    }
    let mut big = Program::default();
    big.u8(2).u8(0);
    chain(
        &mut big,
        0,
        &[(0x2000, 0x1000, true), (0x4000, 0x3000, true)],
    );
    big.u8(NOTIFY);
    vec![("linux-hwrng", p.0), ("large-request", big.0)]
}

/// A chain operation (driver op 3) on queue 0.
pub fn chain(p: &mut Program, first: u8, bufs: &[(u16, u16, bool)]) {
    p.u8(3).u8(0).u8(first).u8(bufs.len() as u8 - 1);
    for &(addr, len, write) in bufs {
        p.u16(addr).u16(len).u8(u8::from(write));
    }
}
