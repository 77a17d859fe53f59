//! A virtio driver in miniature, for driving vessel's devices in-process: split
//! virtqueues written into a `GuestMemoryMmap`, the PCI capability walk, feature
//! negotiation and MSI-X through the transport, and a recording MSI sink.
#![allow(dead_code)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::interrupt::MsiSink;
use devices::pci::PciDevice;
use devices::virtio::{VirtioPciDevice, status};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory as the VMM allocates it: writes report to the software CPU's code map,
/// so the devices run the same paths they do in a VM.
pub type Mem = GuestMemoryMmap<x86::CodeBitmap>;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

pub fn memory(size: usize) -> Mem {
    let ranges = [(GuestAddress(0), size)];
    x86::guest_memory(&ranges, &Arc::new(x86::CodeMap::new(&ranges))).unwrap()
}

/// Records every MSI and lets a test wait for one.
#[derive(Default)]
pub struct RecordingMsi {
    msgs: Mutex<Vec<(u64, u32)>>,
    cv: Condvar,
}

impl MsiSink for RecordingMsi {
    fn send(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.msgs.lock().unwrap().push((address, data));
        self.cv.notify_all();
        Ok(())
    }
}

impl RecordingMsi {
    pub fn messages(&self) -> Vec<(u64, u32)> {
        self.msgs.lock().unwrap().clone()
    }

