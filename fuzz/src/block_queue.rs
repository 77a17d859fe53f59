//! virtio-blk's request queue as a guest driver fills it, served by the device's own
//! queue processing (`BlockQueue`, what its worker runs) against a real disk opened as
//! `--disk` opens one: a raw memfd whose format is probed, the same given as raw, a
//! qcow2 image, or a qcow2 overlay on a raw backing file; read-only or not. The handler
//! runs in this thread on every notification. A model of the disk's bytes follows the
//! requests, and after every step, besides where the device writes (see
//! [`crate::driver`]):
//! - the used ring holds every chain offered since the last step, in order, up to the
//!   first one the device must refuse (a walk error, no device-writable status byte, a
//!   header shorter than 16 bytes), each used with the length the model says;
//! - every request's status byte is the model's: IOERR for buffers the wrong way round,
//!   a write to a read-only disk, a length that is not whole sectors, sectors past the
//!   end (or overflowing), a write that would make a probed raw disk look like another
//!   format; UNSUPP for unknown types, discard or write-zeroes the driver did not
//!   accept, range flags they do not take, range lists that are empty, not whole or
//!   too long;
//! - reads return what the model holds (what was written, zeroes where write-zeroes
//!   went, zeroes or the old bytes where a discard went), GET_ID the disk's serial;
//! - the disk holds what the model says; a raw file's bytes past its last whole sector,
//!   and an overlay's backing file, are never written.
//!
//! A step whose buffers overlap each other (where the device writes), the rings or the
//! descriptors is checked only for where the device writes; the model then takes the
//! disk as it is and the device is reset.
//!
//! Input: queue size, flags (bit 0 EVENT_IDX; bits 1-2 the disk: 0 raw probed, 1 raw,
//! 2 qcow2, 3 qcow2 overlay on raw; bit 3 read-only; bit 4 the driver refuses DISCARD
//! and WRITE_ZEROES), the raw disk's size in sectors (1-128) and the bytes after them
//! (u16, below 512), then operations: the driver's (see [`crate::driver`]), 6 notify,
//! 7 device reset, 8 a request (see [`request`]).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::interrupt::NoMsi;
use devices::virtio::block::request::{self, RANGE_LEN, SECTOR_SIZE, status, types};
use devices::virtio::block::{
    BlockConfig, BlockQueue, Disk, ID_BYTES, MAX_RANGE_SECTORS, MAX_RANGES, VirtioBlock,
    feature_bits,
};
use devices::virtio::chain::Cursor;
use devices::virtio::{Chain, Segment, VirtioDevice, VirtioInterrupt};
use disk::format::{Detected, PROBE_LEN, detect_bytes};
use disk::{Backing, CreateOptions, Format};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::driver::{DRIVER_OPS, GuestDriver, address, queue_size, ranges};
use crate::kernel::memfd;
use crate::ops::{Ops, Program};
use crate::sandbox;

const NOTIFY: u8 = DRIVER_OPS;
const RESET: u8 = DRIVER_OPS + 1;
const REQUEST: u8 = DRIVER_OPS + 2;
/// The qcow2 disks' virtual size.
const QCOW2_SIZE: u64 = 64 << 10;
/// The serial of disks opened with `id=`; the others are named by their file.
const SERIAL: &str = "vessel-fuzz-serial-1";
const FILES: &str = "vessel-fuzz-blk-";

/// The disk a run serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A raw memfd whose format is probed (writes that would make it look like another
    /// format are refused).
    Probed,
    Raw,
    Qcow2,
    /// A qcow2 overlay on a raw backing file holding [`pattern`].
    Overlay,
}

/// What the seeds must reach, counted over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests completed, by status (OK, IOERR, UNSUPP).
    pub ok: usize,
    pub ioerr: usize,
    pub unsupp: usize,
    /// Bytes of read data compared with the model.
    pub read_checked: u64,
    /// Steps not compared (overlapping buffers) and chains refused.
    pub aliased: usize,
    pub refused: usize,
}

/// A disk's initial bytes (raw disks and the overlay's backing file): a different byte
/// for every position within a sector and every sector, never zero (so that zeroes
/// show), never another format's magic.
pub fn pattern(at: u64) -> u8 {
    (at as u8 ^ (at >> 9) as u8).wrapping_mul(31) | 1
}

/// The per-process qcow2 templates: (plain, overlay), and the directory with the
/// overlay's backing file in it.
struct Templates {
    dir: PathBuf,
    plain: Vec<u8>,
    overlay: Vec<u8>,
}

static TEMPLATES: Mutex<Option<Templates>> = Mutex::new(None);

