//! The dispatcher: every vCPU runs this loop. Each exit (KVM) or trap (software CPU)
//! lands here and is routed: port I/O and MMIO to the buses, guest resets and
//! power-offs to the VM, anything fatal to the VM with the vCPU's location.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use cpu::{Exit, Vcpu};
use devices::{Bus, GuestRequest};

use crate::vm::VmEvent;

/// What every vCPU thread shares.
pub struct Dispatcher {
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<VmEvent>,
}

impl Dispatcher {
    /// Runs `vcpu` until the VM stops or the vCPU cannot go on.
    pub fn run_vcpu(&self, vcpu: &mut dyn Vcpu) {
        let index = vcpu.index();
        while !self.stop.load(Ordering::Acquire) {
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
                    if !self.io.read(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: read from unassigned port {port:#x}");
                    }
                }
                Exit::IoOut { port, data } => {
                    if !self.io.write(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: write to unassigned port {port:#x}");
                    }
                }
                Exit::MmioRead { addr, data } => {
                    if !self.mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read from unassigned MMIO {addr:#x}");
                    }
                }
                Exit::MmioWrite { addr, data } => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unassigned MMIO {addr:#x}");
                    }
                }
                Exit::Halt | Exit::Interrupted => {}
                Exit::SystemReset => self.request(GuestRequest::Reset),
                Exit::SystemPowerOff => self.request(GuestRequest::PowerOff),
                Exit::EmulationFailure => {
                    let location = vcpu.location();
                    self.fail(
                        index,
                        "KVM could not emulate an instruction".into(),
                        location,
                    );
                    return;
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
