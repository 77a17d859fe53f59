//! Unit tests for what the differential suite cannot run natively in user mode:
//! privileged and system instructions, faults, paging, CPU modes other than 64-bit,
//! the code cache, devices, and atomicity across threads. Expected values are worked out
//! by hand from the SDM.

#[path = "../common/mod.rs"]
mod common;

mod cache;
mod cpuid;
mod events;
mod faults;
mod jit;
mod modes;
mod paging;
mod smp;
mod strings;
mod system;
mod transitions;
mod x87;

use common::{PTE_NX, PTE_U, PTE_W, PageTables, TestPlatform};
use iced_x86::code_asm::CodeAssembler;
use x86::{CodeCoherence, CpuState, Fault, Interpreter, RunOutcome, StepOutcome};

pub const CODE: u64 = 0x40_0000;
pub const DATA: u64 = 0x50_0000;
pub const STACK_TOP: u64 = 0x60_1000;
/// A user-accessible page for privilege tests.
pub const USER: u64 = 0x70_0000;

/// A long-mode guest: code at CODE (executable), DATA and the stack writable and NX,
/// USER user-accessible.
pub struct Vm {
    pub p: TestPlatform,
    pub pt: PageTables,
    pub cpu: CpuState,
    pub interp: Interpreter,
}

impl Vm {
    pub fn long(cpl: u8) -> Vm {
        let p = TestPlatform::new(16 << 20);
        let mut pt = PageTables::new(&p, 0x1000);
        let u = if cpl == 3 { PTE_U } else { 0 };
        pt.identity(&p, CODE, 0x2000, u);
        pt.identity(&p, DATA, 0x2000, PTE_W | PTE_NX | u);
        pt.identity(&p, STACK_TOP - 0x1000, 0x1000, PTE_W | PTE_NX | u);
        pt.identity(&p, USER, 0x1000, PTE_W | PTE_U);
        let mut cpu = CpuState::long_mode(pt.pml4, cpl);
        cpu.rip = CODE;
        cpu.gpr[4] = STACK_TOP;
        Vm {
            p,
            pt,
            cpu,
            interp: Interpreter::new(CodeCoherence::Tracked),
        }
    }

    /// Assembles 64-bit code at `at` and writes it to guest memory.
    pub fn code_at(
        &mut self,
        at: u64,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ) {
        let mut a = CodeAssembler::new(64).expect("assembler");
        f(&mut a).expect("assemble");
        let bytes = a.assemble(at).expect("assemble");
        self.p.write(at, &bytes);
    }

    pub fn code(&mut self, f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) {
        self.code_at(CODE, f);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.p.write(CODE, b);
    }

    pub fn step(&mut self) -> Result<StepOutcome, Fault> {
        self.interp.step(&mut self.cpu, &mut self.p)
    }

    pub fn run(&mut self, budget: u64) -> Result<RunOutcome, Fault> {
        self.interp.run(&mut self.cpu, &mut self.p, budget)
    }

    pub fn exception(&mut self) -> x86::Exception {
        match self.step() {
            Err(Fault::Exception(e)) => e,
            other => panic!("expected an exception, got {other:?}"),
        }
    }
}

/// Length of the instruction at `at`.
pub fn insn_len(vm: &Vm, at: u64) -> u64 {
    let mut b = [0u8; 15];
    vm.p.read(at, &mut b);
    iced_x86::Decoder::new(64, &b, iced_x86::DecoderOptions::NONE)
        .decode()
        .len() as u64
}
