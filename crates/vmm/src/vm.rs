//! A built VM running: one thread per vCPU through the dispatcher, the console on
//! another, and this thread waiting for the event that ends the VM. A [`VmHandle`]
//! lets other threads (the control API) pause, resume, press the power button, reset
//! or kill it while it runs.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cpu::{Location, Vcpu};
use devices::GuestRequest;
use devices::acpi_pm::AcpiPm;
use devices::bus::lock;
use devices::legacy::Serial;

use crate::builder::Platform;
use crate::console::{self, RawTerminal};
use crate::control::{ControlError, RunState, VmControl};
use crate::dispatcher::Dispatcher;
use crate::error::VmError;
use crate::io_limits::IoLimits;
use crate::metrics::Metrics;
use devices::virtio::balloon::BalloonState;

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
    /// The host ends the VM now (no guest shutdown).
    Kill,
    /// The host resets the VM (no guest shutdown).
    HostReset,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    PoweredOff,
    /// Reset by the guest or by the host.
    Reset,
    /// The user quit from the console.
    Quit,
    /// The host killed it.
    Killed,
    /// The guest wrote the debug exit port: the process exit status it asks for.
    DebugExit(u8),
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
            VmOutcome::Killed => write!(f, "killed"),
            VmOutcome::DebugExit(status) => {
                write!(
                    f,
                    "guest asked to exit with status {status} (debug exit port)"
                )
            }
            VmOutcome::Crashed {
                vcpu,
                reason,
                location,
            } => write!(f, "vCPU {vcpu} stopped: {reason} at {location}"),
        }
    }
}

/// Controls a running VM from other threads.
#[derive(Clone)]
pub struct VmHandle {
    control: Arc<VmControl>,
    events: Sender<VmEvent>,
    pm: Arc<Mutex<AcpiPm>>,
    serial: Arc<Mutex<Serial>>,
    hvc: Option<devices::virtio::console::ConsoleInput>,
    metrics: Arc<Metrics>,
    persist: Arc<crate::snapshot::Persist>,
    io_limits: Arc<IoLimits>,
    balloon: Option<Arc<BalloonState>>,
    incoming: Option<Arc<crate::migration::postcopy::Incoming>>,
}

impl VmHandle {
    /// A VM received by post-copy whose link to the source failed: goes on over `link`
    /// (past its greeting and `Resume`).
    pub fn postcopy_relink(
        &self,
        link: std::fs::File,
    ) -> Result<(), crate::migration::MigrationError> {
        match &self.incoming {
            Some(i) => i.relink(link),
            None => Err(crate::migration::MigrationError::Local(
                "this VM was not received by post-copy".into(),
            )),
        }
    }

