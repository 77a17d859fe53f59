//! virtio-blk driven as a driver would: through the PCI transport, with the device's
//! own worker thread serving the queue.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};

use common::*;
use devices::pci::BarAllocator;
use devices::virtio::block::request::{status as blk, types};
use devices::virtio::block::{Disk, VirtioBlock, feature_bits};
use devices::virtio::{VirtioPciDevice, features, status};
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 0x20_0000;
const STATUS: u64 = 0x20_1000;
const DATA: u64 = 0x30_0000;
const DATA2: u64 = 0x80_0000;
const MSI_BASE: u32 = 0x40;
const MIB: u64 = 1 << 20;

struct Blk {
    mem: Mem,
    msi: Arc<RecordingMsi>,
    drv: PciDriver,
    q: DriverQueue,
    file: tempfile::NamedTempFile,
    features: u64,
}

fn setup_with(readonly: bool, size: u64, wanted: u64) -> Blk {
    let mem = memory(16 << 20);
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(size).unwrap();
    let f = File::options()
        .read(true)
        .write(!readonly)
        .open(file.path())
        .unwrap();
    let mut id = [0u8; 20];
    id[..16].copy_from_slice(b"vessel-test-disk");
    let disk = Disk::from_file(f, readonly, id).unwrap();
    let msi = Arc::new(RecordingMsi::default());
    let pci = VirtioPciDevice::new(
        Box::new(VirtioBlock::with_disk(disk)),
        mem.clone(),
        &mut BarAllocator::mmio32(),
        msi.clone(),
        None,
    )
    .unwrap();
    let drv = PciDriver::new(Arc::new(Mutex::new(pci)));
    let q = DriverQueue::new(&mem, 0x1_0000, 256);
    let features = drv.bring_up(wanted, &[&q], MSI_BASE);
    assert_eq!(drv.status() & status::DEVICE_NEEDS_RESET, 0);
    Blk {
        mem,
        msi,
        drv,
        q,
        file,
        features,
    }
}

fn setup(readonly: bool, size: u64) -> Blk {
    setup_with(readonly, size, u64::MAX)
}

