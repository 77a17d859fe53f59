//! What `--net` asks for (user-mode NAT, a named network, a bridge, a TAP), and vessel's
//! default MAC addresses.

use serde::{Deserialize, Serialize};

use crate::virtio::options::{on_off, pairs};
use crate::virtio::rate_limit::Limits;

/// IFNAMSIZ less the terminating NUL.
pub const MAX_TAP_NAME: usize = 15;
/// The longest network name (it names a folder and a socket).
pub const MAX_NETWORK_NAME: usize = 32;

/// What a NIC is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attachment {
    /// A TAP interface: opened if it exists, created (for the VM's lifetime) if not.
    Tap(String),
    /// User-mode NAT through passt, with port forwards from the host.
    User {
        forwards: Vec<PortForward>,
        /// The DNS server the guest is told about (default: the host's).
        dns: Option<std::net::IpAddr>,
        /// Forward a free loopback port, chosen at start, to the guest's SSH port (what
        /// `vessel ssh` connects to).
        ssh: bool,
    },
    /// A named L2 network shared with other VMs (vessel's switch).
    Network(String),
    /// A TAP made for the VM and attached to this existing Linux bridge.
    Bridge(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// `hostfwd=tcp:[HOSTADDR]:HOSTPORT-:GUESTPORT`, as QEMU writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub protocol: Protocol,
    pub host_addr: Option<std::net::IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

impl PortForward {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("hostfwd={s}: use tcp:[HOSTADDR]:HOSTPORT-:GUESTPORT (or udp:...)");
        let (proto, rest) = s.split_once(':').ok_or_else(bad)?;
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad()),
        };
        let (host, guest) = rest.split_once('-').ok_or_else(bad)?;
        let (addr, host_port) = host.rsplit_once(':').ok_or_else(bad)?;
        let guest_port = guest.strip_prefix(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        let host_addr = match addr {
            "" => None,
            a => Some(
                a.trim_matches(['[', ']'])
                    .parse()
                    .map_err(|_| format!("hostfwd={s}: {a} is not an IP address"))?,
            ),
        };
        Ok(PortForward {
            protocol,
            host_addr,
            host_port: port(host_port)?,
            guest_port: port(guest_port)?,
        })
    }

    pub fn to_spec(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let addr = match self.host_addr {
            Some(std::net::IpAddr::V6(a)) => format!("[{a}]"),
            Some(a) => a.to_string(),
            None => String::new(),
        };
        format!("{proto}:{addr}:{}-:{}", self.host_port, self.guest_port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub attach: Attachment,
    /// None: [`generated_mac`].
    pub mac: Option<[u8; 6]>,
    /// Rate limits on what the guest receives (`rx_bw=`, `rx_iops=`: frames)...
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub rx: Limits,
    /// ... and on what it sends (`tx_bw=`, `tx_iops=`).
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub tx: Limits,
}

fn check_name(kind: &str, v: &str, max: usize) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| v.to_string()).ok_or_else(|| {
        format!("{kind} name '{v}' must be 1 to {max} letters, digits, '-', '_' or '.'")
    })
}

impl NetConfig {
    /// Parses `user[,hostfwd=...][,dns=ADDR][,ssh=on]`, `network=NAME`, `bridge=BR` or
    /// `tap=NAME` (a bare first item is a TAP name), each with `[,mac=MAC]` and rate
    /// limits per direction (`[,rx_bw=RATE][,tx_bw=RATE][,rx_iops=N][,tx_iops=N]` and
    /// their `_burst`s).
    pub fn parse(s: &str) -> Result<Self, String> {
        let items = pairs(s, "tap")?;
        let Some(&(kind, value)) = items.first() else {
            return Err("empty --net".into());
        };
        // A bare `user` is user-mode networking (a TAP named so needs `tap=user`).
        let bare = !s.split(',').next().unwrap_or_default().contains('=');
        let (kind, value) = if bare && value == "user" {
            ("user", "")
        } else {
            (kind, value)
        };
        let mut attach = match kind {
            "tap" => {
                if value.is_empty()
                    || value.len() > MAX_TAP_NAME
                    || value.contains(['/', ' ', '\0'])
                {
                    return Err(format!(
                        "tap name '{value}' must be 1 to {MAX_TAP_NAME} characters without '/' or spaces"
                    ));
                }
                Attachment::Tap(value.to_string())
            }
            "user" if value.is_empty() => Attachment::User {
                forwards: Vec::new(),
                dns: None,
                ssh: false,
            },
            "network" => Attachment::Network(check_name("network", value, MAX_NETWORK_NAME)?),
            "bridge" => Attachment::Bridge(check_name("bridge", value, MAX_TAP_NAME)?),
            _ => {
                return Err(format!(
                    "'{kind}' is not a network: use user, network=NAME, bridge=BR or tap=NAME"
                ));
            }
        };
        let mut mac = None;
        let (mut rx, mut tx) = (Limits::default(), Limits::default());
        for &(k, v) in &items[1..] {
            if rx.parse_prefixed("rx_", k, v)? || tx.parse_prefixed("tx_", k, v)? {
                continue;
            }
            match (k, &mut attach) {
                ("mac", _) => mac = Some(parse_mac(v)?),
                ("hostfwd", Attachment::User { forwards, .. }) => {
                    forwards.push(PortForward::parse(v)?)
                }
                ("dns", Attachment::User { dns, .. }) => {
                    *dns = Some(
                        v.parse()
                            .map_err(|_| format!("dns={v}: not an IP address"))?,
                    )
                }
                ("ssh", Attachment::User { ssh, .. }) => *ssh = on_off(k, v)?,
                ("hostfwd" | "dns" | "ssh", _) => {
                    return Err(format!(
                        "{k}= only goes with user networking (--net user,...)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "unknown option '{k}' (expected mac, hostfwd, dns, ssh, rx_bw, tx_bw, rx_iops, tx_iops)"
                    ));
                }
            }
        }
        rx.validate().map_err(|e| format!("rx_{e}"))?;
        tx.validate().map_err(|e| format!("tx_{e}"))?;
        Ok(NetConfig {
            attach,
            mac,
            rx,
            tx,
        })
    }