fn templates() -> std::sync::MutexGuard<'static, Option<Templates>> {
    let mut t = TEMPLATES.lock().unwrap_or_else(|p| p.into_inner());
    if t.is_none() {
        let dir = sandbox::files_dir(FILES);
        let base = dir.join("base");
        let bytes: Vec<u8> = (0..QCOW2_SIZE).map(pattern).collect();
        std::fs::write(&base, &bytes).expect("the overlay's backing file");
        let create = |name: &str, backing: Option<Backing>| {
            let path = dir.join(name);
            let opts = CreateOptions {
                format: Format::Qcow2,
                size: Some(QCOW2_SIZE),
                backing,
                cluster_size: Some(4096),
            };
            disk::create(&path, &opts).expect("a qcow2 template");
            let bytes = std::fs::read(&path).expect("a qcow2 template");
            std::fs::remove_file(&path).expect("a qcow2 template");
            bytes
        };
        let plain = create("plain", None);
        let backing = Backing {
            path: base,
            format: Some(Format::Raw),
        };
        let overlay = create("ov", Some(backing));
        *t = Some(Templates {
            dir,
            plain,
            overlay,
        });
    }
    t
}

/// The disk's bytes as the model knows them: each byte its value, or (after a discard
/// that may or may not have given the space back) that value or zero.
struct Model {
    bytes: Vec<u8>,
    maybe_zero: Vec<bool>,
}

impl Model {
    fn new(bytes: Vec<u8>) -> Self {
        let n = bytes.len();
        Model {
            bytes,
            maybe_zero: vec![false; n],
        }
    }

    fn write(&mut self, at: usize, data: &[u8]) {
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.maybe_zero[at..at + data.len()].fill(false);
    }

    /// Whether `got` (read at `at`) is what the model allows; it then holds `got`.
    fn read(&mut self, at: usize, got: &[u8]) -> bool {
        let ok = got
            .iter()
            .enumerate()
            .all(|(i, &b)| b == self.bytes[at + i] || (b == 0 && self.maybe_zero[at + i]));
        if ok {
            self.write(at, got);
        }
        ok
    }
}

/// What the device must do with one chain.
struct Expected {
    head: u16,
    used: u32,
    status: u8,
    status_addr: u64,
    /// Read data: where the device put it, and what the model held there then (each
    /// byte, and whether it may read as zero instead).
    read: Option<(Vec<Segment>, Vec<u8>, Vec<bool>)>,
    /// GET_ID: where the serial went and how much of it.
    id: Option<(Vec<Segment>, usize)>,
}

struct Block {
    driver: GuestDriver,
    /// The device whose queue this is (it holds the disk as the transport would).
    _device: VirtioBlock,
    disk: Arc<Disk>,
    queue: BlockQueue<GuestMemoryMmap>,
    features: u64,
    kind: DiskKind,
    readonly: bool,
    serial: [u8; ID_BYTES],
    model: Model,
    /// The raw file (for the bytes past the disk), and its length.
    raw: Option<(std::fs::File, u64)>,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    stats: BlockStats,
}

impl Block {
    fn queue(
        driver: &GuestDriver,
        disk: &Arc<Disk>,
        features: u64,
        event_idx: bool,
    ) -> BlockQueue<GuestMemoryMmap> {
        let interrupt = Arc::new(VirtioInterrupt::new("fuzz-blk", 1, Arc::new(NoMsi), None));
        BlockQueue::new(
            driver.mem.clone(),
            driver.queue(0, event_idx),
            disk.clone(),
            interrupt,
            features,
        )
    }

    fn reset(&mut self) {
        self.driver.reset();
        self.queue = Self::queue(&self.driver, &self.disk, self.features, self.event_idx);
        self.next_avail = 0;
        self.next_used = 0;
    }

