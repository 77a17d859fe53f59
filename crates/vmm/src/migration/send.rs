//! The source's side: pre-copy. Every page goes once while the guest runs, then the
//! pages it wrote meanwhile, round after round, until what is left would cross the link
//! within the downtime limit; then the guest stops, the rest and the state go, and the
//! destination says whether it runs. A guest that writes faster than the link carries
//! is slowed down in steps (auto-converge). Until the destination runs, any failure
//! leaves the source running as before.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::virtio::block::DISK_CHUNK;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::MigrationError;
use super::wire::{self, Encoding, Frame, Hello, MAX_RUN, PAGE};
use crate::control::{RunState, VmControl};
use crate::snapshot::{MemoryRange, Persist};

/// How a migration is made.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The longest the guest may stand still at the end (QEMU's and Cloud Hypervisor's
    /// default: 300 ms).
    pub downtime: Duration,
    /// At most this many bytes per second on the link (None: as fast as it goes).
    pub max_bandwidth: Option<u64>,
    /// Pages LZ4-compressed.
    pub compress: bool,
    /// Slow the guest down when it dirties memory faster than the link carries it.
    pub auto_converge: bool,
    /// After this many rounds the guest stops whatever is left.
    pub max_rounds: u32,
    /// Post-copy: after this many rounds without converging, the destination runs the
    /// guest and takes the pages still stale as it needs them (auto-converge is off).
    pub postcopy_after: Option<u32>,
    /// Copy the disks' contents too (no shared storage): all of each disk first, then
    /// with every round what the guest wrote meanwhile.
    pub copy_disks: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            downtime: Duration::from_millis(300),
            max_bandwidth: None,
            compress: false,
            auto_converge: true,
            max_rounds: 30,
            postcopy_after: None,
            copy_disks: false,
        }
    }
}

/// What a migration did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SendReport {
    pub rounds: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub seconds: f64,
    /// From the guest's stop here to the destination saying it runs.
    pub downtime_ms: f64,
    /// The highest throttle auto-converge reached (percent of each 10 ms the guest is
    /// stopped).
    pub throttle_percent: u8,
    /// Post-copy: the pages the destination got after the switch, and how many of them
    /// it asked for because the guest touched them first.
    pub postcopy_pages: u64,
    pub postcopy_requests: u64,
}

/// Counts what goes out and keeps to a bandwidth limit.
struct Paced<W: Write> {
    inner: W,
    sent: u64,
    limit: Option<u64>,
    since: Instant,
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        if let Some(limit) = self.limit.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(self.sent as f64 / limit as f64);
            let elapsed = self.since.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Stops the guest for part of every 10 ms while auto-converge asks it to.
struct Throttle {
    percent: AtomicU8,
    stop: AtomicBool,
    /// Held while the guest is stopped by the throttle or by the sender.
    gate: Mutex<()>,
}

impl Throttle {
    fn run(&self, control: &VmControl) {
        const PERIOD_US: u64 = 10_000;
        while !self.stop.load(Ordering::Acquire) {
            let p = u64::from(self.percent.load(Ordering::Acquire));
            if p == 0 {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            {
                let _g = lock(&self.gate);
                if control.state() == RunState::Running && control.pause().is_ok() {
                    std::thread::sleep(Duration::from_micros(PERIOD_US * p / 100));
                    let _ = control.resume();
                }
            }
            std::thread::sleep(Duration::from_micros(PERIOD_US * (100 - p) / 100));
        }
    }
}

/// The guest stopped for `f` (unless it was stopped already), the throttle held off.
fn with_paused<T>(control: &VmControl, throttle: &Throttle, f: impl FnOnce() -> T) -> T {
    let _g = lock(&throttle.gate);
    let paused_here = control.state() == RunState::Running && control.pause().is_ok();
    let out = f();
    if paused_here {
        let _ = control.resume();
    }
    out
}

/// The memory map as a memory file lays it out.
pub(crate) fn memory_map<M: GuestMemoryBackend>(mem: &M) -> Vec<MemoryRange> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let m = MemoryRange {
                guest: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            m
        })
        .collect()
}

