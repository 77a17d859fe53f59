//! virtio-fs (device ID 26): a host directory in the guest, served by virtiofsd over
//! vhost-user. vessel is the frontend: it starts virtiofsd ([`daemon`]), gives it the
//! guest's memory (which must then be shared: a memfd) and the queues the driver set
//! up, and forwards its completions to the driver as interrupts. The queue
//! notifications go to virtiofsd directly (the same eventfds KVM's ioeventfds or the
//! software CPU's MMIO writes signal).

mod config;
pub mod daemon;
mod failed;
mod watchdog;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::Frontend;

/// How long virtiofsd has to answer one vhost-user request.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, DeviceError, DeviceType, GuestMemoryShared, VirtioDevice,
    VirtioInterrupt, features, read_config_bytes,
};
pub use config::{DEFAULT_TAG, MAX_TAG, ShareConfig};
pub use daemon::{Virtiofsd, find_virtiofsd};
use watchdog::Watchdog;

/// The high-priority queue and one request queue.
const QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 1024;
/// VHOST_USER_F_PROTOCOL_FEATURES: not negotiated (rings start when kicked).
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// One region of guest RAM as another process maps it: its file and where in it.
#[derive(Clone, Copy, Debug)]
pub struct SharedRegion {
    pub guest_addr: u64,
    pub size: u64,
    /// Where this process maps it.
    pub host_addr: u64,
    pub fd: RawFd,
    pub offset: u64,
}

#[derive(Debug, Error)]
pub enum FsError {
    #[error("{0}")]
    Daemon(std::io::Error),
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("guest memory is not shared (a memfd): virtiofsd cannot map it")]
    PrivateMemory,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct VirtioFs {
    tag: String,
    frontend: Frontend,
    /// A deadline on each exchange with virtiofsd.
    watchdog: Watchdog,
    /// The connection, to close when an answer puts it out of step.
    socket: std::os::unix::net::UnixStream,
    /// Kept as long as the device; dropped last (after the connection). None when
    /// something else plays virtiofsd ([`VirtioFs::connected`]).
    daemon: Option<Virtiofsd>,
    backend_features: u64,
    regions: Vec<SharedRegion>,
    calls: Vec<EventFd>,
    config: Vec<u8>,
    /// Queues handed to virtiofsd.
    started: Vec<usize>,
    worker: Option<Worker>,
}