    fn disk_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.disk.image().size() as usize];
        self.disk
            .image()
            .read_into(&mut b, 0)
            .expect("reading the disk");
        b
    }

    /// The whole disk against the model.
    fn check_disk(&mut self, what: &str) {
        let bytes = self.disk_bytes();
        assert!(
            self.model.read(0, &bytes),
            "virtio-blk: the disk does not hold what the requests wrote ({what})"
        );
    }

    fn notify(&mut self) {
        let before = self.driver.before_step();
        let offered = self.driver.offered_before(0, self.next_avail);
        let result = self.queue.process();
        self.driver.check_writes(&before, &[], "virtio-blk");
        let Some(heads) = offered else {
            assert!(result.is_err(), "an available index past the queue size");
            self.resync();
            return self.reset();
        };
        let mut expected = Vec::new();
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let mut refused = false;
        let mut chain = Chain::new();
        for &head in &heads {
            if !self.driver.walk_before(0, head, &mut chain)
                || chain.writable.is_empty()
                || chain.readable_len() < request::HEADER_LEN
            {
                refused = true;
                break;
            }
            readable.extend(ranges(&chain.readable));
            writable.extend(ranges(&chain.writable));
            expected.push(self.execute(head, &chain));
        }
        let mut all = readable.clone();
        all.extend(&writable);
        if overlapping(&writable, &readable)
            || self.driver.touches_metadata(&all, &before)
            || !self.driver.used_ring_trusted(0, self.next_used, &before)
        {
            // The model's requests may not be the device's: take the disk as it is.
            self.stats.aliased += 1;
            self.resync();
            return self.reset();
        }
        assert_eq!(result.is_err(), refused, "virtio-blk: {result:?}");
        let (idx, used) = self.driver.used_since(0, self.next_used);
        let want: Vec<(u16, u32)> = expected.iter().map(|e| (e.head, e.used)).collect();
        assert_eq!(used, want, "virtio-blk: used ring");
        for e in &expected {
            let mut s = [0u8];
            self.driver
                .mem
                .read_slice(&mut s, GuestAddress(e.status_addr))
                .expect("a status byte in RAM");
            assert_eq!(s[0], e.status, "virtio-blk: status of head {}", e.head);
            match e.status {
                status::OK => self.stats.ok += 1,
                status::IOERR => self.stats.ioerr += 1,
                _ => self.stats.unsupp += 1,
            }
            if let Some((segs, want, maybe_zero)) = &e.read {
                let got = read_segs(&self.driver.mem, segs);
                let bad =
                    (0..got.len()).find(|&i| got[i] != want[i] && !(got[i] == 0 && maybe_zero[i]));
                assert!(
                    bad.is_none(),
                    "virtio-blk: a read (head {}) returned {:#x} at byte {bad:?}, the disk holds {:#x}",
                    e.head,
                    got[bad.unwrap_or(0)],
                    want[bad.unwrap_or(0)]
                );
                self.stats.read_checked += got.len() as u64;
            }
            if let Some((segs, n)) = &e.id {
                let got = read_segs(&self.driver.mem, segs);
                assert_eq!(got, self.serial[..*n], "virtio-blk: GET_ID");
            }
        }
        self.check_disk("after a step");
        if refused {
            self.stats.refused += 1;
            return self.reset();
        }
        self.next_used = idx;
        self.next_avail = self.next_avail.wrapping_add(heads.len() as u16);
    }

    /// The model takes the disk as it is now.
    fn resync(&mut self) {
        self.model = Model::new(self.disk_bytes());
    }

    /// Runs one request (its chain walked as the device saw it) on the model.
    fn execute(&mut self, head: u16, chain: &Chain) -> Expected {
        let last = chain.writable.last().expect("a status buffer");
        let status_addr = last.addr.0 + u64::from(last.len) - 1;
        let mut e = Expected {
            head,
            used: 1,
            status: status::IOERR,
            status_addr,
            read: None,
            id: None,
        };
        let mut cursor = Cursor::new(&chain.readable);
        let mut header_segs = Vec::new();
        cursor.take(request::HEADER_LEN, &mut header_segs);
        let header = read_segs_before(&self.driver, &header_segs);
        let ty = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let size = self.model.bytes.len() as u64;
        let range = |sector: u64, len: u64| {
            let start = sector.checked_mul(SECTOR_SIZE)?;
            (start.checked_add(len)? <= size).then_some(start as usize)
        };
        let in_only = chain.readable_len() == request::HEADER_LEN;
        let out_only = chain.writable_len() == 1;
        // The data: device-writable (less the status byte) for IN and GET_ID, readable
        // after the header for the others.
        let mut data = Vec::new();
        match ty {
            types::IN | types::GET_ID => {
                Cursor::new(&chain.writable).take(chain.writable_len() - 1, &mut data);
            }
            _ => {
                let rest = cursor.remaining();
                cursor.take(rest, &mut data);
            }
        }
        let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        e.status = match ty {
            types::IN | types::OUT => {
                let read = ty == types::IN;
                // Buffers the wrong way round, a write to a read-only disk, a length
                // that is not whole sectors: IOERR, as sectors past the end are.
                let refused = !(if read { in_only } else { out_only })
                    || (!read && self.readonly)
                    || !data_len.is_multiple_of(SECTOR_SIZE);
                if refused {
                    status::IOERR
                } else if let Some(at) = range(sector, data_len) {
                    if read {
                        let end = at + data_len as usize;
                        e.used = data_len as u32 + 1;
                        e.read = Some((
                            data,
                            self.model.bytes[at..end].to_vec(),
                            self.model.maybe_zero[at..end].to_vec(),
                        ));
                        status::OK
                    } else {
                        let bytes = read_segs_before(&self.driver, &data);
                        let looks_foreign = self.kind == DiskKind::Probed
                            && at == 0
                            && detect_bytes(&bytes[..bytes.len().min(PROBE_LEN)]) != Detected::Raw;
                        if looks_foreign {
                            status::IOERR
                        } else {
                            self.model.write(at, &bytes);
                            status::OK
                        }
                    }
                } else {
                    status::IOERR
                }
            }
            types::FLUSH => status::OK,
            types::GET_ID if in_only => {
                let n = (data_len as usize).min(ID_BYTES);
                let mut segs = Vec::new();
                Cursor::new(&data).take(n as u64, &mut segs);
                e.used = n as u32 + 1;
                e.id = Some((segs, n));
                status::OK
            }
            types::DISCARD | types::WRITE_ZEROES if out_only => {
                let discard = ty == types::DISCARD;
                let wanted = if discard {
                    feature_bits::DISCARD
                } else {
                    feature_bits::WRITE_ZEROES
                };
                if self.features & wanted == 0 {
                    status::UNSUPP
                } else if self.readonly {
                    status::IOERR
                } else if data_len == 0
                    || !data_len.is_multiple_of(RANGE_LEN)
                    || data_len / RANGE_LEN > u64::from(MAX_RANGES)
                {
                    status::UNSUPP
                } else {
                    let bytes = read_segs_before(&self.driver, &data);
                    self.zero_ranges(&bytes, discard)
                }
            }
            types::GET_ID | types::DISCARD | types::WRITE_ZEROES => status::IOERR,
            _ => status::UNSUPP,
        };
        e
    }

    /// Discard or write-zeroes over the ranges in `bytes`, one after the other until
    /// one fails.
    fn zero_ranges(&mut self, bytes: &[u8], discard: bool) -> u8 {
        let size = self.model.bytes.len() as u64;
        for r in bytes.chunks(RANGE_LEN as usize) {
            let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            let allowed = if discard {
                0
            } else {
                request::RANGE_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return status::UNSUPP;
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(start) = sector.checked_mul(SECTOR_SIZE) else {
                return status::IOERR;
            };
            if start.checked_add(len).is_none_or(|end| end > size) || sectors > MAX_RANGE_SECTORS {
                return status::IOERR;
            }
            let (start, end) = (start as usize, (start + len) as usize);
            if discard && self.kind != DiskKind::Probed && self.kind != DiskKind::Raw {
                // A qcow2 image gives back whole clusters only: the rest keeps its data.
                self.model.maybe_zero[start..end].fill(true);
            } else {
                self.model.write(start, &vec![0; end - start]);
            }
        }
        status::OK
    }

    /// At the end: what must never have been written was not.
    fn check_untouched(&self, dir: Option<&Path>) {
        if let Some((file, len)) = &self.raw {
            let size = self.disk.image().size();
            let mut tail = vec![0u8; (len - size) as usize];
            file.read_exact_at(&mut tail, size).expect("the raw file");
            let want: Vec<u8> = (size..*len).map(pattern).collect();
            assert_eq!(tail, want, "virtio-blk: bytes past the disk's last sector");
            if self.kind == DiskKind::Probed {
                let mut first = [0u8; PROBE_LEN];
                let n = PROBE_LEN.min(*len as usize);
                file.read_exact_at(&mut first[..n], 0)
                    .expect("the raw file");
                assert_eq!(
                    detect_bytes(&first[..n]),
                    Detected::Raw,
                    "a probed raw disk"
                );
            }
        }
        if let Some(dir) = dir {
            let base = std::fs::read(dir.join("base")).expect("the backing file");
            assert!(
                base.iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(i as u64)),
                "virtio-blk: an overlay wrote its backing file"
            );
        }
    }
}

