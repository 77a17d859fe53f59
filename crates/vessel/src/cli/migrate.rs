//! `vessel migrate` (the source: the VM's monitor sends it) and `vessel receive` (the
//! destination: this process takes it in and starts it).

use std::process::ExitCode;
use std::time::Duration;

use api::model::{MigrateBody, MigrateRequest, RecoverBody, RecoverRequest, StateBody};
use clap::Args;
use manager::migration::Endpoint;

use super::{CliResult, Failure};

#[derive(Args)]
pub struct MigrateArgs {
    /// The running VM.
    name: String,
    /// Where a `vessel receive` listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR", required_unless_present = "cancel")]
    to: Option<String>,
    /// The longest the guest may stand still at the end.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    downtime_ms: u64,
    /// At most this many bytes per second on the link (K, M, G suffixes).
    #[arg(long, value_name = "RATE")]
    max_bandwidth: Option<String>,
    /// LZ4-compress the pages.
    #[arg(long)]
    compress: bool,
    /// Never slow the guest down when it writes memory faster than the link carries it.
    #[arg(long)]
    no_auto_converge: bool,
    /// Copy the disks' contents too, for a destination without the same storage: it
    /// gets a raw copy of each (what the guest sees) in the VM's folder; what the guest
    /// writes meanwhile follows with every round.
    #[arg(long)]
    copy_disks: bool,
    /// Post-copy: when two rounds have not converged, the guest runs at the
    /// destination at once and takes the pages it still lacks as it touches them.
    #[arg(long)]
    postcopy: bool,
    /// Finish a post-copy whose link failed: the pages the destination still lacks go
    /// to it again (it listens again with `vessel receive NAME --recover`).
    #[arg(long, requires = "to")]
    recover: bool,
    /// Stop the migration under way; the VM runs on here.
    #[arg(long, conflicts_with = "to")]
    cancel: bool,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// The VM's name here (default: its name on the source).
    name: Option<String>,
    /// Where to listen: tcp:ADDR:PORT (port 0: any; the address taken is printed) or
    /// unix:PATH.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Run it here on this CPU backend (kvm or emu) whatever it ran on there.
    #[arg(long, value_name = "ACCEL", value_parser = ["kvm", "emu"])]
    accel: Option<String>,
    /// For the VM NAME running here whose post-copy link failed: listen for the
    /// source's `vessel migrate NAME --recover` (returns at once; the VM's monitor
    /// takes the connection).
    #[arg(long, requires = "name", conflicts_with = "accel")]
    recover: bool,
}

pub fn migrate(args: MigrateArgs) -> CliResult {
    let (_, bundle) = super::snapshot::open(&args.name)?;
    let client = api::Client::new(bundle.control_socket());
    if args.cancel {
        client.post::<_, StateBody>(&format!("/v1/vms/{}/migrate/cancel", bundle.name), &())?;
        println!("cancelled the migration of {}", bundle.name);
        return Ok(ExitCode::SUCCESS);
    }
    let to = args.to.unwrap_or_default();
    Endpoint::parse(&to).map_err(Failure::usage)?;
    let max_bandwidth = match &args.max_bandwidth {
        Some(r) => Some(
            vmm::parse_size(r).map_err(|e| Failure::usage(format!("--max-bandwidth {r}: {e}")))?,
        ),
        None => None,
    };
    let req = MigrateRequest {
        to,
        downtime_ms: Some(args.downtime_ms),
        max_bandwidth,
        compress: args.compress,
        no_auto_converge: args.no_auto_converge,
        postcopy_after: args.postcopy.then_some(2),
        copy_disks: args.copy_disks,
        recover: args.recover,
    };
    // A migration takes as long as its memory takes to cross.
    let body: MigrateBody = client
        .with_timeout(Duration::from_secs(24 * 3600))
        .post(&format!("/v1/vms/{}/migrate", bundle.name), &req)?;
    println!(
        "migrated {} to {} in {:.2} s: {} rounds, {} MiB sent, {} zero pages skipped, downtime {:.0} ms{}",
        bundle.name,
        body.to,
        body.seconds,
        body.rounds,
        body.bytes_sent >> 20,
        body.zero_pages,
        body.downtime_ms,
        if body.throttle_percent > 0 {
            format!(", guest throttled up to {}%", body.throttle_percent)
        } else {
            String::new()
        },
    );
    if body.postcopy_pages > 0 || body.postcopy_requests > 0 {
        println!(
            "post-copy: {} pages sent after the switch, {} asked for by the destination",
            body.postcopy_pages, body.postcopy_requests
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn receive(args: ReceiveArgs) -> CliResult {
    let home = super::manage::home()?;
    let endpoint = Endpoint::parse(&args.listen).map_err(Failure::usage)?;
    if args.recover {
        let (_, bundle) = super::snapshot::open(args.name.as_deref().unwrap_or_default())?;
        let body: RecoverBody = api::Client::new(bundle.control_socket()).post(
            &format!("/v1/vms/{}/migrate/recover", bundle.name),
            &RecoverRequest {
                listen: args.listen.clone(),
            },
        )?;
        println!("listening on {}", body.listening);
        return Ok(ExitCode::SUCCESS);
    }
    let (listener, bound) = endpoint.listen().map_err(Failure::refused)?;
    println!("listening on {bound}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let exe = std::env::current_exe()
        .map_err(|e| Failure::usage(format!("cannot find the vessel binary: {e}")))?;
    let got = manager::migration::receive(
        &home,
        &listener,
        args.name.as_deref(),
        args.accel.as_deref(),
        &exe,
    )?;
    println!(
        "received {} ({} MiB in {:.2} s); it runs here on {}{}",
        got.name,
        got.bytes >> 20,
        got.seconds,
        got.accel,
        if got.postcopy {
            " (post-copy: the rest of its memory follows)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
