//! The monitor's jail (issue 17), looked at from the host through /proc: started by
//! root, a monitor runs as PID 1 of its own PID namespace, as vessel's jail user with
//! no capabilities, under rlimits, in a root holding only its VM's files (no
//! /etc/shadow, no other VM's folder), and its guest runs; `sandbox = off` is the
//! control. Started by a user who is not root, the same through a user namespace.

mod common;

use std::path::Path;
use std::time::Duration;

use common::home::Home;

const IDLE: &str = "while :; do sleep 1; done";

/// `Field:` of /proc/PID/status, its words.
fn status_field(pid: i32, field: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{text}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// The monitor's view of `path` (its root is /proc/PID/root).
fn seen_by(pid: i32, path: &Path) -> std::path::PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap())
}

/// What a jailed monitor must show, for a jail user `uid`.
fn assert_jailed(pid: i32, uid: u32, own: &Path, other: &Path) {
    assert_eq!(status_field(pid, "Uid"), vec![uid.to_string(); 4]);
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
    assert_eq!(status_field(pid, "Seccomp"), ["2"]);
    // PID 1 of a namespace of its own: two numbers, the inner one 1.
    let nspid = status_field(pid, "NSpid");
    assert_eq!(nspid, [pid.to_string(), "1".into()]);
    let shadow = std::fs::File::open(seen_by(pid, Path::new("/etc/shadow")));
    assert_eq!(
        shadow.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::NotFound),
        "/etc/shadow is not in the jail"
    );
    assert!(
        seen_by(pid, own).join("vm.toml").is_file(),
        "its own folder"
    );
    assert!(!seen_by(pid, other).exists(), "another VM's folder");
    let vms: Vec<_> = std::fs::read_dir(seen_by(pid, own.parent().unwrap()))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(vms, [own.file_name().unwrap()], "only its own folder");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |what: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(what))
            .map(|l| l.split_whitespace().rev().nth(2).unwrap().to_string())
            .unwrap()
    };
    assert_eq!(limit("Max open files"), "4096", "{limits}");
    assert_eq!(limit("Max core file size"), "0", "{limits}");
}

