//! Lifecycle benchmarks (issue 6), written to BENCHMARKS.md: `vessel start` to the
//! guest's first instruction, and control-API latency for info and pause/resume.
//!
//! Run with `cargo bench -p vessel --bench lifecycle`. Needs /dev/kvm.

use std::process::Command;
use std::time::{Duration, Instant};

use api::model::{Action, ActionRequest, StateBody, VmInfo};
use testguest::code_asm::*;
use testguest::report::{median, percentile, update_section};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const STARTS: usize = 20;
const INFOS: usize = 2000;
const PAUSES: usize = 300;

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm not usable");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let vessel = |args: &[&str]| {
        let out = Command::new(VESSEL)
            .args(args)
            .env("VESSEL_HOME", home.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vessel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The guest's first instruction writes a byte to the serial port, then it counts.
    let code = testguest::assemble(64, testguest::BZIMAGE_ENTRY64, |a| {
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(al, b'!' as u32).unwrap();
        a.out(dx, al).unwrap();
        testguest::snippets::counter(a, 200_000);
    });
    let (_k, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    let kernel = kernel.display().to_string();
    vessel(&[
        "create", "bench", "--accel", "kvm", "--kernel", &kernel, "--memory", "128M",
    ]);
    let log = home.path().join("vms/bench/serial.log");

    let (mut to_ready, mut to_first) = (Vec::new(), Vec::new());
    for _ in 0..STARTS {
        let _ = std::fs::remove_file(&log);
        let t0 = Instant::now();
        vessel(&["start", "bench"]);
        to_ready.push(t0.elapsed().as_secs_f64() * 1000.0);
        while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        to_first.push(t0.elapsed().as_secs_f64() * 1000.0);
        vessel(&["kill", "bench"]);
    }

    vessel(&["start", "bench"]);
    let client = api::Client::new(home.path().join("vms/bench/control.sock"));
    let mut info_ms = Vec::new();
    for _ in 0..INFOS {
        let t = Instant::now();
        let _: VmInfo = client.get("/v1/vms/bench").unwrap();
        info_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut pause_ms = Vec::new();
    for _ in 0..PAUSES {
        let t = Instant::now();
        for action in [Action::Pause, Action::Resume] {
            let _: StateBody = client
                .post("/v1/vms/bench/actions", &ActionRequest::new(action))
                .unwrap();
        }
        pause_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    vessel(&["kill", "bench"]);

    let body = format!(
        "## Lifecycle: start and the control API\n\n\
         Tiny guest (its first instruction writes a byte to COM1), monitor processes on KVM.\n\n\
         | measure | median ms | p99 ms |\n| --- | --- | --- |\n\
         | `vessel start` until it returns (API answering), {STARTS} starts | {:.2} | {:.2} |\n\
         | `vessel start` to the guest's first instruction (its byte in serial.log) | {:.2} | {:.2} |\n\
         | API `GET /v1/vms/NAME` (new connection each), {INFOS} requests | {:.3} | {:.3} |\n\
         | API pause + resume round trip (two requests; pause waits for every vCPU to park), {PAUSES} | {:.3} | {:.3} |\n",
        median(&mut to_ready.clone()),
        percentile(&mut to_ready, 99.0),
        median(&mut to_first.clone()),
        percentile(&mut to_first, 99.0),
        median(&mut info_ms.clone()),
        percentile(&mut info_ms, 99.0),
        median(&mut pause_ms.clone()),
        percentile(&mut pause_ms, 99.0),
    );
    println!("{body}");
    update_section("lifecycle", &body).unwrap();
}
