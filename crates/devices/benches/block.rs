//! The virtio-blk request path in-process (no guest): requests laid out in guest
//! memory as a driver would, served by the same `BlockQueue::process` the device's
//! worker thread runs, against the same I/O done directly with pread/pwrite on the
//! same file, in the same run. Prints one `BENCH {...}` JSON line per case.
//!
//! `cargo bench -p devices --bench block` (set `VESSEL_BENCH_SECS` to change the time
//! per measurement, default 1; `VESSEL_BENCH_DIR` for where the image file goes).

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "blk/mod.rs"]
mod blk;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use blk::{CASES, Case, DATA, Offsets, ROUNDS, virtio};
use common::{Mem, memory};
use devices::virtio::block::Disk;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Direct I/O on the host file: one pread/pwrite per request, into and out of the
/// very buffers the guest's requests use (so both paths copy to the same memory and
/// the difference is the request path).
fn direct(file: &File, mem: &Mem, case: Case, secs: f64) -> f64 {
    let file_size = file.metadata().unwrap().len();
    let bufs: Vec<*mut u8> = (0..case.depth as u64)
        .map(|i| {
            let addr = GuestAddress(DATA + i * case.size as u64);
            assert!(mem.check_range(addr, case.size));
            mem.get_host_address(addr).unwrap()
        })
        .collect();
    let fd = file.as_raw_fd();
    let mut offsets = Offsets::new(case, file_size);
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for buf in &bufs {
            let at = offsets.next() as libc::off_t;
            // SAFETY: `buf` points at `case.size` bytes of guest memory (checked above),
            // which `mem` keeps mapped; nothing else touches it meanwhile.
            let n = unsafe {
                if case.write {
                    libc::pwrite(fd, buf.cast(), case.size, at)
                } else {
                    libc::pread(fd, buf.cast(), case.size, at)
                }
            };
            assert_eq!(n, case.size as isize);
            bytes += case.size as u64;
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("VESSEL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.05 } else { 1.0 });
    let dir = std::env::var("VESSEL_BENCH_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    // `cargo test --benches` runs this as a smoke test: a small image and short runs.
    let file_size: u64 = if quick { 16 << 20 } else { 256 << 20 };
    if quick {
        println!("smoke run (not `cargo bench`): the figures below mean nothing");
    }
    let image = tempfile::NamedTempFile::new_in(&dir).unwrap();
    // A fully written image, in the page cache for both paths.
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..file_size / (1 << 20) {
        image.as_file().write_all_at(&chunk, i << 20).unwrap();
    }
    image.as_file().sync_all().unwrap();
    let file = File::options()
        .read(true)
        .write(true)
        .open(image.path())
        .unwrap();
    let disk = Arc::new(Disk::from_file(file.try_clone().unwrap(), false, [0; 20]).unwrap());
    let mem = memory(64 << 20);

    println!(
        "virtio-blk request path vs direct pread/pwrite, {} MiB image in {dir}, {secs} s per run",
        file_size >> 20
    );
    let only = std::env::var("VESSEL_BENCH_CASE").ok();
    let mut rows = Vec::new();
    for case in CASES {
        if only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        // Interleave the two paths and keep each one's best of three.
        let (mut best_virtio, mut best_e2e, mut best_direct) = (0f64, 0f64, 0f64);
        for _ in 0..ROUNDS {
            best_direct = best_direct.max(direct(&file, &mem, case, secs));
            let (device, e2e) = virtio(&mem, &disk, case, secs);
            best_virtio = best_virtio.max(device);
            best_e2e = best_e2e.max(e2e);
        }
        let ratio = best_virtio / best_direct;
        println!(
            "{:<20} virtio {:>9.1} MB/s (with driver {:>9.1})   direct {:>9.1} MB/s   ratio {:.3}",
            case.name, best_virtio, best_e2e, best_direct, ratio
        );
        println!(
            "BENCH {{\"bench\":\"virtio-blk\",\"case\":\"{}\",\"virtio_mb_s\":{:.1},\"virtio_with_driver_mb_s\":{:.1},\"direct_mb_s\":{:.1},\"ratio\":{:.3},\"depth\":{}}}",
            case.name, best_virtio, best_e2e, best_direct, ratio, case.depth
        );
        rows.push(format!(
            "| {} | {:.0} | {:.0} | {:.0} | **{:.3}** |\n",
            case.name, best_virtio, best_e2e, best_direct, ratio
        ));
    }
    if !quick && only.is_none() {
        let body = format!(
            "## virtio-blk request path, in process\n\n\
             The block device's request handling (descriptor walk, request parsing, \
             preadv/pwritev into guest memory, used ring) on a {} MiB image in the page \
             cache, against the same I/O done with pread/pwrite straight into the same guest \
             buffers, interleaved, best of {ROUNDS} runs of {secs} s each. Guest memory is \
             vessel's own (writes reported to the software CPU's code map).\n\n\
             | case | virtio MB/s | with the simulated driver | direct MB/s | virtio / direct |\n\
             | --- | --- | --- | --- | --- |\n{}\n\
             Target: at least 0.9 of direct.\n",
            file_size >> 20,
            rows.concat()
        );
        testguest::report::update_section("virtio-blk", &body).expect("write BENCHMARKS.md");
    }
}
