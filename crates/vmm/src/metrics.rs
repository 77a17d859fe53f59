//! What the VM has been doing, as counters: exits by reason, instructions the
//! interpreter took over from KVM by mnemonic, console bytes, vCPU time. Rendered in
//! Prometheus' text format for the control API, and as a summary for `--stats`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use api::model::NicInfo;
use devices::virtio::block::Throttling;
use devices::virtio::net::NetCounters;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use devices::bus::lock;

/// Why the dispatcher was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Halt,
    Interrupted,
    EmulationFailure,
    System,
}

impl ExitReason {
    const ALL: [ExitReason; 8] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Halt,
        ExitReason::Interrupted,
        ExitReason::EmulationFailure,
        ExitReason::System,
    ];

    fn label(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Halt => "halt",
            ExitReason::Interrupted => "interrupted",
            ExitReason::EmulationFailure => "emulation_failure",
            ExitReason::System => "system",
        }
    }
}

pub struct Metrics {
    started: Instant,
    exits: [AtomicU64; ExitReason::ALL.len()],
    fallbacks: Mutex<BTreeMap<String, u64>>,
    pub console_out_bytes: AtomicU64,
    pub console_in_bytes: AtomicU64,
    /// CPU-time clocks of the vCPU threads (pthread_getcpuclockid).
    vcpu_clocks: Mutex<Vec<libc::clockid_t>>,
    /// The software CPU's interpreter counters, summed over vCPUs that have stopped.
    software_cpu: Mutex<x86::Stats>,
    /// Each NIC's label (`net0 user 52:54:...`) and counters.
    nics: Mutex<Vec<(String, Arc<NetCounters>)>>,
    /// Where the host reaches the guest's SSH server.
    ssh: Mutex<Option<std::net::SocketAddr>>,
    /// Each rate-limited queue's throttling: `disk0`, `net0-rx`, `net0-tx`.
    throttled: Mutex<Vec<(String, Arc<Throttling>)>>,
    /// The compression cache's figures, when it runs.
    compression: std::sync::OnceLock<Arc<crate::compress::CompressStats>>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            exits: Default::default(),
            fallbacks: Mutex::default(),
            console_out_bytes: AtomicU64::new(0),
            console_in_bytes: AtomicU64::new(0),
            vcpu_clocks: Mutex::default(),
            software_cpu: Mutex::default(),
            nics: Mutex::default(),
            ssh: Mutex::default(),
            throttled: Mutex::default(),
            compression: std::sync::OnceLock::new(),
        }
    }

    pub fn set_compression(&self, stats: Arc<crate::compress::CompressStats>) {
        let _ = self.compression.set(stats);
    }

    pub fn compression(&self) -> Option<&Arc<crate::compress::CompressStats>> {
        self.compression.get()
    }

    pub fn set_ssh(&self, at: Option<std::net::SocketAddr>) {
        *lock(&self.ssh) = at;
    }

    pub fn ssh(&self) -> Option<std::net::SocketAddr> {
        *lock(&self.ssh)
    }

    /// Each rate-limited queue's waits so far.
    pub fn throttled(&self) -> Vec<api::model::ThrottleInfo> {
        lock(&self.throttled)
            .iter()
            .map(|(queue, t)| api::model::ThrottleInfo {
                queue: queue.clone(),
                requests: t.requests.load(Ordering::Relaxed),
                seconds: t.nanos.load(Ordering::Relaxed) as f64 / 1e9,
            })
            .collect()
    }

    pub fn add_throttled(&self, device: String, t: Arc<Throttling>) {
        lock(&self.throttled).push((device, t));
    }

    pub fn add_nic(&self, label: String, counters: Arc<NetCounters>) {
        lock(&self.nics).push((label, counters));
    }

    pub fn nics(&self) -> Vec<NicInfo> {
        let get = NetCounters::get;
        lock(&self.nics)
            .iter()
            .map(|(label, c)| NicInfo {
                nic: label.clone(),
                rx_frames: get(&c.rx_frames),
                rx_bytes: get(&c.rx_bytes),
                tx_frames: get(&c.tx_frames),
                tx_bytes: get(&c.tx_bytes),
                rx_dropped: get(&c.rx_dropped),
                tx_dropped: get(&c.tx_dropped),
            })
            .collect()
    }

    pub fn exit(&self, reason: ExitReason) {
        self.exits[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn exits(&self, reason: ExitReason) -> u64 {
        self.exits[reason as usize].load(Ordering::Relaxed)
    }

    /// An instruction KVM could not emulate and vessel's interpreter ran.
    pub fn fallback(&self, mnemonic: &str) {
        *lock(&self.fallbacks)
            .entry(mnemonic.to_string())
            .or_default() += 1;
    }

    pub fn fallbacks(&self) -> BTreeMap<String, u64> {
        lock(&self.fallbacks).clone()
    }

    pub(crate) fn add_vcpu_thread(&self, thread: libc::pthread_t) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `thread` is a live thread of this process; `clock` is a valid out-pointer.
        if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } == 0 {
            lock(&self.vcpu_clocks).push(clock);
        }
    }

    /// CPU seconds each vCPU thread has used (0 for threads that have exited).
    pub fn vcpu_seconds(&self) -> Vec<f64> {
        lock(&self.vcpu_clocks)
            .iter()
            .map(|clock| {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: a valid clock id and out-pointer; an exited thread's clock
                // returns an error, which we read as zero.
                match unsafe { libc::clock_gettime(*clock, &mut ts) } {
                    0 => ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9,
                    _ => 0.0,
                }
            })
            .collect()
    }

    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Two lines for `vessel run --stats`: exits by reason, and the instructions vessel's
    /// interpreter ran for KVM, by mnemonic.
    /// Adds a stopped vCPU's interpreter counters.
    pub fn add_software_cpu(&self, s: &x86::Stats) {
        let mut t = lock(&self.software_cpu);
        t.instructions += s.instructions;
        t.blocks_decoded += s.blocks_decoded;
        t.blocks_invalidated += s.blocks_invalidated;
        t.slow_lookups += s.slow_lookups;
        t.page_walks += s.page_walks;
        t.tlb_flushes += s.tlb_flushes;
        t.translated_instructions += s.translated_instructions;
        t.blocks_translated += s.blocks_translated;
        t.pause_loops += s.pause_loops;
    }

    pub fn summary(&self) -> String {
        let exits: Vec<String> = ExitReason::ALL
            .iter()
            .filter(|r| self.exits(**r) > 0)
            .map(|r| format!("{}={}", r.label(), self.exits(*r)))
            .collect();
        let fallbacks = self.fallbacks();
        let total: u64 = fallbacks.values().sum();
        let by_mnemonic: Vec<String> = fallbacks.iter().map(|(m, n)| format!("{m}={n}")).collect();
        format!(
            "exits: {}\ninterpreter fallbacks: {total}{}{}",
            if exits.is_empty() {
                "none".into()
            } else {
                exits.join(" ")
            },
            if total > 0 { " (" } else { "" },
            if total > 0 {
                by_mnemonic.join(" ") + ")"
            } else {
                String::new()
            },
        ) + &self.software_cpu_summary()
    }

    /// "\nsoftware CPU: ..." once an emu vCPU has stopped, else nothing.
    fn software_cpu_summary(&self) -> String {
        let s = *lock(&self.software_cpu);
        if s.instructions == 0 {
            return String::new();
        }
        format!(
            "\nsoftware CPU: instructions={} blocks_decoded={} blocks_invalidated={} \
             slow_lookups={} page_walks={} tlb_flushes={} translated_instructions={} \
             blocks_translated={} pause_loops={}",
            s.instructions,
            s.blocks_decoded,
            s.blocks_invalidated,
            s.slow_lookups,
            s.page_walks,
            s.tlb_flushes,
            s.translated_instructions,
            s.blocks_translated,
            s.pause_loops
        )
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self, vm: &str) -> String {
        let mut s = String::new();
        let vm = vm.replace(['\\', '"', '\n'], "_");
        let _ = writeln!(
            s,
            "# HELP vessel_uptime_seconds Time since the VM was built."
        );
        let _ = writeln!(s, "# TYPE vessel_uptime_seconds gauge");
        let _ = writeln!(
            s,
            "vessel_uptime_seconds{{vm=\"{vm}\"}} {:.3}",
            self.uptime_seconds()
        );
        let _ = writeln!(
            s,
            "# HELP vessel_vcpu_exits_total vCPU exits (KVM) or traps (emu) by reason."
        );
        let _ = writeln!(s, "# TYPE vessel_vcpu_exits_total counter");
        for r in ExitReason::ALL {
            let _ = writeln!(
                s,
                "vessel_vcpu_exits_total{{vm=\"{vm}\",reason=\"{}\"}} {}",
                r.label(),
                self.exits(r)
            );
        }
        let _ = writeln!(
            s,
            "# HELP vessel_interpreter_fallbacks_total Instructions KVM could not emulate, run by vessel's interpreter."
        );
        let _ = writeln!(s, "# TYPE vessel_interpreter_fallbacks_total counter");
        for (m, n) in self.fallbacks() {
            let _ = writeln!(
                s,
                "vessel_interpreter_fallbacks_total{{vm=\"{vm}\",mnemonic=\"{m}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP vessel_console_bytes_total Bytes through the serial console."
        );
        let _ = writeln!(s, "# TYPE vessel_console_bytes_total counter");
        for (dir, n) in [
            ("out", &self.console_out_bytes),
            ("in", &self.console_in_bytes),
        ] {
            let _ = writeln!(
                s,
                "vessel_console_bytes_total{{vm=\"{vm}\",direction=\"{dir}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP vessel_vcpu_seconds_total CPU time used by each vCPU thread."
        );
        let _ = writeln!(s, "# TYPE vessel_vcpu_seconds_total counter");
        for (i, secs) in self.vcpu_seconds().iter().enumerate() {
            let _ = writeln!(
                s,
                "vessel_vcpu_seconds_total{{vm=\"{vm}\",vcpu=\"{i}\"}} {secs:.6}"
            );
        }
        let nics = self.nics();
        for (name, help, get) in [
            (
                "rx_frames",
                "Frames the guest received.",
                (|n: &NicInfo| n.rx_frames) as fn(&NicInfo) -> u64,
            ),
            ("rx_bytes", "Bytes the guest received.", |n| n.rx_bytes),
            ("tx_frames", "Frames the guest sent.", |n| n.tx_frames),
            ("tx_bytes", "Bytes the guest sent.", |n| n.tx_bytes),
            (
                "rx_dropped",
                "Frames for the guest dropped (no room).",
                |n| n.rx_dropped,
            ),
            (
                "tx_dropped",
                "Frames from the guest the backend did not take.",
                |n| n.tx_dropped,
            ),
        ] {
            if nics.is_empty() {
                break;
            }
            let _ = writeln!(s, "# HELP vessel_nic_{name}_total {help}");
            let _ = writeln!(s, "# TYPE vessel_nic_{name}_total counter");
            for (i, n) in nics.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "vessel_nic_{name}_total{{vm=\"{vm}\",nic=\"net{i}\"}} {}",
                    get(n)
                );
            }
        }
        let throttled = lock(&self.throttled);
        if !throttled.is_empty() {
            let _ = writeln!(
                s,
                "# HELP vessel_io_throttled_requests_total Requests or frames a rate limit made wait.\n\
                 # TYPE vessel_io_throttled_requests_total counter"
            );
            for (device, t) in throttled.iter() {
                let n = t.requests.load(Ordering::Relaxed);
                let _ = writeln!(
                    s,
                    "vessel_io_throttled_requests_total{{vm=\"{vm}\",device=\"{device}\"}} {n}"
                );
            }
            let _ = writeln!(
                s,
                "# HELP vessel_io_throttled_seconds_total Time a rate limit held a queue.\n\
                 # TYPE vessel_io_throttled_seconds_total counter"
            );
            for (device, t) in throttled.iter() {
                let secs = t.nanos.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(
                    s,
                    "vessel_io_throttled_seconds_total{{vm=\"{vm}\",device=\"{device}\"}} {secs:.6}"
                );
            }
        }
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_typed_counters() {
        let m = Metrics::new();
        m.exit(ExitReason::IoOut);
        m.exit(ExitReason::IoOut);
        m.fallback("popcnt");
        let text = m.prometheus("web\"1");
        assert!(text.contains("vessel_vcpu_exits_total{vm=\"web_1\",reason=\"io_out\"} 2\n"));
        assert!(
            text.contains(
                "vessel_interpreter_fallbacks_total{vm=\"web_1\",mnemonic=\"popcnt\"} 1\n"
            )
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("vessel_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
