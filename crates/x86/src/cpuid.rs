//! The CPUID a guest of the software CPU sees: exactly the features the interpreter
//! implements, a topology of one core per vCPU, and the TSC frequency.

use serde::{Deserialize, Serialize};

/// One CPUID leaf (or leaf/subleaf) as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    /// The subleaf (ECX) selects the entry; otherwise it is ignored.
    pub subleaf_significant: bool,
}

impl CpuidLeaf {
    fn new(leaf: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> Self {
        CpuidLeaf {
            leaf,
            subleaf: 0,
            eax,
            ebx,
            ecx,
            edx,
            subleaf_significant: false,
        }
    }

    fn sub(leaf: u32, subleaf: u32, r: [u32; 4]) -> Self {
        CpuidLeaf {
            subleaf,
            subleaf_significant: true,
            ..Self::new(leaf, r)
        }
    }

    /// The registers: [eax, ebx, ecx, edx].
    pub fn regs(&self) -> [u32; 4] {
        [self.eax, self.ebx, self.ecx, self.edx]
    }
}

/// Looks `leaf`/`subleaf` up in `table`; leaves (and subleaves) it does not list read as
/// zeros.
pub fn cpuid_lookup(table: &[CpuidLeaf], leaf: u32, subleaf: u32) -> [u32; 4] {
    table
        .iter()
        .find(|e| e.leaf == leaf && (!e.subleaf_significant || e.subleaf == subleaf))
        .map_or([0; 4], CpuidLeaf::regs)
}

/// Leaf 1 EDX.
mod edx1 {
    pub const FPU: u32 = 1 << 0;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const CLFLUSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    pub const HTT: u32 = 1 << 28;
}

/// Leaf 1 ECX.
mod ecx1 {
    pub const CX16: u32 = 1 << 13;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
}

fn regs(s: &[u8]) -> u32 {
    u32::from_le_bytes(s.try_into().expect("four bytes"))
}

/// The CPUID table for vCPU `vcpu` (its APIC ID) of a VM with `vcpus` vCPUs whose
/// time-stamp counter runs at `tsc_hz`. Each choice, in one line:
pub fn emu_cpuid(vcpu: u32, vcpus: u32, tsc_hz: u64) -> Vec<CpuidLeaf> {
    let vcpus = vcpus.max(1);
    // Logical processor IDs per package, as the APIC-ID fields count them.
    let ids = vcpus.next_power_of_two().min(256);
    let core_bits = ids.trailing_zeros();
    let mut t = Vec::new();

    // Vendor GenuineIntel: Linux trusts leaves 0x15/0x16 for the TSC only on Intel.
    t.push(CpuidLeaf::new(
        0,
        [0x16, regs(b"Genu"), regs(b"ntel"), regs(b"ineI")],
    ));
    // Family 6 model 0x1c (Atom Bonnell): on Linux's list of CPUs without speculative
    // execution, so it enables no Meltdown/Spectre/MDS mitigation (no PTI CR3 switches, no
    // retpolines, no buffer clearing) that would only cost an interpreter time; stepping
    // 10 avoids the model's early-stepping PSE erratum check.
    let signature = (1 << 16) | (6 << 8) | (0xc << 4) | 10;
    // APIC ID, logical processors per package, CLFLUSH line in 8-byte units (64 bytes).
    let ebx1 = (vcpu << 24) | ((ids & 0xff) << 16) | (8 << 8);
    // The x86-64 baseline the interpreter executes (x87, MMX, SSE/SSE2, fxsave, cmov,
    // cx8), the paging features of its page walk (PSE, PAE, PGE, PAT), TSC/MSR/APIC for the
    // platform, CLFLUSH (a checked no-op); HTT only with several logical processors.
    let mut edx = edx1::FPU
        | edx1::PSE
        | edx1::TSC
        | edx1::MSR
        | edx1::PAE
        | edx1::CX8
        | edx1::APIC
        | edx1::PGE
        | edx1::CMOV
        | edx1::PAT
        | edx1::CLFLUSH
        | edx1::MMX
        | edx1::FXSR
        | edx1::SSE
        | edx1::SSE2;
    if vcpus > 1 {
        edx |= edx1::HTT;
    }
    // cmpxchg16b, popcnt, movbe and rdrand (the host's getrandom) are implemented; the
    // local APIC has TSC-deadline mode; we are a hypervisor. No SSE3+ (not implemented),
    // no XSAVE/AVX (Linux then uses fxsave), no x2APIC, no MONITOR/MWAIT, no PCID.
    let ecx = ecx1::CX16
        | ecx1::POPCNT
        | ecx1::MOVBE
        | ecx1::RDRAND
        | ecx1::TSC_DEADLINE
        | ecx1::HYPERVISOR;
    t.push(CpuidLeaf::new(1, [signature, ebx1, ecx, edx]));
    // Leaf 2: one descriptor byte 0xff, "see leaf 4".
    t.push(CpuidLeaf::new(2, [0xff01, 0, 0, 0]));
    // Leaf 4: plausible caches (32 KiB L1d/L1i and 1 MiB L2 per core, 8 MiB L3 shared by
    // the package), one core per vCPU.
    let caches: [(u32, u32, u32, u32, bool); 4] = [
        // (type, level, ways, size in KiB, shared by the package)
        (1, 1, 8, 32, false),
        (2, 1, 8, 32, false),
        (3, 2, 16, 1024, false),
        (3, 3, 16, 8192, true),
    ];
    for (k, &(kind, level, ways, kib, shared)) in caches.iter().enumerate() {
        let sets = kib * 1024 / (ways * 64);
        let sharing = if shared { ids - 1 } else { 0 };
        let eax = ((ids - 1) << 26) | (sharing << 14) | (1 << 8) | (level << 5) | kind;
        let ebx = ((ways - 1) << 22) | 63;
        t.push(CpuidLeaf::sub(4, k as u32, [eax, ebx, sets - 1, 0]));
    }
    t.push(CpuidLeaf::sub(4, caches.len() as u32, [0; 4]));
    // Leaf 6: the APIC timer keeps running in idle (ARAT): no broadcast timer needed.
    t.push(CpuidLeaf::new(6, [1 << 2, 0, 0, 0]));
    // Leaf 7: FSGSBASE, FDP_EXCPTN_ONLY and deprecated FCS/FDS (the x87 pointers follow
    // the current Intel model: FDP and FOP change only on unmasked exceptions, FCS/FDS
    // are zero), SMEP (checked by the page walk), ERMS and FSRM (rep movsb/stosb are
    // bulk host copies), RDSEED (the host's getrandom), RDPID. No SMAP: its stac/clac
    // pairs would cost time for no benefit.
    t.push(CpuidLeaf::sub(
        7,
        0,
        [
            0,
            1 | (1 << 6) | (1 << 7) | (1 << 9) | (1 << 13) | (1 << 18),
            1 << 22,
            1 << 4,
        ],
    ));
    // Leaf 0xa: no performance counters.
    t.push(CpuidLeaf::new(0xa, [0; 4]));
    // Leaf 0xb: x2APIC topology, one thread per core, one core per vCPU.
    t.push(CpuidLeaf::sub(0xb, 0, [0, 1, 0x100, vcpu]));
    t.push(CpuidLeaf::sub(0xb, 1, [core_bits, vcpus, 0x201, vcpu]));
    t.push(CpuidLeaf::sub(0xb, 2, [0, 0, 2, vcpu]));
    // Leaf 0x15: TSC = crystal * 1/1, crystal = the TSC frequency (Linux also derives the
    // APIC timer rate from the crystal).
    let (num, crystal) = if tsc_hz <= u64::from(u32::MAX) {
        (1, tsc_hz as u32)
    } else {
        let ratio = tsc_hz.div_ceil(u64::from(u32::MAX));
        (ratio as u32, (tsc_hz / ratio) as u32)
    };
    t.push(CpuidLeaf::new(0x15, [1, num, crystal, 0]));
    // Leaf 0x16: base and maximum frequency in MHz, 100 MHz bus.
    let mhz = (tsc_hz / 1_000_000) as u32;
    t.push(CpuidLeaf::new(0x16, [mhz, mhz, 100, 0]));
    // Hypervisor leaves: a signature no guest driver matches.
    t.push(CpuidLeaf::new(
        0x4000_0000,
        [0x4000_0000, regs(b"Vess"), regs(b"elEm"), regs(b"uCPU")],
    ));
    t.push(CpuidLeaf::new(0x8000_0000, [0x8000_0008, 0, 0, 0]));
    // lahf/sahf and lzcnt in 64-bit mode; syscall, NX, 1 GiB pages, rdtscp, long mode.
    t.push(CpuidLeaf::new(
        0x8000_0001,
        [
            0,
            0,
            1 | (1 << 5),
            (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29),
        ],
    ));
    // Brand string.
    let mut brand = [0u8; 48];
    let name = b"vessel software CPU";
    brand[..name.len()].copy_from_slice(name);
    for k in 0..3 {
        let c = &brand[16 * k..16 * (k + 1)];
        t.push(CpuidLeaf::new(
            0x8000_0002 + k as u32,
            [
                regs(&c[0..4]),
                regs(&c[4..8]),
                regs(&c[8..12]),
                regs(&c[12..16]),
            ],
        ));
    }
    // L2 as the legacy leaf describes it: 1 MiB, 16-way, 64-byte lines.
    t.push(CpuidLeaf::new(
        0x8000_0006,
        [0, 0, (1024 << 16) | (8 << 12) | 64, 0],
    ));
    // Invariant TSC: constant rate, runs in every idle state.
    t.push(CpuidLeaf::new(0x8000_0007, [0, 0, 0, 1 << 8]));
    // 40 physical, 48 linear address bits.
    t.push(CpuidLeaf::new(0x8000_0008, [(48 << 8) | 40, 0, 0, 0]));
    t
}
