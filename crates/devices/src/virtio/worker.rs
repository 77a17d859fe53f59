//! A device's worker thread: epoll over its queues' notification eventfds, its
//! backend's descriptors and a kill eventfd. A handler error puts the device into
//! DEVICE_NEEDS_RESET; the thread then ignores everything but the kill event.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{DeviceError, VirtioInterrupt};

/// What a device does on its worker thread.
pub trait QueueHandler: Send + 'static {
    /// Queue `index` was notified (also called once per queue when the worker starts,
    /// for buffers made available before DRIVER_OK).
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceError>;
    /// Descriptors to watch besides the queue events, with the events wanted.
    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// `watched_fds()[which]` is ready.
    fn fd_ready(&mut self, _which: usize, _events: EventSet) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A running worker thread; dropping it stops and joins the thread.
pub struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

const KILL_TOKEN: u64 = u64::MAX;
const FD_TOKEN_BASE: u64 = 1 << 32;

impl Worker {
    /// Starts worker `name` confined to `class` (see the sandbox crate).
    pub fn spawn<H: QueueHandler>(
        name: &str,
        class: sandbox::ThreadClass,
        mut handler: H,
        queue_events: Vec<EventFd>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> io::Result<Worker> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        for (i, evt) in queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let extra = handler.watched_fds();
        for (i, (fd, events)) in extra.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(*events, FD_TOKEN_BASE + i as u64),
            )?;
        }
        let thread = sandbox::thread::spawn(class, name, move || {
            let mut run = Run {
                epoll,
                queue_events,
                extra,
                interrupt,
                broken: false,
            };
            run.run(&mut handler);
        })?;
        Ok(Worker {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.kill.write(1);
            if thread.join().is_err() {
                tracing::error!("a virtio worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

struct Run {
    epoll: Epoll,
    queue_events: Vec<EventFd>,
    extra: Vec<(RawFd, EventSet)>,
    interrupt: Arc<VirtioInterrupt>,
    broken: bool,
}

impl Run {
    fn run<H: QueueHandler>(&mut self, handler: &mut H) {
        for i in 0..self.queue_events.len() {
            let r = handler.queue_notified(i);
            self.check(r);
        }
        let mut events = vec![EpollEvent::default(); 16 + self.queue_events.len()];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: worker epoll failed: {e}", self.interrupt.name());
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    KILL_TOKEN => return,
                    t if t < FD_TOKEN_BASE => {
                        let q = t as usize;
                        // Reading resets the counter; notifications coalesce.
                        let _ = self.queue_events[q].read();
                        if !self.broken {
                            let r = handler.queue_notified(q);
                            self.check(r);
                        }
                    }
                    t => {
                        if !self.broken {
                            let r = handler.fd_ready((t - FD_TOKEN_BASE) as usize, ev.event_set());
                            self.check(r);
                        }
                    }
                }
            }
        }
    }

    /// After an error the device needs a reset: stop watching the backend (a
    /// level-triggered descriptor would spin) and only drain queue events.
    fn check(&mut self, r: Result<(), DeviceError>) {
        if let Err(e) = r
            && !self.broken
        {
            self.broken = true;
            self.interrupt.set_needs_reset(&e.to_string());
            for (fd, _) in &self.extra {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
            }
        }
    }
}
