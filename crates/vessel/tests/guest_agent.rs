//! Guest additions: the guest agent in the kit's Linux on the software CPU, reached
//! through the VM's vsock device. Commands and their exit codes and streams, files both
//! ways, a clean stop, the guest's clock after a pause and a restore, file systems
//! frozen around a snapshot, the guest's facts, and an agent that misbehaves in every
//! way the host can meet.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::home::Home;

/// Keeps the kit's init busy (and the VM up) once it has started the agent.
const IDLE: &str = "while :; do sleep 1; done";

/// A running kit VM `name` whose agent has started; None when there is no kit.
fn agent_vm(home: &Home, name: &str) -> Option<kit::Kit> {
    let kit = common::kit()?;
    assert!(
        kit.agent.is_some(),
        "the kit has no guest agent: cargo build --release, then vessel kit"
    );
    home.create_kit_vm(name, &kit, IDLE, &[]);
    home.ok(&["start", name]);
    home.wait_log(name, 0, kit::AGENT_MARKER);
    Some(kit)
}

/// `vessel exec NAME -- ARGS` with `stdin`: (exit code, stdout, stderr).
fn exec(home: &Home, name: &str, args: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    let mut cmd = common::vessel();
    cmd.env("VESSEL_HOME", home.path())
        .args(["exec", name, "--"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn commands_run_in_the_guest_with_their_streams_and_exit_codes() {
    let home = Home::new();
    let Some(kit) = agent_vm(&home, "x") else {
        return;
    };
    let (code, out, _) = exec(&home, "x", &["uname", "-r"], b"");
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out).trim(), kit.kernel_version);

    let (code, out, err) = exec(
        &home,
        "x",
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        b"",
    );
    assert_eq!((code, &out[..], err.as_str()), (7, &b"out\n"[..], "err\n"));

    let input = random_bytes(1 << 20);
    let (code, out, err) = exec(&home, "x", &["cat"], &input);
    assert_eq!(code, 0, "{err}");
    assert!(
        out == input,
        "1 MiB through cat came back different ({} bytes)",
        out.len()
    );

    let (code, _, err) = exec(&home, "x", &["no-such-program"], b"");
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no-such-program"), "{err}");

    // What the guest says about itself.
    let info = home.ok(&["info", "x"]);
    assert!(
        info.contains(&format!("kernel {}", kit.kernel_version)),
        "{info}"
    );
    let json: serde_json::Value = serde_json::from_str(&home.ok(&["info", "x", "--json"])).unwrap();
    assert!(
        json["guest"]["memory_total_kib"].as_u64().unwrap() > 100_000,
        "{json}"
    );
    assert!(
        json["guest"]["clock_offset_seconds"]
            .as_f64()
            .unwrap()
            .abs()
            < 1.0,
        "{json}"
    );
}

#[test]
fn files_copy_both_ways_byte_for_byte_with_their_mode() {
    let home = Home::new();
    if agent_vm(&home, "f").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ten.bin");
    let data = random_bytes(10 << 20);
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    home.ok(&["cp", src.to_str().unwrap(), "f:/tmp/"]);
    let (_, out, _) = exec(
        &home,
        "f",
        &["sh", "-c", "stat -c %a /tmp/ten.bin; md5sum /tmp/ten.bin"],
        b"",
    );
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.starts_with("640\n"), "{out}");

    let back: PathBuf = dir.path().join("back.bin");
    home.ok(&["cp", "f:/tmp/ten.bin", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "10 MiB came back different"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&back).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o640);

    let (code, err) = home.refused(&["cp", "f:/no/such/file", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/no/such/file"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "a failed copy leaves nothing"
    );
}

#[test]
fn stop_goes_through_the_agent_and_the_button_still_works() {
    let home = Home::new();
    if agent_vm(&home, "s").is_none() {
        return;
    }
    let mark = home.log("s").len();
    home.ok(&["stop", "s"]);
    assert!(
        !home.log("s")[mark..].contains(kit::POWER_BUTTON_MARKER),
        "the agent, not the button, stopped it"
    );
    home.ok(&["start", "s"]);
    let mark = home.log("s").len();
    home.wait_log("s", mark, kit::AGENT_MARKER);
    home.ok(&["stop", "s", "--button"]);
    assert!(home.log("s")[mark..].contains(kit::POWER_BUTTON_MARKER));
}

/// The guest's clock minus the host's, in seconds.
fn clock_offset(home: &Home, name: &str) -> f64 {
    let before = now();
    let (code, out, err) = exec(home, name, &["date", "+%s"], b"");
    let after = now();
    assert_eq!(code, 0, "{err}");
    let guest: f64 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    // `date +%s` truncates: the guest's second began at most 1 s before it printed.
    if guest < before.floor() {
        guest + 1.0 - before
    } else if guest > after {
        guest - after
    } else {
        0.0
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn the_guest_clock_follows_the_host_after_a_pause_and_a_restore() {
    let home = Home::new();
    if agent_vm(&home, "c").is_none() {
        return;
    }
    // The guest's clock is set wrong, then the VM pauses for 10 s.
    let (code, _, err) = exec(&home, "c", &["date", "-s", "@1000000000"], b"");
    assert_eq!(code, 0, "{err}");
    home.ok(&["pause", "c"]);
    std::thread::sleep(Duration::from_secs(10));
    home.ok(&["resume", "c"]);
    wait_offset_below(&home, "c", 1.0);

    // A snapshot (file systems frozen while its disks are taken), restored later.
    exec(&home, "c", &["date", "-s", "@1000000000"], b"");
    home.ok(&["snapshot", "c", "s1"]);
    let log = std::fs::read_to_string(home.vm_dir("c").join("monitor.log")).unwrap();
    assert!(
        log.contains("guest agent: froze") || log.contains("file systems not frozen"),
        "{log}"
    );
    home.ok(&["kill", "c"]);
    home.ok(&["snapshot", "restore", "c", "s1"]);
    std::thread::sleep(Duration::from_secs(3));
    home.ok(&["start", "c"]);
    wait_offset_below(&home, "c", 1.0);
}

/// Waits (the agent sets the clock on a thread of the monitor's) until the guest's
/// clock is within `limit` seconds of the host's.
fn wait_offset_below(home: &Home, name: &str, limit: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let offset = clock_offset(home, name);
        if offset.abs() <= limit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's clock is {offset:.1} s off"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_hostile_agent_is_cut_off_and_the_monitor_runs_on() {
    let home = Home::new();
    if agent_vm(&home, "h").is_none() {
        return;
    }
    let hostile = common::example("hostile_agent");
    home.ok(&["cp", hostile.to_str().unwrap(), "h:/tmp/hostile"]);
    // The real agent makes way (after answering this request) for the hostile one.
    let (code, _, err) = exec(
        &home,
        "h",
        &[
            "sh",
            "-c",
            "chmod +x /tmp/hostile; (sleep 1; killall vessel-agent; /tmp/hostile >/dev/console 2>&1) \
             </dev/null >/dev/null 2>&1 &",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    home.wait_log("h", 0, "hostile agent: listening");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // Each turn of the hostile agent, met by a command that must end with one line.
    let turns: [(&[&str], &str); 5] = [
        (&["exec", "h", "--", "true"], "frame of 4294967295 bytes"),
        (&["info", "h"], ""),
        (&["exec", "h", "--", "true"], "bad message"),
        (
            &[
                "cp",
                "--timeout",
                "2",
                "h:/etc/passwd",
                dir.path().to_str().unwrap(),
            ],
            "did not answer",
        ),
        (&["exec", "h", "--", "true"], "answered"),
    ];
    for (args, said) in turns {
        let r = home.vessel(args);
        if said.is_empty() {
            assert_eq!(r.code, Some(0), "{}", r.dump());
            assert!(
                r.stdout.contains("guest     no agent answers"),
                "{}",
                r.dump()
            );
        } else {
            assert_eq!(r.code, Some(1), "{}", r.dump());
            assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
            assert!(r.stderr.contains(said), "{args:?}: {}", r.dump());
        }
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    // The monitor and its guest are fine: the guest still powers off at the button.
    assert_eq!(home.state_in_ls("h"), "running");
    home.ok(&["stop", "h", "--button"]);
}

#[test]
fn a_live_snapshot_takes_the_disks_with_the_guest_file_systems_frozen() {
    let home = Home::new();
    let Some(kit) = common::kit() else {
        return;
    };
    let disk = home.path().join("root.ext4");
    disk::sparse_copy(&kit.rootfs, &disk).unwrap();
    let cmdline = format!("{} root=/dev/vda", kit::DEFAULT_CMDLINE);
    home.ok(&[
        "create",
        "q",
        "--accel",
        "emu",
        "--net",
        "none",
        "--memory",
        "256M",
        "--disk",
        &format!("path={}", disk.display()),
        "--cmdline",
        &cmdline,
    ]);
    home.ok(&["start", "q"]);
    home.wait_log("q", 0, kit::AGENT_MARKER);
    // Written, not synced: only the freeze puts it on the disk before the copy.
    let (code, _, err) = exec(&home, "q", &["sh", "-c", "echo quiesced > /written"], b"");
    assert_eq!(code, 0, "{err}");
    home.ok(&["snapshot", "q", "s1"]);
    let log = std::fs::read_to_string(home.vm_dir("q").join("monitor.log")).unwrap();
    assert!(log.contains("guest agent: froze /"), "{log}");
    let copy = std::fs::read_dir(home.vm_dir("q").join("snapshots/s1"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ext4"))
        .expect("the snapshot's disk");
    let tool = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let header = tool(&["dumpe2fs", "-h", copy.to_str().unwrap()]);
    assert!(header.contains("Filesystem features:"), "{header}");
    assert!(
        !header.contains("needs_recovery"),
        "the copy needs a journal replay: {header}"
    );
    let written = tool(&["debugfs", "-R", "cat /written", copy.to_str().unwrap()]);
    assert_eq!(written, "quiesced\n");
    // And the guest runs on, its file systems thawed.
    let (code, _, err) = exec(&home, "q", &["sh", "-c", "echo after > /after"], b"");
    assert_eq!(code, 0, "{err}");
    home.ok(&["stop", "q"]);
}