/// Whether a device-writable range overlaps another range of the step (writable or
/// readable).
fn overlapping(writable: &[(u64, u64)], readable: &[(u64, u64)]) -> bool {
    let hit = |a: &(u64, u64), b: &(u64, u64)| a.0 < b.1 && b.0 < a.1;
    writable.iter().enumerate().any(|(i, w)| {
        writable[i + 1..].iter().any(|o| hit(w, o)) || readable.iter().any(|r| hit(w, r))
    })
}

fn read_segs(mem: &GuestMemoryMmap, segs: &[Segment]) -> Vec<u8> {
    let n: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let mut out = vec![0u8; n as usize];
    assert!(Cursor::new(segs).read(mem, &mut out), "walked buffers read");
    out
}

/// The bytes of `segs` as they were before the step.
fn read_segs_before(driver: &GuestDriver, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    driver.read_before(segs, &mut |b| out.extend_from_slice(b));
    out
}

/// Opens the run's disk (`dir`: where the qcow2 files go).
fn open(
    kind: DiskKind,
    readonly: bool,
    sectors: u64,
    tail: u64,
    dir: &Path,
) -> (VirtioBlock, Option<(std::fs::File, u64)>, Vec<u8>, String) {
    let ro = if readonly { ",readonly=on" } else { "" };
    match kind {
        DiskKind::Probed | DiskKind::Raw => {
            let len = sectors * SECTOR_SIZE + tail;
            let bytes: Vec<u8> = (0..len).map(pattern).collect();
            let m = memfd(&bytes);
            let (format, id) = match kind {
                DiskKind::Raw => (",format=raw", format!(",id={SERIAL}")),
                _ => ("", String::new()),
            };
            let spec = format!("path={}{format}{ro}{id}", m.path.display());
            let config = BlockConfig::parse(&spec).expect("a disk spec");
            let device = VirtioBlock::new(&config).expect("a raw disk");
            let name = match kind {
                DiskKind::Raw => SERIAL.to_string(),
                _ => m.path.file_name().expect("a name").to_string_lossy().into(),
            };
            let initial = bytes[..(sectors * SECTOR_SIZE) as usize].to_vec();
            (device, Some((m.file, len)), initial, name)
        }
        DiskKind::Qcow2 | DiskKind::Overlay => {
            let (name, initial) = {
                let t = templates();
                let t = t.as_ref().expect("templates");
                match kind {
                    DiskKind::Qcow2 => {
                        std::fs::write(dir.join("q"), &t.plain).expect("a qcow2 image");
                        ("q", vec![0u8; QCOW2_SIZE as usize])
                    }
                    _ => {
                        std::fs::write(dir.join("ov"), &t.overlay).expect("a qcow2 image");
                        ("ov", (0..QCOW2_SIZE).map(pattern).collect())
                    }
                }
            };
            let spec = format!("path={},format=qcow2{ro}", dir.join(name).display());
            let config = BlockConfig::parse(&spec).expect("a disk spec");
            let device = VirtioBlock::new(&config).expect("a qcow2 disk");
            (device, None, initial, name.to_string())
        }
    }
}

