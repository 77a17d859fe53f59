//! qcow2 against raw on the in-process virtio-blk request path (the block benchmark's
//! driver loop), in the same run, interleaved: on allocated clusters, on unallocated
//! ones (first writes into a fresh image), and reads through a backing file. QEMU's
//! own qcow2/raw ratio on the same files (`qemu-img bench`) is the outside reference.
//!
//! `cargo bench -p devices --bench qcow2` (`VESSEL_BENCH_SECS`, `VESSEL_BENCH_DIR` as
//! for the block benchmark).

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "blk/mod.rs"]
mod blk;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blk::{CASES, Case, ROUNDS, virtio, virtio_rounds};
use common::{Mem, memory};
use devices::virtio::block::{BlockConfig, Disk};
use disk::{Backing, CreateOptions, Format};

const CLUSTER: u64 = 64 << 10;

fn open(path: &Path, format: Format) -> Arc<Disk> {
    let config = BlockConfig {
        path: path.to_path_buf(),
        format: Some(format),
        readonly: false,
        id: None,
        limits: Default::default(),
        group: None,
    };
    Arc::new(Disk::open(&config).unwrap())
}

fn create(path: &Path, format: Format, size: u64, backing: Option<&Path>) {
    let _ = std::fs::remove_file(path);
    disk::create(
        path,
        &CreateOptions {
            format,
            size: Some(size),
            backing: backing.map(|b| Backing {
                path: b.to_path_buf(),
                format: Some(Format::Raw),
            }),
            cluster_size: Some(CLUSTER),
        },
    )
    .unwrap();
}

/// Every byte written (so every qcow2 cluster allocated), through the image's own
/// write path, a cluster at a time for both formats (the page cache then holds both
/// files in folios of the same size).
fn fill(path: &Path, format: Format, size: u64) {
    let img = disk::Image::open(
        path,
        disk::OpenOptions {
            format: Some(format),
            readonly: false,
        },
    )
    .unwrap();
    let chunk = vec![0x5au8; CLUSTER as usize];
    for at in (0..size).step_by(chunk.len()) {
        img.write_from(&chunk, at).unwrap();
    }
    img.flush().unwrap();
}

/// Best of ROUNDS interleaved runs of each path: (baseline MB/s, other MB/s).
fn compare(mut baseline: impl FnMut() -> f64, mut other: impl FnMut() -> f64) -> (f64, f64) {
    let (mut a, mut b) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        a = a.max(baseline());
        b = b.max(other());
    }
    (a, b)
}

struct Row {
    case: String,
    raw: f64,
    qcow2: f64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.qcow2 / self.raw
    }
}

fn measure(mem: &Mem, dir: &Path, size: u64, secs: f64) -> Vec<Row> {
    let raw_path = dir.join("bench.raw");
    let q_path = dir.join("bench.qcow2");
    let base = dir.join("base.raw");
    let overlay = dir.join("overlay.qcow2");
    let fresh = dir.join("fresh.qcow2");
    for (path, format) in [
        (&raw_path, Format::Raw),
        (&base, Format::Raw),
        (&q_path, Format::Qcow2),
    ] {
        create(path, format, size, None);
        fill(path, format, size);
    }
    // The base is only read, so it is a file of its own (the raw disk is open for writing).
    create(&overlay, Format::Qcow2, size, Some(&base));
    let raw = open(&raw_path, Format::Raw);
    let allocated = open(&q_path, Format::Qcow2);
    let through = open(&overlay, Format::Qcow2);
    let mut rows = Vec::new();
    let only = std::env::var("VESSEL_BENCH_CASE").ok();
    for case in CASES {
        if only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        let run = |d: &Arc<Disk>| virtio(mem, d, case, secs).0;
        let (r, q) = compare(|| run(&raw), || run(&allocated));
        rows.push(Row {
            case: format!("{} (allocated)", case.name),
            raw: r,
            qcow2: q,
        });
        if case.write {
            let (r, q) = compare(|| run(&raw), || first_writes(mem, &fresh, size, case, secs));
            rows.push(Row {
                case: format!("{} (first writes)", case.name),
                raw: r,
                qcow2: q,
            });
        } else {
            let (r, q) = compare(|| run(&raw), || run(&through));
            rows.push(Row {
                case: format!("{} (from the backing file)", case.name),
                raw: r,
                qcow2: q,
            });
        }
    }
    drop((raw, allocated, through));
    for f in [&raw_path, &base, &q_path, &overlay, &fresh] {
        let _ = std::fs::remove_file(f);
    }
    rows
}

/// Writes into a fresh image, stopping before half its clusters are allocated (so the
/// figure is for allocating writes, not rewrites).
fn first_writes(mem: &Mem, path: &Path, size: u64, case: Case, secs: f64) -> f64 {
    create(path, Format::Qcow2, size, None);
    let d = open(path, Format::Qcow2);
    let requests = if case.random {
        size / CLUSTER / 2
    } else {
        size / case.size as u64
    };
    let rounds = (requests / case.depth as u64).max(1);
    virtio_rounds(mem, &d, case, secs, rounds).0
}

