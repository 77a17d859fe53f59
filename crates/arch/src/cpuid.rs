//! CPUID as the guest sees it: the host's supported leaves with the topology vessel
//! presents (one core per vCPU, one package, APIC ID = vCPU index).

use serde::{Deserialize, Serialize};

/// One CPUID leaf/subleaf answer (the same fields as KVM's kvm_cpuid_entry2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// x2APIC topology level types (leaf 0xB / 0x1F, ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` cores: the x2APIC ID shift of the core level.
fn core_id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Rewrites the topology-bearing leaves for vCPU `apic_id` of `count`.
pub fn set_topology(entries: &mut [CpuidEntry], apic_id: u8, count: u8) {
    let id = u32::from(apic_id);
    let count = u32::from(count.max(1));
    let shift = core_id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0xffff) | (count.next_power_of_two() << 16) | (id << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: cores per package, sharing.
            0x4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                let (shift_bits, logical, kind) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (shift, count, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift_bits;
                e.ebx = logical;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = id;
            }
            0x8000_0001 => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            // AMD: number of cores (NC) and the APIC ID bits that number them.
            0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1),
            // AMD extended APIC ID, compute-unit (core) id, node id.
            0x8000_001e => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// Where CPUID lists features (leaf, subleaf, register index): what a CPU model keeps or
/// drops.
const FEATURE_WORDS: [(u32, u32, usize); 7] = [
    (1, 0, 2),
    (1, 0, 3),
    (7, 0, 1),
    (7, 0, 2),
    (7, 0, 3),
    (0x8000_0001, 0, 2),
    (0x8000_0001, 0, 3),
];

fn word(e: &mut CpuidEntry, r: usize) -> &mut u32 {
    match r {
        0 => &mut e.eax,
        1 => &mut e.ebx,
        2 => &mut e.ecx,
        _ => &mut e.edx,
    }
}

fn lookup(table: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    table
        .iter()
        .find(|e| e.function == leaf && (e.flags & 1 == 0 || e.index == subleaf))
}

/// Adds `other`'s feature bits to `table`'s (features a fallback implements).
pub fn add_features(table: &mut [CpuidEntry], other: &[CpuidEntry]) {
    for (leaf, sub, r) in FEATURE_WORDS {
        let Some(bits) = lookup(other, leaf, sub).map(|o| [o.eax, o.ebx, o.ecx, o.edx][r]) else {
            continue;
        };
        if let Some(e) = table
            .iter_mut()
            .find(|e| e.function == leaf && (e.flags & 1 == 0 || e.index == sub))
        {
            *word(e, r) |= bits;
        }
    }
}

/// Keeps only the feature bits `model` has too (leaves it lacks lose all), and drops
/// the XSAVE leaf when the model has no XSAVE: a CPU two backends can both give.
pub fn keep_features(table: &mut Vec<CpuidEntry>, model: &[CpuidEntry]) {
    for (leaf, sub, r) in FEATURE_WORDS {
        let bits = lookup(model, leaf, sub).map_or(0, |o| [o.eax, o.ebx, o.ecx, o.edx][r]);
        for e in table
            .iter_mut()
            .filter(|e| e.function == leaf && (e.flags & 1 == 0 || e.index == sub))
        {
            *word(e, r) &= bits;
        }
    }
    let xsave = lookup(model, 1, 0).is_some_and(|e| e.ecx & (1 << 26) != 0);
    if !xsave {
        table.retain(|e| e.function != 0xd);
    }
}

/// The x86-64 psABI's ISA levels, as CPU models: v1 the baseline, v2 adding CX16,
/// LAHF/SAHF, POPCNT and SSE3 to SSE4.2, with AES-NI and PCLMULQDQ (which every v2-class
/// CPU since 2010 has; QEMU's `x86-64-v2-AES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsaLevel {
    V1,
    V2,
}

/// (leaf, register index, bits) of the ISA extensions past v1 that v2 has.
const V2_BITS: [(u32, usize, u32); 2] = [
    // PCLMULQDQ, SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT, AES.
    (
        1,
        2,
        1 | 1 << 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 23 | 1 << 25,
    ),
    // LAHF/SAHF in 64-bit mode.
    (0x8000_0001, 2, 1),
];