impl Blk {
    /// One request: header, `data` buffers, status byte. Returns (status, used len).
    fn req(&mut self, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS, 1, true));
        self.submit(&bufs)
    }

    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
        let before = self.msi.count(MSI_BASE);
        let head = self.q.add(&self.mem, bufs);
        self.q.publish(&self.mem);
        self.drv.notify(0);
        let used = self.q.wait_used(&self.mem, 1);
        assert_eq!(used[0].0, u32::from(head));
        assert!(self.msi.wait_for(MSI_BASE, before + 1), "queue interrupt");
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used[0].1)
    }

    fn blocks(&self) -> u64 {
        self.file.as_file().metadata().unwrap().blocks()
    }

    fn fill(&self, addr: u64, len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        Rng::new(seed).fill(&mut v);
        self.mem.write_slice(&v, GuestAddress(addr)).unwrap();
        v
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn config_space_and_features() {
    let b = setup(false, 8 * MIB);
    assert_eq!(b.drv.cfg_read(0, 4), 0x1042_1af4);
    assert_eq!(b.drv.cfg_read(8, 1), 1, "modern devices have revision >= 1");
    assert_eq!(b.drv.device_config(0, 8), 8 * MIB / 512, "capacity");
    assert_eq!(b.drv.device_config(0x0c, 4), 254, "seg_max");
    assert_eq!(b.drv.device_config(0x28, 4), 32, "max_discard_seg");
    let f = b.features;
    assert_ne!(f & features::VERSION_1, 0);
    assert_ne!(f & feature_bits::FLUSH, 0);
    assert_ne!(f & feature_bits::DISCARD, 0);
    assert_eq!(f & feature_bits::RO, 0);
}

#[test]
fn write_then_read_back_through_split_buffers() {
    let mut b = setup(false, 8 * MIB);
    let data = b.fill(DATA, 8192, 1);
    assert_eq!(
        b.req(
            types::OUT,
            8,
            &[(DATA, 5000, false), (DATA + 5000, 3192, false)]
        ),
        (blk::OK, 1)
    );
    let mut on_disk = vec![0u8; 8192];
    b.file.as_file().read_exact_at(&mut on_disk, 4096).unwrap();
    assert_eq!(on_disk, data);
    let (s, len) = b.req(
        types::IN,
        8,
        &[
            (DATA2, 1000, true),
            (DATA2 + 4096, 3000, true),
            (DATA2 + 12288, 4192, true),
        ],
    );
    assert_eq!((s, len), (blk::OK, 8193));
    let mut back = b.guest(DATA2, 1000);
    back.extend(b.guest(DATA2 + 4096, 3000));
    back.extend(b.guest(DATA2 + 12288, 4192));
    assert_eq!(back, data);
    assert!(b.msi.messages().iter().all(|m| m.0 == MSI_ADDRESS));
}

#[test]
fn reads_see_the_host_file_and_one_mib_requests_work() {
    let mut b = setup(false, 8 * MIB);
    let mut content = vec![0u8; MIB as usize];
    Rng::new(7).fill(&mut content);
    b.file.as_file().write_all_at(&content, 2 * MIB).unwrap();
    let (s, len) = b.req(types::IN, 2 * MIB / 512, &[(DATA, MIB as u32, true)]);
    assert_eq!((s, len), (blk::OK, MIB as u32 + 1));
    assert_eq!(b.guest(DATA, MIB as usize), content);
}

#[test]
fn header_split_over_descriptors_and_indirect_chains() {
    let mut b = setup(false, MIB);
    let data = b.fill(DATA, 512, 3);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&types::OUT.to_le_bytes());
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    b.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let bufs = [
        (HDR, 5, false),
        (HDR + 5, 11, false),
        (DATA, 512, false),
        (STATUS, 1, true),
    ];
    assert_eq!(b.submit(&bufs).0, blk::OK);
    let mut on_disk = vec![0u8; 512];
    b.file
        .as_file()
        .read_exact_at(&mut on_disk, 3 * 512)
        .unwrap();
    assert_eq!(on_disk, data);

    // The same request through an indirect table.
    h[0..4].copy_from_slice(&types::IN.to_le_bytes());
    b.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let before = b.msi.count(MSI_BASE);
    b.q.add_indirect(
        &b.mem,
        0x40_0000,
        &[(HDR, 16, false), (DATA2, 512, true), (STATUS, 1, true)],
    );
    b.q.publish(&b.mem);
    b.drv.notify(0);
    let used = b.q.wait_used(&b.mem, 1);
    assert_eq!(used[0].1, 513);
    assert!(b.msi.wait_for(MSI_BASE, before + 1));
    assert_eq!(b.guest(DATA2, 512), data);
    assert_eq!(
        b.features & features::RING_INDIRECT_DESC,
        features::RING_INDIRECT_DESC
    );
}

#[test]
fn flush_and_get_id() {
    let mut b = setup(false, MIB);
    b.fill(DATA, 512, 4);
    assert_eq!(b.req(types::OUT, 0, &[(DATA, 512, false)]).0, blk::OK);
    assert_eq!(b.req(types::FLUSH, 0, &[]), (blk::OK, 1));
    let (s, len) = b.req(types::GET_ID, 0, &[(DATA2, 20, true)]);
    assert_eq!((s, len), (blk::OK, 21));
    let id = b.guest(DATA2, 20);
    assert_eq!(&id[..17], b"vessel-test-disk\0");
    assert_eq!(id[16..], [0; 4]);
}

