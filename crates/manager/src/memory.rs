//! A running VM's memory as the host sees it, for `vessel info` and the metrics: the
//! monitor's resident memory, the pages KSM merged, the balloon and the guest's own
//! statistics.

use api::model::{BalloonInfo, CompressionInfo, MemoryInfo};
use vmm::VmHandle;

/// This monitor's memory figures (`handle`: the running boot, if any).
pub fn info(handle: Option<&VmHandle>) -> MemoryInfo {
    let balloon = handle.and_then(VmHandle::balloon).map(|b| {
        let s = b.stats().unwrap_or_default();
        BalloonInfo {
            target_bytes: b.target_bytes(),
            actual_bytes: b.actual_bytes(),
            inflated_bytes: b.inflated_bytes(),
            reported_bytes: b.reported_bytes(),
            guest_total_bytes: s.total,
            guest_free_bytes: s.free,
            guest_available_bytes: s.available,
            swap_in_bytes: s.swap_in,
            swap_out_bytes: s.swap_out,
            major_faults: s.major_faults,
            minor_faults: s.minor_faults,
        }
    });
    let compression = handle
        .and_then(|h| h.metrics().compression().cloned())
        .map(|c| {
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            CompressionInfo {
                pages: get(&c.pages),
                bytes: get(&c.bytes),
                faults: get(&c.faults),
                compressed: get(&c.compressed),
                incompressible: get(&c.incompressible),
                engaged: c.engaged.load(std::sync::atomic::Ordering::Relaxed),
            }
        });
    MemoryInfo {
        rss_bytes: rss_kib() * 1024,
        ksm_merging_pages: proc_number("/proc/self/ksm_merging_pages"),
        balloon,
        compression,
    }
}

/// This process's resident memory (VmRSS), KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn proc_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The figures in Prometheus text.
pub fn prometheus(vm: &str, m: &MemoryInfo) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, v: u64| {
        out += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{vm=\"{vm}\"}} {v}\n");
    };
    gauge(
        "vessel_memory_rss_bytes",
        "The monitor's resident memory.",
        m.rss_bytes,
    );
    if let Some(p) = m.ksm_merging_pages {
        gauge(
            "vessel_memory_ksm_merging_pages",
            "Pages of the VM merged by KSM.",
            p,
        );
    }
    if let Some(c) = &m.compression {
        gauge(
            "vessel_compressed_pages",
            "Guest pages held compressed.",
            c.pages,
        );
        gauge("vessel_compressed_bytes", "Their compressed size.", c.bytes);
        gauge(
            "vessel_compressed_faults_total",
            "Compressed pages brought back on touch.",
            c.faults,
        );
        gauge(
            "vessel_compression_engaged",
            "1 while the compression cache takes pages.",
            u64::from(c.engaged),
        );
    }
    if let Some(b) = &m.balloon {
        gauge(
            "vessel_balloon_target_bytes",
            "What the host asks the balloon to hold.",
            b.target_bytes,
        );
        gauge(
            "vessel_balloon_actual_bytes",
            "What the guest says the balloon holds.",
            b.actual_bytes,
        );
        gauge(
            "vessel_balloon_inflated_bytes_total",
            "Bytes given back to the host by inflation.",
            b.inflated_bytes,
        );
        gauge(
            "vessel_balloon_reported_bytes_total",
            "Bytes given back to the host by free page reporting.",
            b.reported_bytes,
        );
        for (name, help, v) in [
            (
                "vessel_guest_memory_total_bytes",
                "The guest's total memory.",
                b.guest_total_bytes,
            ),
            (
                "vessel_guest_memory_free_bytes",
                "The guest's free memory.",
                b.guest_free_bytes,
            ),
            (
                "vessel_guest_memory_available_bytes",
                "The guest's available memory.",
                b.guest_available_bytes,
            ),
            (
                "vessel_guest_swap_in_bytes",
                "Bytes the guest swapped in.",
                b.swap_in_bytes,
            ),
            (
                "vessel_guest_swap_out_bytes",
                "Bytes the guest swapped out.",
                b.swap_out_bytes,
            ),
            (
                "vessel_guest_major_faults",
                "The guest's major page faults.",
                b.major_faults,
            ),
            (
                "vessel_guest_minor_faults",
                "The guest's minor page faults.",
                b.minor_faults,
            ),
        ] {
            if let Some(v) = v {
                gauge(name, help, v);
            }
        }
    }
    out
}
