//! virtio-console with one port (no MULTIPORT): the guest's hvc0. Output goes to a
//! writer; input is pushed by the VMM through a [`ConsoleInput`] handle.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{Chain, Cursor, UsedRing, pop, pop_all};
use super::publish_and_rearm;
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, finish, read_config_bytes,
};
use crate::bus::lock;

pub const QUEUE_SIZE: u16 = 256;
/// Input held while the guest has no receive buffers; more is dropped.
pub const INPUT_LIMIT: usize = 64 << 10;
/// VIRTIO_CONSOLE_F_EMERG_WRITE: bytes written to `emerg_wr` in the configuration.
pub const F_EMERG_WRITE: u64 = 1 << 2;
/// Output is copied out of guest memory this much at a time.
const CHUNK: usize = 16 << 10;
const RX: usize = 0;
const TX: usize = 1;
const EMERG_WR_OFFSET: u64 = 8;

pub type ConsoleOutput = Arc<Mutex<Box<dyn Write + Send>>>;

struct InputQueue {
    bytes: Mutex<VecDeque<u8>>,
    event: EventFd,
}

/// The VMM's end of the console's input: push bytes, the guest reads them on hvc0.
#[derive(Clone)]
pub struct ConsoleInput(Arc<InputQueue>);

impl ConsoleInput {
    /// Queues `bytes` for the guest; returns how many were accepted (the rest did
    /// not fit in [`INPUT_LIMIT`]).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let n = {
            let mut q = lock(&self.0.bytes);
            let n = bytes.len().min(INPUT_LIMIT.saturating_sub(q.len()));
            q.extend(&bytes[..n]);
            n
        };
        if n > 0 {
            let _ = self.0.event.write(1);
        }
        n
    }
}

pub struct VirtioConsole {
    output: ConsoleOutput,
    input: ConsoleInput,
    config: Vec<u8>,
    worker: Option<Worker>,
}

impl VirtioConsole {
    pub fn new(output: Box<dyn Write + Send>) -> io::Result<Self> {
        let input = ConsoleInput(Arc::new(InputQueue {
            bytes: Mutex::new(VecDeque::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
        }));
        // cols, rows (unused without F_SIZE), max_nr_ports (unused without
        // MULTIPORT), emerg_wr.
        let mut config = vec![0u8; 12];
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        Ok(VirtioConsole {
            output: Arc::new(Mutex::new(output)),
            input,
            config,
            worker: None,
        })
    }

    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }

    /// What the worker thread runs on the receive and transmit queues (the fuzz
    /// harnesses run it in their own thread).
    pub fn queues<M: GuestMemory>(
        &self,
        mem: M,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<VirtioInterrupt>,
    ) -> ConsoleQueues<M> {
        ConsoleQueues {
            mem,
            rx_used: UsedRing::new(&rx),
            tx_used: UsedRing::new(&tx),
            heads: Vec::new(),
            rx,
            tx,
            interrupt,
            output: self.output.clone(),
            input: self.input.clone(),
            chain: Chain::new(),
            buf: Vec::new(),
        }
    }
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioConsole {
    fn device_type(&self) -> DeviceType {
        DeviceType::Console
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::COMMON | F_EMERG_WRITE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == EMERG_WR_OFFSET && !data.is_empty() {
            let mut out = lock(&self.output);
            let _ = out.write_all(&data[..1]);
            let _ = out.flush();
        }
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let n = a.queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(a.queues) else {
            return Err(ActivateError::Queues(n));
        };
        let handler = self.queues(a.mem, rx, tx, a.interrupt.clone());
        self.worker = Some(
            Worker::spawn(
                "virtio-console",
                sandbox::ThreadClass::Console,
                handler,
                a.queue_events,
                a.interrupt,
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

pub struct ConsoleQueues<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
    output: ConsoleOutput,
    input: ConsoleInput,
    chain: Chain,
    heads: Vec<u16>,
    rx_used: UsedRing,
    tx_used: UsedRing,
    buf: Vec<u8>,
}

impl<M: GuestMemory> ConsoleQueues<M> {
    fn chain_err(queue: usize) -> impl Fn(super::ChainError) -> DeviceError {
        move |source| DeviceError::Chain { queue, source }
    }

    /// Moves pending input into the guest's receive buffers.
    fn receive(&mut self) -> Result<(), DeviceError> {
        let served = self.serve_rx();
        finish(
            &mut self.rx_used,
            &mut self.rx,
            &self.mem,
            &self.interrupt,
            RX,
        )?;
        served
    }

    fn serve_rx(&mut self) -> Result<(), DeviceError> {
        while !lock(&self.input.0.bytes).is_empty() {
            let Some(head) = pop(&mut self.rx, &self.mem).map_err(Self::chain_err(RX))? else {
                // Out of buffers: ask the driver to tell us when it adds some.
                if self.rx.ready()
                    && self
                        .rx
                        .enable_notification(&self.mem)
                        .map_err(|e| DeviceError::ring(RX, e))?
                {
                    continue;
                }
                break;
            };
            self.chain
                .walk(&self.mem, &self.rx, head)
                .map_err(Self::chain_err(RX))?;
            if !self.chain.readable.is_empty() {
                return Err(DeviceError::direction(RX, head, "device-readable"));
            }
            let written = {
                let mut q = lock(&self.input.0.bytes);
                let n = (self.chain.writable_len() as usize).min(q.len());
                self.buf.clear();
                self.buf.extend(q.drain(..n));
                Cursor::new(&self.chain.writable).write(&self.mem, &self.buf)
            };
            self.rx_used.push(head, written as u32);
        }
        Ok(())
    }

    fn transmit(&mut self) -> Result<(), DeviceError> {
        if !self.tx.ready() {
            return Ok(());
        }
        let served = self.serve_tx();
        finish(
            &mut self.tx_used,
            &mut self.tx,
            &self.mem,
            &self.interrupt,
            TX,
        )?;
        served
    }

    fn serve_tx(&mut self) -> Result<(), DeviceError> {
        loop {
            self.tx
                .disable_notification(&self.mem)
                .map_err(|e| DeviceError::ring(TX, e))?;
            pop_all(&mut self.tx, &self.mem, &mut self.heads).map_err(Self::chain_err(TX))?;
            for i in 0..self.heads.len() {
                let head = self.heads[i];
                self.chain
                    .walk(&self.mem, &self.tx, head)
                    .map_err(Self::chain_err(TX))?;
                if !self.chain.writable.is_empty() {
                    return Err(DeviceError::direction(TX, head, "device-writable"));
                }
                // In pieces: a chain may describe up to 4 GiB.
                let mut cursor = Cursor::new(&self.chain.readable);
                let mut out = lock(&self.output);
                while cursor.remaining() > 0 {
                    let n = cursor.remaining().min(CHUNK as u64) as usize;
                    self.buf.resize(n, 0);
                    if !cursor.read(&self.mem, &mut self.buf) {
                        break;
                    }
                    if let Err(e) = out.write_all(&self.buf) {
                        tracing::debug!("virtio-console: output lost: {e}");
                    }
                }
                let _ = out.flush();
                drop(out);
                self.tx_used.push(head, 0);
            }
            if !publish_and_rearm(&mut self.tx_used, &mut self.tx, &self.mem, &self.mem, TX)? {
                return Ok(());
            }
        }
    }
}

impl<M: GuestMemoryShared> QueueHandler for ConsoleQueues<M> {
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => Ok(()),
        }
    }

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.input.0.event.as_raw_fd(), EventSet::IN)]
    }

    fn fd_ready(&mut self, _which: usize, _events: EventSet) -> Result<(), DeviceError> {
        let _ = self.input.0.event.read();
        self.receive()
    }
}
