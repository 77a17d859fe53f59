//! Code coherence across interpreters sharing guest RAM (one per vCPU thread) and with
//! devices writing RAM through vm-memory, via a shared `CodeMap`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86::{CodeBitmap, CodeMap, CpuState, Interpreter, Platform, RunExit, guest_memory};

/// A platform over guest RAM allocated with `x86::guest_memory`.
struct Shared {
    mem: GuestMemoryMmap<CodeBitmap>,
}

impl Platform for Shared {
    type Memory = GuestMemoryMmap<CodeBitmap>;
    fn memory(&self) -> &Self::Memory {
        &self.mem
    }
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn io_in(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn io_out(&mut self, _port: u16, _data: &[u8]) {}
    fn cpuid(&mut self, _leaf: u32, _subleaf: u32) -> [u32; 4] {
        [0; 4]
    }
    fn rdmsr(&mut self, _msr: u32) -> Option<u64> {
        None
    }
    fn wrmsr(&mut self, _msr: u32, _value: u64) -> bool {
        false
    }
    fn tsc(&mut self) -> u64 {
        0
    }
}

fn vm_memory() -> (Arc<CodeMap>, GuestMemoryMmap<CodeBitmap>) {
    let ranges = [(GuestAddress(0), 1 << 20)];
    let code = Arc::new(CodeMap::new(&ranges));
    let mem = guest_memory(&ranges, &code).expect("guest RAM");
    (code, mem)
}

fn asm32(
    at: u64,
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(32).expect("asm");
    f(&mut a).expect("assemble");
    a.assemble(at).expect("assemble")
}

fn cpu_at(rip: u64, esp: u64) -> CpuState {
    let mut cpu = CpuState::protected_mode32(0);
    cpu.rip = rip;
    cpu.gpr[4] = esp;
    cpu
}

#[test]
fn interpreters_are_send() {
    fn send<T: Send>() {}
    send::<Interpreter>();
    send::<Arc<CodeMap>>();
}

/// vCPU 0 spins calling a function until it returns 2; vCPU 1, on another thread, patches
/// the function's immediate from 1 to 2 through its own interpreter. Without coherence,
/// vCPU 0 would run its cached block forever.
#[test]
fn another_interpreter_patches_running_code() {
    use iced_x86::code_asm::*;
    let (code, mem) = vm_memory();
    let spin = asm32(0x1000, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.call(0x2000u64)?;
        a.cmp(eax, 2)?;
        a.jne(top)?;
        a.hlt()
    });
    mem.write_slice(&spin, GuestAddress(0x1000)).unwrap();
    mem.write_slice(&[0xb8, 1, 0, 0, 0, 0xc3], GuestAddress(0x2000))
        .unwrap();
    let patch = asm32(0x3000, |a| {
        a.mov(dword_ptr(0x2001), 2)?;
        a.hlt()
    });
    mem.write_slice(&patch, GuestAddress(0x3000)).unwrap();

    let mut p0 = Shared { mem: mem.clone() };
    let mut cpu0 = cpu_at(0x1000, 0x8000);
    let mut vcpu0 = Interpreter::with_code_map(Arc::clone(&code));
    // Warm up: the loop and the function are decoded and cached.
    let out = vcpu0.run(&mut cpu0, &mut p0, 10_000).expect("spin");
    assert_eq!(out.exit, RunExit::Budget);

    let spinner = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = vcpu0.run(&mut cpu0, &mut p0, 100_000).expect("spin");
            if out.exit == RunExit::Halt {
                return (cpu0, vcpu0.stats());
            }
            assert!(Instant::now() < deadline, "vCPU 0 never saw the patch");
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut p1 = Shared { mem: mem.clone() };
    let mut cpu1 = cpu_at(0x3000, 0x9000);
    let mut vcpu1 = Interpreter::with_code_map(Arc::clone(&code));
    let out = vcpu1.run(&mut cpu1, &mut p1, 100).expect("patch");
    assert_eq!(out.exit, RunExit::Halt);
    let (cpu0, stats) = spinner.join().expect("spinner");
    assert_eq!(cpu0.gpr[0], 2);
    assert!(stats.blocks_invalidated >= 1);
}

/// A device writes guest RAM through vm-memory (as virtio does): the decoded block at that
/// address is dropped without anyone telling the interpreter.
#[test]
fn device_write_through_vm_memory_invalidates_a_block() {
    let (code, mem) = vm_memory();
    mem.write_slice(&[0xb8, 1, 0, 0, 0, 0xf4], GuestAddress(0x1000))
        .unwrap();
    let mut p = Shared { mem: mem.clone() };
    let mut it = Interpreter::with_code_map(code);
    let mut cpu = cpu_at(0x1000, 0x8000);
    it.run(&mut cpu, &mut p, 10).expect("first");
    assert_eq!(cpu.gpr[0], 1);
    // Same bytes again: the cached block is used.
    let decoded = it.stats().blocks_decoded;
    cpu.rip = 0x1000;
    it.run(&mut cpu, &mut p, 10).expect("again");
    assert_eq!(it.stats().blocks_decoded, decoded);
    // A "DMA" write of new code.
    mem.write_slice(&[0xb8, 2, 0, 0, 0, 0xf4], GuestAddress(0x1000))
        .unwrap();
    cpu.rip = 0x1000;
    it.run(&mut cpu, &mut p, 10).expect("fresh");
    assert_eq!(cpu.gpr[0], 2);
    assert_eq!(it.stats().blocks_decoded, decoded + 1);
    // A write elsewhere leaves the block alone.
    mem.write_obj(0u32, GuestAddress(0x5000)).unwrap();
    cpu.rip = 0x1000;
    it.run(&mut cpu, &mut p, 10).expect("still cached");
    assert_eq!(it.stats().blocks_decoded, decoded + 1);
}

/// Code that a page-crossing store rewrites in the next page, and a page that stops being
/// code once written: later writes to it are plain data writes again.
#[test]
fn code_page_becomes_data_after_a_write() {
    use iced_x86::code_asm::*;
    let (code, mem) = vm_memory();
    let prog = asm32(0x1000, |a| {
        a.call(0x2000u64)?;
        // Overwrite the called function with data, then use the page as data.
        a.mov(dword_ptr(0x2000), 0x1234_5678)?;
        a.mov(ecx, 1000)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(dword_ptr(0x2004), 1)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.hlt()
    });
    mem.write_slice(&prog, GuestAddress(0x1000)).unwrap();
    mem.write_slice(&[0xc3, 0, 0, 0, 0, 0, 0, 0], GuestAddress(0x2000))
        .unwrap();
    let mut p = Shared { mem: mem.clone() };
    let mut it = Interpreter::with_code_map(code);
    let mut cpu = cpu_at(0x1000, 0x8000);
    let out = it.run(&mut cpu, &mut p, 10_000).expect("run");
    assert_eq!(out.exit, RunExit::Halt);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
        0x1234_5678
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2004)).unwrap(), 1000);
}