pub(super) struct Sender<'a> {
    persist: &'a Persist,
    out: BufWriter<Paced<&'a File>>,
    pub(super) stream: &'a File,
    opts: &'a SendOptions,
    cancel: &'a AtomicBool,
    pub(super) report: SendReport,
    buf: Vec<u8>,
    /// The disks being copied (none with shared storage).
    disks: Vec<Arc<devices::virtio::block::Disk>>,
    /// The guest ran when the migration began: only then does a failure resume it.
    was_running: bool,
    /// Cancelling is refused once the destination runs the guest (post-copy).
    pub(super) cancellable: bool,
}

impl<'a> Sender<'a> {
    /// A sender over `stream` for `persist`'s VM: no disks copied, its guest not
    /// resumed on failure, no cancelling (the callers set what differs).
    fn new(
        persist: &'a Persist,
        stream: &'a File,
        opts: &'a SendOptions,
        cancel: &'a AtomicBool,
    ) -> Self {
        Sender {
            persist,
            out: BufWriter::with_capacity(
                1 << 20,
                Paced {
                    inner: stream,
                    sent: 0,
                    limit: opts.max_bandwidth,
                    since: Instant::now(),
                },
            ),
            stream,
            opts,
            cancel,
            report: SendReport::default(),
            buf: Vec::with_capacity(MAX_RUN * PAGE),
            disks: Vec::new(),
            was_running: false,
            cancellable: false,
        }
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancellable && self.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Sends the pages at `gpas` (sorted), in runs of consecutive pages of one kind;
    /// pages of zeros go as zero runs, or not at all when `skip_zero` (the
    /// destination's memory starts as zeros).
    pub(super) fn send_pages(
        &mut self,
        gpas: &[u64],
        skip_zero: bool,
    ) -> Result<(), MigrationError> {
        let mem = &self.persist.mem;
        let mut page = vec![0u8; PAGE];
        let mut k = 0;
        while k < gpas.len() {
            self.check_cancel()?;
            // A run: consecutive pages, all zero or all not.
            let start = gpas[k];
            self.buf.clear();
            let mut zero_run = None;
            let mut count = 0u32;
            while k < gpas.len()
                && gpas[k] == start + u64::from(count) * PAGE as u64
                && (count as usize) < MAX_RUN
            {
                if mem.read_slice(&mut page, GuestAddress(gpas[k])).is_err() {
                    page.fill(0);
                }
                let zero = page.iter().all(|b| *b == 0);
                match zero_run {
                    None => zero_run = Some(zero),
                    Some(z) if z != zero => break,
                    Some(_) => {}
                }
                if !zero {
                    self.buf.extend_from_slice(&page);
                }
                count += 1;
                k += 1;
            }
            if zero_run == Some(true) {
                self.report.zero_pages += u64::from(count);
                if skip_zero {
                    continue;
                }
                wire::send_pages(&mut self.out, start, count, Encoding::Zero, &[])?;
            } else if self.opts.compress {
                let packed = lz4_flex::block::compress(&self.buf);
                wire::send_pages(&mut self.out, start, count, Encoding::Lz4, &packed)?;
            } else {
                wire::send_pages(&mut self.out, start, count, Encoding::Raw, &self.buf)?;
            }
            self.report.pages_sent += u64::from(count);
        }
        Ok(())
    }

    /// Sends chunks of disk `k` (indexes of [`DISK_CHUNK`] bytes); chunks of zeros
    /// only when `zeros` (the destination's disk starts as zeros).
    fn send_disk(&mut self, k: usize, chunks: &[u64], zeros: bool) -> Result<(), MigrationError> {
        let disk = self.disks[k].clone();
        let size = disk.image().size();
        let mut buf = vec![0u8; DISK_CHUNK as usize];
        for &c in chunks {
            self.check_cancel()?;
            let offset = c * DISK_CHUNK;
            if offset >= size {
                continue;
            }
            let data = &mut buf[..DISK_CHUNK.min(size - offset) as usize];
            disk.image()
                .read_into(data, offset)
                .map_err(|e| MigrationError::Vm(format!("reading disk {k}: {e}")))?;
            if zeros || data.iter().any(|b| *b != 0) {
                wire::send_disk_chunk(&mut self.out, k as u32, offset, data)?;
            }
        }
        Ok(())
    }

    /// What the guest wrote to the disks being copied since the last call.
    fn send_disk_writes(&mut self) -> Result<(), MigrationError> {
        for k in 0..self.disks.len() {
            let written = self.disks[k].take_written();
            self.send_disk(k, &written, true)?;
        }
        Ok(())
    }

    pub(super) fn out_mut(&mut self) -> &mut impl Write {
        &mut self.out
    }

    pub(super) fn flush(&mut self) -> Result<(), MigrationError> {
        self.out
            .flush()
            .map_err(|e| MigrationError::Link(format!("sending: {e}")))
    }

    fn reply(&mut self) -> Result<Frame, MigrationError> {
        let mut r = self.stream;
        wire::read(&mut r)
    }
}

/// Every page of guest RAM, in order.
fn all_pages(map: &[MemoryRange]) -> Vec<u64> {
    map.iter()
        .flat_map(|r| (0..r.len / PAGE as u64).map(move |k| r.guest + k * PAGE as u64))
        .collect()
}

/// Migrates the VM over `stream` (a socket connected to a `vessel receive`). On success the
/// guest is stopped here and runs there; on any failure before the destination took
/// over, the guest runs here as before. `name` and `config` are the VM's name and
/// configuration for the destination; `cancel` ends the migration at the next run of pages.
pub fn send(
    persist: &Persist,
    control: &VmControl,
    stream: &File,
    name: &str,
    config: String,
    opts: &SendOptions,
    cancel: &AtomicBool,
) -> Result<SendReport, MigrationError> {
    let started = Instant::now();
    if lock(&persist.unfinished_postcopy).is_some() {
        return Err(MigrationError::Vm(
            "its post-copy to another destination is not finished: use --recover".into(),
        ));
    }
    persist
        .saveable()
        .map_err(|e| MigrationError::Vm(e.to_string()))?;
    let was_running = control.state() == RunState::Running;
    let map = memory_map(&persist.mem);
    let disks = if opts.copy_disks {
        persist.disks()
    } else {
        Vec::new()
    };
    let hello = Hello {
        disks: disks.iter().map(|d| d.image().size()).collect(),
        name: name.to_string(),
        config,
        vessel_version: env!("CARGO_PKG_VERSION").to_string(),
        backend: persist.backend,
        cpus: persist.cpus,
        memory_bytes: persist.memory_bytes,
        cpuid: persist.cpuid.clone(),
        memory: map.clone(),
    };
    let mut s = Sender::new(persist, stream, opts, cancel);
    s.disks = disks;
    s.was_running = was_running;
    s.cancellable = true;
    wire::write_greeting(&mut s.out)?;
    wire::send(&mut s.out, &Frame::Hello(Box::new(hello)))?;
    s.flush()?;
    match s.reply()? {
        Frame::Accept => {}
        Frame::Refuse(why) => return Err(MigrationError::Refused(why)),
        other => return Err(unexpected(&other)),
    }
    let throttle = Arc::new(Throttle {
        percent: AtomicU8::new(0),
        stop: AtomicBool::new(false),
        gate: Mutex::new(()),
    });
    if let Err(e) = with_paused(control, &throttle, || persist.dirty.set(true)) {
        let _ = persist.dirty.set(false);
        let _ = wire::send(&mut s.out, &Frame::Failed(e.clone()));
        let _ = s.out.flush();
        return Err(MigrationError::Vm(e));
    }
    for d in &s.disks {
        d.set_write_log(true);
    }
    let result = std::thread::scope(|scope| {
        if opts.auto_converge {
            let t = throttle.clone();
            scope.spawn(move || t.run(control));
        }
        let r = precopy_and_stop(&mut s, control, &throttle, &map);
        throttle.stop.store(true, Ordering::Release);
        r
    });
    let _ = persist.dirty.set(false);
    for d in &s.disks {
        d.set_write_log(false);
    }
    let (stopped, stale) = match result {
        Ok(stopped) => stopped,
        Err(e) => {
            // Tell the destination (if it still listens) that nothing will come.
            let _ = wire::send(&mut s.out, &Frame::Failed(e.to_string()));
            let _ = s.out.flush();
            return Err(e);
        }
    };
    s.report.throttle_percent = throttle.percent.load(Ordering::Acquire);
    // The guest is stopped and its devices quiesced; everything has been sent, or (post-
    // copy) the destination takes the rest as it goes.
    if let Some(stale) = stale {
        let served = super::serve::postcopy(&mut s, &stale, stopped, false);
        s.report.seconds = started.elapsed().as_secs_f64();
        s.report.bytes_sent = s.out.get_ref().sent;
        return match served {
            Err(super::serve::Served::NeverRan(e)) => {
                go_on(persist, control, s.was_running)?;
                Err(e)
            }
            Err(super::serve::Served::Ran(e)) => {
                // The guest runs there: its missing pages wait here for a new link.
                *lock(&persist.unfinished_postcopy) = Some(stale);
                Err(e)
            }
            Ok(()) => Ok(s.report),
        };
    }
    let outcome = s.reply();
    match outcome {
        Ok(Frame::Running) => {
            s.report.downtime_ms = stopped.elapsed().as_secs_f64() * 1e3;
            s.report.seconds = started.elapsed().as_secs_f64();
            s.report.bytes_sent = s.out.get_ref().sent;
            Ok(s.report)
        }
        Ok(Frame::Failed(why)) => {
            go_on(persist, control, s.was_running)?;
            Err(MigrationError::Destination(why))
        }
        Ok(other) => {
            go_on(persist, control, s.was_running)?;
            Err(unexpected(&other))
        }
        // Everything went, and no answer came: the destination may be running it.
        Err(e) => Err(MigrationError::Uncertain(e.to_string())),
    }
}

/// Finishes a post-copy whose link failed, over a new `stream` to the destination's
/// monitor (`vessel receive --recover`): every page it may lack goes again, asked-for
/// ones first.
pub fn recover(
    persist: &Persist,
    stream: &File,
    opts: &SendOptions,
    cancel: &AtomicBool,
) -> Result<SendReport, MigrationError> {
    let started = Instant::now();
    let stale = lock(&persist.unfinished_postcopy)
        .clone()
        .ok_or_else(|| MigrationError::Vm("no post-copy to recover here".into()))?;
    let mut s = Sender::new(persist, stream, opts, cancel);
    wire::write_greeting(&mut s.out)?;
    wire::send(&mut s.out, &Frame::Resume)?;
    s.flush()?;
    let served = super::serve::postcopy(&mut s, &stale, started, true);
    s.report.seconds = started.elapsed().as_secs_f64();
    s.report.bytes_sent = s.out.get_ref().sent;
    match served {
        Ok(()) => {
            *lock(&persist.unfinished_postcopy) = None;
            Ok(s.report)
        }
        Err(super::serve::Served::Ran(e) | super::serve::Served::NeverRan(e)) => Err(e),
    }
}

/// The guest runs here again after a stop for the last round, if it ran before, with
/// its disks' locks taken back if they went. A disk taken by another process meanwhile
/// keeps the guest stopped: it must not run in two places.
fn go_on(persist: &Persist, control: &VmControl, was_running: bool) -> Result<(), MigrationError> {
    persist
        .take_back_disks()
        .map_err(|e| MigrationError::Uncertain(format!("{e}; another process holds the disk")))?;
    // A guest the user had paused stays paused.
    if was_running && control.state() == RunState::Paused {
        let _ = control.resume();
    }
    Ok(())
}

pub(super) fn unexpected(f: &Frame) -> MigrationError {
    let what = match f {
        Frame::Failed(why) => return MigrationError::Destination(why.clone()),
        Frame::Refuse(why) => return MigrationError::Refused(why.clone()),
        Frame::Hello(_) => "a greeting",
        Frame::Accept => "an acceptance",
        Frame::Pages(_) => "pages",
        Frame::State(_) => "a state",
        Frame::Done => "an end",
        Frame::Running => "a start",
        Frame::Stale(_) => "a stale list",
        Frame::Postcopy => "a switch to post-copy",
        Frame::Request(_) => "a request for a page",
        Frame::Disk(_) => "a piece of a disk",
        Frame::Resume => "a resumption",
    };
    MigrationError::Stream(format!("the other side sent {what} out of turn"))
}

/// With the guest stopped and its devices quiesced: the pages still dirty (`dirty`,
/// taken just before the stop, and what the log holds now), the disks' locks, the
/// state, the end (`Persist::handed_over` says whether the disks' locks went). With `postcopy`, the
/// dirty pages are not sent but listed as stale, and the list is returned.
fn last_round(
    s: &mut Sender<'_>,
    control: &VmControl,
    map: &[MemoryRange],
    dirty: &[u64],
    postcopy: bool,
) -> Result<Option<Vec<u64>>, MigrationError> {
    let persist = s.persist;
    let mut state = persist
        .save_paused(control)
        .map_err(|e| MigrationError::Vm(e.to_string()))?;
    let mut pages = persist.dirty.take().map_err(MigrationError::Vm)?;
    pages.extend_from_slice(dirty);
    pages.sort_unstable();
    pages.dedup();
    // The devices are quiesced: the disks' last writes are logged.
    s.send_disk_writes()?;
    if !postcopy {
        s.send_pages(&pages, false)?;
    }
    persist
        .hand_over_devices(true)
        .map_err(MigrationError::Vm)?;
    persist.handed_over.store(true, Ordering::Release);
    state.memory = map.to_vec();
    let bytes = crate::snapshot::file::encode_state(&state)
        .map_err(|e| MigrationError::Vm(e.to_string()))?;
    wire::send(&mut s.out, &Frame::State(bytes))?;
    if !postcopy {
        wire::send(&mut s.out, &Frame::Done)?;
        s.flush()?;
        return Ok(None);
    }
    let runs = super::serve::runs(&pages);
    for chunk in runs.chunks(wire::MAX_STALE_RUNS) {
        wire::send(&mut s.out, &Frame::Stale(chunk.to_vec()))?;
    }
    wire::send(&mut s.out, &Frame::Postcopy)?;
    s.flush()?;
    Ok(Some(pages))
}

/// The rounds, then the stop and the last round; returns when the guest stopped.
/// With post-copy, also the pages the destination lacks.
fn precopy_and_stop(
    s: &mut Sender<'_>,
    control: &VmControl,
    throttle: &Throttle,
    map: &[MemoryRange],
) -> Result<(Instant, Option<Vec<u64>>), MigrationError> {
    let persist = s.persist;
    let link_started = Instant::now();
    for k in 0..s.disks.len() {
        let chunks = s.disks[k].image().size().div_ceil(DISK_CHUNK);
        s.send_disk(k, &(0..chunks).collect::<Vec<_>>(), false)?;
    }
    // Pages of private anonymous memory the kernel never gave the guest are zeros:
    // not even read.
    let first = match persist.anonymous_memory {
        true => super::resident::touched_pages(&persist.mem),
        false => None,
    };
    let all = all_pages(map);
    if let Some(touched) = &first {
        s.report.zero_pages += (all.len() - touched.len()) as u64;
    }
    s.send_pages(first.as_deref().unwrap_or(&all), true)?;
    s.flush()?;
    s.report.rounds = 1;
    let mut last_round_pages = u64::MAX;
    loop {
        s.check_cancel()?;
        let dirty =
            with_paused(control, throttle, || persist.dirty.take()).map_err(MigrationError::Vm)?;
        let bytes = (dirty.len() * PAGE) as f64;
        let rate = s.out.get_ref().sent as f64 / link_started.elapsed().as_secs_f64().max(1e-6);
        let would_take = Duration::from_secs_f64(bytes / rate.max(1.0));
        let converged = would_take <= s.opts.downtime;
        let postcopy = !converged && s.opts.postcopy_after.is_some_and(|n| s.report.rounds >= n);
        if converged || postcopy || s.report.rounds >= s.opts.max_rounds {
            // Close enough (or post-copy's turn): these pages go with the last round.
            let stopped = Instant::now();
            let _g = lock(&throttle.gate);
            if control.state() == RunState::Running {
                control
                    .pause()
                    .map_err(|e| MigrationError::Vm(e.to_string()))?;
            }
            persist.quiesce_devices();
            let stale = match last_round(s, control, map, &dirty, postcopy) {
                Ok(stale) => stale,
                Err(e) => {
                    go_on(persist, control, s.was_running)?;
                    return Err(e);
                }
            };
            s.report.rounds += 1;
            return Ok((stopped, stale));
        }
        // Not converging: the guest wrote about as much as went out last round.
        let pages = dirty.len() as u64;
        if s.opts.auto_converge
            && s.opts.postcopy_after.is_none()
            && s.report.rounds >= 2
            && pages * 2 > last_round_pages
        {
            let p = throttle.percent.load(Ordering::Acquire);
            let next = if p == 0 { 20 } else { (p + 10).min(99) };
            throttle.percent.store(next, Ordering::Release);
            tracing::info!("migration: the guest dirties memory too fast; throttled to {next}%");
        }
        last_round_pages = pages;
        s.send_disk_writes()?;
        s.send_pages(&dirty, false)?;
        s.flush()?;
        s.report.rounds += 1;
    }
}
