//! The stock Debian kernel and the kit's busybox on vessel's software CPU: boot to
//! init, run commands, power off through ACPI; with one vCPU and with two. No
//! /dev/kvm needed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{boot, kit};

const DEADLINE: Duration = Duration::from_secs(240);

fn host(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run_kit(cpus: &str, command: &str) -> common::Finished {
    let kit = kit().expect("kit");
    let cmdline = kit::cmdline("", Some(command));
    let initrd = kit.initrd.display().to_string();
    boot(
        &kit.vmlinux,
        &[
            "--accel",
            "emu",
            "--cpus",
            cpus,
            "--memory",
            "512M",
            "--initrd",
            &initrd,
            "--cmdline",
            &cmdline,
        ],
        DEADLINE,
    )
}

#[test]
fn linux_boots_to_init_and_computes_on_one_vcpu() {
    if kit().is_none() {
        return;
    }
    let before = host("date -u +%Y-%m-%dT%H:%M");
    let r = run_kit(
        "1",
        "dd if=/dev/zero bs=1M count=64 2>/dev/null | md5sum; date -u +%Y-%m-%dT%H:%M; cat /proc/cpuinfo; \
         echo acpi-tables: $(ls /sys/firmware/acpi/tables)",
    );
    let after = host("date -u +%Y-%m-%dT%H:%M");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains(kit::INIT_MARKER), "{}", r.dump());
    assert!(
        r.stderr.contains("vessel: guest powered off"),
        "{}",
        r.dump()
    );
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 0"),
        "{}",
        r.dump()
    );
    // The same bytes through md5sum on the host.
    let want = host("head -c 64M /dev/zero | md5sum | cut -d' ' -f1");
    assert!(
        r.stdout.contains(&format!("{want}  -")),
        "md5 {want}: {}",
        r.dump()
    );
    assert!(
        r.stdout.contains(&before) || r.stdout.contains(&after),
        "the guest's date is not the host's ({before}): {}",
        r.dump()
    );
    assert_eq!(
        r.stdout.matches("\nprocessor\t:").count(),
        1,
        "{}",
        r.dump()
    );
    assert!(r.stdout.contains("vessel software CPU"), "{}", r.dump());
    // The features the model offers, as Linux took them.
    let flags = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("flags\t\t: "))
        .unwrap_or_else(|| panic!("no flags line: {}", r.dump()));
    for flag in ["movbe", "rdrand", "rdseed", "fsgsbase", "popcnt", "cx16"] {
        assert!(flags.split(' ').any(|f| f == flag), "{flag}: {flags}");
    }
    // Linux found every table, the FACS through the FADT.
    let tables = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("acpi-tables: "))
        .unwrap_or_else(|| panic!("no table list: {}", r.dump()));
    for table in ["APIC", "DSDT", "FACP", "FACS", "MCFG"] {
        assert!(tables.split(' ').any(|t| t == table), "{table}: {tables}");
    }
    // The kit's init marks the boot timer right after its marker line.
    assert!(r.stderr.contains("boot-timer:"), "{}", r.dump());
}

#[test]
fn linux_sees_two_vcpus() {
    if kit().is_none() {
        return;
    }
    let r = run_kit("2", "grep -c ^processor /proc/cpuinfo; date -u +%Y");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    let pos = lines
        .iter()
        .position(|l| l.starts_with("VESSEL-KIT: exit status"))
        .unwrap_or(0);
    assert!(lines[..pos].contains(&"2"), "two processors: {}", r.dump());
    assert!(
        lines[..pos].contains(&host("date -u +%Y").as_str()),
        "{}",
        r.dump()
    );
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 0"),
        "{}",
        r.dump()
    );
}
