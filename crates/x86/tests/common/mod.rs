//! Shared by the test binaries: a platform over plain guest RAM with logged devices, a
//! page-table builder, and a small deterministic PRNG.
#![allow(dead_code)]

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86::Platform;

/// Guest RAM plus logs of what reached the device callbacks.
pub struct TestPlatform {
    pub mem: GuestMemoryMmap,
    pub mmio_reads: Vec<(u64, usize)>,
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
    /// Value returned by MMIO reads (byte-replicated).
    pub mmio_value: u8,
    pub io_in: Vec<(u16, usize)>,
    pub io_out: Vec<(u16, Vec<u8>)>,
    pub msrs: HashMap<u32, u64>,
    pub tsc: u64,
    pub cpuid_calls: Vec<(u32, u32)>,
    /// What `cpuid` answers: a fixed CPU model (the default, so a test does not depend
    /// on the machine it runs on) or, for the differential suite, the host's own.
    pub cpuid: CpuidSource,
    /// What `attention` answers.
    pub attention: bool,
    /// How often `attention` was asked.
    pub attention_asked: std::cell::Cell<u64>,
    /// The flag translated code watches (as the software CPU's vCPUs have one).
    pub attention_flag: std::sync::atomic::AtomicBool,
}

impl TestPlatform {
    pub fn new(ram: usize) -> Self {
        Self::with_memory(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram)]).expect("guest RAM"),
        )
    }

    /// A platform over existing guest RAM (shared with other platforms: vCPU threads).
    pub fn with_memory(mem: GuestMemoryMmap) -> Self {
        TestPlatform {
            mem,
            mmio_reads: Vec::new(),
            mmio_writes: Vec::new(),
            mmio_value: 0xab,
            io_in: Vec::new(),
            io_out: Vec::new(),
            msrs: HashMap::new(),
            tsc: 0x1234_5678_9abc,
            cpuid_calls: Vec::new(),
            cpuid: CpuidSource::Model(model_cpuid()),
            attention: false,
            attention_asked: std::cell::Cell::new(0),
            attention_flag: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("write guest RAM");
    }

    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        self.mem
            .read_slice(out, GuestAddress(gpa))
            .expect("read guest RAM");
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(gpa))
            .expect("read guest RAM")
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.mem
            .write_obj(v, GuestAddress(gpa))
            .expect("write guest RAM")
    }
}

pub enum CpuidSource {
    Host,
    Model(Vec<x86::CpuidLeaf>),
}

/// The unit tests' CPU: the software CPU's model plus XSAVE with x87, SSE and AVX at
/// their standard offsets (what the interpreter also runs for the KVM fallback).
pub fn model_cpuid() -> Vec<x86::CpuidLeaf> {
    let mut t = x86::emu_cpuid(0, 1, 1_000_000_000);
    for l in t.iter_mut().filter(|l| l.leaf == 1) {
        l.ecx |= 1 << 26; // XSAVE
    }
    let leaf_d = |subleaf, r: [u32; 4]| x86::CpuidLeaf {
        leaf: 0xd,
        subleaf,
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
        subleaf_significant: true,
    };
    t.push(leaf_d(0, [0x7, 0x340, 0x340, 0]));
    t.push(leaf_d(1, [0x1, 0, 0, 0])); // xsaveopt
    t.push(leaf_d(2, [256, 576, 0, 0]));
    t
}

