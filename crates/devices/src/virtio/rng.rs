//! virtio-rng: fills the driver's buffers from the host's getrandom(2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::chain::{Chain, Cursor, UsedRing, pop_all};
use super::publish_and_rearm;
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, finish,
};

pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets; the driver asks again for more.
pub const MAX_REQUEST: usize = 64 << 10;

#[derive(Default)]
pub struct VirtioRng {
    worker: Option<Worker>,
}

impl VirtioRng {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioRng {
    fn device_type(&self) -> DeviceType {
        DeviceType::Rng
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let n = a.queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(a.queues) else {
            return Err(ActivateError::Queues(n));
        };
        let handler = RngQueue::new(a.mem, queue, a.interrupt.clone());
        self.worker = Some(
            Worker::spawn(
                "virtio-rng",
                sandbox::ThreadClass::Rng,
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

pub struct RngQueue<M> {
    mem: M,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    chain: Chain,
    heads: Vec<u16>,
    used: UsedRing,
    buf: Vec<u8>,
}

impl<M: GuestMemory> RngQueue<M> {
    pub fn new(mem: M, queue: Queue, interrupt: Arc<VirtioInterrupt>) -> Self {
        RngQueue {
            mem,
            used: UsedRing::new(&queue),
            heads: Vec::new(),
            queue,
            interrupt,
            chain: Chain::new(),
            buf: vec![0; MAX_REQUEST],
        }
    }

    pub fn process(&mut self) -> Result<(), DeviceError> {
        if !self.queue.ready() {
            return Ok(());
        }
        let served = self.serve();
        finish(
            &mut self.used,
            &mut self.queue,
            &self.mem,
            &self.interrupt,
            0,
        )?;
        served
    }

    fn serve(&mut self) -> Result<(), DeviceError> {
        let chain_err = |source| DeviceError::Chain { queue: 0, source };
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(|e| DeviceError::ring(0, e))?;
            pop_all(&mut self.queue, &self.mem, &mut self.heads).map_err(chain_err)?;
            for i in 0..self.heads.len() {
                let head = self.heads[i];
                self.chain
                    .walk(&self.mem, &self.queue, head)
                    .map_err(chain_err)?;
                if !self.chain.readable.is_empty() {
                    // The device only writes here; a readable buffer is a driver bug.
                    return Err(DeviceError::Request {
                        queue: 0,
                        reason: format!("request (head {head}) has device-readable buffers"),
                    });
                }
                let want = (self.chain.writable_len() as usize).min(MAX_REQUEST);
                let filled = fill_random(&mut self.buf[..want]);
                let written =
                    Cursor::new(&self.chain.writable).write(&self.mem, &self.buf[..filled]);
                self.used.push(head, written as u32);
            }
            if !publish_and_rearm(&mut self.used, &mut self.queue, &self.mem, &self.mem, 0)? {
                return Ok(());
            }
        }
    }
}

/// As many random bytes as getrandom gives (all of them, short of an error).
fn fill_random(buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we pass.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        done += n as usize;
    }
    done
}

impl<M: GuestMemoryShared> QueueHandler for RngQueue<M> {
    fn queue_notified(&mut self, _index: usize) -> Result<(), DeviceError> {
        self.process()
    }
}
