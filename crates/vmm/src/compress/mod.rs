//! A compression cache for cold guest pages (`--memory-compress`), as ESXi keeps one
//! before it swaps: a scanner thread takes pages the guest has not faulted back for a
//! while, compresses them (lz4) and frees the originals; a fault thread brings a page
//! back, bit-identical, the moment anything touches it (a vCPU on either backend, a
//! device, vessel itself) — all through userfaultfd.
//!
//! A page leaves the guest atomically: UFFDIO_MOVE takes it out (every access to it from
//! then on faults to the fault thread) into a staging area, where it is compressed; a
//! page that does not compress to half a page goes back the same way. The two threads
//! share one lock, so a fault on a page in flight waits until it is stored or back.
//! Which pages are cold: these hosts have neither idle page tracking nor soft-dirty
//! bits, so the scanner takes every present page the guest has not faulted back
//! recently, and a page that is faulted back waits twice as long each time before it
//! is taken again (a clock with exponential backoff). Pages the balloon or free page
//! reporting give up are dropped from the cache, not decompressed.
//!
//! Private anonymous memory only (what UFFDIO_MOVE moves): not a VM with shared memory
//! (virtio-fs) or one restored from a snapshot (mapped from its file).

pub mod store;
pub mod uffd;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use store::Store;
use uffd::Uffd;

pub const PAGE: usize = 4096;
/// How often the scanner runs.
const INTERVAL: Duration = Duration::from_millis(500);
/// The most pages taken in one scan (64 MiB: 128 MiB/s at most).
const SCAN_PAGES: usize = 16 << 10;
/// Pages moved out under one hold of the lock.
const BATCH: usize = 64;
/// A page is left alone for `2 << strikes` scans after it last came back.
const MAX_STRIKES: u8 = 12;
/// A page that did not compress is left alone this long (in strikes).
const INCOMPRESSIBLE_STRIKES: u8 = 9;

/// `--memory-compress[=on|auto|TARGET_SIZE]`: compress cold pages always, only when the
/// memory governor engages the cache (after the balloon), or only while the monitor's
/// resident memory is above TARGET_SIZE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompressConfig {
    pub target: Option<u64>,
    /// The cache starts disengaged; the governor engages it.
    pub governed: bool,
}

impl CompressConfig {
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec {
            "" | "on" => Ok(CompressConfig::default()),
            "auto" => Ok(CompressConfig {
                governed: true,
                ..Default::default()
            }),
            s => devices::virtio::options::parse_size(s, 20)
                .map(|t| CompressConfig {
                    target: Some(t),
                    governed: false,
                })
                .ok_or_else(|| {
                    format!("--memory-compress {s:?}: on, auto, or a size such as 256M")
                }),
        }
    }
}

/// What the cache holds and has done.
#[derive(Default)]
pub struct CompressStats {
    pub pages: AtomicU64,
    pub bytes: AtomicU64,
    /// Pages brought back because something touched them.
    pub faults: AtomicU64,
    /// Pages compressed in all, and pages that would not compress.
    pub compressed: AtomicU64,
    pub incompressible: AtomicU64,
    /// Whether the scanner takes pages now: always, unless the governor drives the
    /// cache (`auto`), which engages it once the balloon has given what it can.
    pub engaged: AtomicBool,
}

struct Region {
    guest: u64,
    host: u64,
    len: u64,
    /// This region's first page's index in the per-page arrays.
    base: usize,
}

struct Shared {
    uffd: Uffd,
    regions: Vec<Region>,
    staging: u64,
    store: Mutex<Store>,
    /// Per page: the scan when it last came back, and how often it has.
    last_fault: Vec<AtomicU32>,
    strikes: Vec<AtomicU8>,
    epoch: AtomicU32,
    stats: Arc<CompressStats>,
    target: Option<u64>,
    stop: AtomicBool,
}

impl Shared {
    /// The region index and page index of host address `host`.
    fn page_of(&self, host: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (host >= r.host && host < r.host + r.len)
                .then(|| (i, r.base + ((host - r.host) as usize / PAGE)))
        })
    }

    fn update_stats(&self, s: &Store) {
        self.stats.pages.store(s.pages() as u64, Ordering::Relaxed);
        self.stats.bytes.store(s.bytes() as u64, Ordering::Relaxed);
    }
}

/// The running cache; dropping it stops its threads (guest memory stays mapped as long).
pub struct Compressor {
    shared: Arc<Shared>,
    wake: EventFd,
    threads: Vec<JoinHandle<()>>,
    _mem: cpu::GuestMemory,
}

