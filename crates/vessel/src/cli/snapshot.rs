//! `vessel suspend`, `vessel snapshot [ls|restore|rm]` and `vessel clone`: a VM saved to
//! its folder and brought back, a tree of snapshots, copies with identities of their own.

use std::process::ExitCode;
use std::time::Duration;

use api::model::{Action, ActionRequest, SnapshotBody};
use clap::{Args, Subcommand};
use manager::snapshots::{self, SnapshotMeta};
use manager::{Bundle, Home, VmSpec, VmState};

use super::{CliResult, Failure};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: Option<SnapshotCommand>,
    /// The VM to snapshot.
    name: Option<String>,
    /// The snapshot's name (default: snap1, snap2, ...).
    snapshot: Option<String>,
    /// What the snapshot is for.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Draw a VM's snapshot tree.
    Ls {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Put a stopped VM back where a snapshot was (the next start continues from there).
    Restore { name: String, snapshot: String },
    /// Delete a snapshot (its children stay valid).
    Rm { name: String, snapshot: String },
}

#[derive(Args)]
pub struct CloneArgs {
    source: String,
    destination: String,
    /// Clone the VM as it was at this snapshot (its disks and config).
    #[arg(long, value_name = "SNAP")]
    snapshot: Option<String>,
    /// Copy no disk: each of the clone's disks is a qcow2 overlay on the snapshot's
    /// (with --snapshot; the snapshot cannot be removed while the clone exists).
    #[arg(long)]
    linked: bool,
}

pub(super) fn open(name: &str) -> Result<(Home, Bundle), Failure> {
    let home = Home::from_env()?;
    let bundle = Bundle::open(&home, name)?;
    Ok((home, bundle))
}

fn running(bundle: &Bundle) -> bool {
    matches!(bundle.status().state, VmState::Running | VmState::Paused)
}

fn post(bundle: &Bundle, req: &ActionRequest) -> Result<SnapshotBody, Failure> {
    let c = api::Client::new(bundle.control_socket()).with_timeout(Duration::from_secs(600));
    Ok(c.post(&format!("/v1/vms/{}/actions", bundle.name), req)?)
}

pub fn suspend(name: &str) -> CliResult {
    let (_, bundle) = open(name)?;
    if !running(&bundle) {
        return Err(Failure::refused(format!(
            "VM {} is {}: only a running VM can be suspended",
            bundle.name,
            bundle.status().state
        )));
    }
    let body = post(&bundle, &ActionRequest::new(Action::Suspend))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running(&bundle) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "suspended {} ({:.0} ms paused; vessel start continues it)",
        bundle.name,
        body.seconds * 1000.0
    );
    Ok(ExitCode::SUCCESS)
}

pub fn main(args: SnapshotArgs) -> CliResult {
    match args.command {
        Some(SnapshotCommand::Ls { name, json }) => list(&name, json),
        Some(SnapshotCommand::Restore { name, snapshot }) => restore(&name, &snapshot),
        Some(SnapshotCommand::Rm { name, snapshot }) => {
            let (_, bundle) = open(&name)?;
            snapshots::remove(&bundle, &snapshot)?;
            println!("removed snapshot {snapshot} of {name}");
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let name = args
                .name
                .ok_or_else(|| Failure::usage("which VM? (vessel snapshot NAME [SNAP])"))?;
            take(&name, args.snapshot, args.description)
        }
    }
}

fn take(name: &str, snapshot: Option<String>, description: Option<String>) -> CliResult {
    let (_, bundle) = open(name)?;
    if let Some(s) = &snapshot {
        bundle.new_snapshot_dir(s)?;
    }
    if running(&bundle) {
        let body = post(
            &bundle,
            &ActionRequest {
                action: Action::Snapshot,
                name: snapshot,
                description,
            },
        )?;
        println!(
            "snapshot {} of {} ({:.0} ms paused)",
            body.snapshot,
            bundle.name,
            body.seconds * 1000.0
        );
        return Ok(ExitCode::SUCCESS);
    }
    if bundle.suspended_dir().exists() {
        return Err(Failure::refused(format!(
            "VM {} is suspended: start it to take a snapshot of it running",
            bundle.name
        )));
    }
    let meta = SnapshotMeta {
        name: snapshot.unwrap_or_else(|| bundle.next_snapshot_name()),
        parent: bundle.head(),
        description: description.unwrap_or_default(),
        created_unix: manager::status::now_unix(),
        live: false,
        disks: Vec::new(),
    };
    snapshots::take_stopped(&bundle, &meta)?;
    println!(
        "snapshot {} of {} (disks only: it is stopped)",
        meta.name, bundle.name
    );
    Ok(ExitCode::SUCCESS)
}

