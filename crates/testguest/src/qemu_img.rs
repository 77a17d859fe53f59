//! QEMU's image tools (Debian's qemu-utils) as the tests' independent judge of vessel's
//! disk images: making images, writing them with qemu-io, reading them back, checking.

use std::path::Path;
use std::process::{Command, Output};

/// True when qemu-img and qemu-io are installed; otherwise says why the test skips.
/// Panics instead under VESSEL_REQUIRE_KVM=1 (CI installs them).
pub fn available() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        let required = std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1");
        assert!(!required, "VESSEL_REQUIRE_KVM=1 but qemu-utils is missing");
        eprintln!("skipped: needs qemu-img and qemu-io (Debian package qemu-utils)");
    }
    ok
}

fn p(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn must(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`, which must succeed; its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    must("qemu-img", args)
}

/// `qemu-img create -f FORMAT [-o OPTIONS] IMAGE SIZE`.
pub fn create(image: &Path, format: &str, options: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", format];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([p(image), size]);
    qemu_img(&args);
}

/// A qcow2 overlay on `backing` (its name as given: relative names are relative to
/// the overlay's directory), with `options`.
pub fn overlay(image: &Path, backing: &str, backing_format: &str, options: &str) {
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_format,
    ];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.push(p(image));
    qemu_img(&args);
}

/// An overlay of `size` whose backing file qemu-img does not open (`-u`): it may be
/// missing, loop, or be a file no image should ever name.
pub fn unchecked_overlay(image: &Path, backing: &str, backing_format: &str, size: &str) {
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        backing_format,
    ];
    let mut args = args.to_vec();
    args.extend([p(image), size]);
    qemu_img(&args);
}

/// Runs qemu-io commands on an image (format given, so nothing is probed).
pub fn qemu_io(image: &Path, format: &str, commands: &[&str]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(p(image));
    must("qemu-io", &args);
}

/// The guest-visible bytes of an image, as QEMU reads them.
pub fn reads(image: &Path) -> Vec<u8> {
    let out = image.with_extension("qemu-reads");
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-O", "raw", p(image), p(&out)]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `qemu-img check`: clean (exit 0), or only leaked clusters (3) when `leaks_allowed`.
pub fn assert_checks(image: &Path, leaks_allowed: bool) {
    let out: Output = Command::new("qemu-img")
        .args(["check", p(image)])
        .output()
        .unwrap();
    let code = out.status.code();
    let fine = code == Some(0) || (leaks_allowed && code == Some(3));
    assert!(
        fine,
        "qemu-img check {}: exit {code:?}\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