/// One harness run, with what it did.
pub fn block_queue_stats(data: &[u8]) -> BlockStats {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut ops = Ops::new(data);
    let driver = GuestDriver::new(&[queue_size(ops.u8())]);
    let flags = ops.u8();
    let sectors = 1 + u64::from(ops.u8() % 128);
    let tail = u64::from(ops.u16() % 512);
    let event_idx = flags & 1 != 0;
    let kind = [
        DiskKind::Probed,
        DiskKind::Raw,
        DiskKind::Qcow2,
        DiskKind::Overlay,
    ][usize::from(flags >> 1 & 3)];
    let readonly = flags & 8 != 0;
    let dir = templates().as_ref().expect("templates").dir.clone();
    let (device, raw, initial, name) = open(kind, readonly, sectors, tail, &dir);
    // What the device offers: read-only disks say so and take no discards.
    let offered = <VirtioBlock as VirtioDevice<GuestMemoryMmap>>::features(&device);
    assert_eq!(offered & feature_bits::RO != 0, readonly);
    assert_eq!(offered & feature_bits::DISCARD == 0, readonly);
    let mut capacity = [0u8; 8];
    <VirtioBlock as VirtioDevice<GuestMemoryMmap>>::read_config(&device, 0, &mut capacity);
    assert_eq!(
        u64::from_le_bytes(capacity) * SECTOR_SIZE,
        initial.len() as u64,
        "virtio-blk: the capacity is not the disk's whole sectors"
    );
    let mut features = offered;
    if flags & 16 != 0 {
        features &= !(feature_bits::DISCARD | feature_bits::WRITE_ZEROES);
    }
    let disk = device.disk().clone();
    let mut serial = [0u8; ID_BYTES];
    let n = name.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&name.as_bytes()[..n]);
    assert_eq!(disk.id(), &serial, "virtio-blk: the disk's serial");
    let queue = Block::queue(&driver, &disk, features, event_idx);
    let mut b = Block {
        driver,
        _device: device,
        disk,
        queue,
        features,
        kind,
        readonly,
        serial,
        model: Model::new(initial),
        raw,
        event_idx,
        next_avail: 0,
        next_used: 0,
        stats: BlockStats::default(),
    };
    b.check_disk("as opened");
    while ops.next_op() {
        match ops.u8() % (DRIVER_OPS + 3) {
            k if k < DRIVER_OPS => b.driver.op(k, &mut ops),
            NOTIFY => b.notify(),
            RESET => b.reset(),
            _ => request(&mut b, &mut ops),
        }
    }
    b.check_disk("at the end");
    b.check_untouched((kind == DiskKind::Overlay).then_some(dir.as_path()));
    b.stats
}