impl VirtioFs {
    /// Starts virtiofsd for `share` on `socket` and connects to it; `regions` is guest
    /// RAM as virtiofsd will map it.
    pub fn new(
        share: &ShareConfig,
        socket: &Path,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, FsError> {
        if regions.is_empty() || regions.iter().any(|r| r.fd < 0) {
            return Err(FsError::PrivateMemory);
        }
        let daemon = Virtiofsd::start(share, socket).map_err(FsError::Daemon)?;
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(FsError::Daemon)?;
        Self::connected(share, stream, regions, Some(daemon))
    }

    /// The device over a connection to a vhost-user backend: the virtiofsd `new`
    /// started, or (`daemon` None) whatever plays it, with no process to watch or end
    /// (the fuzz harness: a thread on a socket pair).
    pub fn connected(
        share: &ShareConfig,
        stream: std::os::unix::net::UnixStream,
        regions: Vec<SharedRegion>,
        daemon: Option<Virtiofsd>,
    ) -> Result<Self, FsError> {
        if regions.is_empty() || regions.iter().any(|r| r.fd < 0) {
            return Err(FsError::PrivateMemory);
        }
        // A virtiofsd that stops answering (a guest can make it spin) must not hang the
        // vCPU that resets the device: every exchange after this has a deadline.
        let watchdog = Watchdog::new(
            stream.try_clone().map_err(FsError::Daemon)?,
            REPLY_TIMEOUT,
            &share.tag,
        )
        .map_err(FsError::Daemon)?;
        let socket = stream.try_clone().map_err(FsError::Daemon)?;
        let frontend = Frontend::from_stream(stream, QUEUES as u64);
        frontend.set_owner()?;
        let backend_features = frontend.get_features()?;
        let calls = (0..QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        // tag[36], num_request_queues (le32).
        let mut config = vec![0u8; MAX_TAG + 4];
        config[..share.tag.len()].copy_from_slice(share.tag.as_bytes());
        config[MAX_TAG..].copy_from_slice(&1u32.to_le_bytes());
        tracing::info!(
            "virtio-fs {}: virtiofsd (pid {}) serves {}{}",
            share.tag,
            daemon.as_ref().map_or(0, Virtiofsd::pid),
            share.dir.display(),
            if share.readonly { ", read-only" } else { "" }
        );
        Ok(VirtioFs {
            tag: share.tag.clone(),
            frontend,
            watchdog,
            socket,
            daemon,
            backend_features,
            regions,
            calls,
            config,
            started: Vec::new(),
            worker: None,
        })
    }

    /// Whether bytes wait on the connection after an answer (nothing is due: the
    /// backend's own requests would come on a channel of their own).
    fn unasked_bytes(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv into one byte this frame owns; MSG_PEEK leaves the data queued.
        let n = unsafe {
            libc::recv(
                self.socket.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }

    /// A guest-physical range's address in this process (the rings the driver set up).
    fn host_addr(&self, guest: u64, len: u64) -> Option<u64> {
        host_addr(&self.regions, guest, len)
    }

    fn start_queues(&mut self, queues: &[Queue], kicks: &[EventFd]) -> Result<(), String> {
        let e = |what: &str, err: vhost::Error| format!("vhost-user {what}: {err}");
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.offset,
                mmap_handle: r.fd,
            })
            .collect();
        self.frontend
            .set_mem_table(&table)
            .map_err(|err| e("memory table", err))?;
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let size = q.size();
            let ring = |addr: u64, len: u64| {
                self.host_addr(addr, len)
                    .ok_or_else(|| format!("queue {i}: ring at {addr:#x} is not guest RAM"))
            };
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: size,
                flags: 0,
                desc_table_addr: ring(q.desc_table(), 16 * u64::from(size))?,
                used_ring_addr: ring(q.used_ring(), 6 + 8 * u64::from(size))?,
                avail_ring_addr: ring(q.avail_ring(), 6 + 2 * u64::from(size))?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, size)
                .map_err(|err| e("ring size", err))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(|err| e("ring address", err))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(|err| e("ring base", err))?;
            self.frontend
                .set_vring_call(i, &self.calls[i])
                .map_err(|err| e("ring interrupt", err))?;
            self.frontend
                .set_vring_kick(i, &kicks[i])
                .map_err(|err| e("ring notification", err))?;
            self.started.push(i);
        }
        Ok(())
    }
}

/// Where guest range [guest, guest + len) is in this process, if one region holds all
/// of it. (The address is computed only then: a ring the driver put far above RAM
/// must not overflow it.)
fn host_addr(regions: &[SharedRegion], guest: u64, len: u64) -> Option<u64> {
    regions.iter().find_map(|r| {
        let off = guest.checked_sub(r.guest_addr)?;
        (off.checked_add(len)? <= r.size).then(|| r.host_addr + off)
    })
}

