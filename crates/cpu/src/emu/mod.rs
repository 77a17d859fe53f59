//! The software CPU backend (`--accel emu`): every vCPU runs on vessel's interpreter,
//! one thread per vCPU, against the same guest memory, buses and boot path as KVM.
//! The interrupt controllers and timers are user-space models (`devices::irqchip`);
//! this module is the loop that joins them to the interpreter: deliver interrupts at
//! instruction boundaries, sleep in HLT, start application processors on SIPI.

mod entry;
mod platform;

use std::sync::Arc;

use arch::cpuid::CpuidEntry;
use arch::entry::EntryState;
use devices::Bus;
use devices::irqchip::{IrqChip, RunState};
use x86::{CodeMap, CpuState, Event, Fault, Interpreter, RunExit, RunLimits};

use crate::exit::{Exit, FatalExit};
use crate::kick::KickFlag;
use crate::{Location, Vcpu, VcpuError};

pub use entry::entry_state;
use platform::EmuPlatform;

/// Instructions per interpreter call: timers are polled between calls, so this bounds
/// timer latency (about 100 µs at 250 MIPS) without costing the hot loop anything.
const SLICE: u64 = 25_000;

/// What the software vCPUs of one VM share.
pub struct EmuMachine {
    pub mem: crate::GuestMemory,
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub chip: Arc<IrqChip>,
    /// Decoded code shared knowledge: writes by any vCPU or device invalidate it.
    pub code: Arc<CodeMap>,
    /// The ISA level the VM's CPU model fixes, if any.
    pub isa: Option<arch::cpuid::IsaLevel>,
    /// Whether hot blocks run translated (`x86::JitMode`), and after how many runs
    /// (`None`: the tier's default).
    pub jit: x86::JitMode,
    pub jit_hot: Option<u32>,
}

/// The CPUID a software vCPU reports: what the interpreter implements (limited to, or
/// raised to, an ISA level a CPU model fixes), with the TSC (and the local APIC's timer
/// crystal) at the guest clock's 1 GHz.
pub fn cpuid(index: u8, count: u8, isa: Option<arch::cpuid::IsaLevel>) -> Vec<CpuidEntry> {
    let mut table = model_cpuid(index, count);
    if let Some(level) = isa {
        arch::cpuid::limit_isa(&mut table, level, true);
    }
    table
}

fn model_cpuid(index: u8, count: u8) -> Vec<CpuidEntry> {
    x86::emu_cpuid(u32::from(index), u32::from(count), devices::irqchip::TSC_HZ)
        .into_iter()
        .map(|l| CpuidEntry {
            function: l.leaf,
            index: l.subleaf,
            flags: u32::from(l.subleaf_significant),
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
        })
        .collect()
}

pub struct EmuVcpu {
    index: u8,
    cpu: CpuState,
    interp: Interpreter,
    machine: Arc<EmuMachine>,
    cpuid: Vec<CpuidEntry>,
    kick: KickFlag,
    /// In HLT; kept across kicks, so pausing a halted guest does not wake it.
    halted: bool,
    /// The last CR8 the local APIC's TPR was told about.
    cr8: u64,
    /// Guest RIP samples, one per slice, when VESSEL_GUEST_PROFILE names a file.
    profile: Option<Profile>,
}

/// A sampling profile of where the guest spends its instructions: the RIP at the end
/// of every slice, written as `rip count` lines to `<path>.<vcpu>` when the vCPU goes.
struct Profile {
    path: std::path::PathBuf,
    samples: std::collections::HashMap<u64, u32>,
}

impl Drop for Profile {
    fn drop(&mut self) {
        let mut rows: Vec<(u64, u32)> = self.samples.drain().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        let text: String = rows
            .iter()
            .map(|(rip, n)| format!("{rip:#x} {n}\n"))
            .collect();
        if let Err(e) = std::fs::write(&self.path, text) {
            tracing::warn!("guest profile {}: {e}", self.path.display());
        }
    }
}

