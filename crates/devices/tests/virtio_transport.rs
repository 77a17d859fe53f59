//! The PCI transport, virtio-rng and virtio-console, driven through configuration
//! space and the BAR as a driver would.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use devices::pci::{BarAllocator, PciRoot};
use devices::virtio::console::VirtioConsole;
use devices::virtio::rng::VirtioRng;
use devices::virtio::{BAR_SIZE, VirtioPciDevice, features, status};
use vm_memory::{Bytes, GuestAddress};

const MSI_BASE: u32 = 0x60;

fn rng_device(mem: &Mem, msi: Arc<RecordingMsi>) -> Arc<Mutex<VirtioPciDevice<Mem>>> {
    Arc::new(Mutex::new(
        VirtioPciDevice::new(
            Box::new(VirtioRng::new()),
            mem.clone(),
            &mut BarAllocator::mmio32(),
            msi,
            None,
        )
        .unwrap(),
    ))
}

#[test]
fn bar_sizing_and_placement() {
    let mem = memory(1 << 20);
    let mut bars = BarAllocator::mmio32();
    let a = VirtioPciDevice::new(
        Box::new(VirtioRng::new()),
        mem.clone(),
        &mut bars,
        Arc::new(RecordingMsi::default()),
        None,
    )
    .unwrap();
    let b = VirtioPciDevice::new(
        Box::new(VirtioRng::new()),
        mem.clone(),
        &mut bars,
        Arc::new(RecordingMsi::default()),
        None,
    )
    .unwrap();
    let (base_a, len) = a.bar_window();
    let (base_b, _) = b.bar_window();
    assert_eq!(len, BAR_SIZE);
    assert_eq!(base_a, 0xc000_0000);
    assert_eq!(base_b, 0xc000_0000 + BAR_SIZE);
    let drv = PciDriver::new(Arc::new(Mutex::new(a)));
    assert_eq!(drv.cfg_read(0x10, 4), 0xc000_0004, "64-bit memory BAR");
    assert_eq!(drv.cfg_read(0x14, 4), 0);
    drv.cfg_write(0x10, 4, u32::MAX);
    drv.cfg_write(0x14, 4, u32::MAX);
    assert_eq!(drv.cfg_read(0x10, 4), !(BAR_SIZE as u32 - 1) | 4);
    assert_eq!(drv.cfg_read(0x14, 4), u32::MAX);
    drv.cfg_write(0x10, 4, 0xc000_0000);
    drv.cfg_write(0x14, 4, 0);
    assert_eq!(drv.cfg_read(0x10, 4), 0xc000_0004);
    // Unused BARs read zero whatever is written.
    drv.cfg_write(0x18, 4, u32::MAX);
    assert_eq!(drv.cfg_read(0x18, 4), 0);
    // notify addresses follow the capability: BAR + notify offset + 4 * queue.
    let dev = drv.dev.lock().unwrap();
    let ev = dev.notify_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, base_a + drv.caps.notify);
}