#[test]
fn roots_monitor_runs_jailed_as_its_own_user_without_capabilities() {
    if !common::is_root() {
        assert!(
            !common::required(),
            "VESSEL_REQUIRE_KVM=1: this test needs root"
        );
        eprintln!("skipped: the jail as root needs root");
        return;
    }
    let home = Home::new();
    let Some(kit) = common::kit() else { return };
    home.create_kit_vm(
        "jailed",
        &kit,
        &format!("echo in-the-jail; {IDLE}"),
        &["--rng"],
    );
    home.create_kit_vm("open", &kit, IDLE, &["--sandbox", "off"]);
    home.ok(&["start", "jailed"]);
    home.ok(&["start", "open"]);
    home.wait_log("jailed", 0, "in-the-jail");
    let pid = home.pid("jailed");
    assert_jailed(
        pid,
        sandbox::jail::DEFAULT_ID,
        &home.vm_dir("jailed"),
        &home.vm_dir("open"),
    );
    // The control: the same checks fail on a monitor without the jail.
    let open = home.pid("open");
    assert_eq!(status_field(open, "Uid")[0], "0");
    assert_eq!(status_field(open, "NSpid").len(), 1);
    assert!(seen_by(open, Path::new("/etc/shadow")).exists());
    // The jailed VM answers its control API and stops as any other.
    home.ok(&["info", "jailed"]);
    home.ok(&["kill", "jailed"]);
    home.ok(&["kill", "open"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the jailed monitor stays"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A user who is not root: `--sandbox on` jails the monitor through a user namespace
/// (the user is root in it, with every capability then dropped); as seen from the
/// host it runs as that user with none.
#[test]
fn a_users_monitor_runs_jailed_through_a_user_namespace() {
    if !common::is_root() {
        eprintln!("skipped: this test becomes nobody, which needs root");
        return;
    }
    let home = Home::new();
    let Some(kit) = common::kit() else { return };
    // The kit lives under root's home: the user gets copies in the VM's home.
    let own = home.path().join("kit");
    std::fs::create_dir_all(&own).unwrap();
    let (kernel, initrd) = (own.join("vmlinuz"), own.join("initrd"));
    std::fs::copy(&kit.vmlinux, &kernel).unwrap();
    std::fs::copy(&kit.initrd, &initrd).unwrap();
    common::sh(&format!("chmod -R a+rwX {}", home.path().display()));
    let nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(args)
        .env("VESSEL_HOME", home.path());
        let r = common::run_with_deadline(cmd, Duration::from_secs(60));
        assert_eq!(r.code, Some(0), "vessel {args:?}: {}", r.dump());
    };
    let cmdline = kit::cmdline("", Some(&format!("echo user-jail; {IDLE}")));
    for (name, sandbox) in [("mine", "on"), ("theirs", "off")] {
        nobody(&[
            "create",
            name,
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            "256M",
            "--accel",
            "emu",
            "--net",
            "none",
            "--sandbox",
            sandbox,
        ]);
    }
    nobody(&["start", "mine"]);
    nobody(&["start", "theirs"]);
    home.wait_log("mine", 0, "user-jail");
    let pid = home.pid("mine");
    assert_jailed(pid, 65534, &home.vm_dir("mine"), &home.vm_dir("theirs"));
    nobody(&["kill", "mine"]);
    nobody(&["kill", "theirs"]);
}

/// A jailed VM's TAP NIC: root makes the interface (persistent, owned by the jail's
/// user) before the jail, the monitor opens it without any capability, the guest
/// reaches the host through it, and it goes when the VM stops.
#[test]
fn a_jailed_vm_gets_its_tap_made_for_it_and_it_goes_at_the_end() {
    if !common::is_root() {
        eprintln!("skipped: TAP interfaces need root");
        return;
    }
    let Some(kit) = common::kit() else { return };
    let home = Home::new();
    let tap = "vtjail0";
    let _ = std::process::Command::new("ip")
        .args(["link", "del", tap])
        .status();
    let script = "ip link set eth0 up; ip addr add 10.77.0.2/24 dev eth0; \
                  while ! ping -c 1 -W 1 10.77.0.1 >/dev/null; do sleep 1; done; \
                  echo reached-the-host; while :; do sleep 1; done";
    let cmdline = kit::cmdline("vessel.dhcp=off", Some(script));
    let (kernel, initrd) = (kit.vmlinux.to_str().unwrap(), kit.initrd.to_str().unwrap());
    home.ok(&[
        "create",
        "t",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cmdline",
        &cmdline,
        "--memory",
        "256M",
        "--accel",
        "emu",
        "--net",
        &format!("tap={tap}"),
    ]);
    home.ok(&["start", "t"]);
    let sys = Path::new("/sys/class/net").join(tap);
    let owner = std::fs::read_to_string(sys.join("owner")).unwrap_or_default();
    assert_eq!(owner.trim(), sandbox::jail::DEFAULT_ID.to_string());
    common::sh(&format!(
        "ip addr add 10.77.0.1/24 dev {tap} && ip link set {tap} up"
    ));
    home.wait_log("t", 0, "reached-the-host");
    home.ok(&["kill", "t"]);
    let gone = |how: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sys.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{tap} stays after the VM ({how})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    gone("vessel kill");
    // A monitor killed outright releases nothing: the process outside its jail does.
    let from = home.log("t").len();
    home.ok(&["start", "t"]);
    common::sh(&format!(
        "ip addr add 10.77.0.1/24 dev {tap} && ip link set {tap} up"
    ));
    home.wait_log("t", from, "reached-the-host");
    home.kill_monitor("t");
    gone("its monitor killed");
}

#[test]
fn vessel_run_sandbox_boots_the_guest_in_a_jail() {
    if !common::is_root() {
        eprintln!("skipped: the jail as root needs root");
        return;
    }
    let Some(kit) = common::kit() else { return };
    let home = Home::new();
    let mut cmd = common::vessel();
    cmd.env("VESSEL_HOME", home.path())
        .args(["run", "--sandbox", "--accel", "emu", "--memory", "256M"])
        .args(["--net", "none", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args([
            "--cmdline",
            &kit::cmdline("", Some("echo run-jailed-ok; poweroff -f")),
        ]);
    let r = common::run_with_deadline(cmd, Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("run-jailed-ok"), "{}", r.dump());
}

#[test]
fn a_bad_sandbox_setting_is_refused_in_one_line() {
    let home = Home::new();
    let (code, err) = home.refused(&["create", "x", "--net", "none", "--sandbox", "maybe"]);
    assert_eq!(code, Some(2), "{err}");
    home.ok(&["create", "y", "--net", "none"]);
    let (_, err) = home.refused(&["set", "y", "sandbox=maybe"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("sandbox: \"maybe\" is not on or off"), "{err}");
    home.ok(&["set", "y", "sandbox=off"]);
    let toml = std::fs::read_to_string(home.vm_dir("y").join("vm.toml")).unwrap();
    assert!(toml.contains("sandbox = \"off\""), "{toml}");
}
