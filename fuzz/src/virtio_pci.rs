//! The PCI root complex with a virtio function in slot 1, as a guest's PCI and virtio
//! drivers reach them: configuration space through ports 0xCF8-0xCFF (and the reset
//! control register at 0xCF9) and through ECAM, the function's BAR (common
//! configuration, ISR, device configuration, notifications, MSI-X table and pending
//! bits), and the device raising interrupts. The function is the real transport
//! around a real device's configuration (entropy, console, balloon or network); what
//! the transport hands the device at DRIVER_OK is checked instead of starting it.
//!
//! Checked: activation gets the device's queue count, features it offered (with
//! VERSION_1), ready queues of a power-of-two size up to the maximum with every ring
//! inside guest RAM; FEATURES_OK never stays set on features the device did not offer;
//! a status write of 0 resets the queues; every MSI-X message sent is an unmasked
//! entry of an enabled, unmasked table; INTx is low after the ISR is read; IDs, class
//! and capability pointer never change; a snapshot of the function restores to the
//! same state; the reset control resets only on bit 2.
//!
//! Input: device (byte 0 % 4), then operations, each a byte (bits 0-3 kind, bits 4-5
//! access width 1/2/4/8) and its fields: 0 port read (port - 0xCF8), 1 port write
//! (port, value), 2 ECAM read (offset u32), 3 ECAM write (offset, value), 4 BAR read
//! (offset u16, see [`bar_offset`]), 5 BAR write (offset, value), 6 the device
//! signals (queue u8; 0xff the configuration), 7 configuration changed, 8 snapshot
//! round trip, 9 activation starts or stops failing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, ports};
use devices::Bus;
use devices::interrupt::{IrqLine, MsiSink};
use devices::legacy::ResetControl;
use devices::pci::{BarAllocator, ConfigAddressPort, Ecam, PciRoot};
use devices::reclaim::{Backing, Reclaimer};
use devices::virtio::balloon::VirtioBalloon;
use devices::virtio::console::VirtioConsole;
use devices::virtio::net::{NetCounters, VirtioNet};
use devices::virtio::rng::VirtioRng;
use devices::virtio::{
    ActivateError, Activation, DeviceType, VirtioDevice, VirtioPciDevice, features, status,
};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::driver::REGIONS;
use crate::ops::{Ops, Program, access_len};
use crate::virtio_net::MemoryBackend;

type Mem = GuestMemoryMmap;

/// A BAR offset from 16 bits: the top three pick a structure, the rest an offset
/// inside it (a little past its end too).
pub fn bar_offset(v: u16) -> u64 {
    const BASE: [(u64, u16); 8] = [
        (0x0000, 0x3f),   // common configuration
        (0x1000, 0x7),    // ISR
        (0x2000, 0x3f),   // device configuration
        (0x3000, 0x1f),   // notifications
        (0x4000, 0xff),   // MSI-X table
        (0x6000, 0x1f),   // pending bits
        (0x4000, 0x1fff), // anywhere in the table's window
        (0x0000, 0x1fff), // anywhere
    ];
    let (base, mask) = BASE[usize::from(v >> 13)];
    base + u64::from(v & mask)
}

/// Stands in for the device at DRIVER_OK: checks what the transport hands over.
struct Probe {
    inner: Box<dyn VirtioDevice<Mem>>,
    mem: Mem,
    fail: Arc<AtomicBool>,
    activations: Arc<AtomicUsize>,
}

