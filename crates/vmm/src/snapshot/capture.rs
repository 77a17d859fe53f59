//! What a VM keeps for saving and loading itself: handles on every stateful part, and
//! the capture and load sequences over them.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arch::cpuid::CpuidEntry;
use cpu::GuestMemory;
use devices::acpi_pm::AcpiPm;
use devices::bus::lock;
use devices::legacy::{Cmos, Serial};
use devices::virtio::VirtioPciDevice;

use super::file::Fill;
use super::{DeviceStates, FORMAT, IrqState, SnapshotBackend, SnapshotError, VmSnapshot};
use crate::control::{RunState, VmControl};

/// The backend's interrupt controllers and timers, saved and loaded.
pub(crate) trait IrqPersist: Send + Sync {
    fn save(&self) -> Result<IrqState, String>;
    /// Loads a saved state; `elapsed_ns` is how long the snapshot sat on disk, by
    /// which the guest's clock moves on.
    fn restore(&self, s: &IrqState, elapsed_ns: u64) -> Result<(), String>;
    /// The guest clock now (nanoseconds).
    fn guest_ns(&self) -> u64;
}

/// Handles on everything a snapshot holds.
pub struct Persist {
    pub(crate) backend: SnapshotBackend,
    pub(crate) cpus: u16,
    pub(crate) memory_bytes: u64,
    pub(crate) cpuid: Vec<CpuidEntry>,
    pub(crate) mem: GuestMemory,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) cmos: Arc<Mutex<Cmos>>,
    pub(crate) pm: Arc<Mutex<AcpiPm>>,
    pub(crate) virtio: Vec<Arc<Mutex<VirtioPciDevice<GuestMemory>>>>,
    pub(crate) irq: Box<dyn IrqPersist>,
    pub(crate) dirty: crate::migration::dirty::DirtyLog,
    /// A post-copy whose link failed: the pages the destination may still lack (the
    /// guest, stopped here, runs there).
    pub(crate) unfinished_postcopy: Mutex<Option<Vec<u64>>>,
    /// Guest RAM is private anonymous memory that only the guest and its devices fill
    /// (not mapped from a file, not shared, no pages held compressed elsewhere): a page
    /// the kernel never gave it reads as zeros.
    pub(crate) anonymous_memory: bool,
    /// The disks' locks went to a migration's destination (and were not taken back).
    pub(crate) handed_over: std::sync::atomic::AtomicBool,
}

/// What a capture did, for the caller's report.
#[derive(Clone, Debug)]
pub struct Captured {
    pub state: VmSnapshot,
    pub seconds: f64,
}

impl Persist {
    /// Captures the VM into the snapshot folder `dest` (and what `fill` adds while the
    /// VM is paused). The VM runs on afterwards if it was running.
    pub fn capture(
        &self,
        control: &VmControl,
        dest: &Path,
        fill: Fill,
    ) -> Result<Captured, SnapshotError> {
        let started = std::time::Instant::now();
        self.saveable()?;
        let was_running = control.state() == RunState::Running;
        if was_running {
            control
                .pause()
                .map_err(|e| SnapshotError::Capture(e.to_string()))?;
        }
        let result = self.capture_paused(control, dest, fill);
        if was_running && control.state() == RunState::Paused {
            let _ = control.resume();
        }
        result.map(|state| Captured {
            state,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn capture_paused(
        &self,
        control: &VmControl,
        dest: &Path,
        fill: Fill,
    ) -> Result<VmSnapshot, SnapshotError> {
        // Device workers stop once their requests in flight are done; they start again
        // when the capture is over, whatever its outcome.
        self.quiesce_devices();
        let result = self
            .save_paused(control)
            .and_then(|state| super::file::write_snapshot(dest, state, &self.mem, fill));
        self.resume_devices();
        result
    }

    /// Stops every device worker once its requests in flight are done: nothing but the
    /// vCPUs writes guest memory until [`Self::resume_devices`].
    pub(crate) fn quiesce_devices(&self) {
        for d in &self.virtio {
            lock(d).quiesce();
        }
    }

    /// Hands what the devices hold exclusively (disks' locks) to another process, or
    /// takes it back (`give` false); all or nothing.
    pub(crate) fn hand_over_devices(&self, give: bool) -> Result<(), String> {
        for (k, d) in self.virtio.iter().enumerate() {
            if let Err(e) = lock(d).hand_over(give) {
                for done in &self.virtio[..k] {
                    let _ = lock(done).hand_over(!give);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes back the disks' locks a migration's end gave away (if it did) and starts
    /// the device workers again: the VM may run here once more. Refused while another
    /// process holds a disk.
    pub(crate) fn take_back_disks(&self) -> Result<(), String> {
        if self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            self.hand_over_devices(false)?;
            self.handed_over
                .store(false, std::sync::atomic::Ordering::Release);
        }
        self.resume_devices();
        Ok(())
    }

    /// The block devices' disks, in the configuration's order.
    pub(crate) fn disks(&self) -> Vec<Arc<devices::virtio::block::Disk>> {
        self.virtio.iter().filter_map(|d| lock(d).disk()).collect()
    }

    pub(crate) fn resume_devices(&self) {
        for d in &self.virtio {
            lock(d).resume();
        }
    }

    /// Whether every device can be saved (one that lives in another process cannot).
    pub(crate) fn saveable(&self) -> Result<(), SnapshotError> {
        for d in &self.virtio {
            lock(d).saveable().map_err(SnapshotError::Unsaveable)?;
        }
        Ok(())
    }

    /// The VM's state but its memory (the VM paused, its devices quiesced).
    pub(crate) fn save_paused(&self, control: &VmControl) -> Result<VmSnapshot, SnapshotError> {
        let err = SnapshotError::Capture;
        let vcpus = control.capture(usize::from(self.cpus)).map_err(err)?;
        let irq = self.irq.save().map_err(err)?;
        let devices = DeviceStates {
            serial: lock(&self.serial).save(),
            cmos: lock(&self.cmos).save(),
            pm: lock(&self.pm).save(),
            virtio: self.virtio.iter().map(|d| lock(d).save()).collect(),
        };
        Ok(VmSnapshot {
            format: FORMAT,
            vessel_version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.backend,
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            cpuid: self.cpuid.clone(),
            saved_unix_ns: super::now_unix_ns(),
            guest_ns: self.irq.guest_ns(),
            vcpus,
            irq,
            devices,
            memory: Vec::new(),
        })
    }

    /// Loads the devices and interrupt state of `s` (the vCPUs are loaded by the
    /// builder before they run).
    pub(crate) fn restore_platform(&self, s: &VmSnapshot) -> Result<(), SnapshotError> {
        let err = SnapshotError::Restore;
        if s.devices.virtio.len() != self.virtio.len() {
            return Err(err(format!(
                "the snapshot has {} virtio devices, this VM {}: its disks and NICs differ",
                s.devices.virtio.len(),
                self.virtio.len()
            )));
        }
        let elapsed = super::now_unix_ns().saturating_sub(s.saved_unix_ns);
        self.irq.restore(&s.irq, elapsed).map_err(err)?;
        lock(&self.serial).restore(&s.devices.serial);
        lock(&self.cmos).restore(&s.devices.cmos);
        lock(&self.pm).restore(&s.devices.pm);
        for (d, saved) in self.virtio.iter().zip(&s.devices.virtio) {
            lock(d).restore(saved).map_err(err)?;
        }
        // The VM may be somewhere else on the network now (a migration, a copy).
        for d in &self.virtio {
            lock(d).announce();
        }
        Ok(())
    }
}