    /// The source's side of [`Self::postcopy_relink`]: finishes a post-copy whose link
    /// failed, over `stream`.
    pub fn migrate_recover(
        &self,
        stream: &std::fs::File,
        opts: &crate::migration::SendOptions,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<crate::migration::SendReport, crate::migration::MigrationError> {
        crate::migration::send::recover(&self.persist, stream, opts, cancel)
    }

    /// The disks' and NICs' rate limiters.
    pub fn io_limits(&self) -> &IoLimits {
        &self.io_limits
    }

    /// The balloon, when the VM has one.
    pub fn balloon(&self) -> Option<&Arc<BalloonState>> {
        self.balloon.as_ref()
    }

    pub fn state(&self) -> RunState {
        self.control.state()
    }

    /// Stops guest execution; returns once no vCPU runs guest code.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.control.pause()
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        if lock(&self.persist.unfinished_postcopy).is_some() {
            // Its guest runs at a post-copy's destination: never in two places.
            return Err(ControlError::Wrong(
                "running at its migration's destination (finish with vessel migrate --recover)",
            ));
        }
        if self
            .persist
            .handed_over
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // A migration's end gave its disks away and no answer came: only if no
            // other process took them does it run here again.
            self.persist.take_back_disks().map_err(|_| {
                ControlError::Wrong("its disks are held by its migration's destination")
            })?;
        }
        self.control.resume()
    }

    /// The ACPI power button: the guest decides to shut down (or not).
    pub fn press_power_button(&self) -> Result<(), ControlError> {
        match self.control.state() {
            RunState::Running => {
                lock(&self.pm).press_power_button();
                Ok(())
            }
            RunState::Paused => Err(ControlError::Wrong("paused")),
            RunState::Stopping => Err(ControlError::Wrong("stopping")),
        }
    }

    /// Ends the VM at once.
    pub fn kill(&self) {
        let _ = self.events.send(VmEvent::Kill);
    }

    /// Resets the VM at once (as a reset button would).
    pub fn reset(&self) {
        let _ = self.events.send(VmEvent::HostReset);
    }

    /// Feeds console input to the guest's serial port; returns the bytes accepted.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        let n = match &self.hvc {
            Some(hvc) => hvc.push(bytes),
            None => lock(&self.serial).enqueue_input(bytes),
        };
        self.metrics
            .console_in_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Saves the whole VM into the snapshot folder `dest` (with what `fill` adds while
    /// it is paused: its config, copies of its disks). A running VM runs on afterwards.
    pub fn snapshot(
        &self,
        dest: &std::path::Path,
        fill: crate::snapshot::file::Fill,
    ) -> Result<crate::snapshot::capture::Captured, crate::snapshot::SnapshotError> {
        self.persist.capture(&self.control, dest, fill)
    }

    /// Migrates the VM over `stream` to a `vessel receive` (see [`crate::migration`]).
    /// On success the guest is stopped here (the caller ends the VM) and runs there.
    pub fn migrate(
        &self,
        stream: &std::fs::File,
        name: &str,
        config: String,
        opts: &crate::migration::SendOptions,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<crate::migration::SendReport, crate::migration::MigrationError> {
        crate::migration::send::send(
            &self.persist,
            &self.control,
            stream,
            name,
            config,
            opts,
            cancel,
        )
    }
}

pub struct Vm {
    /// Helper processes (passt) and threads, kept as long as the VM; first, so they are
    /// stopped before the devices they serve go.
    _helpers: Vec<Box<dyn std::any::Any + Send>>,
    stdio_console: bool,
    vcpus: Vec<Box<dyn Vcpu>>,
    platform: Platform,
    control: Arc<VmControl>,
    metrics: Arc<Metrics>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    /// The backend VM and guest memory: kept alive until every vCPU has stopped.
    _backing: Box<dyn std::any::Any + Send>,
    /// The KVM VM descriptor whose teardown may be left to a child process.
    vm_fd: Option<std::os::fd::RawFd>,
    detach_teardown: bool,
    mem: cpu::GuestMemory,
    kvm_fallback: bool,
    persist: Arc<crate::snapshot::Persist>,
    io_limits: Arc<IoLimits>,
    balloon: Option<Arc<BalloonState>>,
    /// A VM received by post-copy: its pages still coming.
    incoming: Option<Arc<crate::migration::postcopy::Incoming>>,
}

/// What the builder hands over.
pub(crate) struct VmParts {
    pub stdio_console: bool,
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub platform: Platform,
    pub metrics: Arc<Metrics>,
    pub events_tx: Sender<VmEvent>,
    pub events_rx: Receiver<VmEvent>,
    pub backing: Box<dyn std::any::Any + Send>,
    pub vm_fd: Option<std::os::fd::RawFd>,
    pub mem: cpu::GuestMemory,
    pub kvm_fallback: bool,
    pub helpers: Vec<Box<dyn std::any::Any + Send>>,
    pub persist: Arc<crate::snapshot::Persist>,
    pub io_limits: Arc<IoLimits>,
    pub balloon: Option<Arc<BalloonState>>,
    pub incoming: Option<crate::migration::postcopy::Incoming>,
}

impl Vm {
    pub(crate) fn new(p: VmParts) -> Self {
        Vm {
            stdio_console: p.stdio_console,
            vcpus: p.vcpus,
            platform: p.platform,
            control: Arc::new(VmControl::new()),
            metrics: p.metrics,
            events_tx: p.events_tx,
            events_rx: p.events_rx,
            _backing: p.backing,
            vm_fd: p.vm_fd,
            detach_teardown: false,
            mem: p.mem,
            kvm_fallback: p.kvm_fallback,
            _helpers: p.helpers,
            persist: p.persist,
            io_limits: p.io_limits,
            balloon: p.balloon,
            incoming: p.incoming.map(Arc::new),
        }
    }

    /// For a VM received by post-copy: tells the source it runs here now (call once it
    /// is built, before it runs). Nothing for any other VM.
    pub fn postcopy_running(&self) -> Result<(), crate::migration::MigrationError> {
        match &self.incoming {
            Some(i) => i.running(),
            None => Ok(()),
        }
    }

    /// When the VM ends, leave the kernel's VM teardown to a child process (for a
    /// process that exits right after the VM does).
    pub fn detach_teardown(&mut self) {
        self.detach_teardown = true;
    }

    pub fn handle(&self) -> VmHandle {
        VmHandle {
            control: self.control.clone(),
            events: self.events_tx.clone(),
            pm: self.platform.pm.clone(),
            serial: self.platform.serial.clone(),
            hvc: self.platform.stdio_hvc.clone(),
            metrics: self.metrics.clone(),
            persist: self.persist.clone(),
            io_limits: self.io_limits.clone(),
            balloon: self.balloon.clone(),
            incoming: self.incoming.clone(),
        }
    }

    /// The guest's boot-timer marks so far.
    pub fn boot_marks(&self) -> Arc<Mutex<Vec<devices::legacy::boot_timer::BootMark>>> {
        self.platform.boot_timer.clone()
    }

    /// Runs the guest until it powers off, resets, crashes, is killed or the user quits.
    pub fn run(self) -> Result<VmOutcome, VmError> {
        cpu::kick::install_handler().map_err(VmError::Thread)?;
        let dispatcher = Arc::new(Dispatcher {
            io: self.platform.io.clone(),
            mmio: self.platform.mmio.clone(),
            control: self.control.clone(),
            events: self.events_tx.clone(),
            metrics: self.metrics.clone(),
            mem: self.mem.clone(),
            kvm_fallback: self.kvm_fallback,
        });
        let _raw = if self.stdio_console {
            let raw = RawTerminal::enter();
            let handle = self.handle();
            let events = self.events_tx.clone();
            sandbox::thread::spawn(sandbox::ThreadClass::Console, "console", move || {
                console::forward_stdin(handle, events)
            })
            .map_err(VmError::Thread)?;
            raw
        } else {
            None
        };

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for mut vcpu in self.vcpus {
            let d = dispatcher.clone();
            let flag = vcpu.kick_flag();
            let name = format!("vcpu{}", vcpu.index());
            let handle = sandbox::thread::spawn(sandbox::ThreadClass::Vcpu, &name, move || {
                d.run_vcpu(vcpu.as_mut())
            })
            .map_err(VmError::Thread)?;
            self.control.add_vcpu(flag, handle.as_pthread_t());
            self.metrics.add_vcpu_thread(handle.as_pthread_t());
            threads.push(handle);
        }

        let outcome = loop {
            let event = self.events_rx.recv();
            break match event {
                Ok(VmEvent::Guest(GuestRequest::PowerOff)) => VmOutcome::PoweredOff,
                Ok(VmEvent::Guest(GuestRequest::DebugExit(status))) => VmOutcome::DebugExit(status),
                Ok(VmEvent::Guest(GuestRequest::Reset) | VmEvent::HostReset) => VmOutcome::Reset,
                Ok(VmEvent::ConsoleQuit) => VmOutcome::Quit,
                Ok(VmEvent::Kill) => VmOutcome::Killed,
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
                Err(_) => continue,
            };
        };

        self.control.stop();
        for handle in threads {
            let _ = handle.join();
        }
        if let (true, Some(fd)) = (self.detach_teardown, self.vm_fd) {
            crate::teardown::defer_vm_teardown(fd);
        }
        Ok(outcome)
    }
}
