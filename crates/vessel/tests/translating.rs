//! The software CPU's translating tier (`VESSEL_JIT`) under the stock Debian kernel and
//! the kit's busybox: every translated run checked against the interpreter through a
//! whole boot and a workload, on one and two vCPUs; the same workload's output with the
//! tier on and off; a bad mode refused in one line. No /dev/kvm needed.

mod common;

use std::time::Duration;

use common::{Finished, kit, run_with_deadline, vessel};

const DEADLINE: Duration = Duration::from_secs(400);

/// A workload whose output depends on every instruction of gzip and md5sum: `lines`
/// lines of text from seq, compressed, then both hashed.
fn workload(lines: u32) -> String {
    format!(
        "seq 1 {lines} > /tmp/t; gzip -9 -c /tmp/t > /tmp/t.gz; \
         md5sum /tmp/t /tmp/t.gz; gzip -dc /tmp/t.gz | md5sum"
    )
}

fn run(jit: &str, cpus: &str, command: &str) -> Finished {
    let kit = kit().expect("kit");
    let cmdline = kit::cmdline("", Some(command));
    let mut cmd = vessel();
    cmd.env("VESSEL_JIT", jit)
        .arg("run")
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .args(["--accel", "emu", "--cpus", cpus, "--memory", "512M"])
        .args(["--net", "none", "--stats", "--initrd"])
        .arg(&kit.initrd)
        .args(["--cmdline", &cmdline]);
    run_with_deadline(cmd, DEADLINE)
}

/// The lines the workload printed (the hashes), in order.
fn hashes(r: &Finished) -> Vec<String> {
    r.stdout
        .lines()
        .filter(|l| l.contains("  /tmp/t") || l.trim_end().ends_with("  -"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// `translated_instructions` / `instructions` from `--stats`.
fn translated_share(r: &Finished) -> f64 {
    let field = |name: &str| -> f64 {
        r.stderr
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the stats: {}", r.dump()))
    };
    field("translated_instructions=") / field("instructions=")
}

fn assert_ran(r: &Finished) {
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 0"),
        "{}",
        r.dump()
    );
}

#[test]
fn the_workload_gives_the_same_output_with_the_tier_on_and_off() {
    if kit().is_none() {
        return;
    }
    // 6.9 MB of text.
    let off = run("off", "1", &workload(1_000_000));
    let on = run("on", "1", &workload(1_000_000));
    assert_ran(&off);
    assert_ran(&on);
    let (a, b) = (hashes(&off), hashes(&on));
    assert_eq!(a.len(), 3, "{}", off.dump());
    assert_eq!(a, b, "off:\n{}\non:\n{}", off.dump(), on.dump());
    // The decompressed text is the text.
    assert_eq!(
        a[0].split_whitespace().next(),
        a[2].split_whitespace().next()
    );
    let share = translated_share(&on);
    eprintln!(
        "translated: {:.0}% of the instructions; {:.1} s off, {:.1} s on",
        share * 100.0,
        off.elapsed.as_secs_f64(),
        on.elapsed.as_secs_f64()
    );
    assert!(share > 0.5, "only {:.0}% ran translated", share * 100.0);
    assert_eq!(translated_share(&off), 0.0);
}

/// Check mode: every translated run repeated by the interpreter from the same state,
/// through the boot and the workload; the first difference would stop the VM.
#[test]
fn check_mode_boots_and_runs_the_workload_on_one_vcpu() {
    if kit().is_none() {
        return;
    }
    let r = run("check", "1", &workload(200_000));
    assert_ran(&r);
    assert!(!r.stderr.contains("differs"), "{}", r.dump());
    assert_eq!(hashes(&r).len(), 3, "{}", r.dump());
    assert!(translated_share(&r) > 0.3, "{}", r.dump());
}

#[test]
fn check_mode_boots_on_two_vcpus() {
    if kit().is_none() {
        return;
    }
    let r = run(
        "check",
        "2",
        "grep -c ^processor /proc/cpuinfo; seq 1 200000 | md5sum",
    );
    assert_ran(&r);
    assert!(!r.stderr.contains("differs"), "{}", r.dump());
    assert!(translated_share(&r) > 0.3, "{}", r.dump());
}

#[test]
fn an_unknown_mode_is_refused_in_one_line() {
    if kit().is_none() {
        return;
    }
    let r = run("fast", "1", "true");
    assert_eq!(r.code, Some(2), "{}", r.dump());
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.dump());
    assert!(lines[0].contains("VESSEL_JIT"), "{}", r.dump());
}
