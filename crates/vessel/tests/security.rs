//! The monitor's confinement (issue 17): a thread that makes a system call outside its
//! class's list stops its monitor, with one line naming the thread and the call, and
//! the VM shows crashed while another VM runs on; `--seccomp log` lets the call through
//! (the kernel logs it); the whole test suite runs with seccomp on (the default), which
//! is what checks the lists against every real code path. The violation comes from a
//! test-only hook: `VESSEL_SECCOMP_SELFTEST=CLASS` makes threads of that class call
//! syslog(2), which no list allows, right after entering their class.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::home::Home;

const IDLE: &str = "while :; do sleep 1; done";

fn state(home: &Home, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&home.ok(&["info", name, "--json"])).unwrap();
    v["state"].as_str().unwrap_or_default().to_string()
}

fn start_with_selftest(home: &Home, name: &str, class: &str) {
    let out = common::vessel()
        .env("VESSEL_HOME", home.path())
        .env(sandbox::seccomp::SELFTEST_ENV, class)
        .args(["start", name])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // The monitor may die before or after it says it runs: either is fine here.
    eprintln!(
        "start {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_crashed(home: &Home, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(home, name) != "crashed" {
        assert!(
            Instant::now() < deadline,
            "{name} never shows crashed: {}",
            state(home, name)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn monitor_log(home: &Home, name: &str) -> String {
    std::fs::read_to_string(home.vm_dir(name).join("monitor.log")).unwrap_or_default()
}

#[test]
fn a_thread_outside_its_list_stops_its_monitor_while_another_vm_runs_on() {
    let home = Home::new();
    let Some(kit) = common::kit() else { return };
    home.create_kit_vm_of("bystander", &kit, "256M", IDLE, &[]);
    home.ok(&["start", "bystander"]);
    home.wait_log("bystander", 0, kit::AGENT_MARKER);
    for (name, class, thread, extra) in [
        ("v", "vcpu", "vcpu0", &[][..]),
        ("r", "rng", "virtio-rng", &["--rng"][..]),
    ] {
        home.create_kit_vm_of(name, &kit, "256M", IDLE, extra);
        start_with_selftest(&home, name, class);
        wait_crashed(&home, name);
        let log = monitor_log(&home, name);
        let line = format!(
            "vessel: seccomp: thread {thread} ({class}) made system call 103 (syslog), outside its list: the monitor stops"
        );
        assert!(log.contains(&line), "{name}'s monitor.log: {log}");
    }
    // The other VM never noticed.
    assert_eq!(state(&home, "bystander"), "running");
    home.ok(&["exec", "bystander", "--", "true"]);
    home.ok(&["stop", "bystander"]);
}

#[test]
fn log_mode_lets_the_call_through() {
    let home = Home::new();
    let Some(kit) = common::kit() else { return };
    home.create_kit_vm_of("l", &kit, "256M", IDLE, &["--seccomp", "log"]);
    start_with_selftest(&home, "l", "vcpu");
    home.wait_log("l", 0, kit::AGENT_MARKER);
    assert_eq!(state(&home, "l"), "running");
    home.ok(&["exec", "l", "--", "true"]);
    home.ok(&["stop", "l"]);
}

#[test]
fn a_bad_mode_is_refused_in_one_line() {
    let home = Home::new();
    let (code, err) = home.refused(&["create", "x", "--net", "none", "--seccomp", "strict"]);
    assert_eq!(code, Some(2), "{err}");
    home.ok(&["create", "y", "--net", "none"]);
    let (_, err) = home.refused(&["set", "y", "seccomp=strict"]);
    assert!(err.contains("on, log or off"), "{err}");
}

/// A guest that repeats what makes a device complain (here: asking ACPI for sleep
/// state S1, 10,000 times) gets the complaint logged a bounded number of times, with
/// a count of what was left out, not 10,000 lines.
#[test]
fn a_guest_repeating_a_complaint_cannot_flood_the_log() {
    let (_k, kernel) = testguest::bzimage_file(|a| {
        // PM1a_CNT: SLP_TYP 1, SLP_EN.
        testguest::snippets::repeat_out16(a, 0x604, (1 << 10) | (1 << 13), 10_000);
        testguest::snippets::print(a, "asked 10000 times\n");
        testguest::snippets::i8042_reset(a);
    });
    let r = common::boot(
        std::path::Path::new(&kernel),
        &["--accel", "emu"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("asked 10000 times"), "{}", r.dump());
    let said = r
        .stderr
        .lines()
        .filter(|l| l.contains("unsupported sleep type 1"))
        .count();
    assert!(
        (1..=devices::guest_warn::BURST as usize + 1).contains(&said),
        "{said} lines:\n{}",
        r.dump()
    );
}
