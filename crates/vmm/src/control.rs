//! Running, paused, stopping: the state every vCPU thread obeys. The dispatcher's fast
//! path is one atomic load per exit; pausing kicks every vCPU out of guest mode and
//! returns only once all of them are parked, so a paused guest executes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use cpu::KickFlag;
use devices::bus::lock;
use serde::Serialize;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("already {0}")]
    Already(&'static str),
    #[error("{0}")]
    Wrong(&'static str),
}

struct Inner {
    state: RunState,
    /// vCPU threads still running their loop.
    live: usize,
    /// vCPU threads waiting in `park`.
    parked: usize,
}

pub struct VmControl {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// True exactly while the state is Running: the dispatcher's per-exit check.
    running: AtomicBool,
    vcpus: Mutex<Vec<(KickFlag, libc::pthread_t)>>,
}

impl VmControl {
    pub fn new() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: RunState::Running,
                live: 0,
                parked: 0,
            }),
            changed: Condvar::new(),
            running: AtomicBool::new(true),
            vcpus: Mutex::new(Vec::new()),
        }
    }

    pub fn state(&self) -> RunState {
        lock(&self.inner).state
    }

    /// Registers a vCPU thread (before it starts running guest code).
    pub(crate) fn add_vcpu(&self, kick: KickFlag, thread: libc::pthread_t) {
        lock(&self.vcpus).push((kick, thread));
        lock(&self.inner).live += 1;
    }

    /// A vCPU thread has left its loop for good.
    pub(crate) fn vcpu_exited(&self) {
        lock(&self.inner).live -= 1;
        self.changed.notify_all();
    }

    /// Should this vCPU keep running guest code? Cheap while running; parks the
    /// calling vCPU while paused.
    pub(crate) fn keep_running(&self) -> bool {
        if self.running.load(Ordering::Acquire) {
            return true;
        }
        let mut inner = lock(&self.inner);
        if inner.state == RunState::Paused {
            inner.parked += 1;
            self.changed.notify_all();
            while inner.state == RunState::Paused {
                inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
            inner.parked -= 1;
        }
        inner.state == RunState::Running
    }

    fn kick_all(&self) {
        for (flag, thread) in lock(&self.vcpus).iter() {
            flag.kick(*thread);
        }
    }

    /// Stops guest execution: returns once every vCPU is parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        match inner.state {
            RunState::Paused => return Err(ControlError::Already("paused")),
            RunState::Stopping => return Err(ControlError::Wrong("stopping")),
            RunState::Running => {}
        }
        inner.state = RunState::Paused;
        self.running.store(false, Ordering::Release);
        drop(inner);
        self.kick_all();
        let mut inner = lock(&self.inner);
        while inner.parked < inner.live && inner.state == RunState::Paused {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        match inner.state {
            RunState::Running => return Err(ControlError::Already("running")),
            RunState::Stopping => return Err(ControlError::Wrong("stopping")),
            RunState::Paused => {}
        }
        inner.state = RunState::Running;
        self.running.store(true, Ordering::Release);
        self.changed.notify_all();
        Ok(())
    }

    /// Ends guest execution for good: every vCPU leaves its loop.
    pub(crate) fn stop(&self) {
        let mut inner = lock(&self.inner);
        inner.state = RunState::Stopping;
        self.running.store(false, Ordering::Release);
        self.changed.notify_all();
        drop(inner);
        self.kick_all();
    }
}

impl Default for VmControl {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    /// Fake vCPU threads spin on keep_running, counting "instructions".
    fn spawn(
        control: &Arc<VmControl>,
        n: usize,
    ) -> (Vec<Arc<AtomicU64>>, Vec<std::thread::JoinHandle<()>>) {
        let mut counters = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let c = Arc::new(AtomicU64::new(0));
            counters.push(c.clone());
            let control = control.clone();
            lock(&control.inner).live += 1;
            threads.push(std::thread::spawn(move || {
                while control.keep_running() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                control.vcpu_exited();
            }));
        }
        (counters, threads)
    }

    #[test]
    fn pause_parks_every_vcpu_and_resume_continues() {
        let control = Arc::new(VmControl::new());
        let (counters, threads) = spawn(&control, 3);
        std::thread::sleep(std::time::Duration::from_millis(20));
        control.pause().unwrap();
        let frozen: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let later: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(frozen, later, "nothing runs while paused");
        assert_eq!(control.pause(), Err(ControlError::Already("paused")));
        control.resume().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            counters
                .iter()
                .zip(&later)
                .all(|(c, l)| c.load(Ordering::SeqCst) > *l)
        );
        assert_eq!(control.resume(), Err(ControlError::Already("running")));
        control.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(control.pause(), Err(ControlError::Wrong("stopping")));
    }

    #[test]
    fn stop_releases_paused_vcpus() {
        let control = Arc::new(VmControl::new());
        let (_, threads) = spawn(&control, 2);
        control.pause().unwrap();
        control.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(control.state(), RunState::Stopping);
    }
}