pub fn block_queue(data: &[u8]) {
    block_queue_stats(data);
}

/// A sector from 16 bits of input: mostly on the disk or just past it, sometimes far
/// away or overflowing.
fn sector(v: u16) -> u64 {
    if v < 0xff00 {
        return u64::from(v & 0xff);
    }
    const FAR: [u64; 8] = [
        u64::MAX,
        u64::MAX / SECTOR_SIZE,
        u64::MAX / SECTOR_SIZE + 1,
        1 << 54,
        1 << 32,
        (1 << 55) - 1,
        127,
        128,
    ];
    FAR[usize::from(v & 7)]
}

/// Operation 8, a request as a driver lays it out: fields first (u8, the descriptor it
/// starts at), kind (u8: bits 0-2 IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, an
/// unknown type, OUT with the reserved field set), sector (u16, see [`sector`]), count
/// (u8: IN and OUT, bit 7 clear, that many sectors (0-31); set, that many times 13
/// bytes; GET_ID bytes; DISCARD and WRITE_ZEROES ranges, 0-5, 5 meaning 33), address
/// (u16, see [`address`]), shape (u8: bit 0 the data in two buffers, bit 1 the header
/// and data in one buffer (writes) or data and status in one (reads), bit 2 the data the
/// wrong way round), fill (u8), then per range sector (u16), sectors (u16: below
/// 0xff00 as it is, else a huge count) and flags (u8: bits 0-1, bit 7 a high bit).
///
/// The header goes at the address, the data right after it, the status byte after the
/// data; descriptors from `first` on, chained, offered.
fn request(b: &mut Block, ops: &mut Ops) {
    let first = u16::from(ops.u8());
    let kind = ops.u8();
    let sector = sector(ops.u16());
    let count = ops.u8();
    let at = address(ops.u16());
    let shape = ops.u8();
    let fill = ops.u8();
    let (ty, reserved) = match kind & 7 {
        0 => (types::IN, 0),
        1 => (types::OUT, 0),
        2 => (types::FLUSH, 0),
        3 => (types::GET_ID, 0),
        4 => (types::DISCARD, 0),
        5 => (types::WRITE_ZEROES, 0),
        6 => ([2, 3, 5, 7, 9, 12, 14, u32::MAX][usize::from(kind >> 5)], 0),
        _ => (types::OUT, 0xdead_beef),
    };
    let mut data = Vec::new();
    match ty {
        types::IN | types::OUT => {
            let len = if count & 0x80 == 0 {
                usize::from(count & 0x1f) * SECTOR_SIZE as usize
            } else {
                usize::from(count & 0x7f) * 13
            };
            if ty == types::OUT {
                data = (0..len)
                    .map(|i| (i as u8 ^ fill).wrapping_add(((i >> 9) as u8).wrapping_mul(7)))
                    .collect();
            } else {
                data = vec![0xee; len];
            }
        }
        types::GET_ID => data = vec![0xee; usize::from(count % 41)],
        types::DISCARD | types::WRITE_ZEROES => {
            let n = match count % 6 {
                5 => 33,
                n => usize::from(n),
            };
            let mut one = Vec::new();
            for i in 0..n {
                if i < 4 {
                    let s = if i == 0 {
                        sector
                    } else {
                        self::sector(ops.u16())
                    };
                    let sectors = match ops.u16() {
                        v if v < 0xff00 => u32::from(v & 0xff),
                        v => [MAX_RANGE_SECTORS, MAX_RANGE_SECTORS + 1, u32::MAX, 1 << 31]
                            [usize::from(v & 3)],
                    };
                    let f = ops.u8();
                    let flags = u32::from(f & 3) | if f & 0x80 != 0 { 1 << 31 } else { 0 };
                    one = [
                        s.to_le_bytes().as_slice(),
                        &sectors.to_le_bytes(),
                        &flags.to_le_bytes(),
                    ]
                    .concat();
                }
                data.extend_from_slice(&one);
            }
            if fill & 1 != 0 && !data.is_empty() {
                data.truncate(data.len() - 5);
            }
        }
        _ => {}
    }
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&ty.to_le_bytes());
    header[4..8].copy_from_slice(&u32::to_le_bytes(reserved));
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    let mem = &b.driver.mem;
    let _ = mem.write_slice(&header, GuestAddress(at));
    let data_at = at.wrapping_add(16);
    let reads = matches!(ty, types::IN | types::GET_ID);
    if !reads {
        let _ = mem.write_slice(&data, GuestAddress(data_at));
    }
    let status_at = data_at.wrapping_add(data.len() as u64);
    let _ = mem.write_slice(&[0xff], GuestAddress(status_at));
    // (address, length, device-writable)
    let mut bufs: Vec<(u64, u32, bool)> = Vec::new();
    let data_writable = reads != (shape & 4 != 0);
    let len = data.len() as u32;
    let merged = shape & 2 != 0;
    if merged && !reads {
        bufs.push((at, 16 + len, false));
    } else {
        bufs.push((at, 16, false));
        if !(data.is_empty() || merged && reads) {
            if shape & 1 != 0 && len > 1 {
                let half = len / 2;
                bufs.push((data_at, half, data_writable));
                bufs.push((
                    data_at.wrapping_add(u64::from(half)),
                    len - half,
                    data_writable,
                ));
            } else {
                bufs.push((data_at, len, data_writable));
            }
        }
    }
    if merged && reads {
        bufs.push((data_at, len + 1, true));
    } else {
        bufs.push((status_at, 1, true));
    }
    let size = b.driver.size(0);
    for (i, &(addr, len, write)) in bufs.iter().enumerate() {
        let index = first + i as u16;
        let mut flags = if write { crate::driver::F_WRITE } else { 0 };
        if i + 1 < bufs.len() {
            flags |= crate::driver::F_NEXT;
        }
        b.driver
            .write_desc(0, index, addr, len, flags, (index + 1) % size);
    }
    b.driver.offer(0, first % size);
}

