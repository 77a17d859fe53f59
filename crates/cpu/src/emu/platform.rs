//! The machine around a software vCPU, as its interpreter sees it: guest RAM, its own
//! local APIC page and MSRs, the shared buses, CPUID and the guest clock.

use arch::cpuid::CpuidEntry;
use arch::layout;
use devices::irqchip::{LapicError, LapicRef};

use super::EmuMachine;

const IA32_TSC: u32 = 0x10;
const IA32_PLATFORM_ID: u32 = 0x17;
const IA32_BIOS_SIGN_ID: u32 = 0x8b;
const IA32_DEBUGCTL: u32 = 0x1d9;
/// Machine-check architecture: no banks and nothing to report; the capabilities are
/// read-only, and only a write of zero clears the status.
const IA32_MCG_CAP: u32 = 0x179;
const IA32_MCG_STATUS: u32 = 0x17a;

pub struct EmuPlatform<'a> {
    machine: &'a EmuMachine,
    lapic: LapicRef<'a>,
    cpuid: &'a [CpuidEntry],
}

impl<'a> EmuPlatform<'a> {
    pub fn new(index: u8, machine: &'a EmuMachine, cpuid: &'a [CpuidEntry]) -> Self {
        EmuPlatform {
            machine,
            lapic: machine.chip.lapic(usize::from(index)),
            cpuid,
        }
    }
}

/// The offset into the local APIC page, for accesses that fall in it.
fn lapic_offset(gpa: u64) -> Option<u64> {
    gpa.checked_sub(layout::LAPIC_START).filter(|o| *o < 0x1000)
}

impl x86::Platform for EmuPlatform<'_> {
    type Memory = crate::GuestMemory;

    fn memory(&self) -> &crate::GuestMemory {
        &self.machine.mem
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        match lapic_offset(gpa) {
            Some(offset) => self.lapic.mmio_read(offset, data),
            None => {
                self.machine.mmio.read(gpa, data);
            }
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        match lapic_offset(gpa) {
            Some(offset) => self.lapic.mmio_write(offset, data),
            None => {
                self.machine.mmio.write(gpa, data);
            }
        }
    }

    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        self.machine.io.read(u64::from(port), data);
    }

    fn io_out(&mut self, port: u16, data: &[u8]) {
        self.machine.io.write(u64::from(port), data);
    }

    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        crate::cpuid_lookup(self.cpuid, leaf, subleaf)
    }

    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        match self.lapic.rdmsr(msr) {
            Ok(v) => return Some(v),
            Err(LapicError::UnknownMsr(_)) => {}
            Err(_) => return None,
        }
        match msr {
            IA32_TSC => Some(self.machine.chip.clock().tsc()),
            IA32_PLATFORM_ID | IA32_BIOS_SIGN_ID | IA32_DEBUGCTL => Some(0),
            IA32_MCG_CAP | IA32_MCG_STATUS => Some(0),
            _ => {
                tracing::debug!("rdmsr {msr:#x}: no such MSR (#GP)");
                None
            }
        }
    }

    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        match self.lapic.wrmsr(msr, value) {
            Ok(()) => return true,
            Err(LapicError::UnknownMsr(_)) => {}
            Err(_) => return false,
        }
        match msr {
            // The guest clock is the host's: a guest that sets its TSC is ignored.
            IA32_TSC | IA32_BIOS_SIGN_ID | IA32_DEBUGCTL => true,
            IA32_MCG_STATUS => value == 0,
            _ => {
                tracing::debug!("wrmsr {msr:#x} = {value:#x}: no such MSR (#GP)");
                false
            }
        }
    }

    fn tsc(&mut self) -> u64 {
        self.machine.chip.clock().tsc()
    }

    fn attention(&self) -> bool {
        self.lapic.wake().attention()
    }

    fn attention_flag(&self) -> Option<&std::sync::atomic::AtomicBool> {
        Some(self.lapic.wake().attention_flag())
    }
}
