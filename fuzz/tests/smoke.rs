//! The CI smoke run on a stable compiler: each target for `VESSEL_FUZZ_SECONDS`
//! (default 20) on mutations of its corpus, printing the executions done. Ignored by
//! default; run them all with
//! `cargo test --manifest-path fuzz/Cargo.toml --release --test smoke -- --ignored --nocapture`
//! (add `--test-threads=N` to run N targets at a time). An input that panics is saved
//! under `fuzz/artifacts/TARGET/` and fails the run; `cargo fuzz run TARGET FILE`
//! replays it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use vessel_fuzz::mutate::{Rng, mutate};

fn budget() -> Duration {
    let seconds = std::env::var("VESSEL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(20.0);
    Duration::from_secs_f64(seconds)
}

fn smoke(name: &str) {
    let target = vessel_fuzz::TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("a target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("corpus").join(name);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    corpus.sort();
    assert!(!corpus.is_empty(), "{name}: empty corpus");
    let seed = crc32fast::hash(name.as_bytes());
    let mut r = Rng(u64::from(seed) | 1 << 32);
    let started = Instant::now();
    let deadline = started + budget();
    let mut executions = 0u64;
    let mut i = 0;
    while Instant::now() < deadline {
        let input = if i < corpus.len() {
            corpus[i].clone()
        } else {
            let pick = r.below(corpus.len());
            mutate(&mut r, &corpus, pick)
        };
        i += 1;
        if catch_unwind(AssertUnwindSafe(|| (target.run)(&input))).is_err() {
            let artifacts = root.join("artifacts").join(name);
            std::fs::create_dir_all(&artifacts).expect("fuzz/artifacts");
            let file = artifacts.join(format!("smoke-crash-{:08x}", crc32fast::hash(&input)));
            std::fs::write(&file, &input).expect("writing the crashing input");
            panic!(
                "{name}: crashed after {executions} executions; input saved as {}",
                file.display()
            );
        }
        executions += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "smoke {name}: {executions} executions in {seconds:.1} s ({:.0}/s) from {} corpus inputs",
        executions as f64 / seconds,
        corpus.len()
    );
}

macro_rules! smoke_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            #[ignore = "a time-budgeted smoke run: cargo test --release --test smoke -- --ignored"]
            fn $name() {
                smoke(stringify!($name));
            }
        )*

        /// Every target has its smoke run.
        #[test]
        fn every_target_has_a_smoke_run() {
            let listed = [$(stringify!($name)),*];
            let targets: Vec<&str> = vessel_fuzz::TARGETS.iter().map(|t| t.name).collect();
            assert_eq!(listed.as_slice(), targets.as_slice());
        }
    };
}

smoke_tests!(
    queue,
    block_request,
    dhcp,
    qcow2_image,
    state_file,
    vm_toml,
    vsock_packets,
    agent_protocol,
    virtio_net,
    virtio_rng,
    virtio_console,
    virtio_balloon,
    virtio_pci,
    legacy_ports,
    irqchip,
    kernel_loader,
    host_toml,
    control_api,
    block_queue,
    vsock_device,
    frame_stream,
    snapshot_memory,
    virtio_fs,
    x86_decode,
    x86_translate,
    migration_stream,
);
