//! A real distribution (issue 20), written to BENCHMARKS.md:
//! - building the debian-12 image from Debian's packages;
//! - from `vessel start` to the login prompt on the serial console and to systemd's
//!   end of start-up (`vessel-ready: running`), on the software CPU, against QEMU TCG
//!   (`-M pc`) booting the same disk, kernel, initramfs and command line with the same
//!   memory and vCPUs in the same run. Every boot is a first boot of a fresh copy (both
//!   make their machine ID and SSH host keys), median of 5 each.
//!
//! Run with `cargo bench -p vessel --bench distro`. Needs mmdebstrap and
//! qemu-system-x86_64.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::{ImageStore, READY_PREFIX};
use testguest::report::{median, update_section};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const QEMU: &str = "qemu-system-x86_64";
const BOOTS: usize = 5;
const DEADLINE: Duration = Duration::from_secs(300);

fn main() {
    if Command::new(QEMU).arg("--version").output().is_err() {
        eprintln!("skipped: {QEMU} not installed (apt-get install qemu-system-x86)");
        return;
    }
    // The build, timed into a store of its own (the shared one is kept for the boots).
    let store = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let status = Command::new(VESSEL)
        .args(["image", "build", "debian-12"])
        .env("VESSEL_IMAGE_DIR", store.path())
        .stderr(Stdio::null())
        .status()
        .expect("vessel image build");
    assert!(status.success(), "vessel image build debian-12 failed");
    let build = started.elapsed().as_secs_f64();
    let image = ImageStore::at(store.path())
        .open("debian-12")
        .expect("the image");
    let mut body = String::from("## A real distribution: Debian 12 with systemd\n\n");
    body += &format!(
        "`vessel image build debian-12` (mmdebstrap from deb.debian.org, ext4 by `mke2fs -d`): \
         **{build:.1} s**, {} allocated of {} (target: under 2 minutes).\n\n",
        image::human_size(image.allocated()),
        image::human_size(image.manifest.size),
    );
    for cpus in [1, 2] {
        body += &boots(&image, cpus);
    }
    update_section("distro", &body).expect("write BENCHMARKS.md");
}

/// Seconds from `start` until the file at `log` shows each marker (in order).
fn watch(log: &Path, start: Instant, markers: &[&str]) -> Vec<Option<f64>> {
    let mut found = vec![None; markers.len()];
    while start.elapsed() < DEADLINE && found.iter().any(Option::is_none) {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        for (k, m) in markers.iter().enumerate() {
            if found[k].is_none() && text.contains(m) {
                found[k] = Some(start.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    found
}

/// One boot under vessel: create (untimed), then `vessel start` to the markers.
fn vessel_boot(image: &image::Image, cpus: u32, n: usize) -> Vec<Option<f64>> {
    let home = tempfile::tempdir().unwrap();
    let vessel = |args: &[&str]| {
        let out = Command::new(VESSEL)
            .args(args)
            .env("VESSEL_HOME", home.path())
            .env("VESSEL_IMAGE_DIR", image.dir.parent().unwrap())
            .output()
            .expect("vessel");
        assert!(out.status.success(), "vessel {args:?}: {out:?}");
    };
    let name = format!("bench{n}");
    let cpus = cpus.to_string();
    vessel(&[
        "create",
        &name,
        "--image",
        &image.name,
        "--accel",
        "emu",
        "--cpus",
        &cpus,
        "--memory",
        "1G",
    ]);
    let log = home.path().join("vms").join(&name).join("serial.log");
    let start = Instant::now();
    vessel(&["start", &name]);
    let found = watch(
        &log,
        start,
        &[&format!("{name} login:"), &format!("{READY_PREFIX}running")],
    );
    vessel(&["kill", &name]);
    found
}

/// The same boot under QEMU TCG: a fresh copy of the disk and the same seed contents.
fn qemu_boot(image: &image::Image, cpus: u32, n: usize) -> Vec<Option<f64>> {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    disk::sparse_copy(&image.disk(), &disk).unwrap();
    let name = format!("bench{n}");
    let seed = dir.path().join("seed.img");
    image::write_seed(
        &seed,
        &image::Provision {
            hostname: name.clone(),
            user: "root".into(),
            authorized_keys: String::new(),
        },
    )
    .unwrap();
    let log = dir.path().join("serial.log");
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args([
            "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "1G", "-smp",
        ])
        .arg(cpus.to_string())
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(image.kernel())
        .arg("-initrd")
        .arg(image.initrd())
        .args(["-append", image::CMDLINE])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=seed,readonly=on",
            seed.display()
        ))
        .arg("-device")
        .arg(format!(
            "virtio-blk-pci,drive=seed,serial={}",
            image::SEED_SERIAL
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let found = watch(
        &log,
        start,
        &[&format!("{name} login:"), &format!("{READY_PREFIX}running")],
    );
    let _ = child.kill();
    let _ = child.wait();
    found
}

fn boots(image: &image::Image, cpus: u32) -> String {
    let mut v: [Vec<f64>; 2] = Default::default();
    let mut q: [Vec<f64>; 2] = Default::default();
    // Alternate the two, so drift in the host's load touches both alike.
    for n in 0..BOOTS {
        for (k, t) in vessel_boot(image, cpus, n).into_iter().enumerate() {
            v[k].push(t.expect("vessel: the marker never came"));
        }
        for (k, t) in qemu_boot(image, cpus, n).into_iter().enumerate() {
            q[k].push(t.expect("qemu: the marker never came"));
        }
        eprintln!("{cpus} vCPU boot {n}: vessel {v:?} qemu {q:?}");
    }
    let mut s = format!(
        "### {cpus} vCPU{}, 1 GiB, first boot of a fresh copy (median of {BOOTS})\n\n\
         | from start to | vessel `--accel emu` s | QEMU TCG s | vessel / QEMU |\n\
         | --- | --- | --- | --- |\n",
        if cpus > 1 { "s" } else { "" }
    );
    for (k, what) in ["the login prompt", "`is-system-running` = running"]
        .iter()
        .enumerate()
    {
        let (a, b) = (median(&mut v[k]), median(&mut q[k]));
        s += &format!(
            "| {what} | {a:.1} (worst {:.1}) | {b:.1} (worst {:.1}) | **{:.2}x** |\n",
            v[k].iter().cloned().fold(0.0, f64::max),
            q[k].iter().cloned().fold(0.0, f64::max),
            a / b
        );
    }
    s + "\nTarget: at most 1.0x QEMU's time.\n\n"
}
