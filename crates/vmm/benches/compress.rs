//! The compression cache on its own (issue 15), written to BENCHMARKS.md: 128 MiB of
//! guest RAM filled with the kit's kernel image (real code and data, repeated), taken
//! out and compressed by the cache's scanner, then touched page by page:
//! - compression throughput (MiB/s of pages taken out, moved and lz4-compressed) against
//!   a plain memcpy of the same memory, same run;
//! - the latency of a touch on a compressed page (a userfaultfd round trip and an lz4
//!   decompression) against a first touch of a fresh anonymous page (the kernel's own
//!   zero-fill fault), same run.
//!
//! Run with `cargo bench -p vmm --bench compress` (root: userfaultfd for kernel faults).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use testguest::report::update_section;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm::compress::{CompressConfig, CompressStats, Compressor, PAGE};

const SIZE: u64 = 128 << 20;

fn main() {
    let Some(kit) = kit::locate(&kit::default_cache_dir().expect("cache dir")) else {
        eprintln!("skipped: no kit (vessel kit)");
        return;
    };
    let image = std::fs::read(&kit.vmlinux).expect("vmlinux");
    let (mem, _code) = vmm::builder::guest_memory(SIZE, false).expect("memory");
    let region = mem.iter().next().expect("a region");
    let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
    let len = (region.len() as usize).min(SIZE as usize);
    // SAFETY: the region's own mapping, `len` bytes, written before anything else uses it.
    let ram = unsafe { std::slice::from_raw_parts_mut(host, len) };
    for chunk in ram.chunks_mut(image.len()) {
        chunk.copy_from_slice(&image[..chunk.len()]);
    }
    // Baseline: copying the same memory.
    let mut copy = vec![0u8; len];
    // Touched first: the copy measures copying, not page faults.
    copy.fill(1);
    let t = Instant::now();
    copy.copy_from_slice(std::hint::black_box(&*ram));
    std::hint::black_box(&copy);
    let memcpy_mibs = len as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    drop(copy);
    // lz4 itself, page by page, both ways (the pages the cache would keep).
    let mut scratch = Vec::new();
    let mut store = vmm::compress::store::Store::default();
    let t = Instant::now();
    for (i, page) in ram.chunks(PAGE).enumerate() {
        if let Some(c) = vmm::compress::store::Store::compress(page, &mut scratch) {
            store.insert(i as u64, c);
        }
    }
    let lz4_mibs = len as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let kept = store.pages();
    let mut out = vec![0u8; PAGE];
    let t = Instant::now();
    for i in 0..(len / PAGE) as u64 {
        store.take(i, &mut out);
        std::hint::black_box(&out);
    }
    let unlz4_mibs = (kept * PAGE) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();

    let stats = Arc::new(CompressStats::default());
    let t = Instant::now();
    let compressor = match Compressor::start(&mem, CompressConfig::default(), stats.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: no userfaultfd here ({e})");
            return;
        }
    };
    let pages = len / PAGE;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Wait until the scanner has been over everything (compressed or refused).
    while (stats.compressed.load(Ordering::Relaxed) + stats.incompressible.load(Ordering::Relaxed))
        < pages as u64
    {
        assert!(Instant::now() < deadline, "the scanner did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let scan_secs = t.elapsed().as_secs_f64();
    let compressed_pages = stats.pages.load(Ordering::Relaxed);
    let ratio =
        (compressed_pages as f64 * PAGE as f64) / stats.bytes.load(Ordering::Relaxed) as f64;
    let compress_mibs = len as f64 / (1 << 20) as f64 / scan_secs;

    // Touches: one byte per compressed page, each a fault and a decompression.
    let mut touch_ns = Vec::with_capacity(pages);
    let mut sum = 0u64;
    for p in 0..pages {
        let t = Instant::now();
        // SAFETY: a page of the region; the read faults it back.
        sum = sum.wrapping_add(u64::from(unsafe {
            std::ptr::read_volatile(host.add(p * PAGE))
        }));
        touch_ns.push(t.elapsed().as_nanos() as f64);
    }
    drop(compressor);
    // The data came back as it was.
    for chunk in ram.chunks(image.len()) {
        assert!(chunk == &image[..chunk.len()], "a page came back different");
    }
    // Baseline: first touches of fresh anonymous pages.
    // SAFETY: a fresh anonymous mapping, unmapped below.
    let fresh = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as *mut u8;
    let mut fresh_ns = Vec::with_capacity(pages);
    for p in 0..pages {
        let t = Instant::now();
        // SAFETY: a page of the mapping above; the write faults it in.
        unsafe { std::ptr::write_volatile(fresh.add(p * PAGE), 1) };
        fresh_ns.push(t.elapsed().as_nanos() as f64);
    }
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(fresh.cast(), len) };
    let touch = testguest::report::median(&mut touch_ns) / 1e3;
    let first = testguest::report::median(&mut fresh_ns) / 1e3;
    let body = format!(
        "## Memory compression (issue 15)\n\n\
         The compression cache alone on {} MiB of RAM holding the kit's kernel image \
         (`cargo bench -p vmm --bench compress`); baselines from the same run.\n\n\
         | | compression cache | baseline | ratio |\n|---|---|---|---|\n\
         | lz4 compression of its pages vs memcpy of the same memory | {lz4_mibs:.0} MiB/s | {memcpy_mibs:.0} MiB/s | {:.3} |\n\
         | lz4 decompression of the pages kept vs memcpy | {unlz4_mibs:.0} MiB/s | {memcpy_mibs:.0} MiB/s | {:.3} |\n\
         | the cache taking pages out (scan, move, lz4, store; paced) vs memcpy | {compress_mibs:.0} MiB/s | {memcpy_mibs:.0} MiB/s | {:.3} |\n\
         | touching a compressed page (fault, lz4, copy back) vs a first touch of a fresh page, median | {touch:.1} µs | {first:.1} µs | {:.1} |\n\n\
         {compressed_pages} of {pages} pages kept compressed at {ratio:.2}:1 (pages worse than 2:1 stay \
         uncompressed); the scanner takes at most 64 MiB every 0.5 s, which bounds the third figure. \
         Every page came back bit-identical (checksum {sum:#x}).\n",
        len >> 20,
        lz4_mibs / memcpy_mibs,
        unlz4_mibs / memcpy_mibs,
        compress_mibs / memcpy_mibs,
        touch / first
    );
    print!("{body}");
    update_section("compress", &body).expect("write BENCHMARKS.md");
}