    /// The spec `parse` reads back.
    pub fn to_spec(&self) -> String {
        let mut s = match &self.attach {
            Attachment::Tap(n) => format!("tap={n}"),
            Attachment::User { forwards, dns, ssh } => {
                let mut s = "user".to_string();
                if *ssh {
                    s += ",ssh=on";
                }
                for f in forwards {
                    s += &format!(",hostfwd={}", f.to_spec());
                }
                if let Some(d) = dns {
                    s += &format!(",dns={d}");
                }
                s
            }
            Attachment::Network(n) => format!("network={n}"),
            Attachment::Bridge(b) => format!("bridge={b}"),
        };
        if let Some(m) = &self.mac {
            s += &format!(",mac={}", format_mac(m));
        }
        s += &self.rx.to_spec_prefixed("rx_");
        s += &self.tx.to_spec_prefixed("tx_");
        s
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses (a NIC cannot have one).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac '{s}' is not six hex bytes like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac '{s}' is a multicast address"));
    }
    Ok(mac)
}

/// A MAC for NIC `index` of the VM identified by `vm`: locally administered,
/// unicast, and the same every time for the same (vm, index).
pub fn generated_mac(vm: &[u8], index: u32) -> [u8; 6] {
    // FNV-1a over the VM identity and the index: stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.iter().chain(&index.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let c = NetConfig::parse("tap=vtap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(c.attach, Attachment::Tap("vtap0".into()));
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(NetConfig::parse("tap1").unwrap().mac, None);
        let u = NetConfig::parse(
            "user,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,dns=10.0.0.1",
        )
        .unwrap();
        let Attachment::User { forwards, dns, .. } = &u.attach else {
            panic!("{u:?}")
        };
        assert_eq!(forwards.len(), 2);
        assert_eq!(
            forwards[0],
            PortForward {
                protocol: Protocol::Tcp,
                host_addr: None,
                host_port: 2222,
                guest_port: 22
            }
        );
        assert_eq!(forwards[1].host_addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(*dns, Some("10.0.0.1".parse().unwrap()));
        for spec in [
            "user,hostfwd=tcp::2222-:22,dns=10.0.0.1,mac=52:54:00:12:34:56",
            "user,ssh=on,hostfwd=tcp::80-:8080",
            "network=lab,mac=52:54:00:12:34:56",
            "bridge=br0",
            "tap=vtap0",
            "user,hostfwd=tcp:[::1]:80-:8080",
        ] {
            assert_eq!(NetConfig::parse(spec).unwrap().to_spec(), spec);
        }
        for bad in [
            "",
            "mac=52:54:00:12:34:56",
            "tap=a,mac=52:54:00:12:34",
            "tap=a,mac=01:00:00:00:00:00",
            "tap=a,mac=52:54:00:12:34:5g",
            "tap=a,mac=52:54:00:12:34:56:78",
            "tap=a/b",
            "tap=abcdefghijklmnop",
            "tap=a,speed=10",
            "user,hostfwd=tcp::22",
            "user,hostfwd=tcp::0-:22",
            "user,hostfwd=sctp::1-:2",
            "user,hostfwd=tcp:nohost:1-:2",
            "network=a/b",
            "network=",
            "tap=a,hostfwd=tcp::1-:2",
            "wifi=on",
        ] {
            let e = NetConfig::parse(bad).unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn generated_macs_are_local_unicast_and_stable() {
        let a = generated_mac(b"vm-1", 0);
        assert_eq!(a, generated_mac(b"vm-1", 0));
        assert_ne!(a, generated_mac(b"vm-1", 1));
        assert_ne!(a, generated_mac(b"vm-2", 0));
        for m in [a, generated_mac(b"", 7)] {
            assert_eq!(m[0] & 0x03, 0x02, "{}", format_mac(&m));
        }
    }
}
