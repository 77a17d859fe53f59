//! Hostile drivers: random and adversarial descriptor chains fed to the block,
//! network and entropy queues (thousands of cases, fixed seeds). Whatever the input,
//! the device must not panic, must not write guest memory outside the buffers the
//! driver marked device-writable (and the used ring), and must report chains it
//! cannot follow as errors (which put the device into DEVICE_NEEDS_RESET).

mod common;

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use common::*;
use devices::interrupt::NoMsi;
use devices::pci::BarAllocator;
use devices::virtio::block::request::{status as blk, types};
use devices::virtio::block::{BlockQueue, Disk, VirtioBlock};
use devices::virtio::net::{NetBackend, NetQueues};
use devices::virtio::rng::RngQueue;
use devices::virtio::{DeviceError, VirtioInterrupt, VirtioPciDevice, features, status};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Two adjacent regions (a buffer may straddle them) and one after a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x10_0000), (0x10_0000, 0x8_0000), (0x20_0000, 0x1_0000)];
const HOLE: u64 = 0x18_0000;
const MEM_END: u64 = 0x21_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Indirect tables live here; buffers never do (so a device write cannot change a
/// descriptor after the allowed set was computed).
const INDIRECT: u64 = 0x8000;
const META_END: u64 = 0x1_0000;

/// (address, length, flags, next)
type Desc = (u64, u32, u16, u16);

fn hostile_memory() -> Mem {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn in_memory(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    (addr < HOLE && end <= HOLE) || (addr >= 0x20_0000 && end <= MEM_END)
}

fn write_desc(mem: &Mem, table: u64, i: u64, d: Desc) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.0.to_le_bytes());
    b[8..12].copy_from_slice(&d.1.to_le_bytes());
    b[12..14].copy_from_slice(&d.2.to_le_bytes());
    b[14..16].copy_from_slice(&d.3.to_le_bytes());
    mem.write_slice(&b, GuestAddress(table + 16 * i)).unwrap();
}

fn read_desc(mem: &Mem, at: u64) -> Option<Desc> {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some((
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u16::from_le_bytes(b[12..14].try_into().unwrap()),
        u16::from_le_bytes(b[14..16].try_into().unwrap()),
    ))
}

fn random_addr(r: &mut Rng, writable: bool) -> u64 {
    match r.below(100) {
        0..60 => META_END + r.below(HOLE - META_END),
        60..70 => 0x20_0000 + r.below(0x1_0000),
        // Near region ends: straddles the adjacent region or runs into the hole.
        70..80 => [0x10_0000u64, HOLE, MEM_END][r.below(3) as usize] - r.below(64),
        80..88 => HOLE + r.below(0x8_0000), // the hole
        88..93 => MEM_END + r.below(1 << 40),
        93..96 => u64::MAX - r.below(4096),
        _ if !writable => r.below(META_END),
        _ => META_END + r.below(0x1000),
    }
}

fn random_len(r: &mut Rng) -> u32 {
    match r.below(100) {
        0..5 => 0,
        5..25 => 1 + r.below(16) as u32,
        25..35 => 16,
        35..55 => 512 * (1 + r.below(8) as u32),
        55..65 => 4096,
        65..85 => r.below(1 << 16) as u32,
        85..90 => u32::MAX - r.below(16) as u32,
        _ => r.next() as u32,
    }
}

fn random_desc(r: &mut Rng, size: u16, nested_ok: bool) -> Desc {
    let mut flags = 0;
    if r.chance(50) {
        flags |= DESC_F_NEXT;
    }
    if r.chance(50) {
        flags |= DESC_F_WRITE;
    }
    if r.chance(if nested_ok { 10 } else { 3 }) {
        flags |= DESC_F_INDIRECT;
        let (addr, len) = if r.chance(80) {
            (INDIRECT + 16 * r.below(2000), 16 * (1 + r.below(16) as u32))
        } else {
            (random_addr(r, false), random_len(r))
        };
        return (addr, len, flags, r.next() as u16);
    }
    let next = if r.chance(90) {
        r.below(u64::from(size)) as u16
    } else {
        r.next() as u16
    };
    (
        random_addr(r, flags & DESC_F_WRITE != 0),
        random_len(r),
        flags,
        next,
    )
}

