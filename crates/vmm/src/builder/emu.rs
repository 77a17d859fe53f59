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
use cpu::GuestMemory;

pub(crate) fn backend(
    config: &VmConfig,
    mem: &GuestMemory,
    code: &Arc<x86::CodeMap>,
    entry: &EntryState,
) -> Result<Backend, VmError> {
    let cpus = config.cpus as u8;
    let clock = GuestClock::new();
    let chip = IrqChip::new(usize::from(cpus), clock.clone());
    let pit = Arc::new(Mutex::new(Pit::new(chip.isa_irq_line(0), clock)));
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
            });
            Ok((0..cpus)
                .map(|i| Box::new(EmuVcpu::new(i, cpus, machine.clone(), &entry)) as Box<dyn Vcpu>)
                .collect())
        }),
        backing: Box::new(chip),
        vm_fd: None,
    })
}