/// Fields of a [`request`] for seeds.
#[derive(Clone)]
pub struct Req {
    pub first: u8,
    pub kind: u8,
    pub sector: u16,
    pub count: u8,
    pub at: u16,
    pub shape: u8,
    pub fill: u8,
    /// (sector, sectors, flags) per range (at most 4 are read).
    pub ranges: Vec<(u16, u16, u8)>,
}

impl Req {
    pub fn new(kind: u8, sector: u16, count: u8, at: u16) -> Self {
        Req {
            first: 0,
            kind,
            sector,
            count,
            at,
            shape: 0,
            fill: 0x5a,
            ranges: vec![(sector, 1, 0)],
        }
    }

    /// The operation's bytes: for DISCARD and WRITE_ZEROES the first range's sector is
    /// the request's, and as many ranges as the count says are read (the last one given
    /// repeated).
    fn encode(&self, p: &mut Program) {
        let ranges = matches!(self.kind & 7, 4 | 5);
        let sector = match self.ranges.first() {
            Some(r) if ranges => r.0,
            _ => self.sector,
        };
        p.u8(REQUEST)
            .u8(self.first)
            .u8(self.kind)
            .u16(sector)
            .u8(self.count)
            .u16(self.at)
            .u8(self.shape)
            .u8(self.fill);
        if !ranges {
            return;
        }
        let n = match self.count % 6 {
            5 => 4,
            n => usize::from(n),
        };
        for i in 0..n {
            let (s, n, f) = self.ranges[i.min(self.ranges.len() - 1)];
            if i > 0 {
                p.u16(s);
            }
            p.u16(n).u8(f);
        }
    }
}

/// A seed: queue size, flags, raw sectors and tail, then requests, each notified at
/// once (4 descriptors each, from the descriptor after the last one's).
pub fn program(flags: u8, sectors: u8, tail: u16, reqs: &[Req]) -> Vec<u8> {
    let mut p = Program::default();
    p.u8(4).u8(flags).u8(sectors - 1).u16(tail);
    for (i, r) in reqs.iter().enumerate() {
        let mut r = Req {
            first: (4 * i % 16) as u8,
            ranges: r.ranges.clone(),
            ..*r
        };
        if r.at == 0 {
            r.at = 0x1000 + 0x100 * (i as u16 % 16);
        }
        r.encode(&mut p);
        p.u8(NOTIFY);
    }
    p.0
}

