//! A named network's way out: NAT through passt. A network created with `--nat` gives
//! each VM on it a passt of its own behind the switch (passt serves one guest), all
//! answering at the network's gateway address (.1, the switch's DHCP server) with the
//! switch's MAC: the switch hands a VM's frames for the gateway to that VM's passt and
//! passt's frames back to that VM only. The gateway address reaches the host's loopback
//! and forwards DNS to the host's resolver, as `--net user` does.
//!
//! ```text
//! <networks>/<name>/network.toml   nat = true|false   (`vessel net create`)
//! ```

use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dhcp::SERVER_MAC;
use crate::error::NetError;
use crate::passt::{PASST_FD, find_passt, spawn};

pub const CONFIG: &str = "network.toml";

/// What `vessel net create` records about a network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// A NAT uplink to the outside through passt.
    #[serde(default)]
    pub nat: bool,
}

impl NetworkConfig {
    /// The network's settings; None for a network no one created (made by its first VM).
    pub fn load(dir: &Path) -> Result<Option<Self>, NetError> {
        let path = dir.join(CONFIG);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| NetError::Switch {
                    name: dir.display().to_string(),
                    reason: format!("{}: {e}", path.display()),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NetError::io(path.display().to_string())(e)),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir).map_err(NetError::io(dir.display().to_string()))?;
        let path = dir.join(CONFIG);
        let text = toml::to_string(self).unwrap_or_default();
        std::fs::write(&path, text).map_err(NetError::io(path.display().to_string()))
    }
}

/// Whether `frame`, from a VM, is for the gateway: sent to its MAC, or an ARP request
/// asking for its address.
pub fn for_gateway(frame: &[u8], gateway: Ipv4Addr) -> bool {
    if frame.get(..6) == Some(&SERVER_MAC[..]) {
        return true;
    }
    // Ethernet + ARP: ethertype 0x0806, opcode 1 (request), target IP at 38..42.
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 1]
        && frame[38..42] == gateway.octets()
}

/// passt for one VM of a NAT network: IPv4 only, no DHCP of its own (the switch's
/// answers), the gateway's address and MAC, DNS forwarded from the gateway.
pub fn start(
    gateway: Ipv4Addr,
    guest: Option<Ipv4Addr>,
) -> Result<(sandbox::launcher::Helper, UnixStream), NetError> {
    let passt = find_passt()?;
    let mac = SERVER_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let gw = gateway.to_string();
    let mut args: Vec<String> = ["-f", "-q", "-4", "--no-dhcp", "-F"]
        .map(String::from)
        .to_vec();
    args.push(PASST_FD.to_string());
    for a in ["-M", &mac, "-g", &gw, "--dns-forward", &gw, "-n", "24"] {
        args.push(a.to_string());
    }
    if let Some(ip) = guest {
        args.push("-a".into());
        args.push(ip.to_string());
    }
    spawn(&passt, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_frames_are_told_apart() {
        let gw = Ipv4Addr::new(10, 1, 2, 1);
        let mut to_gw = SERVER_MAC.to_vec();
        to_gw.resize(60, 0);
        assert!(for_gateway(&to_gw, gw));
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 1, 2, 7]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&gw.octets());
        assert!(for_gateway(&arp, gw));
        arp[41] = 9;
        assert!(!for_gateway(&arp, gw), "ARP for another address");
        assert!(!for_gateway(&[0xff; 20], gw));
    }
}
