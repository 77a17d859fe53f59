//! A built VM running: one thread per vCPU through the dispatcher, the console on
//! another, and this thread waiting for the event that ends the VM.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use cpu::{KickFlag, Location, Vcpu};
use devices::GuestRequest;

use crate::builder::Platform;
use crate::config::ConsoleMode;
use crate::console::{self, RawTerminal};
use crate::dispatcher::Dispatcher;
use crate::error::VmError;

/// Something that happened to the VM, reported to the thread that owns it.
#[derive(Debug)]
pub enum VmEvent {
    Guest(GuestRequest),
    VcpuFailed {
        index: u8,
        reason: String,
        location: Location,
    },
    /// The user typed the console's quit escape.
    ConsoleQuit,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    PoweredOff,
    Reset,
    /// The user quit from the console.
    Quit,
    /// A vCPU could not go on.
    Crashed {
        vcpu: u8,
        reason: String,
        location: Location,
    },
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::PoweredOff => write!(f, "guest powered off"),
            VmOutcome::Reset => write!(f, "guest reset"),
            VmOutcome::Quit => write!(f, "quit from the console"),
            VmOutcome::Crashed {
                vcpu,
                reason,
                location,
            } => write!(f, "vCPU {vcpu} stopped: {reason} at {location}"),
        }
    }
}

pub struct Vm {
    console: ConsoleMode,
    vcpus: Vec<Box<dyn Vcpu>>,
    platform: Platform,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    /// The backend VM and guest memory: kept alive until every vCPU has stopped.
    _backing: Box<dyn std::any::Any + Send>,
    /// The KVM VM descriptor whose teardown may be left to a child process.
    vm_fd: std::os::fd::RawFd,
    detach_teardown: bool,
}

impl Vm {
    pub(crate) fn new(
        console: ConsoleMode,
        vcpus: Vec<Box<dyn Vcpu>>,
        platform: Platform,
        events_tx: Sender<VmEvent>,
        events_rx: Receiver<VmEvent>,
        backing: Box<dyn std::any::Any + Send>,
        vm_fd: std::os::fd::RawFd,
    ) -> Self {
        Vm {
            console,
            vcpus,
            platform,
            events_tx,
            events_rx,
            _backing: backing,
            vm_fd,
            detach_teardown: false,
        }
    }

    /// When the VM ends, leave the kernel's VM teardown to a child process (for a
    /// process that exits right after the VM does).
    pub fn detach_teardown(&mut self) {
        self.detach_teardown = true;
    }

    /// The guest's boot-timer marks so far.
    pub fn boot_marks(&self) -> Arc<std::sync::Mutex<Vec<devices::legacy::boot_timer::BootMark>>> {
        self.platform.boot_timer.clone()
    }

    /// Runs the guest until it powers off, resets, crashes or the user quits.
    pub fn run(self) -> Result<VmOutcome, VmError> {
        cpu::kick::install_handler().map_err(VmError::Thread)?;
        let stop = Arc::new(AtomicBool::new(false));
        let dispatcher = Arc::new(Dispatcher {
            io: self.platform.io.clone(),
            mmio: self.platform.mmio.clone(),
            stop: stop.clone(),
            events: self.events_tx.clone(),
        });
        let _raw = match self.console {
            ConsoleMode::Stdio => {
                let raw = RawTerminal::enter();
                let serial = self.platform.serial.clone();
                let events = self.events_tx.clone();
                std::thread::Builder::new()
                    .name("console".into())
                    .spawn(move || console::forward_stdin(serial, events))
                    .map_err(VmError::Thread)?;
                raw
            }
            ConsoleMode::OutputOnly => None,
        };

        let mut threads: Vec<(KickFlag, JoinHandle<()>)> = Vec::new();
        for mut vcpu in self.vcpus {
            let d = dispatcher.clone();
            let flag = vcpu.kick_flag();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || d.run_vcpu(vcpu.as_mut()))
                .map_err(VmError::Thread)?;
            threads.push((flag, handle));
        }

        let outcome = match self.events_rx.recv() {
            Ok(VmEvent::Guest(GuestRequest::PowerOff)) => VmOutcome::PoweredOff,
            Ok(VmEvent::Guest(GuestRequest::Reset)) => VmOutcome::Reset,
            Ok(VmEvent::ConsoleQuit) => VmOutcome::Quit,
            Ok(VmEvent::VcpuFailed {
                index,
                reason,
                location,
            }) => VmOutcome::Crashed {
                vcpu: index,
                reason,
                location,
            },
            // Every sender is held by this struct; recv cannot fail while we hold one.
            Err(_) => VmOutcome::PoweredOff,
        };

        stop.store(true, Ordering::Release);
        for (flag, handle) in &threads {
            flag.kick(handle.as_pthread_t());
        }
        for (_, handle) in threads {
            let _ = handle.join();
        }
        if self.detach_teardown {
            crate::teardown::defer_vm_teardown(self.vm_fd);
        }
        Ok(outcome)
    }
}