impl<M: GuestMemoryShared> VirtioDevice<M> for VirtioFs {
    fn device_type(&self) -> DeviceType {
        DeviceType::Fs
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; QUEUES]
    }

    fn features(&self) -> u64 {
        features::COMMON & self.backend_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation<M>) -> Result<(), ActivateError> {
        let tag = self.tag.clone();
        let backend = |e: String| ActivateError::Backend(format!("virtio-fs {tag}: {e}"));
        let features = a.features & !F_PROTOCOL_FEATURES;
        self.watchdog.arm();
        let started = self
            .frontend
            .set_features(features)
            .map_err(|e| e.to_string())
            .and_then(|()| self.start_queues(&a.queues, &a.queue_events));
        self.watchdog.disarm();
        started.map_err(backend)?;
        let clone_all = |fds: &[EventFd]| {
            fds.iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(ActivateError::Worker)
        };
        let forwarder = Completions {
            calls: clone_all(&self.calls)?,
            interrupt: a.interrupt.clone(),
            tag: self.tag.clone(),
            daemon: self
                .daemon
                .as_ref()
                .map(Virtiofsd::watch)
                .transpose()
                .map_err(ActivateError::Worker)?,
            takeover: Some(Takeover {
                mem: a.mem,
                queues: a.queues,
                kicks: clone_all(&a.queue_events)?,
            }),
            failed: None,
        };
        // No queue events here: virtiofsd reads those.
        self.worker = Some(
            Worker::spawn(
                "virtio-fs",
                sandbox::ThreadClass::Fs,
                forwarder,
                Vec::new(),
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
        // GET_VRING_BASE stops a ring. A virtiofsd that does not answer in time,
        // answers what cannot be taken, or sends more than its answer, is out of step:
        // its connection is closed and it is ended. The share fails (EIO), the VM goes
        // on.
        for i in std::mem::take(&mut self.started) {
            self.watchdog.arm();
            let stopped = self
                .frontend
                .get_vring_base(i)
                .map_err(|e| e.to_string())
                .and_then(|_| match self.unasked_bytes() {
                    true => Err("virtiofsd sent more than its answer".into()),
                    false => Ok(()),
                });
            self.watchdog.disarm();
            if let Err(e) = stopped {
                tracing::warn!(
                    "virtio-fs {}: stopping queue {i}: {e}; ending virtiofsd",
                    self.tag
                );
                let _ = self.socket.shutdown(std::net::Shutdown::Both);
                if let Some(d) = &mut self.daemon {
                    d.kill();
                }
                break;
            }
        }
    }

    fn saveable(&self) -> Result<(), String> {
        Err(format!(
            "a VM with a shared folder ({}) cannot be saved: virtiofsd's state is not vessel's to capture",
            self.tag
        ))
    }
}

/// virtiofsd's completions (its "call" eventfds) to the driver as interrupts, and
/// virtiofsd watched: when it dies, the queues are taken back and fail.
struct Completions<M> {
    calls: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    tag: String,
    /// Readable when virtiofsd has exited (a pidfd); None without a process.
    daemon: Option<std::os::fd::OwnedFd>,
    /// What taking the queues back needs.
    takeover: Option<Takeover<M>>,
    failed: Option<Worker>,
}

struct Takeover<M> {
    mem: M,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
}

impl<M: GuestMemoryShared> Completions<M> {
    fn daemon_died(&mut self) -> Result<(), DeviceError> {
        let Some(t) = self.takeover.take() else {
            return Ok(());
        };
        tracing::error!(
            "virtio-fs {}: virtiofsd exited; the guest's requests on this share fail with EIO from now on",
            self.tag
        );
        let handler = failed::FailedQueues::new(t.mem, t.queues, self.interrupt.clone());
        match Worker::spawn(
            "virtio-fs-failed",
            sandbox::ThreadClass::Fs,
            handler,
            t.kicks,
            self.interrupt.clone(),
        ) {
            Ok(w) => self.failed = Some(w),
            Err(e) => tracing::error!("virtio-fs {}: {e}", self.tag),
        }
        Ok(())
    }
}

impl<M: GuestMemoryShared> QueueHandler for Completions<M> {
    fn queue_notified(&mut self, _index: usize) -> Result<(), DeviceError> {
        Ok(())
    }

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        self.calls
            .iter()
            .map(|c| (c.as_raw_fd(), EventSet::IN))
            .chain(self.daemon.iter().map(|d| (d.as_raw_fd(), EventSet::IN)))
            .collect()
    }

    fn fd_ready(&mut self, which: usize, _events: EventSet) -> Result<(), DeviceError> {
        match self.calls.get(which) {
            Some(call) => {
                let _ = call.read();
                self.interrupt.signal_queue(which);
                Ok(())
            }
            None => self.daemon_died(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rings at the top of the address space are not guest RAM, and computing where
    /// they would be does not overflow (the fuzzer's `virtio_fs` found a driver's
    /// available ring at 2^64 - 2 panicking a debug build).
    #[test]
    fn a_ring_far_above_ram_is_not_guest_ram() {
        let regions = [
            SharedRegion {
                guest_addr: 0,
                size: 0x4000,
                host_addr: 0x7f00_0000_0000,
                fd: 3,
                offset: 0,
            },
            SharedRegion {
                guest_addr: 0x1_0000,
                size: 0x1000,
                host_addr: 0x7f00_0001_0000,
                fd: 3,
                offset: 0x4000,
            },
        ];
        assert_eq!(host_addr(&regions, 0x1000, 0x100), Some(0x7f00_0000_1000));
        assert_eq!(host_addr(&regions, 0x1_0800, 0x800), Some(0x7f00_0001_0800));
        for (guest, len) in [
            (u64::MAX - 1, 6),
            (1 << 63, 16),
            (0x3f00, 0x200),
            (0x8000, 16),
        ] {
            assert_eq!(host_addr(&regions, guest, len), None, "{guest:#x}+{len:#x}");
        }
    }
}
