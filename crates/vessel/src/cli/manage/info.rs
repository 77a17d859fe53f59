//! `vessel info NAME`: what the VM's folder, its monitor, its cgroup and its guest say.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::model::VmInfo;
use manager::host::Host;
use manager::spec::Restart;
use manager::{Bundle, Status, VmState};
use serde_json::json;

use super::{InfoArgs, client, open};
use crate::cli::CliResult;

/// The status a monitor that stopped answering left, once its process is gone (within
/// a second); None if it still runs.
fn gone_status(bundle: &Bundle) -> Option<Status> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let status = bundle.status();
        if !matches!(status.state, VmState::Running | VmState::Paused) {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn info(args: InfoArgs) -> CliResult {
    let (home, bundle) = open(&args.name)?;
    let mut status = bundle.status();
    let spec = bundle.spec()?;
    let live: Option<VmInfo> = match status.state {
        VmState::Running | VmState::Paused => {
            let asked = client(&bundle, "ask")
                .and_then(|c| Ok(c.get(&format!("/v1/vms/{}", bundle.name))?));
            match asked {
                Ok(info) => Some(info),
                // The monitor went away while we asked (it may take an instant to be
                // gone): say what it left.
                Err(e) => match gone_status(&bundle) {
                    Some(left) => {
                        status = left;
                        None
                    }
                    None => return Err(e),
                },
            }
        }
        _ => None,
    };
    let cgroup = match live {
        Some(_) => manager::resources::usage(&home, &Host::load(&home)?, &bundle.name),
        None => None,
    };
    let guest = match live {
        Some(_) => crate::cli::guest::facts(&bundle, &spec),
        None => None,
    };
    if args.json {
        let cgroup = cgroup.as_ref().map(|(g, u)| {
            json!({
                "path": g.path(), "version": g.version(), "cpu_seconds": u.used.as_secs_f64(),
                "throttled_seconds": u.throttled.as_secs_f64(), "periods": u.periods,
                "throttled_periods": u.throttled_periods,
            })
        });
        let v = json!({
            "name": bundle.name, "dir": bundle.dir, "state": live.as_ref().map(|l| l.state.clone()).unwrap_or(status.state.to_string()),
            "config": spec, "status": status, "live": live, "cgroup": cgroup,
            "guest": guest.as_ref().map(|(f, offset)| json!({
                "os": f.os, "kernel": f.kernel, "uptime_seconds": f.uptime_seconds,
                "addresses": f.addresses, "memory_total_kib": f.memory_total_kib,
                "memory_available_kib": f.memory_available_kib, "clock_offset_seconds": offset,
            })),
        });
        return crate::cli::print_json(&v);
    }
    println!("name      {}", bundle.name);
    println!("folder    {}", bundle.dir.display());
    println!(
        "state     {}",
        live.as_ref()
            .map(|l| l.state.clone())
            .unwrap_or(status.state.to_string())
    );
    println!("cpus      {}", spec.cpus);
    println!("memory    {}", spec.memory);
    println!("kernel    {}", spec.kernel);
    if let Some(i) = &spec.initrd {
        println!("initrd    {i}");
    }
    if let Some(c) = &spec.cmdline {
        println!("cmdline   {c}");
    }
    println!("accel     {}", spec.accel);
    println!(
        "restart   {}",
        if spec.restart == Restart::Never {
            "never"
        } else {
            "on-reboot"
        }
    );
    if !spec.cpu.is_empty() {
        println!("cpu       {}", spec.cpu.describe());
    }
    if live.is_some() {
        match &cgroup {
            Some((g, u)) => println!(
                "cgroup    {} (v{}): cpu time {:.2}s, throttled {:.2}s in {} of {} periods",
                g.path().display(),
                g.version(),
                u.used.as_secs_f64(),
                u.throttled.as_secs_f64(),
                u.throttled_periods,
                u.periods
            ),
            None => println!("cgroup    none (no cgroup controls on this host for this user)"),
        }
    }
    if let Some(l) = live {
        println!("pid       {}", l.pid);
        println!("uptime    {:.1}s", l.uptime_seconds);
        println!("boots     {}", l.boots);
        println!(
            "vcpu time {}",
            l.vcpu_seconds
                .iter()
                .map(|s| format!("{s:.2}s"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("monitor   {} KiB resident", l.monitor_rss_kib);
        let mib = |b: u64| b >> 20;
        if let Some(b) = &l.memory.balloon {
            println!(
                "balloon   {} MiB asked, {} MiB held; returned to the host: {} MiB inflated, {} MiB reported free",
                mib(b.target_bytes),
                mib(b.actual_bytes),
                mib(b.inflated_bytes),
                mib(b.reported_bytes)
            );
            if let (Some(t), Some(a)) = (b.guest_total_bytes, b.guest_available_bytes) {
                println!(
                    "guest ram {} MiB, {} MiB available, {} MiB free (balloon statistics)",
                    mib(t),
                    mib(a),
                    mib(b.guest_free_bytes.unwrap_or(0))
                );
            }
        }
        if let Some(c) = &l.memory.compression {
            println!(
                "compress  {} pages in {} KiB ({}), {} brought back",
                c.pages,
                c.bytes >> 10,
                if c.engaged { "engaged" } else { "standby" },
                c.faults
            );
        }
        if let Some(p) = l.memory.ksm_merging_pages.filter(|&p| p > 0) {
            println!("ksm       {p} pages merged");
        }
        for t in l.throttled.iter().filter(|t| t.requests > 0) {
            println!(
                "throttled {}: {} requests waited {:.2}s in all",
                t.queue, t.requests, t.seconds
            );
        }
        for n in &l.nics {
            println!(
                "nic       {}: rx {} frames {} bytes, tx {} frames {} bytes, dropped rx {} tx {}",
                n.nic, n.rx_frames, n.rx_bytes, n.tx_frames, n.tx_bytes, n.rx_dropped, n.tx_dropped
            );
        }
        match &guest {
            Some((f, offset)) => {
                println!(
                    "guest     {} (kernel {}), up {:.0}s",
                    f.os, f.kernel, f.uptime_seconds
                );
                println!(
                    "guest mem {} MiB in use of {} MiB",
                    f.memory_total_kib.saturating_sub(f.memory_available_kib) / 1024,
                    f.memory_total_kib / 1024
                );
                if !f.addresses.is_empty() {
                    println!("addresses {}", f.addresses.join(", "));
                }
                println!("clock     {offset:+.3}s from the host's");
            }
            None => println!("guest     no agent answers"),
        }
    } else if let Some(e) = &status.last_exit {
        println!("last exit {e}");
    }
    Ok(ExitCode::SUCCESS)
}