impl Compressor {
    /// Starts compressing `mem` (private anonymous guest RAM) as `config` says.
    pub fn start(
        mem: &cpu::GuestMemory,
        config: CompressConfig,
        stats: Arc<CompressStats>,
    ) -> std::io::Result<Compressor> {
        stats.engaged.store(!config.governed, Ordering::Relaxed);
        let uffd = Uffd::new()?;
        set_nonblocking(uffd.raw_fd())?;
        let mut regions = Vec::new();
        let mut pages = 0;
        for r in mem.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| std::io::Error::other(e.to_string()))? as u64;
            uffd.register(host, r.len())?;
            regions.push(Region {
                guest: r.start_addr().0,
                host,
                len: r.len(),
                base: pages,
            });
            pages += r.len() as usize / PAGE;
        }
        let staging = map_staging()?;
        uffd.register(staging, (BATCH * PAGE) as u64)?;
        let shared = Arc::new(Shared {
            uffd,
            regions,
            staging,
            store: Mutex::new(Store::default()),
            last_fault: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            strikes: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            epoch: AtomicU32::new(0),
            stats,
            target: config.target,
            stop: AtomicBool::new(false),
        });
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let faults = {
            let (s, w) = (shared.clone(), wake.try_clone()?);
            sandbox::thread::spawn(sandbox::ThreadClass::Memory, "mem-faults", move || {
                serve_faults(&s, &w)
            })?
        };
        let scanner = {
            let s = shared.clone();
            // Opened here: the scanner's class opens no files.
            let pagemap = std::fs::File::open("/proc/self/pagemap")?;
            let statm = std::fs::File::open("/proc/self/statm")?;
            sandbox::thread::spawn(sandbox::ThreadClass::Memory, "mem-compress", move || {
                scan(&s, &pagemap, &statm)
            })?
        };
        Ok(Compressor {
            shared,
            wake,
            threads: vec![faults, scanner],
            _mem: mem.clone(),
        })
    }

    /// A hook for the reclaim path (balloon, free page reporting): a range the guest gave
    /// up has its compressed pages dropped.
    pub fn forget_hook(&self) -> Arc<dyn Fn(u64, u64) + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |gpa, len| forget(&shared, gpa, len))
    }
}

fn forget(shared: &Shared, gpa: u64, len: u64) {
    let Some(r) = shared
        .regions
        .iter()
        .find(|r| gpa >= r.guest && gpa < r.guest + r.len)
    else {
        return;
    };
    let first = r.base + ((gpa - r.guest) as usize / PAGE);
    let count = (len.min(r.guest + r.len - gpa) as usize).div_ceil(PAGE);
    let mut store = devices::bus::lock(&shared.store);
    store.forget(first as u64, count as u64);
    shared.update_stats(&store);
}

impl Drop for Compressor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // SAFETY: the staging area mapped by `map_staging`, no longer used by anyone.
        unsafe { libc::munmap(self.shared.staging as *mut libc::c_void, BATCH * PAGE) };
    }
}

fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn map_staging() -> std::io::Result<u64> {
    // SAFETY: a fresh anonymous private mapping, unmapped by the compressor's drop.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            BATCH * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p as u64)
}

/// The fault thread: brings back every page something touches (or maps zeros for a page
/// never written), until stopped.
fn serve_faults(s: &Shared, wake: &EventFd) {
    let mut page = vec![0u8; PAGE];
    let mut fds = [
        libc::pollfd {
            fd: s.uffd.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !s.stop.load(Ordering::SeqCst) {
        // SAFETY: two pollfds that live across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        loop {
            match s.uffd.next_fault() {
                Ok(Some(addr)) => bring_back(s, addr & !(PAGE as u64 - 1), &mut page),
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("memory compression: userfaultfd: {e}");
                    return;
                }
            }
        }
    }
}

