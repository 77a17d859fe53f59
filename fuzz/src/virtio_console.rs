//! virtio-console's two queues (receive 0, transmit 1) as a guest driver fills them,
//! with host input pushed in between; the handler runs in this thread. Checked after
//! every step, besides where the device writes: what reaches the console output is the
//! transmit chains' readable bytes, in order, up to the first chain the device must
//! refuse; what the guest receives is the host's input, in order, nothing lost or
//! repeated, each receive buffer used with the bytes written into it.
//!
//! Input: receive and transmit queue sizes, flags (bit 0 EVENT_IDX), then
//! operations: the driver's (see [`crate::driver`]), 6 notify receive, 7 notify
//! transmit, 8 host input (count u8, bytes), 9 device reset.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::interrupt::NoMsi;
use devices::virtio::chain::Cursor;
use devices::virtio::console::{ConsoleInput, ConsoleQueues, VirtioConsole};
use devices::virtio::{Chain, QueueHandler, VirtioInterrupt};
use vm_memory::GuestMemoryMmap;

use crate::driver::{DRIVER_OPS, GuestDriver, queue_size, ranges};
use crate::ops::{Ops, Program};

const RX: usize = 0;
const TX: usize = 1;
const NOTIFY_RX: u8 = DRIVER_OPS;
const NOTIFY_TX: u8 = DRIVER_OPS + 1;
const INPUT: u8 = DRIVER_OPS + 2;

/// The console output as its length and CRC-32 (a chain may describe 4 GiB).
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Digest>>);

#[derive(Clone, Default)]
struct Digest {
    len: u64,
    crc: crc32fast::Hasher,
}

impl Digest {
    fn add(&mut self, b: &[u8]) {
        self.len += b.len() as u64;
        self.crc.update(b);
    }