#[test]
fn discard_punches_holes_and_reads_back_zeroes() {
    let mut b = setup(false, 8 * MIB);
    // Allocate 4 MiB of real data.
    let mut content = vec![0u8; 4 * MIB as usize];
    Rng::new(9).fill(&mut content);
    b.file.as_file().write_all_at(&content, 0).unwrap();
    b.file.as_file().sync_all().unwrap();
    let before = b.blocks();
    assert!(before >= 4 * MIB / 512, "allocated: {before} blocks");
    // One range: 2 MiB from sector 2048 (1 MiB in).
    let mut range = [0u8; 16];
    range[0..8].copy_from_slice(&2048u64.to_le_bytes());
    range[8..12].copy_from_slice(&4096u32.to_le_bytes());
    b.mem.write_slice(&range, GuestAddress(DATA)).unwrap();
    assert_eq!(b.req(types::DISCARD, 0, &[(DATA, 16, false)]), (blk::OK, 1));
    let after = b.blocks();
    assert!(
        after <= before - 2 * MIB / 512 + 64,
        "the file shrank: {before} -> {after} blocks"
    );
    let (s, _) = b.req(types::IN, 2048, &[(DATA2, 2 * MIB as u32, true)]);
    assert_eq!(s, blk::OK);
    assert!(b.guest(DATA2, 2 * MIB as usize).iter().all(|x| *x == 0));
    // The data around the hole is untouched.
    let (s, _) = b.req(types::IN, 0, &[(DATA2, MIB as u32, true)]);
    assert_eq!(s, blk::OK);
    assert_eq!(b.guest(DATA2, MIB as usize), content[..MIB as usize]);
    // Discard takes no flags; a payload that is not whole ranges is unsupported.
    range[12..16].copy_from_slice(&1u32.to_le_bytes());
    b.mem.write_slice(&range, GuestAddress(DATA)).unwrap();
    assert_eq!(
        b.req(types::DISCARD, 0, &[(DATA, 16, false)]).0,
        blk::UNSUPP
    );
    assert_eq!(
        b.req(types::DISCARD, 0, &[(DATA, 15, false)]).0,
        blk::UNSUPP
    );
    assert_eq!(b.req(types::DISCARD, 0, &[]).0, blk::UNSUPP);
    // A range past the end is an I/O error.
    range[0..8].copy_from_slice(&(8 * MIB / 512 - 1).to_le_bytes());
    range[12..16].copy_from_slice(&0u32.to_le_bytes());
    b.mem.write_slice(&range, GuestAddress(DATA)).unwrap();
    assert_eq!(b.req(types::DISCARD, 0, &[(DATA, 16, false)]).0, blk::IOERR);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let mut b = setup(false, 8 * MIB);
    let mut content = vec![0x5au8; 4 * MIB as usize];
    content[0] = 1;
    b.file.as_file().write_all_at(&content, 0).unwrap();
    b.file.as_file().sync_all().unwrap();
    let before = b.blocks();
    let mut ranges = [0u8; 32];
    // 1 MiB at sector 0, keep allocated; 1 MiB at 2 MiB, unmap.
    ranges[8..12].copy_from_slice(&2048u32.to_le_bytes());
    ranges[16..24].copy_from_slice(&4096u64.to_le_bytes());
    ranges[24..28].copy_from_slice(&2048u32.to_le_bytes());
    ranges[28..32].copy_from_slice(&1u32.to_le_bytes());
    b.mem.write_slice(&ranges, GuestAddress(DATA)).unwrap();
    assert_eq!(
        b.req(types::WRITE_ZEROES, 0, &[(DATA, 32, false)]),
        (blk::OK, 1)
    );
    let after = b.blocks();
    assert!(
        after <= before - MIB / 512 + 64 && after >= before - 2 * MIB / 512,
        "only the unmapped range was deallocated: {before} -> {after}"
    );
    let mut back = vec![0u8; 4 * MIB as usize];
    let mut f = File::open(b.file.path()).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back[..MIB as usize].iter().all(|x| *x == 0));
    assert!(
        back[MIB as usize..2 * MIB as usize]
            .iter()
            .all(|x| *x == 0x5a)
    );
    assert!(
        back[2 * MIB as usize..3 * MIB as usize]
            .iter()
            .all(|x| *x == 0)
    );
    // Unknown flags are unsupported.
    ranges[28..32].copy_from_slice(&2u32.to_le_bytes());
    b.mem.write_slice(&ranges, GuestAddress(DATA)).unwrap();
    assert_eq!(
        b.req(types::WRITE_ZEROES, 0, &[(DATA, 32, false)]).0,
        blk::UNSUPP
    );
}

#[test]
fn readonly_disks_refuse_writes() {
    let mut b = setup(true, MIB);
    assert_ne!(b.features & feature_bits::RO, 0);
    assert_eq!(
        b.features & (feature_bits::DISCARD | feature_bits::WRITE_ZEROES),
        0
    );
    b.fill(DATA, 512, 5);
    assert_eq!(b.req(types::OUT, 0, &[(DATA, 512, false)]), (blk::IOERR, 1));
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    b.mem.write_slice(&range, GuestAddress(DATA)).unwrap();
    assert_eq!(
        b.req(types::DISCARD, 0, &[(DATA, 16, false)]).0,
        blk::UNSUPP
    );
    let mut on_disk = vec![0u8; 512];
    b.file.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk.iter().all(|x| *x == 0));
    assert_eq!(b.req(types::IN, 0, &[(DATA2, 512, true)]).0, blk::OK);
    assert_eq!(b.req(types::FLUSH, 0, &[]).0, blk::OK);
}