impl VirtioDevice<Mem> for Probe {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.inner.queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data)
    }

    fn activate(&mut self, a: Activation<Mem>) -> Result<(), ActivateError> {
        let max = self.inner.queue_max_sizes();
        assert_eq!(a.queues.len(), max.len(), "one queue per declared queue");
        assert_eq!(a.queue_events.len(), max.len());
        let offered = self.inner.features() | features::VERSION_1;
        assert_eq!(
            a.features & !offered,
            0,
            "features the device never offered"
        );
        assert_ne!(
            a.features & features::VERSION_1,
            0,
            "activated without VERSION_1"
        );
        for (q, m) in a.queues.iter().zip(&max) {
            use virtio_queue::QueueT;
            if !q.ready() {
                continue;
            }
            let size = q.size();
            assert!(size.is_power_of_two() && size <= *m, "queue size {size}");
            let n = u64::from(size);
            for (addr, len, access) in [
                (q.desc_table(), 16 * n, Permissions::Read),
                (q.avail_ring(), 6 + 2 * n, Permissions::Read),
                (q.used_ring(), 6 + 8 * n, Permissions::Write),
            ] {
                assert!(
                    self.mem
                        .check_range(GuestAddress(addr), len as usize, access),
                    "a ring at {addr:#x}+{len:#x} outside guest RAM"
                );
            }
        }
        self.activations.fetch_add(1, Ordering::Relaxed);
        if self.fail.load(Ordering::Relaxed) {
            return Err(ActivateError::Backend("the harness says no".into()));
        }
        Ok(())
    }

    fn reset(&mut self) {}
}

/// MSI messages as sent.
#[derive(Default)]
struct Messages(Mutex<Vec<(u64, u32)>>);

impl MsiSink for Messages {
    fn send(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.0.lock().expect("messages").push((address, data));
        Ok(())
    }
}

#[derive(Default)]
struct Level(AtomicBool);

impl IrqLine for Level {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        self.0.store(high, Ordering::Relaxed);
        Ok(())
    }
}

fn device(kind: u8) -> Box<dyn VirtioDevice<Mem>> {
    match kind % 4 {
        0 => Box::new(VirtioRng::new()),
        1 => Box::new(VirtioConsole::new(Box::new(std::io::sink())).expect("an eventfd")),
        2 => Box::new(VirtioBalloon::new(Reclaimer::new(Backing::Private))),
        _ => Box::new(VirtioNet::new(
            Arc::new(MemoryBackend::default()),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            Arc::new(NetCounters::default()),
        )),
    }
}

/// What the function reports to: MSI-X messages, the INTx level, activations, and
/// whether activation fails.
#[derive(Default)]
struct Wiring {
    messages: Arc<Messages>,
    intx: Arc<Level>,
    fail: Arc<AtomicBool>,
    activations: Arc<AtomicUsize>,
}

fn new_function(kind: u8, mem: &Mem, w: &Wiring) -> VirtioPciDevice<Mem> {
    let probe = Probe {
        inner: device(kind),
        mem: mem.clone(),
        fail: w.fail.clone(),
        activations: w.activations.clone(),
    };
    let intx: Arc<dyn IrqLine> = w.intx.clone();
    VirtioPciDevice::new(
        Box::new(probe),
        mem.clone(),
        &mut BarAllocator::mmio32(),
        w.messages.clone(),
        Some(intx),
    )
    .expect("a virtio function")
}

struct Machine {
    kind: u8,
    mem: Mem,
    wiring: Wiring,
    function: Arc<Mutex<VirtioPciDevice<Mem>>>,
    io: Bus,
    mmio: Bus,
    bar: u64,
    resets: Arc<AtomicUsize>,
    /// IDs, class, subsystem and capability pointer of slots 0 and 1.
    identity: Vec<u8>,
}