    fn value(&self) -> (u64, u32) {
        (self.len, self.crc.clone().finalize())
    }
}

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("output").add(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Console {
    driver: GuestDriver,
    console: VirtioConsole,
    input: ConsoleInput,
    queues: ConsoleQueues<GuestMemoryMmap>,
    output: Output,
    event_idx: bool,
    /// Host input the device took and the guest has not received yet.
    pending: VecDeque<u8>,
    /// Whether `pending` is still exact (false once the driver wrote over a used index).
    rx_synced: bool,
    next_avail: [u16; 2],
    next_used: [u16; 2],
}

impl Console {
    fn queues(&self) -> ConsoleQueues<GuestMemoryMmap> {
        let interrupt = Arc::new(VirtioInterrupt::new(
            "fuzz-console",
            2,
            Arc::new(NoMsi),
            None,
        ));
        let (rx, tx) = (
            self.driver.queue(RX, self.event_idx),
            self.driver.queue(TX, self.event_idx),
        );
        self.console
            .queues(self.driver.mem.clone(), rx, tx, interrupt)
    }

    fn reset(&mut self) {
        self.driver.reset();
        self.queues = self.queues();
        self.next_avail = [0; 2];
        self.next_used = [0; 2];
    }

    fn transmit(&mut self) {
        let before = self.driver.before_step();
        let offered = self.driver.offered_before(TX, self.next_avail[TX]);
        let mut expected = self.output.0.lock().expect("output").clone();
        let result = self.queues.queue_notified(TX);
        self.driver
            .check_writes(&before, &[], "virtio-console transmit");
        let Some(heads) = offered else {
            assert!(result.is_err(), "an available index past the queue size");
            return self.reset();
        };
        let (mut used, mut refused, mut read) = (Vec::new(), false, Vec::new());
        let mut chain = Chain::new();
        for &head in &heads {
            if !self.driver.walk_before(TX, head, &mut chain) || !chain.writable.is_empty() {
                refused = true;
                break;
            }
            self.driver
                .read_before(&chain.readable, &mut |b| expected.add(b));
            read.extend(ranges(&chain.readable));
            used.push((head, 0));
        }
        // The device writes the used ring's flags before it reads the chains.
        if self.driver.touches_metadata(&read, &before)
            || !self
                .driver
                .used_ring_trusted(TX, self.next_used[TX], &before)
        {
            return self.reset();
        }
        assert_eq!(result.is_err(), refused, "virtio-console: {result:?}");
        let out = self.output.0.lock().expect("output").value();
        assert_eq!(
            out,
            expected.value(),
            "virtio-console: the output is not the chains' bytes (length, CRC-32)"
        );
        let (idx, entries) = self.driver.used_since(TX, self.next_used[TX]);
        assert_eq!(entries, used, "virtio-console: transmit used ring");
        if refused {
            return self.reset();
        }
        self.next_used[TX] = idx;
        self.next_avail[TX] = self.next_avail[TX].wrapping_add(heads.len() as u16);
    }

    fn receive(&mut self, notified: bool) {
        let before = self.driver.before_step();
        let result = if notified {
            self.queues.queue_notified(RX)
        } else {
            self.queues.fd_ready(0, vmm_sys_util::epoll::EventSet::IN)
        };
        self.driver
            .check_writes(&before, &[], "virtio-console receive");
        if !self
            .driver
            .used_ring_trusted(RX, self.next_used[RX], &before)
        {
            // What the device took from the input can no longer be told.
            self.rx_synced = false;
            return self.reset();
        }
        let (idx, entries) = self.driver.used_since(RX, self.next_used[RX]);
        let mut chains = Vec::new();
        let mut segs = Vec::new();
        let mut aliased = false;
        for &(head, len) in &entries {
            let mut chain = Chain::new();
            // A chain that no longer walks was changed by the device's own writes.
            aliased |= !self.driver.walk_before(RX, head, &mut chain);
            segs.extend(ranges(&chain.writable));
            chains.push((chain, len));
        }
        aliased |= self.driver.aliased(&segs, &before);
        for (chain, len) in chains {
            // The host's input went out exactly once, whatever the check below can see.
            let want: Vec<u8> = self
                .pending
                .drain(..(len as usize).min(self.pending.len()))
                .collect();
            if aliased || !self.rx_synced {
                continue;
            }
            assert!(
                u64::from(len) <= chain.writable_len(),
                "used past the buffers"
            );
            let mut got = vec![0u8; len as usize];
            assert!(Cursor::new(&chain.writable).read(&self.driver.mem, &mut got));
            assert!(
                got == want,
                "virtio-console: the guest received other bytes than the host sent"
            );
        }
        self.next_used[RX] = idx;
        if result.is_err() {
            self.reset();
        }
    }
}

pub fn virtio_console(data: &[u8]) {
    let mut ops = Ops::new(data);
    let sizes = [queue_size(ops.u8()), queue_size(ops.u8())];
    let event_idx = ops.u8() & 1 != 0;
    let output = Output::default();
    let console = VirtioConsole::new(Box::new(output.clone())).expect("an eventfd");
    let driver = GuestDriver::new(&sizes);
    let interrupt = Arc::new(VirtioInterrupt::new(
        "fuzz-console",
        2,
        Arc::new(NoMsi),
        None,
    ));
    let queues = console.queues(
        driver.mem.clone(),
        driver.queue(RX, event_idx),
        driver.queue(TX, event_idx),
        interrupt,
    );
    let mut c = Console {
        input: console.input(),
        console,
        queues,
        driver,
        output,
        event_idx,
        pending: VecDeque::new(),
        rx_synced: true,
        next_avail: [0; 2],
        next_used: [0; 2],
    };
    while ops.next_op() {
        match ops.u8() % (DRIVER_OPS + 4) {
            k if k < DRIVER_OPS => c.driver.op(k, &mut ops),
            NOTIFY_RX => c.receive(true),
            NOTIFY_TX => c.transmit(),
            INPUT => {
                let n = usize::from(ops.u8());
                let bytes = ops.bytes(n);
                let taken = c.input.push(bytes);
                c.pending.extend(&bytes[..taken]);
                c.receive(false);
            }
            _ => c.reset(),
        }
    }
}

/// What the Linux driver (hvc over virtio_console) does: receive buffers posted
/// first (one page each), then output lines sent one buffer each, keyboard input in
/// between.
pub fn virtio_console_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut p = Program::default();
    p.u8(2).u8(4).u8(0); // receive 4 entries, transmit 16, no EVENT_IDX
    for i in 0..4u16 {
        chain(
            &mut p,
            RX as u8,
            i as u8,
            &[(0x2000 + 0x400 * i, 0x400, true)],
        );
    }
    p.u8(NOTIFY_RX);
    for (i, line) in [&b"Welcome to the kit\r\n"[..], b"~ # "].iter().enumerate() {
        let at = 0x4000 + 0x100 * i as u16;
        p.u8(1).u16(at).u8(line.len() as u8).bytes(line);
        chain(&mut p, TX as u8, i as u8, &[(at, line.len() as u16, false)]);
        p.u8(NOTIFY_TX);
    }
    p.u8(INPUT).u8(3).bytes(b"ls\r");
    vec![("linux-hvc", p.0)]
}

fn chain(p: &mut Program, q: u8, first: u8, bufs: &[(u16, u16, bool)]) {
    p.u8(3).u8(q).u8(first).u8(bufs.len() as u8 - 1);
    for &(addr, len, write) in bufs {
        p.u16(addr).u16(len).u8(u8::from(write));
    }
}
