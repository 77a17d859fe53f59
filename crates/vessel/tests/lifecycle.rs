//! The VM lifecycle through the real CLI and monitor processes, on /dev/kvm with tiny
//! guests: bundles, start/pause/resume/stop/kill, the control API, fault isolation and
//! admission control. Each test has its own VESSEL_HOME.

mod common;

use common::home::Home;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::kvm_available;
use testguest::code_asm::*;
use testguest::snippets::{self, i8042_reset, print};

fn counter() -> (tempfile::TempPath, String) {
    testguest::bzimage_file(|a| snippets::counter(a, 20_000))
}

/// Pause really stops guest execution, on each backend.
fn pausing_freezes_only_the_paused_vm(accel: &str) {
    let home = Home::new();
    let (_k, kernel) = counter();
    for name in ["a", "b", "c"] {
        home.ok(&[
            "create", name, "--kernel", &kernel, "--memory", "64M", "--accel", accel,
        ]);
    }
    for name in ["a", "b", "c"] {
        home.ok(&["start", name]);
    }
    for name in ["a", "b", "c"] {
        home.wait_count(name, 3);
    }
    assert!(home.ok(&["pause", "b"]).contains("b is paused"));
    assert_eq!(home.state_in_ls("b"), "paused");
    let before: Vec<u32> = ["a", "b", "c"].iter().map(|n| home.count(n)).collect();
    std::thread::sleep(Duration::from_millis(800));
    let after: Vec<u32> = ["a", "b", "c"].iter().map(|n| home.count(n)).collect();
    assert_eq!(before[1], after[1], "a paused VM's counter must not move");
    assert!(
        after[0] > before[0] && after[2] > before[2],
        "{before:?} -> {after:?}"
    );
    // Pausing twice is an illegal transition: one line, exit 1.
    let r = home.vessel(&["pause", "b"]);
    assert_eq!(r.code, Some(1), "{}", r.dump());
    assert_eq!(r.stderr.trim(), "vessel: error: VM b is already paused");
    home.ok(&["resume", "b"]);
    home.wait_count("b", after[1] + 3);
    for name in ["a", "b", "c"] {
        home.ok(&["kill", name]);
        assert_eq!(home.state_in_ls(name), "stopped");
    }
}

#[test]
fn pausing_one_of_three_kvm_vms_freezes_only_its_counter() {
    if kvm_available() {
        pausing_freezes_only_the_paused_vm("kvm");
    }
}

#[test]
fn pausing_one_of_three_emu_vms_freezes_only_its_counter() {
    pausing_freezes_only_the_paused_vm("emu");
}