/// What the device may write: every device-writable buffer any descriptor (direct,
/// or in an indirect table a direct one points at) describes, and the used ring.
fn allowed_writes(mem: &Mem, size: u16) -> Vec<(u64, u64)> {
    let mut out = vec![(USED, USED + 6 + 8 * u64::from(size))];
    let mut note = |d: Desc| {
        if d.2 & DESC_F_WRITE != 0 && d.2 & DESC_F_INDIRECT == 0 && d.1 > 0 {
            out.push((d.0, d.0.saturating_add(u64::from(d.1))));
        }
    };
    for i in 0..u64::from(size) {
        let d = read_desc(mem, DESC + 16 * i).unwrap();
        if d.2 & DESC_F_INDIRECT != 0 {
            let n = u64::from(d.1 / 16).min(0xffff);
            if in_memory(d.0, 16 * n) {
                for j in 0..n {
                    note(read_desc(mem, d.0 + 16 * j).unwrap());
                }
            }
        } else {
            note(d);
        }
    }
    out.sort();
    out
}

fn snapshot(mem: &Mem) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|(a, l)| {
            let mut v = vec![0u8; *l];
            mem.read_slice(&mut v, GuestAddress(*a)).unwrap();
            v
        })
        .collect()
}

/// Every byte that changed lies in an allowed range.
fn check_writes(mem: &Mem, before: &[Vec<u8>], allowed: &[(u64, u64)], case: &str) {
    let after = snapshot(mem);
    for ((base, _), (b, a)) in REGIONS.iter().zip(before.iter().zip(&after)) {
        for (chunk, (cb, ca)) in b.chunks(4096).zip(a.chunks(4096)).enumerate() {
            if cb == ca {
                continue;
            }
            for (i, (x, y)) in cb.iter().zip(ca).enumerate() {
                if x != y {
                    let addr = base + (chunk * 4096 + i) as u64;
                    let ok = allowed.iter().any(|(s, e)| (*s..*e).contains(&addr));
                    assert!(
                        ok,
                        "{case}: wrote {addr:#x} ({x:#x} -> {y:#x}) outside the chain's buffers"
                    );
                }
            }
        }
    }
}

/// Random metadata for one case: descriptor table, indirect tables, and an
/// available ring offering `heads` (or garbage, or an impossible index jump).
fn scramble(mem: &Mem, r: &mut Rng, size: u16) {
    let mut meta = vec![0u8; META_END as usize];
    mem.write_slice(&meta, GuestAddress(0)).unwrap();
    for i in 0..u64::from(size) {
        write_desc(mem, DESC, i, random_desc(r, size, true));
    }
    for i in 0..2048 {
        if r.chance(30) {
            write_desc(mem, INDIRECT, i, random_desc(r, 16, false));
        }
    }
    // Some random bytes in the data area, so headers and ranges are random too.
    for _ in 0..8 {
        let at = META_END + r.below(HOLE - META_END - 4096);
        r.fill(&mut meta[..4096]);
        mem.write_slice(&meta[..4096], GuestAddress(at)).unwrap();
    }
}

fn publish(mem: &Mem, r: &mut Rng, size: u16, heads: &[u16]) {
    let count = heads.len() as u16;
    for (i, h) in heads.iter().enumerate() {
        let h = if r.chance(5) { r.next() as u16 } else { *h };
        mem.write_obj(
            h,
            GuestAddress(AVAIL + 4 + 2 * (i as u64 % u64::from(size))),
        )
        .unwrap();
    }
    let idx = match r.below(100) {
        0..5 => r.next() as u16,
        5..10 => count.wrapping_add(size).wrapping_add(1),
        _ => count,
    };
    mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(
        r.next() as u16,
        GuestAddress(AVAIL + 4 + 2 * u64::from(size)),
    )
    .unwrap();
}

fn queue(size: u16, event_idx: bool) -> Queue {
    let mut q = Queue::new(256).unwrap();
    q.try_set_size(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

fn interrupt(queues: usize) -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        "hostile",
        queues,
        Arc::new(NoMsi),
        None,
    ))
}

fn random_size(r: &mut Rng) -> u16 {
    1 << r.below(9)
}

