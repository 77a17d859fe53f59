//! The software CPU's CPUID table.

use x86::{cpuid_lookup, emu_cpuid};

fn text(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn vendor_features_topology_and_tsc() {
    let t = emu_cpuid(1, 2, 1_000_000_000);
    let l0 = cpuid_lookup(&t, 0, 0);
    assert_eq!(text(&[l0[1], l0[3], l0[2]]), "GenuineIntel");
    assert!(l0[0] >= 0x16);
    let l1 = cpuid_lookup(&t, 1, 0);
    assert_eq!((l1[0] >> 8) & 0xf, 6, "family");
    assert_eq!(l1[1] >> 24, 1, "APIC ID = vCPU index");
    assert_eq!((l1[1] >> 16) & 0xff, 2, "logical processors");
    assert_eq!((l1[1] >> 8) & 0xff, 8, "CLFLUSH line / 8");
    let edx = l1[3];
    for bit in [0, 4, 5, 6, 8, 9, 13, 15, 19, 23, 24, 25, 26, 28] {
        assert_ne!(edx & (1 << bit), 0, "leaf 1 EDX bit {bit}");
    }
    let ecx = l1[2];
    assert_ne!(ecx & (1 << 31), 0, "hypervisor");
    assert_ne!(ecx & (1 << 24), 0, "TSC deadline");
    for (bit, name) in [
        (0, "sse3"),
        (3, "monitor"),
        (17, "pcid"),
        (21, "x2apic"),
        (26, "xsave"),
        (28, "avx"),
    ] {
        assert_eq!(ecx & (1 << bit), 0, "{name} must not be advertised");
    }
    assert_eq!(
        emu_cpuid(0, 1, 1_000_000_000)[1].edx & (1 << 28),
        0,
        "no HTT alone"
    );
    // Topology: one core per vCPU.
    let smt = cpuid_lookup(&t, 0xb, 0);
    let core = cpuid_lookup(&t, 0xb, 1);
    assert_eq!((smt[1], smt[2] >> 8, smt[3]), (1, 1, 1));
    assert_eq!((core[0], core[1], core[2] >> 8), (1, 2, 2));
    assert_eq!(cpuid_lookup(&t, 0xb, 2)[2] >> 8, 0);
    assert_eq!(cpuid_lookup(&t, 4, 0)[0] & 0x1f, 1, "L1d");
    assert_eq!(cpuid_lookup(&t, 4, 4)[0] & 0x1f, 0, "end of the cache list");
    // TSC = crystal = 1 GHz.
    let l15 = cpuid_lookup(&t, 0x15, 0);
    assert_eq!(
        u64::from(l15[2]) * u64::from(l15[1]) / u64::from(l15[0]),
        1_000_000_000
    );
    assert_eq!(cpuid_lookup(&t, 0x16, 0)[0], 1000);
    // Extended leaves.
    let e1 = cpuid_lookup(&t, 0x8000_0001, 0);
    for bit in [11, 20, 29] {
        assert_ne!(e1[3] & (1 << bit), 0, "syscall/nx/lm");
    }
    assert_ne!(e1[2] & 1, 0, "lahf_lm");
    let brand: Vec<u32> = (0..3)
        .flat_map(|k| cpuid_lookup(&t, 0x8000_0002 + k, 0))
        .collect();
    assert_eq!(text(&brand), "vessel software CPU");
    assert_eq!(cpuid_lookup(&t, 0x8000_0008, 0)[0] & 0xffff, 0x3028);
    assert_eq!(cpuid_lookup(&t, 7, 0)[1] & (1 << 20), 0, "no SMAP");
    // The x87 pointer model (see unit/x87.rs): FDP only on exceptions, FCS/FDS zero.
    assert_eq!(
        cpuid_lookup(&t, 7, 0)[1] & (1 << 6 | 1 << 13),
        1 << 6 | 1 << 13
    );
    assert_eq!(cpuid_lookup(&t, 0xd, 0), [0; 4], "no XSAVE leaf");
}
