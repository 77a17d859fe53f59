//! The dispatcher: every vCPU runs this loop. Each exit (KVM) or trap (software CPU)
//! lands here and is routed: port I/O and MMIO to the buses, guest resets and
//! power-offs to the VM, anything fatal to the VM with the vCPU's location.

use std::sync::Arc;
use std::sync::mpsc::Sender;

use cpu::GuestMemory;
use cpu::{Exit, Vcpu};
use devices::{Bus, GuestRequest};
use x86::{CodeCoherence, Interpreter};

use crate::control::VmControl;
use crate::metrics::{ExitReason, Metrics};
use crate::vm::VmEvent;

/// What every vCPU thread shares.
pub struct Dispatcher {
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    pub events: Sender<VmEvent>,
    pub metrics: Arc<Metrics>,
    /// Guest RAM, for the interpreter when KVM cannot emulate an instruction.
    pub mem: GuestMemory,
    /// Whether the interpreter takes over where KVM's emulator gives up.
    pub kvm_fallback: bool,
}

/// Tells the VM control a vCPU has left its loop, however it leaves.
struct Exited<'a>(&'a VmControl);
impl Drop for Exited<'_> {
    fn drop(&mut self) {
        self.0.vcpu_exited();
    }
}

impl Dispatcher {
    /// Runs `vcpu` until the VM stops or the vCPU cannot go on.
    pub fn run_vcpu(&self, vcpu: &mut dyn Vcpu) {
        let _exited = Exited(&self.control);
        self.dispatch(vcpu);
        if let Some(stats) = vcpu.software_cpu_stats() {
            self.metrics.add_software_cpu(&stats);
        }
    }

    fn dispatch(&self, vcpu: &mut dyn Vcpu) {
        let index = vcpu.index();
        // Made on first use: most vCPUs on hosts with VT-x/AMD-V never need it.
        let mut interpreter: Option<Interpreter> = None;
        while self.control.keep_running(vcpu) {
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) => {
                    let location = vcpu.location();
                    self.fail(index, e.to_string(), location);
                    return;
                }
            };
            match exit {
                Exit::IoIn { port, data } => {
                    self.metrics.exit(ExitReason::IoIn);
                    if !self.io.read(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: read from unassigned port {port:#x}");
                    }
                }
                Exit::IoOut { port, data } => {
                    self.metrics.exit(ExitReason::IoOut);
                    if !self.io.write(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: write to unassigned port {port:#x}");
                    }
                }
                Exit::MmioRead { addr, data } => {
                    self.metrics.exit(ExitReason::MmioRead);
                    if !self.mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read from unassigned MMIO {addr:#x}");
                    }
                }
                Exit::MmioWrite { addr, data } => {
                    self.metrics.exit(ExitReason::MmioWrite);
                    if !self.mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unassigned MMIO {addr:#x}");
                    }
                }
                Exit::Halt => self.metrics.exit(ExitReason::Halt),
                Exit::Interrupted => self.metrics.exit(ExitReason::Interrupted),
                Exit::SystemReset => {
                    self.metrics.exit(ExitReason::System);
                    self.request(GuestRequest::Reset);
                }
                Exit::SystemPowerOff => {
                    self.metrics.exit(ExitReason::System);
                    self.request(GuestRequest::PowerOff);
                }
                Exit::EmulationFailure => {
                    self.metrics.exit(ExitReason::EmulationFailure);
                    if !self.kvm_fallback {
                        let reason = "KVM could not emulate an instruction (fallback off)";
                        self.fail(index, reason.into(), vcpu.location());
                        return;
                    }
                    let interp = interpreter
                        .get_or_insert_with(|| Interpreter::new(CodeCoherence::Validate));
                    let done = crate::fallback::emulate(
                        interp,
                        vcpu,
                        &self.mem,
                        &self.io,
                        &self.mmio,
                        &self.metrics,
                    );
                    if let Err(f) = done {
                        let location = f.location.unwrap_or_else(|| vcpu.location());
                        self.fail(index, f.reason, location);
                        return;
                    }
                }
                Exit::Fatal(fatal) => {
                    let location = vcpu.location();
                    self.fail(index, fatal.to_string(), location);
                    return;
                }
            }
        }
    }

    fn request(&self, request: GuestRequest) {
        let _ = self.events.send(VmEvent::Guest(request));
    }

    fn fail(&self, index: u8, reason: String, location: cpu::Location) {
        let _ = self.events.send(VmEvent::VcpuFailed {
            index,
            reason,
            location,
        });
    }
}