fn list(name: &str, json: bool) -> CliResult {
    let (_, bundle) = open(name)?;
    let all = snapshots::list(&bundle)?;
    let head = bundle.head();
    if json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name, "parent": m.parent, "description": m.description,
                    "created_unix": m.created_unix, "live": m.live,
                    "size": snapshots::size(&bundle, &m.name),
                    "current": head.as_deref() == Some(m.name.as_str()),
                })
            })
            .collect();
        return super::print_json(&rows);
    }
    if all.is_empty() {
        println!("{} has no snapshots", bundle.name);
        return Ok(ExitCode::SUCCESS);
    }
    let known: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    let roots = all
        .iter()
        .filter(|m| m.parent.as_deref().is_none_or(|p| !known.contains(&p)));
    for root in roots {
        draw(&bundle, &all, root, "", head.as_deref());
    }
    Ok(ExitCode::SUCCESS)
}

fn draw(bundle: &Bundle, all: &[SnapshotMeta], m: &SnapshotMeta, indent: &str, head: Option<&str>) {
    let here = if head == Some(m.name.as_str()) {
        "  <- you are here"
    } else {
        ""
    };
    let kind = if m.live { "running" } else { "disks" };
    println!(
        "{indent}{} ({kind}, {}, {}){}{here}",
        m.name,
        date(m.created_unix),
        image::human_size(snapshots::size(bundle, &m.name)),
        if m.description.is_empty() {
            String::new()
        } else {
            format!(" {}", m.description)
        }
    );
    for c in all
        .iter()
        .filter(|c| c.parent.as_deref() == Some(m.name.as_str()))
    {
        draw(bundle, all, c, &format!("{indent}  "), head);
    }
}

/// `2026-12-06 17:04 UTC`.
fn date(unix: u64) -> String {
    let t = libc::time_t::try_from(unix).unwrap_or(libc::time_t::MAX);
    // SAFETY: all-zero is a valid `struct tm`, filled in by gmtime_r.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; gmtime_r keeps neither.
    if unsafe { libc::gmtime_r(&t, &mut tm) }.is_null() {
        return format!("@{unix}");
    }
    format!(
        "{}-{:02}-{:02} {:02}:{:02} UTC",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

fn restore(name: &str, snapshot: &str) -> CliResult {
    let (_, bundle) = open(name)?;
    if running(&bundle) {
        return Err(Failure::refused(format!(
            "VM {} is running: stop it before restoring a snapshot",
            bundle.name
        )));
    }
    let meta = snapshots::restore(&bundle, snapshot)?;
    if meta.live {
        println!("{name} is back at {snapshot}; vessel start continues it from there");
    } else {
        println!("{name}'s disks are back at {snapshot}; vessel start boots it");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clone(args: CloneArgs) -> CliResult {
    let (home, src) = open(&args.source)?;
    if args.linked && args.snapshot.is_none() {
        return Err(Failure::usage(format!(
            "a linked clone shares a snapshot's disks, which never change: give --snapshot NAME (take one with `vessel snapshot {} NAME`)",
            src.name
        )));
    }
    let (spec, from) = match &args.snapshot {
        Some(s) => {
            let dir = src.snapshots_dir().join(s);
            let path = dir.join("vm.toml");
            let text = std::fs::read_to_string(&path).map_err(|_| {
                Failure::usage(format!("VM {} has no snapshot named {s}", src.name))
            })?;
            (VmSpec::from_toml(&path, &text)?, dir)
        }
        None => {
            if running(&src) {
                return Err(Failure::refused(format!(
                    "VM {} is running: stop it, or clone one of its snapshots (--snapshot)",
                    src.name
                )));
            }
            (src.spec()?, src.dir.clone())
        }
    };
    let dst = Bundle::create_with(&home, &args.destination, |dir| {
        manager::clone::copy_vm(&spec, &from, dir, &args.destination, args.linked)
    })?;
    if args.linked {
        snapshots::add_linked_clone(&from, &dst.name)?;
        println!(
            "cloned {} to {}, linked to snapshot {} (new MAC addresses)",
            src.name,
            dst.name,
            args.snapshot.as_deref().unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("cloned {} to {} (new MAC addresses)", src.name, dst.name);
    Ok(ExitCode::SUCCESS)
}
