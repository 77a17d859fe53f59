//! `vessel net create|ls|rm`: the named networks (made with a NAT uplink or not),
//! whether their switch runs, and the VMs on each (MAC, and the address the switch's
//! DHCP gave it).

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use devices::virtio::net::{Attachment, NetConfig, format_mac};
use manager::{Bundle, Home};
use network::dhcp::DhcpServer;

use super::{CliResult, Failure};

#[derive(Subcommand)]
pub enum NetCommand {
    /// Make a named network; with --nat its VMs also reach the outside (NAT through
    /// passt). A network no one made is made, without NAT, by its first VM.
    Create(CreateArgs),
    /// List the named networks and their VMs.
    Ls(LsArgs),
    /// Delete a named network that no running VM is on.
    Rm(RmArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// Give the network a NAT uplink: its gateway (.1) leads to the host's network.
    #[arg(long)]
    nat: bool,
}

#[derive(Args)]
pub struct RmArgs {
    name: String,
}

#[derive(Args)]
pub struct LsArgs {
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Member {
    vm: String,
    mac: String,
    ip: Option<String>,
}

#[derive(serde::Serialize, Default)]
struct Row {
    name: String,
    subnet: String,
    nat: bool,
    switch_running: bool,
    members: Vec<Member>,
}

pub fn main(cmd: NetCommand) -> CliResult {
    match cmd {
        NetCommand::Create(a) => create(a),
        NetCommand::Ls(a) => list(a),
        NetCommand::Rm(a) => remove(a),
    }
}

/// The network's folder, for a valid name.
fn network_dir(name: &str) -> Result<std::path::PathBuf, Failure> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !ok {
        return Err(Failure::usage(format!(
            "invalid network name {name:?}: up to 32 letters, digits, '-' or '_'"
        )));
    }
    let home = Home::from_env()?;
    Ok(network::switch::networks_dir(home.root()).join(name))
}

fn switch_running(dir: &std::path::Path) -> bool {
    std::os::unix::net::UnixStream::connect(dir.join(network::switch::SOCKET)).is_ok()
}

fn create(a: CreateArgs) -> CliResult {
    let dir = network_dir(&a.name)?;
    if dir.join(network::uplink::CONFIG).exists() {
        return Err(Failure::usage(format!("network {} exists", a.name)));
    }
    if switch_running(&dir) {
        return Err(Failure::usage(format!(
            "network {} is in use by running VMs; create it before they start",
            a.name
        )));
    }
    network::uplink::NetworkConfig { nat: a.nat }
        .save(&dir)
        .map_err(Failure::usage)?;
    let subnet = network::dhcp::subnet_for(&a.name);
    println!(
        "network {}: {subnet}/24{}",
        a.name,
        if a.nat {
            ", NAT through gateway .1"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn remove(a: RmArgs) -> CliResult {
    let dir = network_dir(&a.name)?;
    if !dir.exists() {
        return Err(Failure::usage(format!("no network named {}", a.name)));
    }
    if switch_running(&dir) {
        return Err(Failure::usage(format!(
            "network {} is in use by running VMs",
            a.name
        )));
    }
    std::fs::remove_dir_all(&dir).map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?;
    println!("removed network {}", a.name);
    Ok(ExitCode::SUCCESS)
}

fn list(a: LsArgs) -> CliResult {
    let home = Home::from_env()?;
    let dir = network::switch::networks_dir(home.root());
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            let name = e.file_name().to_string_lossy().into_owned();
            rows.entry(name.clone()).or_default().name = name.clone();
        }
    }
    for (bundle, spec) in Bundle::list(&home)? {
        let Ok(spec) = spec else { continue };
        for n in &spec.nets {
            let Ok(NetConfig {
                attach: Attachment::Network(name),
                mac,
                ..
            }) = NetConfig::parse(n)
            else {
                continue;
            };
            let row = rows.entry(name.clone()).or_default();
            row.name = name.clone();
            row.members.push(Member {
                vm: bundle.name.clone(),
                mac: mac.as_ref().map(format_mac).unwrap_or_default(),
                ip: None,
            });
        }
    }
    for row in rows.values_mut() {
        let net = dir.join(&row.name);
        let leases: Option<DhcpServer> = std::fs::read(net.join(network::switch::LEASES))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        row.subnet = format!("{}/24", network::dhcp::subnet_for(&row.name));
        row.nat = network::uplink::NetworkConfig::load(&net)
            .ok()
            .flatten()
            .is_some_and(|c| c.nat);
        row.switch_running = switch_running(&net);
        for m in &mut row.members {
            m.ip = leases
                .as_ref()
                .and_then(|l| l.leases.get(&m.mac))
                .map(|l| l.ip.to_string());
        }
    }
    if a.json {
        let rows: Vec<&Row> = rows.values().collect();
        return super::print_json(&rows);
    }
    println!(
        "{:<16} {:<16} {:<4} {:<8} VMS",
        "NETWORK", "SUBNET", "NAT", "SWITCH"
    );
    for r in rows.values() {
        let members: Vec<String> = r
            .members
            .iter()
            .map(|m| format!("{} {} {}", m.vm, m.mac, m.ip.as_deref().unwrap_or("-")))
            .collect();
        println!(
            "{:<16} {:<16} {:<4} {:<8} {}",
            r.name,
            r.subnet,
            if r.nat { "yes" } else { "no" },
            if r.switch_running { "up" } else { "down" },
            members.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
