//! Boots a Linux vmlinux (PVH entry) on the interpreter alone, with nothing but a serial
//! port: a smoke test of the instruction set on real kernel code, not a VMM (no
//! interrupt controllers, no timers, no devices). It runs until the kernel stops making
//! progress, faults, or hits an instruction the interpreter lacks, and prints the console
//! output and where it ended.
//!
//! `cargo run -p x86 --release --example linux_smoke -- VMLINUX [CMDLINE] [SECONDS] [INITRD]`

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86::{
    CodeCoherence, CpuState, CpuidLeaf, Event, Fault, Interpreter, Platform, RunExit, SegReg,
    Segment, cpuid_lookup, emu_cpuid,
};

const RAM: usize = 512 << 20;
const START_INFO: u64 = 0x6000;
const CMDLINE: u64 = 0x7000;
const MEMMAP: u64 = 0x8000;
const MODLIST: u64 = 0x9000;
const INITRD_AT: u64 = 0x1000_0000;

struct Smoke {
    mem: GuestMemoryMmap,
    cpuid: Vec<CpuidLeaf>,
    out: Vec<u8>,
    start: Instant,
    ports: BTreeMap<u16, u64>,
    msrs: BTreeMap<u32, u64>,
}

impl Platform for Smoke {
    type Memory = GuestMemoryMmap;
    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        *self.ports.entry(port).or_default() += 1;
        data.fill(0xff);
        if port == 0x3fd {
            data[0] = 0x60; // LSR: transmitter empty
        }
    }
    fn io_out(&mut self, port: u16, data: &[u8]) {
        *self.ports.entry(port).or_default() += 1;
        if port == 0x3f8 {
            self.out.push(data[0]);
            let _ = std::io::stderr().write_all(&data[..1]);
        }
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid_lookup(&self.cpuid, leaf, subleaf)
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        Some(match msr {
            0x1a0 => 1,
            0x1b => 0xfee0_0900,
            _ => *self.msrs.get(&msr).unwrap_or(&0),
        })
    }
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        self.msrs.insert(msr, value);
        true
    }
    fn tsc(&mut self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Loads the ELF's segments; returns the PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
fn load(mem: &GuestMemoryMmap, elf: &[u8]) -> u64 {
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = usize::from(u16_at(elf, 0x36));
    let phnum = usize::from(u16_at(elf, 0x38));
    let mut entry = None;
    for k in 0..phnum {
        let ph = &elf[phoff + k * phentsize..];
        let (ty, off, paddr) = (u32_at(ph, 0), u64_at(ph, 8) as usize, u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32) as usize, u64_at(ph, 40) as usize);
        match ty {
            1 => {
                mem.write_slice(&elf[off..off + filesz], GuestAddress(paddr))
                    .expect("segment");
                let zeros = vec![0u8; memsz - filesz];
                mem.write_slice(&zeros, GuestAddress(paddr + filesz as u64))
                    .expect("bss");
            }
            4 => {
                let mut n = off;
                while n < off + filesz {
                    let namesz = u32_at(elf, n) as usize;
                    let descsz = u32_at(elf, n + 4) as usize;
                    let ty = u32_at(elf, n + 8);
                    let name = n + 12;
                    let desc = name + namesz.next_multiple_of(4);
                    if &elf[name..name + 3] == b"Xen" && ty == 18 {
                        entry = Some(if descsz == 8 {
                            u64_at(elf, desc)
                        } else {
                            u64::from(u32_at(elf, desc))
                        });
                    }
                    n = desc + descsz.next_multiple_of(4);
                }
            }
            _ => {}
        }
    }
    entry.expect("no PVH entry note")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: linux_smoke VMLINUX [CMDLINE] [SECONDS]");
    let cmdline = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "console=ttyS0 earlyprintk=serial,ttyS0 nolapic".to_string());
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(60);
    let initrd = args.get(4).map(|p| std::fs::read(p).expect("read initrd"));
    let elf = std::fs::read(path).expect("read vmlinux");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("RAM");
    let entry = load(&mem, &elf);
    // hvm_start_info (version 1, with a memory map).
    let mut si = [0u8; 56];
    si[0..4].copy_from_slice(&0x336e_c578u32.to_le_bytes());
    si[4..8].copy_from_slice(&1u32.to_le_bytes());
    si[24..32].copy_from_slice(&CMDLINE.to_le_bytes());
    si[40..48].copy_from_slice(&MEMMAP.to_le_bytes());
    si[48..52].copy_from_slice(&2u32.to_le_bytes());
    if let Some(rd) = &initrd {
        mem.write_slice(rd, GuestAddress(INITRD_AT)).unwrap();
        let mut m = [0u8; 32];
        m[0..8].copy_from_slice(&INITRD_AT.to_le_bytes());
        m[8..16].copy_from_slice(&(rd.len() as u64).to_le_bytes());
        mem.write_slice(&m, GuestAddress(MODLIST)).unwrap();
        si[12..16].copy_from_slice(&1u32.to_le_bytes());
        si[16..24].copy_from_slice(&MODLIST.to_le_bytes());
    }
    mem.write_slice(&si, GuestAddress(START_INFO)).unwrap();
    let mut c = cmdline.into_bytes();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE)).unwrap();
    let mut mm = Vec::new();
    for (addr, size, ty) in [
        (0u64, 0x9_fc00u64, 1u32),
        (0x10_0000, RAM as u64 - 0x10_0000, 1),
    ] {
        mm.extend(addr.to_le_bytes());
        mm.extend(size.to_le_bytes());
        mm.extend(ty.to_le_bytes());
        mm.extend(0u32.to_le_bytes());
    }
    mem.write_slice(&mm, GuestAddress(MEMMAP)).unwrap();

    let mut cpu = CpuState::protected_mode32(0);
    cpu.seg[SegReg::Cs as usize] = Segment::flat(0x10, 0xb, 0, true, false);
    cpu.rip = entry;
    cpu.gpr[3] = START_INFO;
    let mut p = Smoke {
        mem,
        cpuid: emu_cpuid(0, 1, 1_000_000_000),
        out: Vec::new(),
        start: Instant::now(),
        ports: BTreeMap::new(),
        msrs: BTreeMap::new(),
    };
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut executed = 0u64;
    let mut exceptions = 0u64;
    // LINUX_SMOKE_PROFILE=1: sample RIP every 20k instructions.
    let profile = std::env::var_os("LINUX_SMOKE_PROFILE").is_some();
    // LINUX_SMOKE_PROFILE_AFTER: start sampling after this many instructions.
    let profile_after: u64 = std::env::var("LINUX_SMOKE_PROFILE_AFTER")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let slice = if profile { 20_000 } else { 1_000_000 };
    let mut samples: BTreeMap<u64, u64> = BTreeMap::new();
    // LINUX_SMOKE_LIMIT: stop after this many instructions (for profilers).
    let limit: u64 = std::env::var("LINUX_SMOKE_LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    let t = Instant::now();
    let why = loop {
        if Instant::now() > deadline {
            break "time limit".to_string();
        }
        if executed >= limit {
            break "instruction limit".to_string();
        }
        match it.run(&mut cpu, &mut p, slice) {
            Ok(out) => {
                executed += out.executed;
                if profile && executed >= profile_after {
                    *samples.entry(cpu.rip).or_default() += 1;
                }
                if out.exit == RunExit::Halt && cpu.rflags & x86::rflags::IF == 0 {
                    break "hlt with interrupts off".to_string();
                }
            }
            Err(Fault::Exception(e)) => {
                exceptions += 1;
                if let Err(f) = it.deliver(&mut cpu, &mut p, Event::Exception(e)) {
                    break format!("{f} delivering {e}");
                }
            }
            Err(f) => break f.to_string(),
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let code = it.peek_code(&mut cpu, &mut p, 15);
    eprintln!(
        "\n--- {why}: rip {:#x} ({:?}) cs {:#x} cpl {} mode {:?}, bytes {:02x?}",
        cpu.rip,
        cpu.mode(),
        cpu.seg[SegReg::Cs as usize].selector,
        cpu.cpl(),
        cpu.mode(),
        code
    );
    eprintln!(
        "{executed} instructions in {secs:.2} s ({:.1} MIPS), {exceptions} exceptions, {:?}",
        executed as f64 / secs / 1e6,
        it.stats()
    );
    eprintln!("ports: {:x?}", p.ports);
    if profile {
        let mut v: Vec<_> = samples.into_iter().collect();
        v.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        for (rip, n) in v.iter() {
            eprintln!("sample {rip:#x} {n}");
        }
    }
}