impl Machine {
    fn new(kind: u8) -> Self {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|(a, l)| (GuestAddress(*a), *l))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
        let wiring = Wiring::default();
        let function = new_function(kind, &mem, &wiring);
        let (bar, len) = function.bar_window();
        let function = Arc::new(Mutex::new(function));
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock().expect("root").add(1, function.clone());
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let reset = ResetControl::new(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        let config = ConfigAddressPort::new(root.clone()).with_reset_control(Box::new(reset));
        let mut io = Bus::new();
        io.insert(
            u64::from(ports::PCI_CONFIG_ADDRESS),
            8,
            Arc::new(Mutex::new(config)),
        )
        .expect("ports");
        let mut mmio = Bus::new();
        mmio.insert(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(Ecam::new(root))),
        )
        .expect("ECAM");
        mmio.insert(bar, len, function.clone()).expect("the BAR");
        let mut m = Machine {
            kind,
            mem,
            wiring,
            function,
            io,
            mmio,
            bar,
            resets,
            identity: Vec::new(),
        };
        m.identity = m.identity();
        m
    }

    fn identity(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for slot in [0u64, 1] {
            for reg in [0u64, 8, 0x2c, 0x34] {
                let mut d = [0u8; 4];
                self.mmio.read(PCI_ECAM_START + (slot << 15) + reg, &mut d);
                out.extend_from_slice(&d);
            }
        }
        out
    }

    fn check(&self, sent_before: usize) {
        assert_eq!(
            self.identity(),
            self.identity,
            "read-only configuration changed"
        );
        let f = self.function.lock().expect("function");
        let state = f.state();
        let offered = device(self.kind).features() | features::VERSION_1;
        if state.device_status & status::FEATURES_OK != 0 {
            assert_eq!(
                state.driver_features & !offered,
                0,
                "FEATURES_OK on unknown features"
            );
            assert_ne!(state.driver_features & features::VERSION_1, 0);
        }
        let msix = &state.msix;
        let sent = self.wiring.messages.0.lock().expect("messages");
        for m in &sent[sent_before..] {
            assert!(
                msix.enabled && !msix.function_masked,
                "MSI-X message while off"
            );
            let entry = msix
                .entries
                .iter()
                .any(|e| (e.address, e.data) == *m && e.vector_control & 1 == 0);
            assert!(entry, "message {m:?} is no unmasked table entry");
        }
    }

    /// Saves the function, restores it into a new one, and compares.
    fn round_trip(&self) {
        // Activation does not fail during the round trip: the function and its copy
        // resume alike.
        let fail = self.wiring.fail.swap(false, Ordering::Relaxed);
        let mut f = self.function.lock().expect("function");
        f.quiesce();
        let saved = f.save();
        f.resume();
        // Resuming may put it into DEVICE_NEEDS_RESET; its copy must end the same.
        let resumed = f.save();
        drop(f);
        let mut fresh = new_function(self.kind, &self.mem, &self.wiring);
        fresh
            .restore(&saved)
            .expect("a function's own state restores");
        self.wiring.fail.store(fail, Ordering::Relaxed);
        let mut again = fresh.save();
        // Features the driver wrote that the device never offered are dropped.
        let offered = device(self.kind).features() | features::VERSION_1;
        let mut expected = resumed;
        expected.transport.driver_features &= offered;
        again.transport.driver_features &= offered;
        assert_eq!(
            again, expected,
            "a snapshot of the function restores differently"
        );
    }
}

pub fn virtio_pci(data: &[u8]) {
    virtio_pci_activations(data);
}