    pub fn count(&self, data: u32) -> usize {
        self.msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.1 == data)
            .count()
    }

    /// Waits until at least `n` messages with `data` were sent.
    pub fn wait_for(&self, data: u32, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut g = self.msgs.lock().unwrap();
        loop {
            if g.iter().filter(|m| m.1 == data).count() >= n {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

/// The driver's side of one split virtqueue.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    pub avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Rings for a queue of `size` at `base` (16 KiB is enough for 256 entries).
    pub fn new(mem: &Mem, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let q = DriverQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        let zero = vec![0u8; (used + 6 + 8 * u64::from(size) - base) as usize];
        mem.write_slice(&zero, GuestAddress(base)).unwrap();
        q
    }

    /// Writes descriptor `index` of the table at `table`: (addr, len, flags, next).
    pub fn write_desc(&self, mem: &Mem, table: u64, index: u16, desc: (u64, u32, u16, u16)) {
        let (addr, len, flags, next) = desc;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    /// Adds a chain of `bufs` (address, length, device-writable) and makes it
    /// available (not yet published). Returns the head.
    pub fn add(&mut self, mem: &Mem, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { DESC_F_NEXT } | if *w { DESC_F_WRITE } else { 0 };
            self.write_desc(
                mem,
                self.desc,
                idx,
                (*addr, *len, flags, (idx + 1) % self.size),
            );
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_avail(mem, head);
        head
    }

    /// Adds a chain through an indirect table at `table`.
    pub fn add_indirect(&mut self, mem: &Mem, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { DESC_F_NEXT } | if *w { DESC_F_WRITE } else { 0 };
            self.write_desc(mem, table, i as u16, (*addr, *len, flags, i as u16 + 1));
        }
        let head = self.next_desc;
        self.write_desc(
            mem,
            self.desc,
            head,
            (table, 16 * bufs.len() as u32, DESC_F_INDIRECT, 0),
        );
        self.next_desc = (head + 1) % self.size;
        self.push_avail(mem, head);
        head
    }

    pub fn push_avail(&mut self, mem: &Mem, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes everything added so far visible to the device, and (as Linux does with
    /// EVENT_IDX) asks for an interrupt at the next used buffer.
    pub fn publish(&self, mem: &Mem) {
        mem.write_obj(
            self.used_seen,
            GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
        )
        .unwrap();
        mem.store(
            self.avail_idx,
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    pub fn used_idx(&self, mem: &Mem) -> u16 {
        mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Used entries (id, len) the device added since the last call.
    pub fn take_used(&mut self, mem: &Mem) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = GuestAddress(self.used + 4 + 8 * slot);
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits for `n` more used entries (the device works on its own thread).
    pub fn wait_used(&mut self, mem: &Mem, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(self.take_used(mem));
            if got.len() >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for used buffers ({} of {n})",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    /// The same rings as a device-side `Queue` (for driving a queue handler directly).
    pub fn device_queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }
}

/// Where the vendor capabilities put each structure, as a driver discovers it.
#[derive(Debug, Default)]
pub struct Caps {
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub isr: u64,
    pub device: u64,
    pub pci_cfg: usize,
    pub msix: usize,
    pub msix_table: u64,
    pub msix_pba: u64,
}

pub struct PciDriver {
    pub dev: Arc<Mutex<VirtioPciDevice<Mem>>>,
    pub caps: Caps,
}

pub const MSI_ADDRESS: u64 = 0xfee0_0000;

impl PciDriver {
    pub fn new(dev: Arc<Mutex<VirtioPciDevice<Mem>>>) -> Self {
        let mut d = PciDriver {
            dev,
            caps: Caps::default(),
        };
        d.caps = d.find_caps();
        d
    }

    pub fn cfg_read(&self, offset: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.lock().unwrap().config_read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    pub fn cfg_write(&self, offset: usize, len: usize, v: u32) {
        self.dev
            .lock()
            .unwrap()
            .config_write(offset, &v.to_le_bytes()[..len]);
    }

    fn find_caps(&self) -> Caps {
        let mut caps = Caps::default();
        assert_ne!(self.cfg_read(0x06, 2) & 0x10, 0, "capability list bit");
        let mut at = self.cfg_read(0x34, 1) as usize;
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            assert!(seen < 48, "capability list loops");
            let id = self.cfg_read(at, 1);
            match id {
                0x11 => {
                    caps.msix = at;
                    let table = self.cfg_read(at + 4, 4);
                    let pba = self.cfg_read(at + 8, 4);
                    assert_eq!(table & 7, 0, "table in BAR0");
                    caps.msix_table = u64::from(table & !7);
                    caps.msix_pba = u64::from(pba & !7);
                }
                0x09 => {
                    let cfg_type = self.cfg_read(at + 3, 1);
                    let bar = self.cfg_read(at + 4, 1);
                    let offset = u64::from(self.cfg_read(at + 8, 4));
                    match cfg_type {
                        1 => caps.common = offset,
                        2 => {
                            caps.notify = offset;
                            caps.notify_mult = self.cfg_read(at + 16, 4);
                        }
                        3 => caps.isr = offset,
                        4 => caps.device = offset,
                        5 => caps.pci_cfg = at,
                        t => panic!("unknown virtio cap type {t}"),
                    }
                    if cfg_type != 5 {
                        assert_eq!(bar, 0);
                    }
                }
                other => panic!("unexpected capability {other:#x}"),
            }
            at = self.cfg_read(at + 1, 1) as usize;
        }
        assert!(caps.msix != 0 && caps.pci_cfg != 0 && caps.notify_mult == 4);
        caps
    }

    pub fn bar_read(&self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.lock().unwrap().read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn bar_write(&self, offset: u64, len: usize, v: u64) {
        self.dev
            .lock()
            .unwrap()
            .write(offset, &v.to_le_bytes()[..len]);
    }

    pub fn common_read(&self, offset: u64, len: usize) -> u64 {
        self.bar_read(self.caps.common + offset, len)
    }

    pub fn common_write(&self, offset: u64, len: usize, v: u64) {
        self.bar_write(self.caps.common + offset, len, v)
    }

    pub fn status(&self) -> u8 {
        self.common_read(0x14, 1) as u8
    }

    pub fn set_status(&self, s: u8) {
        self.common_write(0x14, 1, u64::from(s));
    }

    pub fn device_features(&self) -> u64 {
        self.common_write(0x00, 4, 0);
        let lo = self.common_read(0x04, 4);
        self.common_write(0x00, 4, 1);
        let hi = self.common_read(0x04, 4);
        lo | (hi << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (the intersection with `wanted`),
    /// FEATURES_OK. Returns the features in force.
    pub fn negotiate(&self, wanted: u64) -> u64 {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let features = self.device_features() & wanted;
        self.common_write(0x08, 4, 0);
        self.common_write(0x0c, 4, features & 0xffff_ffff);
        self.common_write(0x08, 4, 1);
        self.common_write(0x0c, 4, features >> 32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        assert_eq!(self.status(), s, "FEATURES_OK accepted");
        features
    }

    /// Enables MSI-X and programs vector `v` to send data `data_base + v`.
    pub fn enable_msix(&self, vectors: u16, data_base: u32) {
        let control = self.caps.msix + 2;
        let size = (self.cfg_read(control, 2) & 0x7ff) + 1;
        assert!(u32::from(vectors) <= size);
        self.cfg_write(control, 2, 0x8000);
        for v in 0..u64::from(vectors) {
            let e = self.caps.msix_table + 16 * v;
            self.bar_write(e, 4, MSI_ADDRESS);
            self.bar_write(e + 4, 4, 0);
            self.bar_write(e + 8, 4, u64::from(data_base) + v);
            self.bar_write(e + 12, 4, 0);
        }
    }

    pub fn set_config_vector(&self, v: u16) {
        self.common_write(0x10, 2, u64::from(v));
    }

    pub fn setup_queue(&self, index: u16, q: &DriverQueue, vector: u16) {
        self.common_write(0x16, 2, u64::from(index));
        let max = self.common_read(0x18, 2) as u16;
        assert!(
            q.size <= max && max > 0,
            "queue {index}: size {} > max {max}",
            q.size
        );
        self.common_write(0x18, 2, u64::from(q.size));
        self.common_write(0x1a, 2, u64::from(vector));
        assert_eq!(self.common_read(0x1a, 2) as u16, vector, "vector accepted");
        for (off, addr) in [(0x20, q.desc), (0x28, q.avail), (0x30, q.used)] {
            self.common_write(off, 4, addr & 0xffff_ffff);
            self.common_write(off + 4, 4, addr >> 32);
        }
        self.common_write(0x1c, 2, 1);
    }

    pub fn driver_ok(&self) {
        let s = self.status() | status::DRIVER_OK;
        self.set_status(s);
    }

    pub fn notify(&self, queue: u16) {
        self.common_write(0x16, 2, u64::from(queue));
        let off = self.common_read(0x1e, 2);
        self.bar_write(
            self.caps.notify + off * u64::from(self.caps.notify_mult),
            2,
            u64::from(queue),
        );
    }

    pub fn device_config(&self, offset: u64, len: usize) -> u64 {
        self.bar_read(self.caps.device + offset, len)
    }

    /// Everything up to DRIVER_OK for a device with `queues`, MSI-X vector i for
    /// queue i and the last one for configuration changes.
    pub fn bring_up(&self, wanted: u64, queues: &[&DriverQueue], data_base: u32) -> u64 {
        let features = self.negotiate(wanted);
        let n = queues.len() as u16;
        self.enable_msix(n + 1, data_base);
        self.set_config_vector(n);
        for (i, q) in queues.iter().enumerate() {
            self.setup_queue(i as u16, q, i as u16);
        }
        self.driver_ok();
        features
    }
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