/// Well-formed block requests, then a random mutation or two: reaches the request
/// logic (types, sectors, lengths, ranges) rather than stopping at the chain walk.
fn structured_blk(mem: &Mem, r: &mut Rng, size: u16) -> Vec<u16> {
    let mut heads = Vec::new();
    let mut next = 0u16;
    let mut indirect_at = 0u64;
    while next < size {
        let ty = [
            types::IN,
            types::OUT,
            types::FLUSH,
            types::GET_ID,
            types::DISCARD,
            types::WRITE_ZEROES,
            10,
            r.next() as u32,
        ][r.below(8) as usize];
        let sector = if r.chance(80) {
            r.below(2100)
        } else {
            r.next()
        };
        let hdr = META_END + r.below(HOLE - META_END - 64);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let data_write = matches!(ty, types::IN | types::GET_ID);
        let mut bufs = vec![(hdr, 16u32, false)];
        for _ in 0..r.below(4) {
            let len = if r.chance(70) {
                512 * (1 + r.below(16) as u32)
            } else {
                random_len(r)
            };
            let addr = META_END + r.below(HOLE - META_END - u64::from(len.min(0x1000)));
            if matches!(ty, types::DISCARD | types::WRITE_ZEROES) {
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&r.below(2100).to_le_bytes());
                seg[8..12].copy_from_slice(&(r.below(64) as u32).to_le_bytes());
                seg[12..16].copy_from_slice(&(r.below(3) as u32).to_le_bytes());
                mem.write_slice(&seg, GuestAddress(addr)).unwrap();
                bufs.push((addr, 16 * (1 + r.below(2) as u32), false));
            } else {
                bufs.push((addr, len, data_write));
            }
        }
        bufs.push((META_END + r.below(HOLE - META_END), 1, true));
        for _ in 0..r.below(3) {
            // Mutations: any field of any buffer.
            let i = r.below(bufs.len() as u64) as usize;
            match r.below(3) {
                0 => bufs[i].0 = random_addr(r, bufs[i].2),
                1 => bufs[i].1 = random_len(r),
                _ => bufs[i].2 = !bufs[i].2,
            }
        }
        let head = next;
        if r.chance(20) && indirect_at + bufs.len() as u64 <= 2048 {
            for (j, (a, l, w)) in bufs.iter().enumerate() {
                let last = j + 1 == bufs.len();
                let flags = if last { 0 } else { DESC_F_NEXT } | if *w { DESC_F_WRITE } else { 0 };
                write_desc(
                    mem,
                    INDIRECT,
                    indirect_at + j as u64,
                    (*a, *l, flags, j as u16 + 1),
                );
            }
            let table = INDIRECT + 16 * indirect_at;
            write_desc(
                mem,
                DESC,
                u64::from(head),
                (table, 16 * bufs.len() as u32, DESC_F_INDIRECT, 0),
            );
            indirect_at += bufs.len() as u64;
            next += 1;
        } else {
            if next as usize + bufs.len() > size as usize {
                break;
            }
            for (j, (a, l, w)) in bufs.iter().enumerate() {
                let last = j + 1 == bufs.len();
                let flags = if last { 0 } else { DESC_F_NEXT } | if *w { DESC_F_WRITE } else { 0 };
                write_desc(
                    mem,
                    DESC,
                    u64::from(next) + j as u64,
                    (*a, *l, flags, next + j as u16 + 1),
                );
            }
            next += bufs.len() as u16;
        }
        heads.push(head);
    }
    heads
}

fn temp_disk(size: u64) -> (tempfile::NamedTempFile, Arc<Disk>) {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(size).unwrap();
    let f = File::options()
        .read(true)
        .write(true)
        .open(file.path())
        .unwrap();
    (
        file,
        Arc::new(Disk::from_file(f, false, [b'x'; 20]).unwrap()),
    )
}

const BLK_FEATURES: u64 = features::COMMON | (1 << 9) | (1 << 13) | (1 << 14);

#[test]
fn block_survives_random_chains() {
    let mem = hostile_memory();
    let (_file, disk) = temp_disk(1 << 20);
    let mut r = Rng::new(0x5eed_b10c);
    let (mut ok, mut err) = (0, 0);
    for case in 0..3000 {
        let size = random_size(&mut r);
        scramble(&mem, &mut r, size);
        let heads: Vec<u16> = if r.chance(50) {
            structured_blk(&mem, &mut r, size)
        } else {
            (0..r.below(u64::from(size) + 1))
                .map(|_| r.below(u64::from(size)) as u16)
                .collect()
        };
        publish(&mem, &mut r, size, &heads);
        let before = snapshot(&mem);
        let allowed = allowed_writes(&mem, size);
        let mut q = BlockQueue::new(
            mem.clone(),
            queue(size, r.chance(50)),
            disk.clone(),
            interrupt(1),
            BLK_FEATURES,
        );
        match q.process() {
            Ok(()) => ok += 1,
            Err(_) => err += 1,
        }
        check_writes(&mem, &before, &allowed, &format!("blk case {case}"));
    }
    eprintln!("block: {ok} cases served, {err} put the device into needs-reset");
    assert!(
        ok > 300 && err > 300,
        "both outcomes exercised: {ok} ok, {err} errors"
    );
}