/// Runs an input; returns how often the device was activated (for the corpus test).
pub fn virtio_pci_activations(data: &[u8]) -> usize {
    let mut ops = Ops::new(data);
    let m = Machine::new(ops.u8());
    let mut buf = [0u8; 8];
    while ops.next_op() {
        let op = ops.u8();
        let len = access_len(op >> 4);
        let sent = m.wiring.messages.0.lock().expect("messages").len();
        let resets = m.resets.load(Ordering::Relaxed);
        let mut expect_resets = resets;
        match op & 0xf {
            0 => {
                let port = u64::from(ports::PCI_CONFIG_ADDRESS) + u64::from(ops.u8() & 7);
                m.io.read(port, &mut buf[..len]);
            }
            1 => {
                let port = u64::from(ports::PCI_CONFIG_ADDRESS) + u64::from(ops.u8() & 7);
                let v = ops.value(len);
                buf[..len].copy_from_slice(&v.to_le_bytes()[..len]);
                if port == u64::from(ports::RESET_CONTROL) && len == 1 && v & 4 != 0 {
                    expect_resets += 1;
                }
                m.io.write(port, &buf[..len]);
            }
            2 => {
                let offset = u64::from(ops.u32()) % PCI_ECAM_SIZE;
                m.mmio.read(PCI_ECAM_START + offset, &mut buf[..len]);
            }
            3 => {
                let offset = u64::from(ops.u32()) % PCI_ECAM_SIZE;
                let v = ops.value(len);
                buf[..len].copy_from_slice(&v.to_le_bytes()[..len]);
                m.mmio.write(PCI_ECAM_START + offset, &buf[..len]);
            }
            4 => {
                let offset = bar_offset(ops.u16());
                m.mmio.read(m.bar + offset, &mut buf[..len]);
                if offset == 0x1000 {
                    assert!(
                        !m.wiring.intx.0.load(Ordering::Relaxed),
                        "INTx high after the ISR read"
                    );
                }
            }
            5 => {
                let offset = bar_offset(ops.u16());
                let v = ops.value(len);
                buf[..len].copy_from_slice(&v.to_le_bytes()[..len]);
                m.mmio.write(m.bar + offset, &buf[..len]);
                if offset == 0x14 && len == 1 && v == 0 {
                    let f = m.function.lock().expect("function");
                    assert_eq!(f.device_status(), 0, "status 0 is a reset");
                    assert!(f.state().queues.iter().all(|q| !q.ready));
                }
            }
            6 => {
                let q = ops.u8();
                let f = m.function.lock().expect("function");
                match q {
                    0xff => f.interrupt().signal_config(),
                    q => f.interrupt().signal_queue(usize::from(q)),
                }
            }
            7 => m.function.lock().expect("function").config_changed(),
            8 => m.round_trip(),
            9 => {
                let fail = m.wiring.fail.load(Ordering::Relaxed);
                m.wiring.fail.store(!fail, Ordering::Relaxed);
            }
            _ => {}
        }
        assert_eq!(
            m.resets.load(Ordering::Relaxed),
            expect_resets,
            "reset control"
        );
        m.check(sent);
    }
    m.wiring.activations.load(Ordering::Relaxed)
}

/// An operation as [`virtio_pci`] reads it.
pub fn op(p: &mut Program, kind: u8, len: usize) -> &mut Program {
    let width = [1, 2, 4, 8].iter().position(|&l| l == len).unwrap_or(0) as u8;
    p.u8(kind | width << 4)
}

