//! Memory across VMs (issue 15), written to BENCHMARKS.md: eight idle kit guests of
//! 512 MiB on the software CPU, and the host memory they hold (the sum of their
//! monitors' proportional set sizes, so pages KSM shares count once) with no technique,
//! with free page reporting (a balloon device, not inflated), with the balloon inflated
//! to take 256 MiB from each, with KSM merging, with the compression cache, and with all
//! of them; every variant in the same run.
//!
//! Run with `cargo bench -p vessel --bench memory` (root, for KSM).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testguest::report::update_section;

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const VMS: usize = 8;
const KSM: &str = "/sys/kernel/mm/ksm";

struct Home(tempfile::TempDir);

impl Home {
    fn vessel(&self, args: &[&str]) -> String {
        let out = Command::new(VESSEL)
            .args(args)
            .env("VESSEL_HOME", self.0.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vessel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_has(&self, name: &str, what: &str) -> bool {
        std::fs::read_to_string(self.0.path().join(format!("vms/{name}/serial.log")))
            .is_ok_and(|l| l.contains(what))
    }

    fn pid(&self, name: &str) -> u32 {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.0.path().join(format!("vms/{name}/status.json")))
                .unwrap(),
        )
        .unwrap();
        v["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        for i in 0..VMS {
            let _ = Command::new(VESSEL)
                .args(["kill", &format!("m{i}")])
                .env("VESSEL_HOME", self.0.path())
                .output();
        }
    }
}

/// A process's proportional set size, MiB.
fn pss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kib: u64 = text
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    kib as f64 / 1024.0
}

struct Variant {
    name: &'static str,
    balloon: bool,
    inflate: bool,
    merge: bool,
    compress: bool,
}

/// Boots the VMs of `v`, lets them settle, and returns the memory they hold (MiB).
fn run(kit: &kit::Kit, v: &Variant) -> f64 {
    let home = Home(tempfile::tempdir().unwrap());
    let cmdline = kit::cmdline("", Some("while :; do sleep 1; done"));
    for i in 0..VMS {
        let name = format!("m{i}");
        let mut args = vec![
            "create",
            &name,
            "--kernel",
            kit.vmlinux.to_str().unwrap(),
            "--initrd",
            kit.initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            "512M",
            "--accel",
            "emu",
            "--net",
            "none",
        ];
        if v.balloon {
            args.push("--balloon");
        }
        if v.merge {
            args.push("--memory-merge");
        }
        if v.compress {
            args.push("--memory-compress");
        }
        home.vessel(&args);
        home.vessel(&["start", &name]);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for i in 0..VMS {
        while !home.log_has(&format!("m{i}"), kit::AGENT_MARKER) {
            assert!(Instant::now() < deadline, "m{i} did not boot");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if v.inflate {
        for i in 0..VMS {
            home.vessel(&["set", &format!("m{i}"), "balloon=256M"]);
        }
    }
    // Settled: KSM needs a few full scans; the others a few seconds.
    let settle = if v.merge || v.compress { 60 } else { 15 };
    std::thread::sleep(Duration::from_secs(settle));
    let pids: Vec<u32> = (0..VMS).map(|i| home.pid(&format!("m{i}"))).collect();
    pids.iter().map(|&p| pss_mib(p)).sum()
}

fn main() {
    let kit = kit::build(&kit::KitOptions::default()).expect("kit");
    let ksm_saved =
        ["run", "pages_to_scan"].map(|f| std::fs::read_to_string(format!("{KSM}/{f}")).ok());
    let ksm = ksm_saved.iter().all(Option::is_some);
    if ksm {
        let _ = std::fs::write(format!("{KSM}/pages_to_scan"), "5000");
        let _ = std::fs::write(format!("{KSM}/run"), "1");
    }
    let v = |name, balloon, inflate, merge, compress| Variant {
        name,
        balloon,
        inflate,
        merge,
        compress,
    };
    let variants = [
        v("no technique", false, false, false, false),
        v(
            "free page reporting (balloon device, not inflated)",
            true,
            false,
            false,
            false,
        ),
        v(
            "balloon inflated to 256 MiB per guest (with reporting)",
            true,
            true,
            false,
            false,
        ),
        v("KSM (--memory-merge)", false, false, true, false),
        v("compression (--memory-compress)", false, false, false, true),
        v("all together", true, true, true, true),
    ];
    let mut rows = Vec::new();
    for v in variants.iter().filter(|v| ksm || !v.merge) {
        let mib = run(&kit, v);
        eprintln!("{}: {mib:.0} MiB", v.name);
        rows.push((v.name, mib));
    }
    if ksm {
        for (f, saved) in ["run", "pages_to_scan"].iter().zip(&ksm_saved) {
            if let Some(s) = saved {
                let _ = std::fs::write(format!("{KSM}/{f}"), s);
            }
        }
    }
    let base = rows[0].1;
    let mut body = format!(
        "## Memory across VMs (issue 15)\n\n\
         {VMS} idle kit guests of 512 MiB on the software CPU (`cargo bench -p vessel --bench memory`): \
         the host memory they hold, as the sum of the monitors' proportional set sizes (pages KSM \
         shares count once), after settling; every variant in the same run.\n\n\
         | technique | host memory, {VMS} VMs | per VM | ratio to none |\n|---|---|---|---|\n"
    );
    for (name, mib) in &rows {
        body += &format!(
            "| {name} | {mib:.0} MiB | {:.0} MiB | {:.2} |\n",
            mib / VMS as f64,
            mib / base
        );
    }
    body += "\nIdle kit guests touch little memory beyond their kernel and page cache: the \
             balloon mostly takes pages never touched (or already reported free). KSM merges \
             the eight identical kernels; compression keeps the cold pages (page cache, \
             freed-but-unreported memory) lz4-compressed.\n";
    print!("{body}");
    update_section("memory", &body).expect("write BENCHMARKS.md");
}