impl EmuVcpu {
    /// vCPU `index` of `count`; the boot vCPU starts at `entry`, the others wait for SIPI.
    pub fn new(index: u8, count: u8, machine: Arc<EmuMachine>, entry: &EntryState) -> Self {
        let wake = machine.chip.wake(usize::from(index)).clone();
        let cpu = if index == 0 {
            entry_state(entry)
        } else {
            CpuState::default()
        };
        EmuVcpu {
            index,
            cpu,
            interp: {
                let mut i = Interpreter::with_code_map(machine.code.clone());
                i.enforce_cpuid();
                i.set_jit(machine.jit, machine.jit_hot);
                i
            },
            cpuid: cpuid(index, count, machine.isa),
            kick: KickFlag::with_waker(Arc::new(move || wake.notify())),
            machine,
            halted: false,
            cr8: 0,
            profile: std::env::var_os("VESSEL_GUEST_PROFILE").map(|p| Profile {
                path: format!("{}.{index}", p.to_string_lossy()).into(),
                samples: Default::default(),
            }),
        }
    }

    fn platform(&mut self) -> (EmuPlatform<'_>, &mut CpuState, &mut Interpreter) {
        (
            EmuPlatform::new(self.index, &self.machine, &self.cpuid),
            &mut self.cpu,
            &mut self.interp,
        )
    }

    /// Delivers `event` through the IDT; a triple fault ends the vCPU.
    fn deliver(&mut self, event: Event) -> Option<Exit<'static>> {
        let (mut p, cpu, interp) = self.platform();
        match interp.deliver(cpu, &mut p, event) {
            Ok(()) => None,
            Err(Fault::TripleFault) => Some(Exit::Fatal(FatalExit::TripleFault)),
            Err(other) => Some(Exit::Fatal(FatalExit::Unhandled(format!(
                "delivering {event:?}: {other:?}"
            )))),
        }
    }

    /// An INIT (and maybe its SIPI) arrived: reset, and start if the SIPI is there.
    fn follow_init(&mut self) -> bool {
        let lapic = self.machine.chip.lapic(usize::from(self.index));
        match lapic.run_state() {
            RunState::WaitForSipi => false,
            RunState::Startup { .. } => {
                let vector = lapic.take_startup().unwrap_or(0);
                self.cpu = entry::startup_state(vector);
                self.interp.invalidate_all_code();
                self.halted = false;
                true
            }
            RunState::Running | RunState::Halted => true,
        }
    }
}

impl Vcpu for EmuVcpu {
    fn index(&self) -> u8 {
        self.index
    }

    fn kick_flag(&self) -> KickFlag {
        self.kick.clone()
    }