/// What Linux's virtio_blk does, on each kind of disk: it reads the serial and the
/// first sectors (the partition table), writes and reads back, flushes; discards and
/// zeroes ranges (fstrim, blkdiscard -z); and what it must be refused: writes past the
/// end, to a read-only disk, lengths that are not whole sectors, unknown types, bad
/// range lists.
pub fn block_queue_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const IN: u8 = 0;
    const OUT: u8 = 1;
    const FLUSH: u8 = 2;
    const GET_ID: u8 = 3;
    const DISCARD: u8 = 4;
    const WZ: u8 = 5;
    let data = |at: u16| 0x4000 + at;
    let linux = |flags: u8| {
        program(
            flags,
            64,
            0,
            &[
                Req::new(GET_ID, 0, 20, data(0)),
                Req::new(IN, 0, 8, data(0)),
                Req::new(OUT, 2, 4, data(0x1000)),
                Req {
                    shape: 1,
                    ..Req::new(IN, 1, 6, data(0x2000))
                },
                Req::new(FLUSH, 0, 0, 0),
                Req {
                    shape: 2,
                    fill: 0x33,
                    ..Req::new(OUT, 9, 3, data(0x2000))
                },
                Req::new(IN, 8, 8, data(0)),
            ],
        )
    };
    let trim = |flags: u8| {
        let mut d = Req::new(DISCARD, 8, 2, 0x2000);
        d.ranges = vec![(8, 16, 0), (40, 8, 0)];
        let mut z = Req::new(WZ, 0, 2, 0x2400);
        z.ranges = vec![(0, 4, 1), (60, 4, 0)];
        program(
            flags,
            64,
            0,
            &[
                Req::new(OUT, 0, 31, data(0)),
                Req::new(OUT, 31, 31, data(0)),
                d,
                z,
                Req::new(IN, 0, 31, data(0)),
                Req::new(IN, 31, 31, data(0)),
            ],
        )
    };
    let mut too_many = Req::new(DISCARD, 0, 5, 0x2000);
    too_many.ranges = vec![(0, 1, 0)];
    let mut bad_flags = Req::new(WZ, 0, 1, 0x2400);
    bad_flags.ranges = vec![(0, 1, 2)];
    let mut past = Req::new(DISCARD, 0, 1, 0x2800);
    past.ranges = vec![(120, 16, 0)];
    let refused = program(
        0, // raw, probed
        16,
        300,
        &[
            Req::new(OUT, 15, 2, data(0)),
            Req::new(IN, 16, 1, data(0)),
            Req::new(IN, 0xff07, 1, data(0)),
            Req::new(OUT, 0xff00, 1, data(0)),
            Req::new(OUT, 0, 0x81, data(0)),
            Req::new(6, 0, 0, 0),
            Req {
                shape: 4,
                ..Req::new(IN, 0, 1, data(0))
            },
            too_many,
            bad_flags,
            past,
            Req::new(7, 3, 1, data(0x1000)),
            Req::new(IN, 15, 1, data(0x1000)),
        ],
    );
    let readonly = |flags: u8| {
        program(
            flags | 8,
            32,
            0,
            &[
                Req::new(IN, 0, 8, data(0)),
                Req::new(OUT, 0, 8, data(0)),
                Req::new(DISCARD, 0, 1, 0x2000),
                Req::new(FLUSH, 0, 0, 0),
                Req::new(IN, 0, 8, data(0)),
            ],
        )
    };
    // A write of a qcow2 header onto a probed raw disk's first sector: the request's
    // data, then its first bytes made the magic (driver operation 1), then the notify.
    let mut magic = Program::default();
    magic.u8(4).u8(0).u8(7).u16(0);
    let mut hijack = Req::new(OUT, 0, 1, 0x4000);
    hijack.fill = 0;
    hijack.encode(&mut magic);
    magic
        .u8(1)
        .u16(0x4010)
        .u8(4)
        .bytes(&disk::format::QCOW_MAGIC)
        .u8(NOTIFY);
    let magic = magic.0;
    // Flags: bit 0 EVENT_IDX, bits 1-2 the disk (raw probed, raw, qcow2, overlay).
    vec![
        ("linux-raw", linux(1 | 1 << 1)),
        ("linux-raw-probed", linux(1)),
        ("linux-qcow2", linux(1 | 2 << 1)),
        ("linux-qcow2-overlay", linux(1 | 3 << 1)),
        ("trim-raw", trim(1 | 1 << 1)),
        ("trim-qcow2", trim(1 | 2 << 1)),
        ("trim-qcow2-overlay", trim(1 | 3 << 1)),
        ("refused", refused),
        ("readonly-raw", readonly(1 << 1)),
        ("readonly-qcow2-overlay", readonly(3 << 1)),
        ("qcow2-magic-on-probed-raw", magic),
    ]
}
