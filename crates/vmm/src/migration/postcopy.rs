//! The destination's side of post-copy: the VM runs before all its memory is here.
//! Guest RAM is fresh anonymous memory registered with userfaultfd; one thread serves
//! every first touch of a page: from the received memory file when the page arrived
//! during pre-copy, else from the source (a `Request` on the link, answered ahead of
//! the pages it sends in the background). Pages are only ever placed with UFFDIO_COPY:
//! this thread never touches guest memory itself.
//!
//! When the link fails before every stale page is here, the guest's threads that touch
//! one wait; the source keeps the pages (and its stopped guest).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::MigrationError;
use super::wire::{self, Frame, PAGE};
use crate::compress::uffd::Uffd;
use crate::snapshot::file::MEMORY;

/// One region of guest RAM: where it is in this process, in the guest and in the file.
struct Region {
    host: u64,
    gpa: u64,
    len: u64,
    file_offset: u64,
    /// Index of its first page in the bitmaps.
    base: usize,
}

/// One bit per page.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: usize, on: bool) {
        if on {
            self.0[i / 64] |= 1 << (i % 64);
        } else {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// What the thread reports to the rest of the monitor.
#[derive(Default)]
pub struct PostcopyStats {
    /// Pages the guest touched before they were here and that the source had to send.
    pub requested: AtomicU64,
    /// Pages still to come from the source.
    pub stale_left: AtomicU64,
    /// Every page is here.
    pub complete: AtomicBool,
}

/// The running post-copy of a VM being received.
pub struct Incoming {
    link: File,
    pub stats: Arc<PostcopyStats>,
    /// A new link to the source, for the thread to take (after its link failed).
    relink: Arc<Mutex<Option<File>>>,
}

impl Incoming {
    /// Goes on over `link` (a new connection from the source, past its greeting and
    /// `Resume`): the thread asks again for what it asked before.
    pub fn relink(&self, link: File) -> Result<(), MigrationError> {
        if self.stats.complete.load(Ordering::Acquire) {
            // Every page is here already: say so, and the source is done.
            let mut w = &link;
            wire::send(&mut w, &Frame::Done)?;
            return w.flush().map_err(|e| MigrationError::Link(e.to_string()));
        }
        *devices::bus::lock(&self.relink) = Some(link);
        Ok(())
    }

    /// Tells the source the VM runs here (it then never runs the guest again).
    pub fn running(&self) -> Result<(), MigrationError> {
        let mut w = &self.link;
        wire::send(&mut w, &Frame::Running)?;
        w.flush().map_err(|e| MigrationError::Link(e.to_string()))
    }
}

/// What a monitor needs for post-copy, made before it confines itself (a jail has no
/// /dev/userfaultfd, and seccomp forbids the system call).
pub struct PostcopyLink {
    /// To the source.
    pub link: File,
    pub uffd: Arc<Uffd>,
}

impl PostcopyLink {
    pub fn new(link: File) -> Result<Self, MigrationError> {
        let err = |e: std::io::Error| MigrationError::Local(format!("post-copy: userfaultfd: {e}"));
        let uffd = Uffd::new().map_err(err)?;
        uffd.set_nonblocking().map_err(err)?;
        Ok(PostcopyLink {
            link,
            uffd: Arc::new(uffd),
        })
    }
}

/// Registers `mem` (fresh, untouched) with `uffd` and starts serving it from the
/// received folder `dir` and the source on `link`.
pub fn start<M: GuestMemoryBackend>(
    mem: &M,
    dir: &Path,
    postcopy: &PostcopyLink,
) -> Result<Incoming, MigrationError> {
    let local = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| MigrationError::Local(format!("post-copy: {what}: {e}"))
    };
    let uffd = postcopy.uffd.clone();
    let link = postcopy.link.try_clone().map_err(local("the link"))?;
    let mut regions = Vec::new();
    let (mut base, mut offset) = (0usize, 0u64);
    for r in mem.iter() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MigrationError::Local(e.to_string()))? as u64;
        uffd.register(host, r.len())
            .map_err(local("registering guest memory"))?;
        regions.push(Region {
            host,
            gpa: r.start_addr().0,
            len: r.len(),
            file_offset: offset,
            base,
        });
        base += (r.len() / PAGE as u64) as usize;
        offset += r.len();
    }
    let memory = File::open(dir.join(MEMORY)).map_err(local("the memory file"))?;
    let stale_list =
        std::fs::read(dir.join(super::receive::STALE)).map_err(local("the stale list"))?;
    let mut stale = Bits::new(base);
    let mut left = 0u64;
    for run in stale_list.chunks_exact(12) {
        let gpa = u64::from_le_bytes(run[..8].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(run[8..].try_into().unwrap_or_default());
        for k in 0..u64::from(count) {
            if let Some(i) = index_of(&regions, gpa + k * PAGE as u64)
                && !stale.get(i)
            {
                stale.set(i, true);
                left += 1;
            }
        }
    }
    let stats = Arc::new(PostcopyStats::default());
    stats.stale_left.store(left, Ordering::Relaxed);
    let reader = link.try_clone().map_err(local("the link"))?;
    let writer = link.try_clone().map_err(local("the link"))?;
    let relink = Arc::new(Mutex::new(None));
    let server = Server {
        relink: relink.clone(),
        uffd,
        regions,
        memory,
        stale,
        present: Bits::new(base),
        requested: Bits::new(base),
        pages: base,
        link: reader,
        out: writer,
        stats: stats.clone(),
        source_done: false,
        told_source: false,
        fill_cursor: 0,
    };
    sandbox::thread::spawn(sandbox::ThreadClass::Vmm, "postcopy", move || server.run())
        .map_err(local("a thread"))?;
    Ok(Incoming {
        link,
        stats,
        relink,
    })
}

