//! When virtiofsd dies, the share fails, not the VM: vessel takes the queues back and
//! answers every request the guest makes (and every one virtiofsd left unanswered)
//! with EIO, so the guest's file operations on the mount return errors instead of
//! waiting forever.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::virtio::chain::{Chain, Cursor, UsedRing, pop_all};
use crate::virtio::worker::QueueHandler;
use crate::virtio::{DeviceError, VirtioInterrupt, finish, publish_and_rearm};

/// A FUSE request's header: len, opcode, unique, nodeid, uid, gid, pid, padding.
const IN_HEADER: usize = 40;
/// The reply's: len, error, unique.
const OUT_HEADER: usize = 16;
const EIO: i32 = 5;

pub(super) struct FailedQueues<M> {
    mem: M,
    queues: Vec<Queue>,
    used: Vec<UsedRing>,
    interrupt: Arc<VirtioInterrupt>,
    chain: Chain,
    heads: Vec<u16>,
}

impl<M: GuestMemory> FailedQueues<M> {
    /// Takes over `queues` where virtiofsd left them: every chain not yet in a used
    /// ring is answered again.
    pub(super) fn new(mem: M, mut queues: Vec<Queue>, interrupt: Arc<VirtioInterrupt>) -> Self {
        for q in queues.iter_mut().filter(|q| q.ready()) {
            let used = mem
                .read_obj::<u16>(GuestAddress(q.used_ring()).unchecked_add(2))
                .unwrap_or(0);
            q.set_next_avail(used);
            q.set_next_used(used);
        }
        let used = queues.iter().map(UsedRing::new).collect();
        FailedQueues {
            mem,
            queues,
            used,
            interrupt,
            chain: Chain::new(),
            heads: Vec::new(),
        }
    }

    fn fail_all(&mut self, index: usize) -> Result<(), DeviceError> {
        let Some(queue) = self.queues.get_mut(index) else {
            return Ok(());
        };
        if !queue.ready() {
            return Ok(());
        }
        let chain_err = |source| DeviceError::Chain {
            queue: index,
            source,
        };
        loop {
            queue
                .disable_notification(&self.mem)
                .map_err(|e| DeviceError::ring(index, e))?;
            pop_all(queue, &self.mem, &mut self.heads).map_err(chain_err)?;
            for &head in &self.heads {
                self.chain.walk(&self.mem, queue, head).map_err(chain_err)?;
                let mut header = [0u8; IN_HEADER];
                let written = if Cursor::new(&self.chain.readable).read(&self.mem, &mut header) {
                    let reply = eio_reply(&header);
                    Cursor::new(&self.chain.writable).write(&self.mem, &reply)
                } else {
                    0
                };
                self.used[index].push(head, written as u32);
            }
            if !publish_and_rearm(&mut self.used[index], queue, &self.mem, &self.mem, index)? {
                break;
            }
        }
        finish(
            &mut self.used[index],
            queue,
            &self.mem,
            &self.interrupt,
            index,
        )
    }
}

/// The reply to a FUSE request (by its header): EIO, for the same `unique`.
fn eio_reply(header: &[u8; IN_HEADER]) -> [u8; OUT_HEADER] {
    let mut out = [0u8; OUT_HEADER];
    out[0..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    out[4..8].copy_from_slice(&(-EIO).to_le_bytes());
    out[8..16].copy_from_slice(&header[8..16]);
    out
}

impl<M: GuestMemory + Send + 'static> QueueHandler for FailedQueues<M> {
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceError> {
        self.fail_all(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_is_eio_for_the_same_request() {
        let mut header = [0u8; IN_HEADER];
        header[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        let r = eio_reply(&header);
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_le_bytes(r[4..8].try_into().unwrap()), -5);
        assert_eq!(&r[8..16], &header[8..16]);
    }
}