/// Frames on demand for the receive path.
struct FrameSource {
    frames: Mutex<VecDeque<Vec<u8>>>,
    evt: EventFd,
}

impl NetBackend for FrameSource {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.frames.lock().unwrap().pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        Ok(frame.len())
    }
    fn set_offloads(&self, _: u64) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn network_survives_random_chains() {
    let mem = hostile_memory();
    let mut r = Rng::new(0x05ee_d0e7);
    let (mut ok, mut err) = (0, 0);
    for case in 0..2000 {
        let size = random_size(&mut r);
        scramble(&mem, &mut r, size);
        let heads: Vec<u16> = (0..r.below(u64::from(size) + 1))
            .map(|_| r.below(u64::from(size)) as u16)
            .collect();
        publish(&mem, &mut r, size, &heads);
        let before = snapshot(&mem);
        let allowed = allowed_writes(&mem, size);
        let source = Arc::new(FrameSource {
            frames: Mutex::new(VecDeque::new()),
            evt: EventFd::new(0).unwrap(),
        });
        for _ in 0..r.below(6) {
            let mut f = vec![0u8; [1, 11, 12, 60, 1514, 9000, 65_000][r.below(7) as usize]];
            r.fill(&mut f);
            source.frames.lock().unwrap().push_back(f);
        }
        let f = if r.chance(50) { u64::MAX } else { !(1 << 15) };
        // The queue under test is rx or tx; the other one is an idle, valid queue.
        let rx_under_test = r.chance(50);
        let idle = Queue::new(256).unwrap();
        let (rx, tx) = if rx_under_test {
            (queue(size, r.chance(50)), idle)
        } else {
            (idle, queue(size, r.chance(50)))
        };
        let mut q = NetQueues::new(mem.clone(), rx, tx, source, interrupt(2), f);
        let result: Result<(), DeviceError> = if rx_under_test {
            q.receive()
        } else {
            q.transmit()
        };
        match result {
            Ok(()) => ok += 1,
            Err(_) => err += 1,
        }
        check_writes(&mem, &before, &allowed, &format!("net case {case}"));
    }
    eprintln!("net: {ok} cases served, {err} put the device into needs-reset");
    assert!(
        ok > 100 && err > 100,
        "both outcomes exercised: {ok} ok, {err} errors"
    );
}

#[test]
fn entropy_survives_random_chains() {
    let mem = hostile_memory();
    let mut r = Rng::new(0x5eed_4a2d);
    let (mut ok, mut err) = (0, 0);
    for case in 0..2000 {
        let size = random_size(&mut r);
        scramble(&mem, &mut r, size);
        let heads: Vec<u16> = (0..r.below(u64::from(size) + 1))
            .map(|_| r.below(u64::from(size)) as u16)
            .collect();
        publish(&mem, &mut r, size, &heads);
        let before = snapshot(&mem);
        let allowed = allowed_writes(&mem, size);
        let mut q = RngQueue::new(mem.clone(), queue(size, r.chance(50)), interrupt(1));
        match q.process() {
            Ok(()) => ok += 1,
            Err(_) => err += 1,
        }
        check_writes(&mem, &before, &allowed, &format!("rng case {case}"));
    }
    eprintln!("rng: {ok} cases served, {err} put the device into needs-reset");
    assert!(ok > 100 && err > 100);
}

#[test]
fn the_write_checker_catches_stray_writes() {
    let mem = hostile_memory();
    write_desc(&mem, DESC, 0, (0x5_0000, 16, W, 0));
    let before = snapshot(&mem);
    let allowed = allowed_writes(&mem, 4);
    mem.write_obj(1u8, GuestAddress(0x5_000f)).unwrap();
    mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
    check_writes(&mem, &before, &allowed, "inside");
    mem.write_obj(1u8, GuestAddress(0x5_0010)).unwrap();
    let caught = std::panic::catch_unwind(|| check_writes(&mem, &before, &allowed, "outside"));
    assert!(caught.is_err());
}

// --- Adversarial chains with a known verdict ------------------------------------