fn index_of(regions: &[Region], gpa: u64) -> Option<usize> {
    regions.iter().find_map(|r| {
        let off = gpa.checked_sub(r.gpa)?;
        (off < r.len).then(|| r.base + (off / PAGE as u64) as usize)
    })
}

struct Server {
    relink: Arc<Mutex<Option<File>>>,
    uffd: Arc<Uffd>,
    regions: Vec<Region>,
    memory: File,
    stale: Bits,
    present: Bits,
    requested: Bits,
    pages: usize,
    link: File,
    out: File,
    stats: Arc<PostcopyStats>,
    source_done: bool,
    /// The source was told every page is here.
    told_source: bool,
    /// Where the background fill from the memory file goes on.
    fill_cursor: usize,
}

impl Server {
    fn run(mut self) {
        let mut link_up = true;
        loop {
            let new = devices::bus::lock(&self.relink).take();
            if let Some(new) = new {
                link_up = self.take_link(new);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.link.as_raw_fd(),
                    events: if link_up { libc::POLLIN } else { 0 },
                    revents: 0,
                },
            ];
            // SAFETY: poll on two descriptors we own, with an array of their size.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1) };
            if n < 0 {
                continue;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                while let Ok(Some(addr)) = self.uffd.next_fault() {
                    self.fault(addr);
                }
            }
            if link_up && fds[1].revents != 0 {
                let mut r = &self.link;
                match wire::read(&mut r) {
                    Ok(frame) => {
                        if let Err(e) = self.take_frame(frame) {
                            tracing::error!("post-copy: {e}");
                            link_up = false;
                        }
                    }
                    Err(e) => {
                        if !self.source_done {
                            tracing::error!(
                                "post-copy: the link to the source failed ({e}); {} pages are still there",
                                self.stats.stale_left.load(Ordering::Relaxed)
                            );
                        }
                        link_up = false;
                    }
                }
            }
            // Once every stale page is here the source is not needed any more.
            if self.source_done
                && !self.told_source
                && self.stats.stale_left.load(Ordering::Relaxed) == 0
            {
                self.told_source = true;
                let mut w = &self.out;
                let _ = wire::send(&mut w, &Frame::Done);
                let _ = w.flush();
            }
            if n == 0 && self.fill_some() && self.told_source {
                // Faults there are the kernel's again (a page the balloon gives back
                // reads as zeros).
                for r in &self.regions {
                    if let Err(e) = self.uffd.unregister(r.host, r.len) {
                        tracing::warn!("post-copy: unregistering guest memory: {e}");
                    }
                }
                self.stats.complete.store(true, Ordering::Release);
                tracing::info!(
                    "post-copy complete: {} pages were asked for",
                    self.stats.requested.load(Ordering::Relaxed)
                );
                return;
            }
        }
    }

    /// Goes on over a new link: asks again for every page asked for and not yet here.
    fn take_link(&mut self, new: File) -> bool {
        let Ok(out) = new.try_clone() else {
            return false;
        };
        self.link = new;
        self.out = out;
        self.source_done = false;
        self.told_source = false;
        tracing::info!(
            "post-copy: a new link to the source; {} pages still to come",
            self.stats.stale_left.load(Ordering::Relaxed)
        );
        let mut w = &self.out;
        for i in 0..self.pages {
            if self.requested.get(i) && self.stale.get(i) {
                let Some((r, off)) = self.locate(i) else {
                    continue;
                };
                if wire::send(&mut w, &Frame::Request(r.gpa + off)).is_err() {
                    return false;
                }
            }
        }
        w.flush().is_ok()
    }

    fn locate(&self, i: usize) -> Option<(&Region, u64)> {
        self.regions
            .iter()
            .find(|r| i >= r.base && ((i - r.base) as u64) < r.len / PAGE as u64)
            .map(|r| (r, (i - r.base) as u64 * PAGE as u64))
    }

    /// Places page `i` with `data` (EEXIST: someone placed it first; then wake).
    fn place(&mut self, i: usize, data: &[u8]) {
        let Some((r, off)) = self.locate(i) else {
            return;
        };
        let host = r.host + off;
        let placed = if data.iter().all(|b| *b == 0) {
            self.uffd.zeropage(host, PAGE as u64)
        } else {
            self.uffd.copy(host, data)
        };
        match placed {
            Ok(()) => self.present.set(i, true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.present.set(i, true);
                let _ = self.uffd.wake(host, PAGE as u64);
            }
            Err(e) => tracing::error!("post-copy: placing a page: {e}"),
        }
    }

    /// Page `i` from the memory file.
    fn load_from_file(&mut self, i: usize) {
        let Some((r, off)) = self.locate(i) else {
            return;
        };
        let mut page = [0u8; PAGE];
        if let Err(e) = self.memory.read_exact_at(&mut page, r.file_offset + off) {
            tracing::error!("post-copy: reading the memory file: {e}");
        }
        self.place(i, &page);
    }

    fn fault(&mut self, addr: u64) {
        let Some(r) = self
            .regions
            .iter()
            .find(|r| addr >= r.host && addr - r.host < r.len)
        else {
            return;
        };
        let i = r.base + ((addr - r.host) / PAGE as u64) as usize;
        let gpa = r.gpa + (addr - r.host) / PAGE as u64 * PAGE as u64;
        if self.present.get(i) {
            // Placed before and missing again: given back since (the balloon), so it
            // reads as zeros.
            let page = addr & !(PAGE as u64 - 1);
            if let Err(e) = self.uffd.zeropage(page, PAGE as u64)
                && e.raw_os_error() == Some(libc::EEXIST)
            {
                let _ = self.uffd.wake(page, PAGE as u64);
            }
        } else if !self.stale.get(i) {
            self.load_from_file(i);
        } else if !self.requested.get(i) {
            self.requested.set(i, true);
            self.stats.requested.fetch_add(1, Ordering::Relaxed);
            let mut w = &self.out;
            if wire::send(&mut w, &Frame::Request(gpa))
                .and_then(|()| w.flush().map_err(|e| MigrationError::Link(e.to_string())))
                .is_err()
            {
                tracing::error!("post-copy: cannot ask the source for page {gpa:#x}");
            }
        }
    }

    fn take_frame(&mut self, frame: Frame) -> Result<(), MigrationError> {
        match frame {
            Frame::Pages(p) => {
                for k in 0..p.count as usize {
                    let gpa = p.gpa.checked_add((k * PAGE) as u64);
                    let Some(i) = gpa.and_then(|gpa| index_of(&self.regions, gpa)) else {
                        let gpa = p.gpa;
                        return Err(MigrationError::Stream(format!(
                            "page {gpa:#x} is not the VM's memory"
                        )));
                    };
                    if self.stale.get(i) {
                        self.stale.set(i, false);
                        self.stats.stale_left.fetch_sub(1, Ordering::Relaxed);
                    }
                    if !self.present.get(i) {
                        self.place(i, &p.data[k * PAGE..(k + 1) * PAGE]);
                    }
                }
                Ok(())
            }
            Frame::Done => {
                self.source_done = true;
                Ok(())
            }
            _ => Err(MigrationError::Stream(
                "a frame out of turn during post-copy".into(),
            )),
        }
    }

    /// Brings in a few pages from the memory file that nobody touched yet (a run of
    /// pages of zeros in one call); true once every page is here.
    fn fill_some(&mut self) -> bool {
        const CHUNK: usize = 256;
        let mut buf = vec![0u8; CHUNK * PAGE];
        let mut budget = 16;
        while self.fill_cursor < self.pages && budget > 0 {
            budget -= 1;
            let first = self.fill_cursor;
            // A chunk within one region.
            let Some((r, off)) = self.locate(first) else {
                self.fill_cursor += 1;
                continue;
            };
            let in_region = ((r.len - off) / PAGE as u64) as usize;
            let n = CHUNK.min(in_region).min(self.pages - first);
            let (host, file_at) = (r.host + off, r.file_offset + off);
            self.fill_cursor += n;
            let wanted = |s: &Self, i: usize| !s.present.get(i) && !s.stale.get(i);
            if !(first..first + n).any(|i| wanted(self, i)) {
                continue;
            }
            let data = &mut buf[..n * PAGE];
            if let Err(e) = self.memory.read_exact_at(data, file_at) {
                tracing::error!("post-copy: reading the memory file: {e}");
            }
            let all = (first..first + n).all(|i| wanted(self, i));
            // (Should the call fail, page by page below.)
            if all
                && data.iter().all(|b| *b == 0)
                && self.uffd.zeropage(host, (n * PAGE) as u64).is_ok()
            {
                for i in first..first + n {
                    self.present.set(i, true);
                }
                continue;
            }
            for k in 0..n {
                if wanted(self, first + k) {
                    let page = buf[k * PAGE..(k + 1) * PAGE].to_vec();
                    self.place(first + k, &page);
                }
            }
        }
        self.fill_cursor >= self.pages && self.stats.stale_left.load(Ordering::Relaxed) == 0
    }
}
