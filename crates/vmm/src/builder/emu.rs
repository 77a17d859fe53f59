//! The software CPU backend: vessel's interpreter on every vCPU, with the interrupt
//! controllers and the PIT in user space, driven by a guest clock (TSC at 1 GHz).

use std::sync::{Arc, Mutex};

use arch::entry::EntryState;
use arch::layout::{self, ports};
use cpu::Vcpu;
use cpu::emu::{EmuMachine, EmuVcpu};
use devices::bus::SharedDevice;
use devices::irqchip::{ELCR_PORT, GuestClock, IoApicMmio, IrqChip, PicPort, PicPorts};
use devices::legacy::pit::{Pit, PitPort61, PitTimer};

use super::{Backend, Placement};
use crate::config::VmConfig;
use crate::error::VmError;
use crate::snapshot::capture::IrqPersist;
use crate::snapshot::{EmuIrqState, IrqState, SnapshotBackend};
use cpu::GuestMemory;

pub(crate) fn backend(
    config: &VmConfig,
    mem: &GuestMemory,
    code: &Arc<x86::CodeMap>,
    entry: &EntryState,
    clock_start: Option<u64>,
) -> Result<Backend, VmError> {
    let cpus = config.cpus as u8;
    let isa = config.cpu_model.isa_level();
    let (jit, jit_hot) = jit_mode()?;
    // A restored VM's clock goes on from its snapshot (plus the time it sat on disk).
    let clock = GuestClock::resume_at(clock_start.unwrap_or(0));
    let chip = IrqChip::new(usize::from(cpus), clock.clone());
    let pit = Arc::new(Mutex::new(Pit::new(chip.isa_irq_line(0), clock)));
    let irq = Box::new(EmuIrq {
        chip: chip.clone(),
        pit: pit.clone(),
    });
    chip.set_platform_timers(vec![PitTimer::new(pit.clone())])
        .map_err(|e| VmError::Backend(e.to_string()))?;
    let pic = |port| -> SharedDevice { Arc::new(Mutex::new(PicPorts::new(chip.clone(), port))) };
    let devices: Vec<(Placement, SharedDevice)> = vec![
        (
            Placement::Mmio(layout::IOAPIC_START, layout::IOAPIC_SIZE),
            Arc::new(Mutex::new(IoApicMmio::new(chip.clone()))),
        ),
        (Placement::Io(ports::PIC_MASTER, 2), pic(PicPort::Master)),
        (Placement::Io(ports::PIC_SLAVE, 2), pic(PicPort::Slave)),
        (Placement::Io(ELCR_PORT, 2), pic(PicPort::Elcr)),
        (Placement::Io(ports::PIT, 4), pit.clone()),
        (
            Placement::Io(ports::NMI_STATUS, 1),
            Arc::new(Mutex::new(PitPort61::new(pit))),
        ),
    ];
    let (entry, mem, code, vcpu_chip) = (entry.clone(), mem.clone(), code.clone(), chip.clone());
    Ok(Backend {
        com1_irq: chip.irq_line(ports::COM1_IRQ),
        sci: chip.irq_line(ports::ACPI_SCI_IRQ),
        devices,
        msi: chip.clone(),
        notify: Box::new(|_, _| Ok(())),
        vcpus: Box::new(move |platform| {
            let machine = Arc::new(EmuMachine {
                mem,
                io: platform.io.clone(),
                mmio: platform.mmio.clone(),
                chip: vcpu_chip,
                code,
                isa,
                jit,
                jit_hot,
            });
            Ok((0..cpus)
                .map(|i| Box::new(EmuVcpu::new(i, cpus, machine.clone(), &entry)) as Box<dyn Vcpu>)
                .collect())
        }),
        backing: Box::new(chip),
        vm_fd: None,
        kind: SnapshotBackend::Emu,
        cpuid: cpu::emu::cpuid(0, cpus, isa),
        irq,
        dirty_log: None,
    })
}

/// The software CPU's translating tier: `VESSEL_JIT=off|on|check` (on by default), and
/// `VESSEL_JIT_HOT=N`, how many runs make a block hot enough to translate.
fn jit_mode() -> Result<(x86::JitMode, Option<u32>), VmError> {
    let mode = match std::env::var("VESSEL_JIT") {
        Ok(v) => v
            .parse()
            .map_err(|e: String| VmError::Backend(format!("VESSEL_JIT: {e}")))?,
        Err(_) => x86::JitMode::On,
    };
    let hot = match std::env::var("VESSEL_JIT_HOT") {
        Ok(v) => Some(v.parse().map_err(|_| {
            VmError::Backend(format!(
                "VESSEL_JIT_HOT: {v:?} is not a count of runs (0 to 1073741824)"
            ))
        })?),
        Err(_) => None,
    };
    Ok((mode, hot))
}

/// The software CPU's interrupt controllers and PIT, saved and loaded.
struct EmuIrq {
    chip: Arc<IrqChip>,
    pit: Arc<Mutex<Pit>>,
}

impl IrqPersist for EmuIrq {
    fn save(&self) -> Result<IrqState, String> {
        Ok(IrqState::Emu(Box::new(EmuIrqState {
            chip: self.chip.save(),
            pit: devices::bus::lock(&self.pit).save(),
        })))
    }

    fn restore(&self, s: &IrqState, _elapsed_ns: u64) -> Result<(), String> {
        // The clock already resumed where the snapshot left it, moved on by the time
        // on disk (the chip was built on it).
        match s {
            IrqState::Emu(e) => {
                self.chip.restore(&e.chip).map_err(|e| e.to_string())?;
                devices::bus::lock(&self.pit).restore(&e.pit);
                Ok(())
            }
            IrqState::Kvm(_) => Err("KVM's interrupt state on the software CPU".into()),
        }
    }

    fn guest_ns(&self) -> u64 {
        self.chip.clock().now_ns()
    }
}