#[test]
fn root_complex_reaches_devices_in_free_slots() {
    let mem = memory(1 << 20);
    let dev = rng_device(&mem, Arc::new(RecordingMsi::default()));
    let mut root = PciRoot::new();
    assert_eq!(root.free_slot(), Some(1));
    let slot = root.add_next(dev.clone()).unwrap();
    assert_eq!(slot, 1);
    assert_eq!(root.free_slot(), Some(2));
    let root = Arc::new(Mutex::new(root));
    let mut ecam = devices::pci::Ecam::new(root);
    let mut id = [0u8; 4];
    devices::bus::BusDevice::read(&mut ecam, u64::from(slot) << 15, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let mem = memory(1 << 20);
    let drv = PciDriver::new(rng_device(&mem, Arc::new(RecordingMsi::default())));
    let offered = drv.device_features();
    assert_ne!(offered & features::VERSION_1, 0);
    drv.set_status(status::ACKNOWLEDGE | status::DRIVER);
    drv.common_write(0x08, 4, 0);
    drv.common_write(0x0c, 4, 1 << 3); // not offered
    drv.common_write(0x08, 4, 1);
    drv.common_write(0x0c, 4, 1); // VERSION_1
    drv.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(drv.status() & status::FEATURES_OK, 0, "refused");
    // Without VERSION_1 (a legacy driver) too.
    drv.set_status(0);
    drv.set_status(status::ACKNOWLEDGE | status::DRIVER);
    drv.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(drv.status() & status::FEATURES_OK, 0);
    // A subset is accepted.
    let f = drv.negotiate(features::VERSION_1);
    assert_eq!(f, features::VERSION_1);
}

#[test]
fn queue_registers_are_checked() {
    let mem = memory(1 << 20);
    let drv = PciDriver::new(rng_device(&mem, Arc::new(RecordingMsi::default())));
    drv.negotiate(u64::MAX);
    assert_eq!(drv.common_read(0x12, 2), 1, "num_queues");
    drv.common_write(0x16, 2, 0);
    assert_eq!(drv.common_read(0x18, 2), 256);
    for bad in [0u64, 3, 512, 0xffff] {
        drv.common_write(0x18, 2, bad);
        assert_eq!(drv.common_read(0x18, 2), 256, "size {bad} refused");
    }
    drv.common_write(0x18, 2, 64);
    assert_eq!(drv.common_read(0x18, 2), 64);
    // A queue that does not exist reads size 0; vectors the table lacks read NO_VECTOR.
    drv.common_write(0x16, 2, 1);
    assert_eq!(drv.common_read(0x18, 2), 0);
    drv.common_write(0x16, 2, 0);
    drv.common_write(0x1a, 2, 7);
    assert_eq!(drv.common_read(0x1a, 2), 0xffff);
    drv.common_write(0x10, 2, 1);
    assert_eq!(drv.common_read(0x10, 2), 1);
    // 64-bit addresses in halves and whole.
    drv.common_write(0x20, 4, 0x1234_5000);
    drv.common_write(0x24, 4, 0x1);
    assert_eq!(drv.common_read(0x20, 8), 0x1_1234_5000);
    drv.common_write(0x28, 8, 0x2000);
    assert_eq!(drv.common_read(0x28, 4), 0x2000);
    // Rings outside guest memory: DRIVER_OK puts the device into needs-reset.
    drv.common_write(0x30, 8, 0x3000);
    drv.common_write(0x1c, 2, 1);
    drv.driver_ok();
    assert_ne!(drv.status() & status::DEVICE_NEEDS_RESET, 0);
    // Reset clears it all.
    drv.set_status(0);
    assert_eq!(drv.status(), 0);
    assert_eq!(drv.common_read(0x18, 2), 256);
    assert_eq!(drv.common_read(0x1c, 2), 0);
    assert_eq!(drv.common_read(0x10, 2), 0xffff);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let mem = memory(1 << 20);
    let drv = PciDriver::new(rng_device(&mem, Arc::new(RecordingMsi::default())));
    let cap = drv.caps.pci_cfg;
    drv.cfg_write(cap + 4, 1, 0); // BAR 0
    drv.cfg_write(cap + 8, 4, (drv.caps.common + 0x12) as u32); // num_queues
    drv.cfg_write(cap + 12, 4, 2);
    assert_eq!(drv.cfg_read(cap + 16, 2), 1);
    // Writes go through too: device status.
    drv.cfg_write(cap + 8, 4, (drv.caps.common + 0x14) as u32);
    drv.cfg_write(cap + 12, 4, 1);
    drv.cfg_write(cap + 16, 1, u32::from(status::ACKNOWLEDGE));
    assert_eq!(drv.status(), status::ACKNOWLEDGE);
}

#[test]
fn rng_fills_buffers_and_interrupts() {
    let mem = memory(4 << 20);
    let msi = Arc::new(RecordingMsi::default());
    let drv = PciDriver::new(rng_device(&mem, msi.clone()));
    let mut q = DriverQueue::new(&mem, 0x1_0000, 64);
    drv.bring_up(u64::MAX, &[&q], MSI_BASE);
    let bufs = [
        (0x10_0000u64, 64u32),
        (0x11_0000, 4096),
        (0x12_0000, 100_000),
    ];
    for (addr, len) in bufs {
        q.add(&mem, &[(addr, len, true)]);
    }
    q.publish(&mem);
    drv.notify(0);
    let used = q.wait_used(&mem, 3);
    assert_eq!(used[0].1, 64);
    assert_eq!(used[1].1, 4096);
    assert_eq!(used[2].1, 65536, "one request gets at most 64 KiB");
    let mut b = vec![0u8; 4096];
    mem.read_slice(&mut b, GuestAddress(0x11_0000)).unwrap();
    assert!(
        b.iter().filter(|x| **x == 0).count() < 100,
        "random, not zeroes"
    );
    assert!(msi.wait_for(MSI_BASE, 1));
    assert_eq!(drv.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[derive(Clone, Default)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);
impl Write for SharedOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn console_both_directions() {
    let mem = memory(4 << 20);
    let msi = Arc::new(RecordingMsi::default());
    let out = SharedOut::default();
    let console = VirtioConsole::new(Box::new(out.clone())).unwrap();
    let input = console.input();
    // Input typed before the driver is ready waits for it.
    assert_eq!(input.push(b"early "), 6);
    let dev = VirtioPciDevice::new(
        Box::new(console),
        mem.clone(),
        &mut BarAllocator::mmio32(),
        msi.clone(),
        None,
    )
    .unwrap();
    let drv = PciDriver::new(Arc::new(Mutex::new(dev)));
    assert_eq!(drv.cfg_read(0, 4), 0x1043_1af4);
    let mut rx = DriverQueue::new(&mem, 0x1_0000, 64);
    let mut tx = DriverQueue::new(&mem, 0x2_0000, 64);
    drv.bring_up(u64::MAX, &[&rx, &tx], MSI_BASE);

    // Guest to host.
    mem.write_slice(b"hello, ", GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(b"host\n", GuestAddress(0x10_1000)).unwrap();
    tx.add(&mem, &[(0x10_0000, 7, false), (0x10_1000, 5, false)]);
    tx.publish(&mem);
    drv.notify(1);
    tx.wait_used(&mem, 1);
    assert_eq!(&out.0.lock().unwrap()[..], b"hello, host\n");
    assert!(msi.wait_for(MSI_BASE + 1, 1), "tx interrupt on vector 1");

    // Host to guest: pending input arrives once buffers are there.
    rx.add(&mem, &[(0x20_0000, 4, true)]);
    rx.add(&mem, &[(0x20_1000, 64, true)]);
    rx.publish(&mem);
    drv.notify(0);
    let used = rx.wait_used(&mem, 2);
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), 6);
    input.push(b"typed");
    rx.add(&mem, &[(0x20_2000, 64, true)]);
    rx.publish(&mem);
    drv.notify(0);
    let used = rx.wait_used(&mem, 1);
    assert_eq!(used[0].1, 5);
    let mut got = vec![0u8; 5];
    mem.read_slice(&mut got, GuestAddress(0x20_2000)).unwrap();
    assert_eq!(&got, b"typed");
    let mut first = vec![0u8; 4];
    mem.read_slice(&mut first, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&first, b"earl");
    assert!(msi.wait_for(MSI_BASE, 2), "rx interrupts on vector 0");

    // Emergency write through the configuration space.
    drv.bar_write(drv.caps.device + 8, 4, u64::from(b'!'));
    assert_eq!(out.0.lock().unwrap().last(), Some(&b'!'));
}

#[test]
fn msix_masking_holds_interrupts_in_the_pba() {
    let mem = memory(4 << 20);
    let msi = Arc::new(RecordingMsi::default());
    let drv = PciDriver::new(rng_device(&mem, msi.clone()));
    let mut q = DriverQueue::new(&mem, 0x1_0000, 64);
    drv.bring_up(u64::MAX, &[&q], MSI_BASE);
    // Mask vector 0, use the queue, see the pending bit, unmask, get the message.
    drv.bar_write(drv.caps.msix_table + 12, 4, 1);
    q.add(&mem, &[(0x10_0000, 16, true)]);
    q.publish(&mem);
    drv.notify(0);
    q.wait_used(&mem, 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while drv.bar_read(drv.caps.msix_pba, 8) & 1 == 0 {
        assert!(std::time::Instant::now() < deadline, "pending bit");
        std::thread::yield_now();
    }
    assert_eq!(msi.count(MSI_BASE), 0);
    drv.bar_write(drv.caps.msix_table + 12, 4, 0);
    assert_eq!(msi.count(MSI_BASE), 1);
    assert_eq!(drv.bar_read(drv.caps.msix_pba, 8), 0);
    // The message control register's function mask works the same way.
    let control = drv.caps.msix + 2;
    drv.cfg_write(control, 2, 0xc000);
    q.add(&mem, &[(0x10_0000, 16, true)]);
    q.publish(&mem);
    drv.notify(0);
    q.wait_used(&mem, 1);
    while drv.bar_read(drv.caps.msix_pba, 8) & 1 == 0 {
        assert!(std::time::Instant::now() < deadline, "pending bit");
        std::thread::yield_now();
    }
    drv.cfg_write(control, 2, 0x8000);
    assert_eq!(msi.count(MSI_BASE), 2);
}