/// One block request laid out by hand: `descs` at table slots 0.., head 0.
fn blk_case(descs: &[Desc], avail_idx: u16, head: u16) -> (Result<(), DeviceError>, Mem) {
    let mem = hostile_memory();
    for (i, d) in descs.iter().enumerate() {
        write_desc(&mem, DESC, i as u64, *d);
    }
    mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&types::IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x2_0000)).unwrap();
    let (_f, disk) = temp_disk(1 << 20);
    let before = snapshot(&mem);
    let allowed = allowed_writes(&mem, 16);
    let result = BlockQueue::new(
        mem.clone(),
        queue(16, false),
        disk,
        interrupt(1),
        BLK_FEATURES,
    )
    .process();
    check_writes(&mem, &before, &allowed, "adversarial");
    (result, mem)
}

const N: u16 = DESC_F_NEXT;
const W: u16 = DESC_F_WRITE;
const I: u16 = DESC_F_INDIRECT;

#[test]
fn adversarial_chains_need_a_reset() {
    let hdr = (0x2_0000, 16, N, 1);
    let data = (0x3_0000, 512, N | W, 2);
    let st = (0x4_0000, 1, W, 0);
    // The well-formed request first: served.
    let (r, mem) = blk_case(&[hdr, data, st], 1, 0);
    r.unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4_0000)).unwrap(), blk::OK);

    let cases: Vec<(&str, Vec<Desc>, u16, u16)> = vec![
        ("head outside the queue", vec![hdr, data, st], 1, 16),
        ("self loop", vec![(0x2_0000, 16, N, 0)], 1, 0),
        (
            "two-descriptor loop",
            vec![(0x2_0000, 16, N, 1), (0x3_0000, 16, N, 0)],
            1,
            0,
        ),
        ("next outside the table", vec![(0x2_0000, 16, N, 99)], 1, 0),
        (
            "buffer in the hole",
            vec![hdr, (HOLE, 512, N | W, 2), st],
            1,
            0,
        ),
        (
            "buffer past the end",
            vec![hdr, (MEM_END - 256, 512, N | W, 2), st],
            1,
            0,
        ),
        (
            "buffer into the hole",
            vec![hdr, (HOLE - 256, 512, N | W, 2), st],
            1,
            0,
        ),
        (
            "address wraps",
            vec![hdr, (u64::MAX - 100, 512, N | W, 2), st],
            1,
            0,
        ),
        (
            "4 GiB length",
            vec![hdr, (0x3_0000, u32::MAX, N | W, 2), st],
            1,
            0,
        ),
        (
            "readable after writable",
            vec![hdr, data, (0x5_0000, 16, N, 3), st],
            1,
            0,
        ),
        (
            "no status byte",
            vec![(0x2_0000, 16, N, 1), (0x3_0000, 512, 0, 0)],
            1,
            0,
        ),
        ("short header", vec![(0x2_0000, 8, N, 1), st], 1, 0),
        ("avail index jump", vec![hdr, data, st], 17, 0),
        (
            "indirect table outside memory",
            vec![(HOLE, 48, I, 0)],
            1,
            0,
        ),
        (
            "indirect table of 15 bytes",
            vec![(INDIRECT, 15, I, 0)],
            1,
            0,
        ),
        ("empty indirect table", vec![(INDIRECT, 0, I, 0)], 1, 0),
        ("only zero-length buffers", vec![(0x2_0000, 0, 0, 0)], 1, 0),
    ];
    for (what, descs, idx, head) in cases {
        let (r, _) = blk_case(&descs, idx, head);
        assert!(r.is_err(), "{what}: accepted");
        eprintln!("{what}: {}", r.unwrap_err());
    }

    // Nested indirect tables.
    let mem = hostile_memory();
    write_desc(&mem, INDIRECT, 0, (INDIRECT + 0x100, 48, I, 0));
    write_desc(&mem, DESC, 0, (INDIRECT, 16, I, 0));
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let (_f, disk) = temp_disk(1 << 20);
    let r = BlockQueue::new(
        mem.clone(),
        queue(16, false),
        disk,
        interrupt(1),
        BLK_FEATURES,
    )
    .process();
    assert!(r.is_err(), "nested indirect accepted");
}