fn bring_back(s: &Shared, host: u64, page: &mut [u8]) {
    let Some((_, idx)) = s.page_of(host) else {
        // The staging area: only the scanner touches it, never while it is empty.
        let _ = s.uffd.zeropage(host, PAGE as u64);
        return;
    };
    let mut store = devices::bus::lock(&s.store);
    let result = if store.take(idx as u64, page) {
        s.stats.faults.fetch_add(1, Ordering::Relaxed);
        let strikes = &s.strikes[idx];
        let _ = strikes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_add(1).min(MAX_STRIKES))
        });
        s.last_fault[idx].store(s.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
        s.update_stats(&store);
        s.uffd.copy(host, page)
    } else {
        // Never written, or given up by the guest: zeros.
        s.uffd.zeropage(host, PAGE as u64)
    };
    drop(store);
    if let Err(e) = result {
        // Another fault filled it first: wake whoever waits.
        if e.raw_os_error() == Some(libc::EEXIST) {
            let _ = s.uffd.wake(host, PAGE as u64);
        } else {
            tracing::error!("memory compression: filling {host:#x}: {e}");
        }
    }
}

/// The scanner: every INTERVAL, takes cold pages out and compresses them.
fn scan(s: &Shared, file: &std::fs::File, statm: &std::fs::File) {
    let mut scratch = Vec::new();
    let mut pagemap = vec![0u64; 0];
    let mut candidates: Vec<(u64, usize)> = Vec::new();
    while !s.stop.load(Ordering::SeqCst) {
        std::thread::sleep(INTERVAL);
        let epoch = s.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        if !s.stats.engaged.load(Ordering::Relaxed) {
            continue;
        }
        if let Some(target) = s.target
            && rss_bytes(statm) <= target
        {
            continue;
        }
        candidates.clear();
        for r in &s.regions {
            let pages = r.len as usize / PAGE;
            pagemap.resize(pages, 0);
            if !read_pagemap(file, r.host, &mut pagemap) {
                continue;
            }
            for (i, &e) in pagemap.iter().enumerate() {
                // Present (bit 63) and mapped here only (bit 56): what MOVE can take.
                if e >> 63 == 0 || (e >> 56) & 1 == 0 {
                    continue;
                }
                let idx = r.base + i;
                let wait = 2u32 << s.strikes[idx].load(Ordering::Relaxed);
                if epoch.wrapping_sub(s.last_fault[idx].load(Ordering::Relaxed)) < wait {
                    continue;
                }
                candidates.push((r.host + (i * PAGE) as u64, idx));
                if candidates.len() == SCAN_PAGES {
                    break;
                }
            }
        }
        for batch in candidates.chunks(BATCH) {
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            compress_batch(s, batch, &mut scratch);
        }
    }
}

fn compress_batch(s: &Shared, batch: &[(u64, usize)], scratch: &mut Vec<u8>) {
    let mut store = devices::bus::lock(&s.store);
    for (slot, &(host, idx)) in batch.iter().enumerate() {
        let staged = s.staging + (slot * PAGE) as u64;
        // A page touched since the scan looked is simply not moved (or is missing).
        if s.uffd.move_pages(staged, host, PAGE as u64).is_err() {
            continue;
        }
        // SAFETY: the staging page now holds the page just moved; only this thread
        // touches the staging area.
        let data = unsafe { std::slice::from_raw_parts(staged as *const u8, PAGE) };
        match Store::compress(data, scratch) {
            Some(c) => {
                store.insert(idx as u64, c);
                s.stats.compressed.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                // Back where it was, untouched (the guest's page is missing until then;
                // a fault on it waits for this lock).
                if let Err(e) = s.uffd.move_pages(host, staged, PAGE as u64) {
                    tracing::error!("memory compression: returning {host:#x}: {e}");
                    let _ = s.uffd.copy(host, data);
                }
                s.stats.incompressible.fetch_add(1, Ordering::Relaxed);
                s.strikes[idx].store(INCOMPRESSIBLE_STRIKES, Ordering::Relaxed);
                s.last_fault[idx].store(s.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }
    // The staging pages go, empty for the next batch.
    // SAFETY: dropping the staging area's pages, which nothing refers to any more.
    unsafe {
        libc::madvise(
            s.staging as *mut libc::c_void,
            BATCH * PAGE,
            libc::MADV_DONTNEED,
        )
    };
    s.update_stats(&store);
}

fn read_pagemap(file: &std::fs::File, host: u64, out: &mut [u64]) -> bool {
    use std::os::unix::fs::FileExt;
    let offset = host / PAGE as u64 * 8;
    // SAFETY: viewing the u64 slice as bytes for the read; every bit pattern is valid.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 8) };
    file.read_exact_at(bytes, offset).is_ok()
}

/// The process's resident memory, from `/proc/self/statm` opened once (`statm`).
fn rss_bytes(statm: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 128];
    let n = statm.read_at(&mut buf, 0).unwrap_or(0);
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * PAGE as u64)
}
