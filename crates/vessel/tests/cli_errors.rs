//! Bad input gets one clear line on stderr and exit code 2: never a panic or a backtrace.

mod common;

use std::time::Duration;

use common::{Finished, is_root, kvm_available, run_with_deadline, vessel};

fn run(args: &[&str]) -> Finished {
    let mut cmd = vessel();
    cmd.args(args).env("RUST_BACKTRACE", "1");
    run_with_deadline(cmd, Duration::from_secs(30))
}

fn assert_one_line_error(r: &Finished, needle: &str) {
    assert_eq!(r.code, Some(2), "{}", r.dump());
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line:\n{}", r.dump());
    assert!(lines[0].starts_with("vessel: error: "), "{}", r.dump());
    assert!(
        lines[0].contains(needle),
        "wanted {needle:?}:\n{}",
        r.dump()
    );
    assert!(!r.stderr.contains("panicked") && !r.stderr.contains("backtrace"));
}

fn tiny_kernel() -> (tempfile::TempPath, String) {
    let code = [0xf4u8];
    let (t, p) = testguest::temp_path(&testguest::bzimage(&code));
    (t, p.display().to_string())
}

#[test]
fn missing_unreadable_and_non_kernels() {
    assert_one_line_error(
        &run(&["run", "--kernel", "/nonexistent/vmlinuz"]),
        "cannot read kernel /nonexistent/vmlinuz",
    );
    assert_one_line_error(
        &run(&["run", "--kernel", "/tmp"]),
        "cannot read kernel /tmp",
    );
    let (_t, text) = testguest::temp_path(b"#!/bin/sh\necho not a kernel\n");
    assert_one_line_error(
        &run(&["run", "--kernel", &text.display().to_string()]),
        "not a kernel",
    );
    let (_t, empty) = testguest::temp_path(b"");
    assert_one_line_error(
        &run(&["run", "--kernel", &empty.display().to_string()]),
        "not a kernel",
    );
}

#[test]
fn cpu_and_memory_limits() {
    let (_t, k) = tiny_kernel();
    for (args, needle) in [
        (
            vec!["--cpus", "0"],
            "--cpus must be between 1 and 255, got 0",
        ),
        (
            vec!["--cpus", "256"],
            "--cpus must be between 1 and 255, got 256",
        ),
        (vec!["--cpus", "many"], "invalid value 'many'"),
        (vec!["--memory", "16M"], "below the 32 MiB minimum"),
        (vec!["--memory", "64T"], "more than this host's"),
        (vec!["--memory", "lots"], "invalid memory size \"lots\""),
        (vec!["--accel", "magic"], "invalid value 'magic'"),
    ] {
        let mut all = vec!["run", "--kernel", &k];
        all.extend(args);
        assert_one_line_error(&run(&all), needle);
    }
    assert_one_line_error(&run(&["frobnicate"]), "unrecognized subcommand");
}

#[test]
fn bad_device_specs() {
    let (_t, k) = tiny_kernel();
    assert_one_line_error(
        &run(&[
            "run",
            "--kernel",
            &k,
            "--disk",
            "path=/nonexistent/disk.img",
        ]),
        "disk /nonexistent/disk.img",
    );
    assert_one_line_error(
        &run(&["run", "--kernel", &k, "--disk", "path=/tmp,colour=red"]),
        "--disk \"path=/tmp,colour=red\"",
    );
    assert_one_line_error(
        &run(&["run", "--kernel", &k, "--net", "tap=t0,mac=zz:00"]),
        "--net \"tap=t0,mac=zz:00\"",
    );
}

#[test]
fn initrd_that_does_not_fit() {
    let (_t, k) = tiny_kernel();
    let (_i, initrd) = testguest::temp_path(&vec![0u8; 48 << 20]);
    assert_one_line_error(
        &run(&[
            "run",
            "--kernel",
            &k,
            "--memory",
            "32M",
            "--initrd",
            &initrd.display().to_string(),
        ]),
        "initrd of 48 MiB does not fit",
    );
    assert_one_line_error(
        &run(&["run", "--kernel", &k, "--initrd", "/nonexistent/initrd"]),
        "cannot read initrd /nonexistent/initrd",
    );
}

/// /dev/kvm hidden by a private mount namespace (needs root for unshare + mount).
#[test]
fn missing_dev_kvm() {
    if !is_root() {
        return;
    }
    let (_t, k) = tiny_kernel();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" run --accel kvm --kernel \"$1\"",
    ])
    .arg(env!("CARGO_BIN_EXE_vessel"))
    .arg(&k);
    let r = run_with_deadline(cmd, Duration::from_secs(30));
    assert_one_line_error(&r, "/dev/kvm does not exist");
}

/// /dev/kvm present but not ours: run as an unprivileged user.
#[test]
fn inaccessible_dev_kvm() {
    if !is_root() || !kvm_available() {
        return;
    }
    let (t, k) = tiny_kernel();
    // The unprivileged user must be able to read the kernel file.
    std::fs::set_permissions(&t, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o006 == 0o006 {
        eprintln!("skipped: /dev/kvm is world-accessible here");
        return;
    }
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "kvm", "--kernel", &k]);
    let r = run_with_deadline(cmd, Duration::from_secs(30));
    assert_one_line_error(&r, "permission denied");
}