/// What Linux's virtio_pci (modern) does with the function once the PCI core found
/// it: reset, ACKNOWLEDGE and DRIVER, read the offered features and accept them with
/// VERSION_1, FEATURES_OK and read it back, set up queue 0 with an MSI-X vector,
/// enable MSI-X (message control in configuration space), DRIVER_OK, and take a
/// queue interrupt.
pub fn virtio_pci_linux_probe(kind: u8, offered: u64) -> Vec<u8> {
    let mut p = Program::default();
    p.u8(kind);
    let bar_write = |p: &mut Program, offset: u16, len: usize, v: u64| {
        op(p, 5, len).u16(offset).value(len, v);
    };
    let bar_read = |p: &mut Program, offset: u16, len: usize| {
        op(p, 4, len).u16(offset);
    };
    // Memory space and bus mastering on, through ECAM (command register of 00:01.0).
    op(&mut p, 3, 2).u32((1 << 15) | 4).u16(0x6);
    bar_write(&mut p, 0x14, 1, 0);
    bar_write(&mut p, 0x14, 1, u64::from(status::ACKNOWLEDGE));
    bar_write(
        &mut p,
        0x14,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    for sel in 0..2u64 {
        bar_write(&mut p, 0x00, 4, sel);
        bar_read(&mut p, 0x04, 4);
        bar_write(&mut p, 0x08, 4, sel);
        bar_write(&mut p, 0x0c, 4, (offered >> (32 * sel)) & 0xffff_ffff);
    }
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    bar_write(&mut p, 0x14, 1, u64::from(s));
    bar_read(&mut p, 0x14, 1);
    // MSI-X: vector 0 for configuration changes, 1 for queue 0; the table entries
    // (table structure, offsets 0x8000 | n) then the enable bit.
    for (v, data) in [(0u16, 0x41u64), (1, 0x42)] {
        let entry = 0x8000 + 16 * v;
        bar_write(&mut p, entry, 4, 0xfee0_0000);
        bar_write(&mut p, entry + 4, 4, 0);
        bar_write(&mut p, entry + 8, 4, data);
        bar_write(&mut p, entry + 12, 4, 0);
    }
    bar_write(&mut p, 0x10, 2, 0);
    bar_write(&mut p, 0x16, 2, 0);
    bar_read(&mut p, 0x18, 2);
    bar_write(&mut p, 0x18, 2, 16);
    bar_write(&mut p, 0x1a, 2, 1);
    for (offset, addr) in [(0x20u16, 0x1000u64), (0x28, 0x1100), (0x30, 0x1200)] {
        bar_write(&mut p, offset, 4, addr);
        bar_write(&mut p, offset + 4, 4, 0);
    }
    bar_write(&mut p, 0x1c, 2, 1);
    // Message control of the MSI-X capability (the first, at 0x40): enable.
    op(&mut p, 3, 2).u32((1 << 15) | 0x42).u16(0x8000);
    bar_write(&mut p, 0x14, 1, u64::from(s | status::DRIVER_OK));
    op(&mut p, 6, 1).u8(0);
    op(&mut p, 6, 1).u8(0xff);
    op(&mut p, 8, 1);
    p.0
}

/// The Linux probe against each device, accepting what it offers; and the two ways
/// a snapshot used to start a device on features it never accepted.
pub fn virtio_pci_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = (0..4u8)
        .map(|kind| {
            let offered = device(kind).features() | features::VERSION_1;
            let name = device(kind).device_type().name();
            (
                format!("linux-probe-{name}"),
                virtio_pci_linux_probe(kind, offered),
            )
        })
        .collect();
    seeds.push((
        "regression-refused-features-resumed".into(),
        features_after_status(&[0xb, 0xf], 1 << 24),
    ));
    seeds.push((
        "regression-features-changed-while-running".into(),
        features_after_status(&[0xb, 0xf, 0x7], 1 << 24),
    ));
    seeds
}

/// The console's function (it offers bit 2 and VERSION_1), then a snapshot after:
/// with two `statuses`, features with `extra` written and the statuses (FEATURES_OK
/// refused, then DRIVER_OK); with three, the features it offers, the statuses
/// (accepted, running, FEATURES_OK cleared without a reset) and `extra` written.
fn features_after_status(statuses: &[u8], extra: u32) -> Vec<u8> {
    let mut p = Program::default();
    p.u8(1);
    let features = |p: &mut Program, low: u32| {
        for (sel, v) in [(0u32, low), (1, 1)] {
            op(p, 5, 4).u16(0x08).u32(sel);
            op(p, 5, 4).u16(0x0c).u32(v);
        }
    };
    let status = |p: &mut Program, v: u8| {
        op(p, 5, 1).u16(0x14).u8(v);
    };
    status(&mut p, 1);
    status(&mut p, 3);
    if let [ok, running, cleared] = statuses {
        // Accepted and running, then FEATURES_OK cleared without a reset.
        features(&mut p, 4);
        status(&mut p, *ok);
        status(&mut p, *running);
        status(&mut p, *cleared);
        features(&mut p, 4 | extra);
    } else {
        features(&mut p, 4 | extra);
        for v in statuses {
            status(&mut p, *v);
        }
    }
    op(&mut p, 8, 1);
    p.0
}