impl Platform for TestPlatform {
    type Memory = GuestMemoryMmap;
    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        self.mmio_reads.push((gpa, data.len()));
        data.fill(self.mmio_value);
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.mmio_writes.push((gpa, data.to_vec()));
    }
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        self.io_in.push((port, data.len()));
        for (k, b) in data.iter_mut().enumerate() {
            *b = (port as u8).wrapping_add(k as u8);
        }
    }
    fn io_out(&mut self, port: u16, data: &[u8]) {
        self.io_out.push((port, data.to_vec()));
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid_calls.push((leaf, subleaf));
        match &self.cpuid {
            CpuidSource::Host => {
                let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
                [r.eax, r.ebx, r.ecx, r.edx]
            }
            CpuidSource::Model(t) => x86::cpuid_lookup(t, leaf, subleaf),
        }
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        self.msrs.get(&msr).copied()
    }
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        match self.msrs.get_mut(&msr) {
            Some(v) => {
                *v = value;
                true
            }
            None => false,
        }
    }
    fn tsc(&mut self) -> u64 {
        self.tsc += 1000;
        self.tsc
    }
    fn attention(&self) -> bool {
        self.attention_asked.set(self.attention_asked.get() + 1);
        self.attention
            || self
                .attention_flag
                .load(std::sync::atomic::Ordering::Relaxed)
    }
    fn attention_flag(&self) -> Option<&std::sync::atomic::AtomicBool> {
        Some(&self.attention_flag)
    }
}

pub const PTE_P: u64 = 1;
pub const PTE_W: u64 = 2;
pub const PTE_U: u64 = 4;
pub const PTE_A: u64 = 1 << 5;
pub const PTE_D: u64 = 1 << 6;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_NX: u64 = 1 << 63;

/// Builds 4-level page tables in guest RAM, allocating table pages from `next`.
pub struct PageTables {
    pub pml4: u64,
    next: u64,
}

impl PageTables {
    pub fn new(p: &TestPlatform, first_table: u64) -> Self {
        p.write(first_table, &[0u8; 4096]);
        PageTables {
            pml4: first_table,
            next: first_table + 0x1000,
        }
    }

    fn table(&mut self, p: &TestPlatform, entry_addr: u64) -> u64 {
        let e = p.read_u64(entry_addr);
        if e & PTE_P != 0 {
            return e & 0x000f_ffff_ffff_f000;
        }
        let t = self.next;
        self.next += 0x1000;
        p.write(t, &[0u8; 4096]);
        p.write_u64(entry_addr, t | PTE_P | PTE_W | PTE_U);
        t
    }

    /// Maps the 4 KiB page at `lin` to `gpa` with leaf flags `flags` (P is added).
    pub fn map(&mut self, p: &TestPlatform, lin: u64, gpa: u64, flags: u64) {
        let mut t = self.pml4;
        for shift in [39, 30, 21] {
            let idx = (lin >> shift) & 511;
            t = self.table(p, t + idx * 8);
        }
        let idx = (lin >> 12) & 511;
        p.write_u64(t + idx * 8, gpa | flags | PTE_P);
    }

    /// Address of the leaf entry for `lin` (which must be mapped).
    pub fn leaf(&self, p: &TestPlatform, lin: u64) -> u64 {
        let mut t = self.pml4;
        for shift in [39, 30, 21] {
            let idx = (lin >> shift) & 511;
            t = p.read_u64(t + idx * 8) & 0x000f_ffff_ffff_f000;
        }
        t + ((lin >> 12) & 511) * 8
    }

    /// Maps `len` bytes (whole pages) identically.
    pub fn identity(&mut self, p: &TestPlatform, lin: u64, len: u64, flags: u64) {
        let mut a = lin & !0xfff;
        while a < lin + len {
            self.map(p, a, a, flags);
            a += 0x1000;
        }
    }
}

/// splitmix64: tiny, deterministic, good enough to drive test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// A value biased towards the edges where flags change: 0, all ones, sign
    /// boundaries of every width, small numbers.
    pub fn interesting(&mut self) -> u64 {
        const EDGES: [u64; 14] = [
            0,
            1,
            u64::MAX,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
        ];
        match self.below(8) {
            0 => EDGES[self.below(EDGES.len() as u64) as usize],
            1 => self.below(64),
            2 => EDGES[self.below(EDGES.len() as u64) as usize]
                .wrapping_add(self.below(3))
                .wrapping_sub(1),
            3 => self.next() & 0xff,
            _ => self.next(),
        }
    }
}
