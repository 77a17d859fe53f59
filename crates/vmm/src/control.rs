//! Running, paused, stopping: the state every vCPU thread obeys. The dispatcher's fast
//! path is one atomic load per exit; pausing kicks every vCPU out of guest mode and
//! returns only once all of them are parked, so a paused guest executes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use cpu::{KickFlag, Vcpu, VcpuSnapshot};
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
    /// A snapshot in progress: each parked vCPU puts its state in its slot.
    capture: Option<Vec<Option<Result<VcpuSnapshot, String>>>>,
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
                capture: None,
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
    /// calling vCPU while paused (saving its state there when a snapshot asks).
    pub(crate) fn keep_running(&self, vcpu: &mut dyn Vcpu) -> bool {
        if self.running.load(Ordering::Acquire) {
            return true;
        }
        let mut inner = lock(&self.inner);
        if inner.state == RunState::Paused {
            inner.parked += 1;
            self.changed.notify_all();
            while inner.state == RunState::Paused {
                let slot = usize::from(vcpu.index());
                let wanted = inner
                    .capture
                    .as_ref()
                    .is_some_and(|c| c.get(slot).is_some_and(Option::is_none));
                if wanted {
                    drop(inner);
                    let saved = vcpu.save().map_err(|e| e.to_string());
                    inner = lock(&self.inner);
                    if let Some(s) = inner.capture.as_mut().and_then(|c| c.get_mut(slot)) {
                        *s = Some(saved);
                    }
                    self.changed.notify_all();
                    continue;
                }
                inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
            inner.parked -= 1;
        }
        inner.state == RunState::Running
    }

    /// Every vCPU's state, saved by the vCPU threads themselves (the VM must be
    /// paused, so they all are parked).
    pub(crate) fn capture(&self, vcpus: usize) -> Result<Vec<VcpuSnapshot>, String> {
        let mut inner = lock(&self.inner);
        if inner.state != RunState::Paused {
            return Err("the VM is not paused".into());
        }
        if inner.live != vcpus {
            return Err(format!("{} of {vcpus} vCPUs are running", inner.live));
        }
        inner.capture = Some(vec![None; vcpus]);
        self.changed.notify_all();
        while inner
            .capture
            .as_ref()
            .is_some_and(|c| c.iter().any(Option::is_none))
            && inner.state == RunState::Paused
        {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        let slots = inner.capture.take().unwrap_or_default();
        slots
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Err("the VM stopped during the snapshot".into())))
            .collect()
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

    /// A vCPU that has nothing to save (the fake threads below).
    struct NoVcpu;
    impl Vcpu for NoVcpu {
        fn index(&self) -> u8 {
            0
        }
        fn run(&mut self) -> Result<cpu::Exit<'_>, cpu::VcpuError> {
            unreachable!("never run")
        }
        fn location(&mut self) -> cpu::Location {
            cpu::Location::default()
        }
        fn kick_flag(&self) -> KickFlag {
            KickFlag::default()
        }
        fn state(&mut self) -> Result<x86::CpuState, cpu::VcpuError> {
            Ok(x86::CpuState::default())
        }
        fn set_state(&mut self, _: &x86::CpuState) -> Result<(), cpu::VcpuError> {
            Ok(())
        }
        fn inject(&mut self, _: x86::Exception) -> Result<(), cpu::VcpuError> {
            Ok(())
        }
        fn cpuid(&self, _: u32, _: u32) -> [u32; 4] {
            [0; 4]
        }
        fn rdmsr(&mut self, _: u32) -> Option<u64> {
            None
        }
        fn wrmsr(&mut self, _: u32, _: u64) -> bool {
            false
        }
        fn save(&mut self) -> Result<VcpuSnapshot, cpu::VcpuError> {
            Err(cpu::VcpuError::Emu {
                index: 0,
                reason: "nothing to save".into(),
            })
        }
        fn restore(&mut self, _: &VcpuSnapshot) -> Result<(), cpu::VcpuError> {
            Ok(())
        }
    }

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
                while control.keep_running(&mut NoVcpu) {
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