#[test]
fn semantic_errors_complete_with_a_status() {
    // Structurally fine requests the device cannot do: a status, no reset.
    for (ty, sector, len, want) in [
        (types::IN, 1u64 << 40, 512, blk::IOERR),
        (types::IN, 0, 100, blk::IOERR),
        (77, 0, 512, blk::UNSUPP),
    ] {
        let mem = hostile_memory();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x2_0000)).unwrap();
        write_desc(&mem, DESC, 0, (0x2_0000, 16, N, 1));
        write_desc(&mem, DESC, 1, (0x3_0000, len, N | W, 2));
        write_desc(&mem, DESC, 2, (0x4_0000, 1, W, 0));
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let (_f, disk) = temp_disk(1 << 20);
        BlockQueue::new(
            mem.clone(),
            queue(16, false),
            disk,
            interrupt(1),
            BLK_FEATURES,
        )
        .process()
        .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4_0000)).unwrap(), want);
    }
}

#[test]
fn wrong_directions_need_a_reset() {
    let mem = hostile_memory();
    write_desc(&mem, DESC, 0, (0x2_0000, 64, 0, 0)); // readable, for an rng
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    assert!(
        RngQueue::new(mem.clone(), queue(16, false), interrupt(1))
            .process()
            .is_err()
    );

    let source = Arc::new(FrameSource {
        frames: Mutex::new(VecDeque::from([vec![0u8; 100]])),
        evt: EventFd::new(0).unwrap(),
    });
    let mut q = NetQueues::new(
        mem.clone(),
        queue(16, false),
        Queue::new(256).unwrap(),
        source.clone(),
        interrupt(2),
        u64::MAX,
    );
    assert!(q.receive().is_err(), "readable receive buffer");
    let mem = hostile_memory();
    write_desc(&mem, DESC, 0, (0x2_0000, 64, W, 0)); // writable, on transmit
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let mut q = NetQueues::new(
        mem.clone(),
        Queue::new(256).unwrap(),
        queue(16, false),
        source,
        interrupt(2),
        u64::MAX,
    );
    assert!(q.transmit().is_err(), "writable transmit buffer");
}

/// Through the transport and worker threads: a malformed chain puts one device into
/// DEVICE_NEEDS_RESET with a configuration interrupt; its neighbour keeps serving;
/// a reset brings the broken one back.
#[test]
fn a_broken_device_needs_reset_and_its_neighbour_keeps_working() {
    let mem = memory(16 << 20);
    let msi = Arc::new(RecordingMsi::default());
    let mut bars = BarAllocator::mmio32();
    let mut files = Vec::new();
    let mut drivers = Vec::new();
    for _ in 0..2 {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .open(file.path())
            .unwrap();
        let dev = VirtioBlock::with_disk(Disk::from_file(f, false, [0; 20]).unwrap());
        let pci =
            VirtioPciDevice::new(Box::new(dev), mem.clone(), &mut bars, msi.clone(), None).unwrap();
        drivers.push(PciDriver::new(Arc::new(Mutex::new(pci))));
        files.push(file);
    }
    let mut qa = DriverQueue::new(&mem, 0x1_0000, 64);
    let mut qb = DriverQueue::new(&mem, 0x2_0000, 64);
    drivers[0].bring_up(u64::MAX, &[&qa], 0x100);
    drivers[1].bring_up(u64::MAX, &[&qb], 0x200);
    // A loop on device A.
    qa.write_desc(&mem, qa.desc, 0, (0x10_0000, 16, DESC_F_NEXT, 0));
    qa.push_avail(&mem, 0);
    qa.publish(&mem);
    drivers[0].notify(0);
    assert!(msi.wait_for(0x101, 1), "configuration interrupt (vector 1)");
    assert_ne!(drivers[0].status() & status::DEVICE_NEEDS_RESET, 0);
    // Device B serves a read.
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&types::IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x30_0000)).unwrap();
    qb.add(
        &mem,
        &[
            (0x30_0000, 16, false),
            (0x31_0000, 4096, true),
            (0x32_0000, 1, true),
        ],
    );
    qb.publish(&mem);
    drivers[1].notify(0);
    qb.wait_used(&mem, 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x32_0000)).unwrap(),
        blk::OK
    );
    assert_eq!(drivers[1].status() & status::DEVICE_NEEDS_RESET, 0);
    // Reset A and use it again.
    drivers[0].set_status(0);
    assert_eq!(drivers[0].status(), 0);
    let mut qa = DriverQueue::new(&mem, 0x1_0000, 64);
    drivers[0].bring_up(u64::MAX, &[&qa], 0x100);
    qa.add(
        &mem,
        &[
            (0x30_0000, 16, false),
            (0x31_0000, 4096, true),
            (0x33_0000, 1, true),
        ],
    );
    qa.publish(&mem);
    drivers[0].notify(0);
    qa.wait_used(&mem, 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x33_0000)).unwrap(),
        blk::OK
    );
}