/// `qemu-img bench` on one file: MB/s, or None when qemu-img is missing or fails.
fn qemu_bench(
    file: &Path,
    format: Format,
    size: usize,
    depth: usize,
    write: bool,
    count: u64,
) -> Option<f64> {
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "bench",
        "-f",
        format.name(),
        "-t",
        "writeback",
        "-i",
        "threads",
    ])
    .args(["-c", &count.to_string(), "-d", &depth.to_string()])
    .args(["-s", &size.to_string(), "-S", &size.to_string()]);
    if write {
        cmd.arg("-w");
    }
    let out = cmd.arg(file).output().ok()?;
    if !out.status.success() {
        eprintln!("qemu-img bench: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(count as f64 * size as f64 / secs / 1e6)
}

fn qemu_reference(dir: &Path, size: u64, quick: bool) -> Vec<Row> {
    let raw_path = dir.join("qemu.raw");
    let q_path = dir.join("qemu.qcow2");
    create(&raw_path, Format::Raw, size, None);
    fill(&raw_path, Format::Raw, size);
    create(&q_path, Format::Qcow2, size, None);
    fill(&q_path, Format::Qcow2, size);
    let mut rows = Vec::new();
    for case in CASES {
        // Offsets step through the file (qemu-img bench has no random pattern).
        let count = if quick {
            64
        } else {
            (4 * size / case.size as u64).max(64)
        };
        let best = |f: &PathBuf, fmt| {
            (0..3)
                .filter_map(|_| qemu_bench(f, fmt, case.size, case.depth, case.write, count))
                .fold(None, |b: Option<f64>, x| Some(b.map_or(x, |b| b.max(x))))
        };
        let (Some(r), Some(q)) = (best(&raw_path, Format::Raw), best(&q_path, Format::Qcow2))
        else {
            return Vec::new();
        };
        let name = case.name.replace("random", "sequential");
        rows.push(Row {
            case: format!("{name} (allocated)"),
            raw: r,
            qcow2: q,
        });
    }
    for f in [&raw_path, &q_path] {
        let _ = std::fs::remove_file(f);
    }
    rows
}

fn table(rows: &[Row]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "| {} | {:.0} | {:.0} | **{:.2}** |\n",
                r.case,
                r.raw,
                r.qcow2,
                r.ratio()
            )
        })
        .collect()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("VESSEL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.05 } else { 1.0 });
    let base =
        std::env::var("VESSEL_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let size: u64 = if quick { 16 << 20 } else { 256 << 20 };
    if quick {
        println!("smoke run (not `cargo bench`): the figures below mean nothing");
    }
    let mem = memory(64 << 20);
    let rows = measure(&mem, dir.path(), size, secs);
    for r in &rows {
        println!(
            "{:<40} raw {:>9.1} MB/s   qcow2 {:>9.1} MB/s   ratio {:.3}",
            r.case,
            r.raw,
            r.qcow2,
            r.ratio()
        );
        println!(
            "BENCH {{\"bench\":\"qcow2\",\"case\":\"{}\",\"raw_mb_s\":{:.1},\"qcow2_mb_s\":{:.1},\"ratio\":{:.3}}}",
            r.case,
            r.raw,
            r.qcow2,
            r.ratio()
        );
    }
    let qemu = qemu_reference(dir.path(), size, quick);
    for r in &qemu {
        println!(
            "qemu-img bench {:<25} raw {:>9.1} MB/s   qcow2 {:>9.1} MB/s   ratio {:.3}",
            r.case,
            r.raw,
            r.qcow2,
            r.ratio()
        );
    }
    if quick || std::env::var("VESSEL_BENCH_CASE").is_ok() {
        return;
    }
    let qemu_part = if qemu.is_empty() {
        "qemu-img was not installed: no outside reference this run.\n".to_string()
    } else {
        format!(
            "QEMU's own qcow2 against raw on the same kind of files (`qemu-img bench -t \
             writeback -i threads`, offsets stepping through the file, best of 3; its 4 KiB figures swing by two or \
             three times from run to run on these machines):\n\n\
             | case | raw MB/s | qcow2 MB/s | qcow2 / raw |\n| --- | --- | --- | --- |\n{}",
            table(&qemu)
        )
    };
    let body = format!(
        "## qcow2 against raw, in process\n\n\
         The virtio-blk request path (the block benchmark's driver loop, device time \
         only) on a {} MiB image in the page cache: raw, and qcow2 (64 KiB clusters, \
         through imago), interleaved, best of {ROUNDS} runs of {secs} s. *Allocated*: \
         every cluster written beforehand; *first writes*: a fresh image each run, \
         stopped before half its clusters are allocated; *from the backing file*: an \
         empty overlay on the raw image.\n\n\
         | case | raw MB/s | qcow2 MB/s | qcow2 / raw |\n| --- | --- | --- | --- |\n{}\n\
         Target: at least 0.8 of raw on allocated clusters.\n\n{qemu_part}",
        size >> 20,
        table(&rows)
    );
    testguest::report::update_section("qcow2", &body).expect("write BENCHMARKS.md");
}
