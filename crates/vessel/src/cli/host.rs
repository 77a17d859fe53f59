//! `vessel host`: the host's CPUs and memory and what running VMs hold, and its page
//! merging (`vessel host ksm on|off|status`).

use std::process::ExitCode;

use clap::Args;
use manager::host::{self, Allocation, Host};
use serde_json::json;

use super::manage::home;
use super::{CliResult, Failure};

#[derive(Args)]
pub struct HostArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Option<HostCommand>,
}

#[derive(clap::Subcommand)]
pub enum HostCommand {
    /// The host's kernel same-page merging: on, off or status. It merges identical pages
    /// of VMs created with --memory-merge (CPU spent scanning; see the README's risks).
    Ksm {
        #[arg(value_parser = ["on", "off", "status"])]
        action: String,
        /// Machine-readable status.
        #[arg(long)]
        json: bool,
    },
}

/// `vessel host ksm on|off|status`.
fn ksm(action: &str, json: bool) -> CliResult {
    match action {
        "on" | "off" => manager::ksm::set_running(action == "on").map_err(Failure::refused)?,
        _ => {}
    }
    let s = manager::ksm::status().map_err(Failure::refused)?;
    if json {
        return super::print_json(&json!(s));
    }
    let page = 4096.0;
    println!(
        "ksm       {}",
        if s.running { "running" } else { "stopped" }
    );
    println!(
        "sharing   {} pages in {} ({} saved)",
        s.pages_sharing,
        s.pages_shared,
        host::human(s.pages_sharing as f64 * page)
    );
    println!(
        "scanning  {} pages every {} ms, {} full scans",
        s.pages_to_scan, s.sleep_millisecs, s.full_scans
    );
    Ok(ExitCode::SUCCESS)
}

pub fn host(args: HostArgs) -> CliResult {
    if let Some(HostCommand::Ksm { action, json }) = &args.command {
        return ksm(action, *json);
    }
    let home = home()?;
    let h = Host::load(&home)?;
    let held = host::allocations(&home)?;
    let cpus: u32 = held.iter().map(|a| a.cpus).sum();
    let memory: u64 = held.iter().map(|a| a.memory).sum();
    if args.json {
        let v = json!({
            "host": h, "cpu_capacity": h.cpu_capacity(), "memory_capacity": h.memory_capacity() as u64,
            "cpus_allocated": cpus, "memory_allocated": memory, "vms": held,
        });
        return super::print_json(&v);
    }
    println!(
        "cpus      {} (overcommit {}: {} vCPUs)",
        h.cpus,
        h.cpu_overcommit,
        h.cpu_capacity()
    );
    println!(
        "memory    {} (overcommit {}: {})",
        host::human(h.memory as f64),
        h.memory_overcommit,
        host::human(h.memory_capacity())
    );
    println!("allocated {cpus} vCPUs, {}", host::human(memory as f64));
    println!(
        "free      {} vCPUs, {}",
        h.cpu_capacity() - f64::from(cpus),
        host::human((h.memory_capacity() - memory as f64).max(0.0))
    );
    let reserved: f64 = held.iter().map(|a| a.reservation).sum();
    if reserved > 0.0 {
        println!("reserved  {reserved} of {} CPUs", h.cpus);
    }
    for Allocation {
        name,
        cpus,
        memory,
        reservation,
        ..
    } in held
    {
        let reserves = match reservation {
            r if r > 0.0 => format!("  reserves {r} CPUs"),
            _ => String::new(),
        };
        println!(
            "  {name:<20} {cpus:>3} vCPUs {:>10}{reserves}",
            host::human(memory as f64)
        );
    }
    Ok(ExitCode::SUCCESS)
}
