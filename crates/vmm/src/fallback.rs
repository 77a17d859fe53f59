//! The KVM emulation fallback. On hosts without VT-x/AMD-V, KVM runs the guest through
//! its own instruction emulator, which gives up on instructions it does not know
//! (cmpxchg16b, xrstor, int3, popcnt, clac, SSE arithmetic...). There the dispatcher
//! hands the instruction to vessel's interpreter: read the vCPU's state, execute the
//! one instruction against guest memory and the same buses, write the state back (or
//! inject the exception it raised), and let KVM carry on.

use cpu::GuestMemory;
use cpu::{Location, Vcpu};
use devices::Bus;
use x86::{Exception, Fault, Interpreter};

use crate::metrics::Metrics;

/// The machine around the instruction, as the interpreter sees it.
struct FallbackPlatform<'a> {
    vcpu: &'a mut dyn Vcpu,
    mem: &'a GuestMemory,
    io: &'a Bus,
    mmio: &'a Bus,
}

const IA32_TSC: u32 = 0x10;

impl x86::Platform for FallbackPlatform<'_> {
    type Memory = GuestMemory;

    fn memory(&self) -> &GuestMemory {
        self.mem
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        self.mmio.read(gpa, data);
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.mmio.write(gpa, data);
    }
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        self.io.read(u64::from(port), data);
    }
    fn io_out(&mut self, port: u16, data: &[u8]) {
        self.io.write(u64::from(port), data);
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.vcpu.cpuid(leaf, subleaf)
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        self.vcpu.rdmsr(msr)
    }
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        self.vcpu.wrmsr(msr, value)
    }
    fn tsc(&mut self) -> u64 {
        self.vcpu.rdmsr(IA32_TSC).unwrap_or(0)
    }
}

/// Why the fallback could not carry the vCPU on.
pub struct FallbackFailure {
    pub reason: String,
    pub location: Option<Location>,
}

/// The name an instruction that ended in an exception is counted under.
fn exception_label(e: &Exception) -> String {
    match e {
        Exception::Breakpoint => "int3".into(),
        Exception::Overflow => "into".into(),
        Exception::SoftwareInterrupt(_) => "int".into(),
        other => format!("exception {}", other.vector()),
    }
}

/// Runs the instruction at the vCPU's RIP in the interpreter.
pub fn emulate(
    interp: &mut Interpreter,
    vcpu: &mut dyn Vcpu,
    mem: &GuestMemory,
    io: &Bus,
    mmio: &Bus,
    metrics: &Metrics,
) -> Result<(), FallbackFailure> {
    let failed = |e: cpu::VcpuError| FallbackFailure {
        reason: e.to_string(),
        location: None,
    };
    let mut state = vcpu.state().map_err(failed)?;
    let result = {
        let mut platform = FallbackPlatform {
            vcpu,
            mem,
            io,
            mmio,
        };
        interp.step(&mut state, &mut platform)
    };
    match result {
        Ok(done) => {
            metrics.fallback(&format!("{:?}", done.mnemonic).to_lowercase());
            vcpu.set_state(&state).map_err(failed)
        }
        Err(Fault::Exception(e)) => {
            metrics.fallback(&exception_label(&e));
            vcpu.set_state(&state).map_err(failed)?;
            vcpu.inject(e).map_err(failed)
        }
        Err(fault) => Err(failure(fault)),
    }
}

/// Why the interpreter could not run the instruction either.
fn failure(fault: Fault) -> FallbackFailure {
    match fault {
        Fault::Unsupported(u) => FallbackFailure {
            reason: format!(
                "KVM could not emulate {:?}, and neither can vessel's interpreter",
                u.mnemonic
            )
            .to_lowercase()
            .replacen("kvm", "KVM", 1),
            location: Some(Location {
                rip: u.rip,
                bytes: u.bytes().to_vec(),
            }),
        },
        other => FallbackFailure {
            reason: format!("the interpreter stopped: {other:?}"),
            location: None,
        },
    }
}