/// (leaf, subleaf, register index, bits) of the ISA extensions of v3 and v4: AVX,
/// AVX2, AVX-512, BMI1/2, F16C, FMA, LZCNT, MOVBE, XSAVE (the system bits stay).
const V3_BITS: [(u32, u32, usize, u32); 3] = [
    // FMA, MOVBE, XSAVE, OSXSAVE, AVX, F16C.
    (
        1,
        0,
        2,
        1 << 12 | 1 << 22 | 1 << 26 | 1 << 27 | 1 << 28 | 1 << 29,
    ),
    // BMI1, AVX2, BMI2, AVX-512 F, DQ, IFMA, CD, BW, VL.
    (
        7,
        0,
        1,
        1 << 3 | 1 << 5 | 1 << 8 | 1 << 16 | 1 << 17 | 1 << 21 | 1 << 28 | 1 << 30 | 1 << 31,
    ),
    // LZCNT (ABM).
    (0x8000_0001, 0, 2, 1 << 5),
];

/// `table` as a CPU of `level`: the ISA extensions past it cleared (and the XSAVE leaf
/// with XSAVE); `add_v2` also sets v2's bits (a backend that runs them all).
pub fn limit_isa(table: &mut Vec<CpuidEntry>, level: IsaLevel, add_v2: bool) {
    for (leaf, sub, r, bits) in V3_BITS {
        for e in table
            .iter_mut()
            .filter(|e| e.function == leaf && (e.flags & 1 == 0 || e.index == sub))
        {
            *word(e, r) &= !bits;
        }
    }
    for (leaf, r, bits) in V2_BITS {
        for e in table.iter_mut().filter(|e| e.function == leaf) {
            match level {
                IsaLevel::V1 => *word(e, r) &= !bits,
                IsaLevel::V2 if add_v2 => *word(e, r) |= bits,
                IsaLevel::V2 => {}
            }
        }
    }
    table.retain(|e| e.function != 0xd);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves() -> Vec<CpuidEntry> {
        let mut v = vec![
            CpuidEntry {
                function: 1,
                ebx: 0xdead_0800,
                ..Default::default()
            },
            CpuidEntry {
                function: 0x8000_0008,
                ecx: 0x0000_7007,
                ..Default::default()
            },
        ];
        for index in 0..3 {
            v.push(CpuidEntry {
                function: 0xb,
                index,
                ..Default::default()
            });
        }
        v
    }

    fn get(v: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *v.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id() {
        for id in 0..4u8 {
            let mut v = leaves();
            set_topology(&mut v, id, 4);
            assert_eq!(get(&v, 1, 0).ebx >> 24, u32::from(id));
            assert_eq!(get(&v, 0xb, 0).edx, u32::from(id));
            assert_eq!(get(&v, 0xb, 1).edx, u32::from(id));
        }
    }

    #[test]
    fn topology_counts_match_the_vcpu_count() {
        let mut v = leaves();
        set_topology(&mut v, 0, 3);
        let l1 = get(&v, 1, 0);
        assert_eq!(
            (l1.ebx >> 16) & 0xff,
            4,
            "addressable IDs: next power of two"
        );
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let smt = get(&v, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff), (0, 1, LEVEL_SMT));
        let core = get(&v, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, (core.ecx >> 8) & 0xff),
            (2, 3, LEVEL_CORE)
        );
        let end = get(&v, 0xb, 2);
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
        let amd = get(&v, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 2);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
    }

    #[test]
    fn one_vcpu_is_not_hyperthreaded() {
        let mut v = leaves();
        v[0].edx = LEAF1_EDX_HTT;
        set_topology(&mut v, 0, 1);
        assert_eq!(get(&v, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(get(&v, 0xb, 1).eax, 0);
    }

    #[test]
    fn models_add_and_keep_feature_bits() {
        let e = |function, ecx, edx| CpuidEntry {
            function,
            ecx,
            edx,
            ..Default::default()
        };
        let mut kvm = vec![e(1, 0b1100 | (1 << 26), 0b11), e(0xd, 7, 0)];
        let soft = vec![e(1, 0b0110, 0b01)];
        add_features(&mut kvm, &soft);
        assert_eq!((kvm[0].ecx, kvm[0].edx), (0b1110 | (1 << 26), 0b11));
        keep_features(&mut kvm, &soft);
        assert_eq!((kvm[0].ecx, kvm[0].edx), (0b0110, 0b01));
        assert!(
            kvm.iter().all(|x| x.function != 0xd),
            "no XSAVE leaf without XSAVE"
        );
    }
}
