use super::*;
use std::process::Command;

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

fn tables(cpus: u8) -> AcpiTables {
    AcpiTables::build(&AcpiConfig {
        vmgenid: [0x11; 16],
        cpus,
        ram_size: 512 << 20,
    })
    .unwrap()
}

#[test]
fn every_table_checksums_to_zero() {
    let t = tables(4);
    let rsdp = &t.blobs[0].1;
    assert!(rsdp.starts_with(b"RSD PTR "));
    assert!(checksum_ok(&rsdp[..20]), "RSDP v1 checksum");
    assert!(checksum_ok(&rsdp[..36]), "RSDP extended checksum");
    for (_, blob) in &t.blobs[1..] {
        let sig = String::from_utf8_lossy(&blob[..4]).to_string();
        if sig == "FACS" {
            continue; // the FACS carries no checksum
        }
        let len = u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, blob.len(), "{sig} length field");
        assert!(checksum_ok(blob), "{sig} checksum");
    }
}

#[test]
fn tables_sit_in_the_bios_area_without_overlap() {
    let t = tables(255);
    let mut spans: Vec<(u64, u64)> = t
        .blobs
        .iter()
        .map(|(a, b)| (*a, *a + b.len() as u64))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0);
    }
    assert!(spans[0].0 >= layout::ACPI_START && spans.last().unwrap().1 <= layout::ACPI_END);
}

#[test]
fn madt_lists_every_vcpu_and_the_ioapic() {
    for cpus in [1u8, 4, 255] {
        let t = tables(cpus);
        let madt = t.table(b"APIC").unwrap();
        let mut apic_ids = Vec::new();
        let mut ioapics = 0;
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(madt[at + 4] & 1, 1, "enabled");
                    apic_ids.push(madt[at + 3]);
                }
                1 => ioapics += 1,
                _ => {}
            }
            at += len;
        }
        assert_eq!(apic_ids, (0..cpus).collect::<Vec<_>>());
        assert_eq!(ioapics, 1);
    }
}

#[test]
fn fadt_points_at_dsdt_facs_and_the_pm_registers() {
    let t = tables(1);
    let fadt = t.table(b"FACP").unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(fadt[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(fadt[o..o + 8].try_into().unwrap());
    let addr_of = |sig: &[u8; 4]| t.blobs.iter().find(|(_, b)| b.starts_with(sig)).unwrap().0;
    assert_eq!(u64_at(140), addr_of(b"DSDT"), "X_DSDT");
    assert_eq!(u64_at(132), addr_of(b"FACS"), "X_FIRMWARE_CTRL");
    assert_eq!(u64::from(u32_at(36)), addr_of(b"FACS"), "FIRMWARE_CTRL");
    assert_eq!(u64::from(u32_at(40)), addr_of(b"DSDT"), "DSDT");
    assert_eq!(u32_at(56), u32::from(ports::ACPI_PM1A_EVT));
    assert_eq!(u32_at(64), u32::from(ports::ACPI_PM1A_CNT));
    assert_eq!(u32_at(76), u32::from(ports::ACPI_PM_TMR));
    assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
    assert_eq!(u32_at(48), 0, "SMI_CMD: no SMM, always in ACPI mode");
    assert_ne!(u32_at(112) & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(fadt[116], 1, "reset register in I/O space");
    assert_eq!(u64_at(120), u64::from(ports::RESET_CONTROL));
    assert_eq!(fadt[128], ports::RESET_VALUE);
}

/// The DSDT must disassemble cleanly with ACPICA's iasl (Debian's acpica-tools).
#[test]
fn dsdt_disassembles_with_iasl() {
    if Command::new("iasl").arg("-v").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "iasl is required in CI (apt-get install acpica-tools)"
        );
        eprintln!("skipped: iasl not installed (apt-get install acpica-tools)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = tables(2);
    for sig in [b"DSDT", b"FACP", b"APIC", b"MCFG"] {
        let path = dir
            .path()
            .join(format!("{}.dat", String::from_utf8_lossy(sig)));
        std::fs::write(&path, t.table(sig).unwrap()).unwrap();
        let out = Command::new("iasl").arg("-d").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {sig:?} failed:\n{text}");
        assert!(!text.contains("Error"), "iasl reported errors:\n{text}");
        let dsl = std::fs::read_to_string(path.with_extension("dsl")).unwrap();
        if sig == b"DSDT" {
            for needle in ["_S5_", "PNP0501", "PNP0B00", "PNP0A08", "_CRS"] {
                assert!(dsl.contains(needle), "{needle} missing from DSDT:\n{dsl}");
            }
        }
    }
}
