//! Shared by the integration tests: run the real `vessel` binary, with a deadline, and
//! decide when a test that needs KVM or root must skip (or fail, under
//! VESSEL_REQUIRE_KVM=1, as CI runs).
#![allow(dead_code)]

pub mod home;
pub mod receiver;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn dump(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }

    /// For a run of `testguest::snippets::virtio_rng_driver`: asserts the VM exited 0
    /// and the driver saw one used buffer of 16 bytes and one interrupt; returns its line.
    pub fn rng_driver_line(&self) -> &str {
        assert_eq!(self.code, Some(0), "{}", self.dump());
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("rng used="))
            .unwrap_or_default();
        assert!(
            line.starts_with(&format!(
                "rng used={:016x} len={:016x} irq={:016x}",
                1, 16, 1
            )),
            "{}",
            self.dump()
        );
        line
    }
}

/// An example program of this package (`examples/NAME.rs`), built by `cargo test`.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is not built (cargo test builds the examples)",
        path.display()
    );
    path
}

pub fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

/// Runs `cmd` with stdin closed, killing it after `deadline`.
pub fn run_with_deadline(cmd: Command, deadline: Duration) -> Finished {
    run_script(cmd, &[], None, deadline)
}

/// Runs `cmd` with stdin closed until its stdout contains `marker` (then kills it; the
/// result has no exit code), it exits, or `deadline` passes.
pub fn run_until(cmd: Command, marker: &str, deadline: Duration) -> Finished {
    run_script(cmd, &[], Some(marker), deadline)
}

/// Runs `cmd` like a person at its console: for each step, waits until stdout shows
/// `expect` (after what earlier steps saw), then types `send`. Kills it after `deadline`.
pub fn run_interactive(cmd: Command, steps: &[(&str, &[u8])], deadline: Duration) -> Finished {
    run_script(cmd, steps, None, deadline)
}

/// The engine behind the runners: spawn, follow stdout, type the steps' input as their
/// expected text appears, stop at `stop_at` or the deadline.
fn run_script(
    mut cmd: Command,
    steps: &[(&str, &[u8])],
    stop_at: Option<&str>,
    deadline: Duration,
) -> Finished {
    use std::io::Write;
    let start = Instant::now();
    let stdin = if steps.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    // Kept open until the end: EOF on the console must not be what ends a VM.
    let mut input = child.stdin.take();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut stdout = Vec::new();
    let (mut seen, mut next) = (0, 0);
    let status = loop {
        while let Ok(chunk) = rx.try_recv() {
            stdout.extend_from_slice(&chunk);
        }
        if let Some((expect, send)) = steps.get(next) {
            let text = String::from_utf8_lossy(&stdout[seen..]).into_owned();
            if let Some(at) = text.find(expect) {
                seen += at + expect.len();
                if let Some(i) = input.as_mut() {
                    let _ = i.write_all(send);
                }
                next += 1;
            }
        }
        let stop = stop_at.is_some_and(|m| String::from_utf8_lossy(&stdout).contains(m));
        if stop || start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(input);
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
        stdout.extend_from_slice(&chunk);
    }
    Finished {
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Boots `kernel` (a file) on KVM, whatever `--accel auto` would choose.
pub fn boot_kvm(kernel: &Path, args: &[&str], deadline: Duration) -> Finished {
    let mut all = vec!["--accel", "kvm"];
    all.extend_from_slice(args);
    boot(kernel, &all, deadline)
}

/// Boots `kernel` (a file) with extra `args`; without a NIC unless `args` ask for one
/// (assembled guests find their devices by PCI slot).
pub fn boot(kernel: &Path, args: &[&str], deadline: Duration) -> Finished {
    let mut cmd = vessel();
    cmd.arg("run").arg("--kernel").arg(kernel).args(args);
    if !args.contains(&"--net") {
        cmd.args(["--net", "none"]);
    }
    run_with_deadline(cmd, deadline)
}

/// True when virtiofsd is installed; otherwise prints why the test skips (or panics
/// when VESSEL_REQUIRE_KVM=1, under which CI installs it).
pub fn virtiofsd_available() -> bool {
    if devices::virtio::fs::find_virtiofsd().is_some() {
        return true;
    }
    assert!(
        !required(),
        "VESSEL_REQUIRE_KVM=1 but virtiofsd is not installed (cargo install virtiofsd)"
    );
    eprintln!("skipped: virtiofsd is not installed (cargo install virtiofsd)");
    false
}

pub fn required() -> bool {
    std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// True when /dev/kvm can be used; otherwise prints why the test skips (or panics
/// when VESSEL_REQUIRE_KVM=1).
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(!required(), "VESSEL_REQUIRE_KVM=1 but /dev/kvm: {e}");
            eprintln!("skipped: /dev/kvm not usable ({e})");
            false
        }
    }
}

/// Runs a host shell command that must succeed (setting up TAPs and bridges).
pub fn sh(command: &str) {
    let ok = Command::new("sh")
        .args(["-c", command])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{command}");
}

/// True when running as root; otherwise prints why the test skips (or panics when
/// VESSEL_REQUIRE_KVM=1).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root {
        assert!(!required(), "VESSEL_REQUIRE_KVM=1 but not running as root");
        eprintln!("skipped: needs root");
    }
    root
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// The default guest kit, built if needed (or rebuilt when its guest agent is not the
/// one just built). None (after printing why) when it cannot be had; under
/// VESSEL_REQUIRE_KVM=1 that is a failure.
pub fn kit() -> Option<kit::Kit> {
    match kit::build(&kit::KitOptions::default()) {
        Ok(k) => Some(k),
        Err(e) => {
            assert!(
                !required(),
                "VESSEL_REQUIRE_KVM=1 but the kit is unavailable: {e}"
            );
            eprintln!("skipped: no guest kit ({e})");
            None
        }
    }
}