#[test]
fn out_of_range_and_odd_requests_fail_cleanly() {
    let mut b = setup(false, MIB);
    let sectors = MIB / 512;
    assert_eq!(
        b.req(types::IN, sectors, &[(DATA, 512, true)]).0,
        blk::IOERR
    );
    assert_eq!(
        b.req(types::IN, sectors - 1, &[(DATA, 1024, true)]).0,
        blk::IOERR
    );
    assert_eq!(
        b.req(types::IN, u64::MAX, &[(DATA, 512, true)]).0,
        blk::IOERR
    );
    assert_eq!(
        b.req(types::OUT, u64::MAX / 512, &[(DATA, 512, false)]).0,
        blk::IOERR
    );
    assert_eq!(b.req(types::IN, 0, &[(DATA, 100, true)]).0, blk::IOERR);
    assert_eq!(b.req(99, 0, &[]), (blk::UNSUPP, 1));
    assert_eq!(
        b.req(10, 0, &[(DATA, 16, true)]).0,
        blk::UNSUPP,
        "GET_LIFETIME"
    );
    // Buffers running the wrong way for the request type.
    assert_eq!(b.req(types::IN, 0, &[(DATA, 512, false)]).0, blk::IOERR);
    assert_eq!(b.req(types::OUT, 0, &[(DATA, 512, true)]).0, blk::IOERR);
    // The last sector is fine.
    assert_eq!(
        b.req(types::IN, sectors - 1, &[(DATA, 512, true)]).0,
        blk::OK
    );
    assert_eq!(b.drv.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn works_without_event_idx_and_after_a_reset() {
    let mut b = setup_with(false, MIB, !features::RING_EVENT_IDX);
    assert_eq!(b.features & features::RING_EVENT_IDX, 0);
    for i in 0..20 {
        b.fill(DATA, 512, i);
        assert_eq!(b.req(types::OUT, i, &[(DATA, 512, false)]).0, blk::OK);
    }
    // Reset, then bring the device up again on fresh rings.
    b.drv.set_status(0);
    assert_eq!(b.drv.status(), 0);
    b.q = DriverQueue::new(&b.mem, 0x1_0000, 128);
    let q = b.q.clone();
    b.drv.bring_up(u64::MAX, &[&q], MSI_BASE);
    assert_eq!(b.req(types::IN, 19, &[(DATA2, 512, true)]).0, blk::OK);
    let mut expect = vec![0u8; 512];
    Rng::new(19).fill(&mut expect);
    assert_eq!(b.guest(DATA2, 512), expect);
}

#[test]
fn many_requests_in_one_notification() {
    let mut b = setup(false, 4 * MIB);
    let before = b.msi.count(MSI_BASE);
    let mut heads = Vec::new();
    for i in 0..64u64 {
        let hdr = 0x50_0000 + i * 32;
        let st = hdr + 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&types::OUT.to_le_bytes());
        h[8..16].copy_from_slice(&(i * 8).to_le_bytes());
        b.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        b.mem
            .write_slice(&[i as u8; 4096], GuestAddress(DATA + i * 4096))
            .unwrap();
        heads.push(b.q.add(
            &b.mem,
            &[
                (hdr, 16, false),
                (DATA + i * 4096, 4096, false),
                (st, 1, true),
            ],
        ));
    }
    b.q.publish(&b.mem);
    b.drv.notify(0);
    let used = b.q.wait_used(&b.mem, 64);
    assert_eq!(used.iter().map(|u| u.0 as u16).collect::<Vec<_>>(), heads);
    assert!(b.msi.wait_for(MSI_BASE, before + 1));
    for i in 0..64u64 {
        let mut on_disk = vec![0u8; 4096];
        b.file
            .as_file()
            .read_exact_at(&mut on_disk, i * 4096)
            .unwrap();
        assert!(on_disk.iter().all(|x| *x == i as u8));
        assert_eq!(
            b.mem
                .read_obj::<u8>(GuestAddress(0x50_0000 + i * 32 + 16))
                .unwrap(),
            0
        );
    }
}
