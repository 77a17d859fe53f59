//! virtio-vsock (device ID 19) with its host side in user space: connections between
//! guest ports and Unix sockets on the host ([`muxer`]), no vhost-vsock needed.
//!
//! Three queues: receive (packets to the guest), transmit (packets from it) and events
//! (TRANSPORT_RESET). The configuration holds the guest's CID. Connections live in the
//! muxer, which outlasts the worker thread: a snapshot taken while the VM runs pauses
//! the worker and connections go on; a fresh device (a restored VM) tells the guest
//! its connections are gone with a TRANSPORT_RESET event as soon as the driver gives
//! it an event buffer.

mod config;
pub mod muxer;
pub mod packet;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::EventSet;

use super::chain::{Chain, Cursor, UsedRing, pop, pop_all};
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, finish, publish_and_rearm, read_config_bytes,
};
use crate::bus::lock;
pub use config::{DEFAULT_CID, VsockConfig};
pub use muxer::Muxer;
use packet::{HEADER_LEN, Header};

pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// The lowest CID a guest may have (0-2 are the hypervisor, local and host).
pub const MIN_GUEST_CID: u64 = 3;

pub struct VirtioVsock {
    muxer: Arc<Mutex<Muxer>>,
    /// A TRANSPORT_RESET event is owed to the driver.
    reset_owed: Arc<AtomicBool>,
    worker: Option<Worker>,
}

impl VirtioVsock {
    /// The device `config` asks for, its host side listening on its socket.
    pub fn new(config: &VsockConfig) -> std::io::Result<Self> {
        Ok(VirtioVsock {
            muxer: Arc::new(Mutex::new(Muxer::new(config.cid, &config.socket)?)),
            reset_owed: Arc::new(AtomicBool::new(true)),
            worker: None,
        })
    }

    /// What the worker thread runs on the receive, transmit and event queues (the fuzz
    /// harnesses run it in their own thread).
    pub fn queues<M: GuestMemory>(
        &self,
        mem: M,
        [rx, tx, event]: [Queue; 3],
        interrupt: Arc<VirtioInterrupt>,
    ) -> VsockQueues<M> {
        VsockQueues {
            mem,
            rx_used: UsedRing::new(&rx),
            tx_used: UsedRing::new(&tx),
            event_used: UsedRing::new(&event),
            rx,
            tx,
            event,
            interrupt,
            muxer: self.muxer.clone(),
            reset_owed: self.reset_owed.clone(),
            chain: Chain::new(),
            heads: Vec::new(),
            buf: Vec::new(),
        }
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioVsock {
    fn device_type(&self) -> DeviceType {
        DeviceType::Vsock
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = lock(&self.muxer).guest_cid();
        read_config_bytes(&cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let n = a.queues.len();
        let Ok([rx, tx, event]) = <[Queue; 3]>::try_from(a.queues) else {
            return Err(ActivateError::Queues(n));
        };
        let handler = self.queues(a.mem, [rx, tx, event], a.interrupt.clone());
        self.worker = Some(
            Worker::spawn(
                "virtio-vsock",
                sandbox::ThreadClass::Vsock,
                handler,
                a.queue_events,
                a.interrupt,
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        lock(&self.muxer).reset();
    }

    fn pause(&mut self) {
        self.stop_worker();
    }
}

pub struct VsockQueues<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    event: Queue,
    rx_used: UsedRing,
    tx_used: UsedRing,
    event_used: UsedRing,
    interrupt: Arc<VirtioInterrupt>,
    muxer: Arc<Mutex<Muxer>>,
    reset_owed: Arc<AtomicBool>,
    chain: Chain,
    heads: Vec<u16>,
    buf: Vec<u8>,
}

impl<M: GuestMemory> VsockQueues<M> {
    fn chain_err(queue: usize) -> impl Fn(super::ChainError) -> DeviceError {
        move |source| DeviceError::Chain { queue, source }
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
        let cid = lock(&self.muxer).guest_cid();
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
                self.tx_used.push(head, 0);
                let mut cursor = Cursor::new(&self.chain.readable);
                let mut raw = [0u8; HEADER_LEN];
                if !cursor.read(&self.mem, &mut raw) {
                    tracing::debug!("vsock: packet (head {head}) shorter than its header");
                    continue;
                }
                let h = Header::parse(&raw);
                if let Err(e) = h.check_from_guest(self.chain.readable_len(), cid) {
                    // The guest's own packet is lost; nothing else is.
                    tracing::debug!("vsock: packet dropped: {e}");
                    continue;
                }
                self.buf.resize(h.len as usize, 0);
                if !cursor.read(&self.mem, &mut self.buf) {
                    continue;
                }
                lock(&self.muxer).guest_packet(&h, &self.buf);
            }
            if !publish_and_rearm(&mut self.tx_used, &mut self.tx, &self.mem, &self.mem, TX)? {
                return Ok(());
            }
        }
    }

    /// Fills the guest's receive buffers with whatever the muxer has for it.
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
        let mut muxer = lock(&self.muxer);
        muxer.process_host_events();
        while muxer.has_rx() {
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
            let room = self.chain.writable_len();
            if room < HEADER_LEN as u64 {
                return Err(DeviceError::Request {
                    queue: RX,
                    reason: format!("receive buffer (head {head}) of {room} bytes"),
                });
            }
            let max_payload = (room - HEADER_LEN as u64).min(u64::from(packet::MAX_PAYLOAD));
            let Some(h) = muxer.next_rx(max_payload as usize, &mut self.buf) else {
                // Nothing after all: the buffer goes back for next time.
                self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                break;
            };
            let mut cursor = Cursor::new(&self.chain.writable);
            let written =
                cursor.write(&self.mem, &h.to_bytes()) + cursor.write(&self.mem, &self.buf);
            self.rx_used.push(head, written as u32);
        }
        Ok(())
    }

    /// Sends the TRANSPORT_RESET event owed, if the driver gave an event buffer.
    fn send_events(&mut self) -> Result<(), DeviceError> {
        if !self.reset_owed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(head) = pop(&mut self.event, &self.mem).map_err(Self::chain_err(EVENT))? else {
            return Ok(());
        };
        self.chain
            .walk(&self.mem, &self.event, head)
            .map_err(Self::chain_err(EVENT))?;
        let id = packet::EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = Cursor::new(&self.chain.writable).write(&self.mem, &id);
        self.event_used.push(head, written as u32);
        self.reset_owed.store(false, Ordering::Release);
        finish(
            &mut self.event_used,
            &mut self.event,
            &self.mem,
            &self.interrupt,
            EVENT,
        )
    }
}

impl<M: GuestMemoryShared> QueueHandler for VsockQueues<M> {
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RX => self.receive(),
            TX => {
                self.transmit()?;
                // Answers (responses, credit) and data the new credit lets go.
                self.receive()
            }
            EVENT => self.send_events(),
            _ => Ok(()),
        }
    }

    fn watched_fds(&self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        vec![(lock(&self.muxer).epoll_fd(), EventSet::IN)]
    }

    fn fd_ready(&mut self, _which: usize, _events: EventSet) -> Result<(), DeviceError> {
        self.receive()
    }
}