#[test]
fn a_killed_monitor_shows_as_crashed_and_the_others_run_on() {
    let home = Home::new();
    let (_k, kernel) = counter();
    for name in ["x", "y", "z"] {
        home.ok(&["create", name, "--kernel", &kernel, "--memory", "64M"]);
        home.ok(&["start", name]);
    }
    home.wait_count("y", 2);
    let pid = home.pid("y");
    // SAFETY: sending SIGKILL to the monitor process this test started.
    assert_eq!(unsafe { libc_kill(pid, 9) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    let (x0, z0) = (home.count("x"), home.count("z"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        home.count("x") > x0 && home.count("z") > z0,
        "the others keep running"
    );
    assert_eq!(home.state_in_ls("y"), "crashed");
    let ls = home.ok(&["ls"]);
    let y_line = ls.lines().position(|l| l.starts_with("y ")).unwrap();
    let tail = ls.lines().nth(y_line + 1).unwrap_or_default();
    assert!(
        tail.contains("| count "),
        "the crashed VM's log tail is shown:\n{ls}"
    );
    // Its state files are intact and it can be started again.
    home.ok(&["start", "y"]);
    assert_eq!(home.state_in_ls("y"), "running");
    for name in ["x", "y", "z"] {
        home.ok(&["kill", name]);
    }
}

/// Raw HTTP over the control socket.
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[test]
fn the_control_api_answers_bad_requests_with_4xx_and_keeps_serving() {
    let home = Home::new();
    let (_k, kernel) = counter();
    home.ok(&["create", "api", "--kernel", &kernel, "--memory", "64M"]);
    home.ok(&["start", "api"]);
    let sock = home.vm_dir("api").join("control.sock");
    let actions = "/v1/vms/api/actions";
    for (method, path, body, want, needle) in [
        ("POST", actions, "{not json", 400, "invalid action request"),
        (
            "POST",
            actions,
            r#"{"action":"pause","force":true}"#,
            400,
            "unknown field `force`",
        ),
        (
            "POST",
            actions,
            r#"{"action":"explode"}"#,
            400,
            "unknown variant `explode`",
        ),
        ("POST", actions, "", 400, "invalid action request"),
        ("GET", "/v1/vms/other", "", 404, "no VM named other here"),
        ("GET", "/v1/nothing", "", 404, "no such resource"),
        ("DELETE", "/v1/vms/api", "", 405, "method not allowed"),
        (
            "POST",
            actions,
            r#"{"action":"resume"}"#,
            409,
            "VM api is already running",
        ),
    ] {
        let (status, text) = http(&sock, method, path, body);
        assert_eq!(status, want, "{method} {path} {body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].as_str().unwrap().contains(needle), "{text}");
    }
    // A garbage request line, then a real client: still serving.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"\x00\x01\x02 nonsense\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let curl = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/v1/vms/api")
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(info["name"], "api");
    assert_eq!(info["state"], "running");
    assert_eq!(info["cpus"], 1);
    let (status, metrics) = http(&sock, "GET", "/v1/vms/api/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("vessel_vcpu_exits_total{vm=\"api\",reason=\"io_out\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vessel_console_bytes_total{vm=\"api\",direction=\"out\"}"),
        "{metrics}"
    );
    home.ok(&["kill", "api"]);
}

/// A guest that plays the OS's part in an ACPI shutdown: it enables the power button
/// event, waits for it, and enters S5.
fn acpi_aware_guest() -> (tempfile::TempPath, String) {
    testguest::bzimage_file(|a| {
        let mut wait = a.create_label();
        print(a, "waiting for the power button\n");
        a.mov(dx, 0x602u32).unwrap(); // PM1a_EN
        a.mov(ax, 1u32 << 8).unwrap(); // PWRBTN_EN
        a.out(dx, ax).unwrap();
        a.set_label(&mut wait).unwrap();
        a.mov(dx, 0x600u32).unwrap(); // PM1a_STS
        a.in_(ax, dx).unwrap();
        a.test(ax, 1u32 << 8).unwrap();
        a.jz(wait).unwrap();
        print(a, "power button pressed\n");
        snippets::acpi_power_off(a);
    })
}

#[test]
fn stop_powers_off_through_acpi_and_force_ends_a_guest_that_ignores_it() {
    let home = Home::new();
    let (_k, aware) = acpi_aware_guest();
    home.ok(&["create", "polite", "--kernel", &aware, "--memory", "64M"]);
    home.ok(&["start", "polite"]);
    let out = home.ok(&["stop", "polite", "--timeout", "30"]);
    assert!(out.contains("polite powered off"), "{out}");
    assert!(home.log("polite").contains("power button pressed"));
    assert_eq!(home.status("polite")["last_exit"], "guest powered off");

    let (_k2, deaf) = counter();
    home.ok(&["create", "deaf", "--kernel", &deaf, "--memory", "64M"]);
    home.ok(&["start", "deaf"]);
    let r = home.vessel(&["stop", "deaf", "--timeout", "1"]);
    assert_eq!(r.code, Some(1), "{}", r.dump());
    assert!(
        r.stderr
            .contains("did not power off within 1s (use --force"),
        "{}",
        r.dump()
    );
    assert_eq!(home.state_in_ls("deaf"), "running");
    let out = home.ok(&["stop", "deaf", "--timeout", "1", "--force"]);
    assert!(out.contains("killed"), "{out}");
    assert_eq!(home.state_in_ls("deaf"), "stopped");
}

#[test]
fn a_guest_reboot_restarts_a_managed_vm_unless_its_policy_says_never() {
    let home = Home::new();
    let (_k, kernel) = testguest::bzimage_file(|a| {
        print(a, "booted\n");
        i8042_reset(a);
    });
    home.ok(&["create", "phoenix", "--kernel", &kernel, "--memory", "64M"]);
    home.ok(&[
        "create",
        "once",
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--restart",
        "never",
    ]);
    home.ok(&["start", "phoenix"]);
    home.ok(&["start", "once"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while home.log("phoenix").matches("booted").count() < 3 {
        assert!(Instant::now() < deadline, "{}", home.log("phoenix"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(home.state_in_ls("phoenix"), "running");
    home.ok(&["kill", "phoenix"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while home.state_in_ls("once") != "stopped" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(home.log("once").matches("booted").count(), 1);
    assert_eq!(home.status("once")["last_exit"], "guest reset");
}

#[test]
fn admission_control_the_classic_example() {
    let home = Home::new();
    std::fs::write(
        home.path().join("host.toml"),
        "cpus = 4\nmemory = \"8G\"\ncpu_overcommit = 1.0\nmemory_overcommit = 1.0\n",
    )
    .unwrap();
    let (_k, kernel) = counter();
    for (name, cpus, mem) in [
        ("a", "1", "2G"),
        ("b", "2", "2G"),
        ("c", "1", "4G"),
        ("d", "1", "2G"),
    ] {
        home.ok(&[
            "create", name, "--kernel", &kernel, "--cpus", cpus, "--memory", mem,
        ]);
    }
    for name in ["a", "b", "c"] {
        home.ok(&["start", name]);
    }
    let r = home.vessel(&["start", "d"]);
    assert_eq!(r.code, Some(1), "{}", r.dump());
    let line = r.stderr.trim();
    assert!(
        line.starts_with("vessel: error: cannot start d: ")
            && line.contains("needs 2 GiB of memory but only 0 MiB of 8 GiB are free"),
        "{line}"
    );
    assert_eq!(r.stderr.lines().count(), 1);
    assert_eq!(home.state_in_ls("d"), "created");
    let host: serde_json::Value = serde_json::from_str(&home.ok(&["host", "--json"])).unwrap();
    assert_eq!(host["cpus_allocated"], 4);
    assert_eq!(host["memory_allocated"], 8u64 << 30);
    // Stopping one makes room.
    home.ok(&["kill", "a"]);
    home.ok(&["start", "d"]);
    for name in ["b", "c", "d"] {
        home.ok(&["kill", name]);
    }
}

#[test]
fn bundles_config_errors_and_settings() {
    let home = Home::new();
    let (_k, kernel) = counter();
    home.ok(&["create", "vm1", "--kernel", &kernel, "--memory", "64M"]);
    let r = home.vessel(&["create", "vm1", "--kernel", &kernel]);
    assert_eq!(
        (r.code, r.stderr.trim()),
        (Some(2), "vessel: error: a VM named vm1 already exists")
    );
    let r = home.vessel(&["create", "bad/name", "--kernel", &kernel]);
    assert_eq!(r.code, Some(2));
    let r = home.vessel(&["start", "ghost"]);
    assert_eq!(
        (r.code, r.stderr.trim()),
        (Some(2), "vessel: error: no VM named ghost")
    );
    let r = home.vessel(&["pause", "vm1"]);
    assert_eq!(
        (r.code, r.stderr.trim()),
        (Some(1), "vessel: error: VM vm1 is created: cannot pause")
    );
    home.ok(&[
        "set",
        "vm1",
        "cpus=2",
        "memory=128M",
        "cmdline=console=ttyS0 quiet",
    ]);
    let toml = std::fs::read_to_string(home.vm_dir("vm1").join("vm.toml")).unwrap();
    assert!(
        toml.contains("cpus = 2") && toml.contains("memory = \"128M\""),
        "{toml}"
    );
    let r = home.vessel(&["set", "vm1", "cpus=0"]);
    assert_eq!(r.code, Some(2));
    // A bundle whose config is broken is listed as such, never skipped.
    std::fs::create_dir_all(home.vm_dir("broken")).unwrap();
    std::fs::write(
        home.vm_dir("broken").join("vm.toml"),
        "cpus = 1\nmemory = \"64M\"\nkernel = \"k\"\ngpus = 2\n",
    )
    .unwrap();
    let ls = home.ok(&["ls"]);
    assert!(
        ls.contains("broken") && ls.contains("unknown field `gpus`"),
        "{ls}"
    );
    // Copying the folder copies the VM.
    std::fs::create_dir_all(home.vm_dir("vm2")).unwrap();
    std::fs::copy(
        home.vm_dir("vm1").join("vm.toml"),
        home.vm_dir("vm2").join("vm.toml"),
    )
    .unwrap();
    assert!(home.ok(&["info", "vm2"]).contains("cpus      2"));
    home.ok(&["rm", "vm2"]);
    assert!(!home.vm_dir("vm2").exists());
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// `vessel stop --button` presses the ACPI power button; the kit's Linux (acpid) powers off.
#[test]
fn stop_powers_a_linux_guest_off_through_acpi() {
    if common::kit().is_none() {
        return;
    }
    let home = Home::new();
    home.ok(&["create", "linux", "--accel", "emu", "--memory", "256M"]);
    home.ok(&["start", "linux"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    // acpid starts right after the modules load, before the shell's prompt.
    while !home.log("linux").contains("vessel:/# ") {
        assert!(Instant::now() < deadline, "no shell: {}", home.log("linux"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    let out = home.ok(&["stop", "linux", "--button", "--timeout", "60"]);
    assert!(out.contains("linux powered off"), "{out}");
    let log = home.log("linux");
    assert!(log.contains("VESSEL-KIT: power button"), "{log}");
    assert!(log.contains("reboot: Power down"), "{log}");
    assert_eq!(home.status("linux")["last_exit"], "guest powered off");
    eprintln!("powered off {:?} after the button", t.elapsed());
}

/// A monitor that cannot answer (stopped here with SIGSTOP, as one whose threads are
/// stuck) is still ended by `vessel kill`: asked first, then killed outright, and its
/// status says so.
#[test]
fn kill_ends_a_monitor_that_cannot_answer() {
    let home = Home::new();
    let (_k, kernel) = counter();
    home.ok(&["create", "stuck", "--kernel", &kernel, "--memory", "64M"]);
    home.ok(&["start", "stuck"]);
    home.wait_count("stuck", 1);
    let pid = home.pid("stuck");
    // SAFETY: stopping the monitor process this test started.
    assert_eq!(unsafe { libc_kill(pid, 19) }, 0);
    home.ok(&["kill", "stuck"]);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            // A zombie until its parent (the jail's first process) reaps it.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        }
    );
    let status = home.status("stuck");
    assert_eq!(status["state"], "stopped", "{status}");
    assert!(
        status["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("killed")),
        "{status}"
    );
    home.ok(&["start", "stuck"]);
    home.ok(&["kill", "stuck"]);
}