    fn run(&mut self) -> Result<Exit<'_>, VcpuError> {
        let chip = self.machine.chip.clone();
        let lapic = chip.lapic(usize::from(self.index));
        loop {
            if self.kick.take() {
                return Ok(Exit::Interrupted);
            }
            lapic.wake().take_attention();
            if lapic.run_state() == RunState::WaitForSipi
                || matches!(lapic.run_state(), RunState::Startup { .. })
            {
                if matches!(lapic.run_state(), RunState::WaitForSipi) {
                    self.cpu = CpuState::default();
                }
                if !self.follow_init() {
                    lapic.wait();
                    continue;
                }
            }
            if self.cpu.cr8 != self.cr8 {
                lapic.set_cr8(self.cpu.cr8);
                self.cr8 = self.cpu.cr8;
            }
            let interruptible =
                self.cpu.rflags & x86::rflags::IF != 0 && !self.cpu.interrupt_shadow;
            if lapic.take_nmi() {
                self.halted = false;
                if let Some(exit) = self.deliver(Event::Nmi) {
                    return Ok(exit);
                }
            } else if interruptible && let Some(vector) = lapic.ack_interrupt() {
                self.halted = false;
                if let Some(exit) = self.deliver(Event::Interrupt(vector)) {
                    return Ok(exit);
                }
            }
            if self.halted {
                lapic.set_halted();
                let if_flag = self.cpu.rflags & x86::rflags::IF != 0;
                while !lapic.halt_ends(if_flag) {
                    if self.kick.take() {
                        return Ok(Exit::Interrupted);
                    }
                    lapic.wait();
                }
                lapic.set_running();
                self.halted = false;
                continue;
            }
            let limits = RunLimits {
                budget: SLICE,
                stop_when_interruptible: lapic.has_interrupt() && !interruptible,
            };
            let outcome = {
                let (mut p, cpu, interp) = self.platform();
                interp.run_with(cpu, &mut p, limits)
            };
            lapic.poll_timers();
            if let Some(p) = &mut self.profile {
                *p.samples.entry(self.cpu.rip).or_default() += 1;
            }
            match outcome {
                Ok(out) => match out.exit {
                    RunExit::Halt => self.halted = true,
                    // Spinning on a lock another vCPU holds: give its thread (or anything
                    // else that waits for this core) the CPU.
                    RunExit::PauseLoop => std::thread::yield_now(),
                    _ => {}
                },
                Err(Fault::Exception(e)) => {
                    if let Some(exit) = self.deliver(Event::Exception(e)) {
                        return Ok(exit);
                    }
                }
                Err(Fault::TripleFault) => return Ok(Exit::Fatal(FatalExit::TripleFault)),
                Err(Fault::TranslationDiffers(m)) => {
                    return Ok(Exit::Fatal(FatalExit::Unhandled(m.to_string())));
                }
                Err(Fault::Unsupported(u)) => {
                    // An instruction the guest's CPUID does not offer is #UD, as on
                    // hardware; one it offers that the interpreter cannot run stops it.
                    let bytes = &u.bytes[..usize::from(u.len).min(15)];
                    let bitness = self.cpu.mode().bitness();
                    let offered = x86::offered(bytes, bitness, |leaf, sub| {
                        crate::cpuid_lookup(&self.cpuid, leaf, sub)
                    });
                    if offered == Some(false) {
                        if let Some(exit) =
                            self.deliver(Event::Exception(x86::Exception::InvalidOpcode))
                        {
                            return Ok(exit);
                        }
                        continue;
                    }
                    return Ok(Exit::Fatal(FatalExit::Unhandled(format!(
                        "vessel's interpreter does not implement {:?}",
                        u.mnemonic
                    ))));
                }
            }
        }
    }

    fn location(&mut self) -> Location {
        let (mut p, cpu, interp) = self.platform();
        let bytes = interp.peek_code(cpu, &mut p, 15);
        Location {
            rip: cpu.rip,
            bytes,
        }
    }

    fn state(&mut self) -> Result<CpuState, VcpuError> {
        Ok(self.cpu.clone())
    }

    fn set_state(&mut self, state: &CpuState) -> Result<(), VcpuError> {
        self.cpu = state.clone();
        self.interp.invalidate_all_code();
        Ok(())
    }

    fn inject(&mut self, exception: x86::Exception) -> Result<(), VcpuError> {
        match self.deliver(Event::Exception(exception)) {
            None => Ok(()),
            Some(_) => Err(VcpuError::Emu {
                index: self.index,
                reason: format!("triple fault delivering {exception}"),
            }),
        }
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        crate::cpuid_lookup(&self.cpuid, leaf, subleaf)
    }

    fn software_cpu_stats(&self) -> Option<x86::Stats> {
        Some(self.interp.stats())
    }

    fn save(&mut self) -> Result<crate::VcpuSnapshot, VcpuError> {
        Ok(crate::VcpuSnapshot {
            index: self.index,
            cpu: self.cpu.clone(),
            halted: self.halted,
            backend: crate::BackendVcpu::Emu,
        })
    }

    fn restore(&mut self, s: &crate::VcpuSnapshot) -> Result<(), VcpuError> {
        self.cpu = s.cpu.clone();
        self.halted = s.halted;
        // The local APIC's TPR comes with the interrupt controller's state.
        self.cr8 = s.cpu.cr8;
        self.interp.invalidate_all_code();
        Ok(())
    }

    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        let (mut p, _, _) = self.platform();
        x86::Platform::rdmsr(&mut p, msr)
    }

    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        let (mut p, _, _) = self.platform();
        x86::Platform::wrmsr(&mut p, msr, value)
    }
}
