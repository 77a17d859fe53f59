//! `vessel net ls`: the named networks, whether their switch runs, and the VMs on each
//! (MAC, and the address the switch's DHCP gave it).

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use devices::virtio::net::{Attachment, NetConfig, format_mac};
use manager::{Bundle, Home};
use network::dhcp::DhcpServer;

use super::CliResult;

#[derive(Subcommand)]
pub enum NetCommand {
    /// List the named networks and their VMs.
    Ls(LsArgs),
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
    switch_running: bool,
    members: Vec<Member>,
}

pub fn main(cmd: NetCommand) -> CliResult {
    match cmd {
        NetCommand::Ls(a) => list(a),
    }
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
        row.switch_running =
            std::os::unix::net::UnixStream::connect(net.join(network::switch::SOCKET)).is_ok();
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
    println!("{:<16} {:<16} {:<8} VMS", "NETWORK", "SUBNET", "SWITCH");
    for r in rows.values() {
        let members: Vec<String> = r
            .members
            .iter()
            .map(|m| format!("{} {} {}", m.vm, m.mac, m.ip.as_deref().unwrap_or("-")))
            .collect();
        println!(
            "{:<16} {:<16} {:<8} {}",
            r.name,
            r.subnet,
            if r.switch_running { "up" } else { "down" },
            members.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
