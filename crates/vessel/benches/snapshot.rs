//! Snapshots (issue 11), written to BENCHMARKS.md:
//! - taking one of the kit's Linux (512 MiB) idle and after it filled 256 MiB: how long
//!   the VM is paused, and the folder's size on disk;
//! - restoring: from spawning `vessel run --restore` to the guest's next instruction (an
//!   assembled guest writes the boot-timer port in its loop), for 512 MiB and 4 GiB, and
//!   to the restored kit's next console line;
//! - the state file's size.
//!
//! Run with `cargo bench -p vessel --bench snapshot`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testguest::code_asm::*;
use testguest::report::{median, update_section};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const RUNS: usize = 10;

fn vessel(home: &Path, args: &[&str]) -> String {
    let out = Command::new(VESSEL)
        .args(args)
        .env("VESSEL_HOME", home)
        .output()
        .expect("vessel");
    assert!(out.status.success(), "vessel {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn wait_for(log: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ms figure `vessel snapshot` printed ("(254 ms paused)").
fn paused_ms(out: &str) -> f64 {
    out.split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a pause figure")
}

/// The kit's Linux snapshotted idle, then after filling 256 MiB; then restored, timed
/// to its next console line.
fn kit_snapshots(home: &Path) -> String {
    let script = "echo ready; sleep 4; yes vessel-fill | head -c 268435456 > /data; \
                  echo filled; while true; do sleep 0.2; echo tick; done";
    vessel(
        home,
        &[
            "create",
            "kit",
            "--accel",
            "emu",
            "--net",
            "none",
            "--memory",
            "512M",
            "--cmdline",
            &format!("{} -- {script}", kit::DEFAULT_CMDLINE),
        ],
    );
    vessel(home, &["start", "kit"]);
    let dir = home.join("vms/kit");
    wait_for(&dir.join("serial.log"), "ready");
    let idle = vessel(home, &["snapshot", "kit", "idle"]);
    wait_for(&dir.join("serial.log"), "tick");
    let full = vessel(home, &["snapshot", "kit", "full"]);
    vessel(home, &["kill", "kit"]);
    let mut s = String::from(
        "### Taking a snapshot of the kit's Linux (512 MiB, software CPU)\n\n\
         | guest | paused for | folder on disk | of which the state file |\n| --- | --- | --- | --- |\n",
    );
    for (what, out, snap) in [
        ("idle after boot", &idle, "idle"),
        ("after filling 256 MiB", &full, "full"),
    ] {
        let d = dir.join("snapshots").join(snap);
        s += &format!(
            "| {what} | {:.0} ms | {:.1} MiB | {:.1} KiB |\n",
            paused_ms(out),
            mib(allocated(&d)),
            std::fs::metadata(d.join("state")).unwrap().len() as f64 / 1024.0
        );
    }
    let full_dir = dir.join("snapshots/full");
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut child = Command::new(VESSEL)
                .args(["run", "--accel", "emu", "--restore"])
                .arg(&full_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let out = BufReader::new(child.stdout.take().unwrap());
            for line in out.lines().map_while(Result::ok) {
                if line.contains("tick") {
                    break;
                }
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            let _ = child.kill();
            let _ = child.wait();
            ms
        })
        .collect();
    s += &format!(
        "\nRestoring the filled kit (`vessel run --restore`) to its next console line \
         (it prints every 200 ms): median {:.0} ms of 5.\n\n",
        median(&mut t)
    );
    s
}

/// A guest that loops writing the boot-timer port (its next instruction after a
/// restore shows up as a boot-timer line), `delay` iterations of dec/jnz apart (on
/// KVM here every instruction is emulated: the loop must be short there).
fn timer_guest(delay: u32) -> (tempfile::TempPath, String) {
    testguest::bzimage_file(|a| {
        let mut lp = a.create_label();
        let mut wait = a.create_label();
        a.set_label(&mut lp).unwrap();
        a.mov(dx, 0x440u32).unwrap();
        a.mov(al, 1u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(ecx, delay).unwrap();
        a.set_label(&mut wait).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(wait).unwrap();
        a.jmp(lp).unwrap();
    })
}

/// Milliseconds from process start to the first boot-timer line of a restore.
fn restore_to_instruction(dir: &Path, accel: &str) -> f64 {
    let mut child = Command::new(VESSEL)
        .args(["run", "--accel", accel, "--restore"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let mut ms = None;
    for line in err.lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("vessel: boot-timer: ") {
            ms = rest.split_whitespace().next().and_then(|v| v.parse().ok());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    ms.expect("a boot-timer line")
}

fn restores(home: &Path, accel: &str) -> String {
    let (_k, kernel) = timer_guest(if accel == "kvm" { 1 } else { 100_000 });
    let mut rows = String::new();
    for memory in ["512M", "4G"] {
        let name = format!("t{accel}{memory}");
        vessel(
            home,
            &[
                "create", &name, "--kernel", &kernel, "--memory", memory, "--accel", accel,
                "--net", "none",
            ],
        );
        vessel(home, &["start", &name]);
        std::thread::sleep(Duration::from_millis(300));
        vessel(home, &["snapshot", &name, "s"]);
        vessel(home, &["kill", &name]);
        let dir = home.join("vms").join(&name).join("snapshots/s");
        let mut t: Vec<f64> = (0..RUNS)
            .map(|_| restore_to_instruction(&dir, accel))
            .collect();
        rows += &format!(
            "| {accel} | {memory} | {:.2} ms | {:.2} ms |\n",
            median(&mut t),
            t.iter().cloned().fold(0.0, f64::max)
        );
    }
    rows
}

fn main() {
    let home = tempfile::tempdir().unwrap();
    let mut body = format!("## Snapshots and restore\n\n{}", kit_snapshots(home.path()));
    body += &format!(
        "### Restoring: from spawning `vessel run --restore` to the guest's next instruction ({RUNS} runs)\n\n\
         | backend | guest memory | median | worst |\n| --- | --- | --- | --- |\n"
    );
    body += &restores(home.path(), "emu");
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        body += &restores(home.path(), "kvm");
    }
    body += "\nTarget: 5 ms for 512 MiB, whatever the memory size (Firecracker's published \
             target is 8 ms). Memory is mapped privately from the snapshot's file, so \
             restoring does not read it.\n";
    update_section("snapshot", &body).expect("write BENCHMARKS.md");
}
