//! The DHCP server of a named network, inside vessel's switch: every VM on the network
//! gets an address in the network's own /24 (stable per MAC, kept across switch
//! restarts), so VMs reach each other by address without any setup in the guest.
//!
//! Frames come from guests: every length and field is checked; anything that is not a
//! well-formed DHCP request for this server is left alone (forwarded like any frame).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The switch's own MAC (locally administered), the source of its replies.
pub const SERVER_MAC: [u8; 6] = [0x02, 0x76, 0x65, 0x73, 0x00, 0x01];
const LEASE_SECONDS: u32 = 86_400;
const MAGIC: [u8; 4] = [0x63, 0x82, 0x53, 0x63];
const BOOTP_LEN: usize = 236;

/// One address handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// What the client called itself (option 12), if it said.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// A network's address plan and leases.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DhcpServer {
    /// The network's /24 (the switch is .1; clients get .2 to .254).
    pub subnet: Ipv4Addr,
    /// By MAC, as `aa:bb:cc:dd:ee:ff`.
    pub leases: BTreeMap<String, Lease>,
    /// The network has a NAT uplink: the switch's address (.1) is the clients' router
    /// and DNS server.
    #[serde(default)]
    pub router: bool,
}

/// A /24 in 10.0.0.0/8 chosen from the network's name (so the same name is the same
/// subnet every time), avoiding 10.0.x.
pub fn subnet_for(name: &str) -> Ipv4Addr {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [a, b, ..] = h.to_le_bytes();
    Ipv4Addr::new(10, a.max(1), b, 0)
}

fn mac_text(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a request asked for.
struct Request<'a> {
    kind: u8,
    xid: [u8; 4],
    flags: [u8; 2],
    chaddr: [u8; 6],
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    hostname: Option<&'a [u8]>,
}

impl DhcpServer {
    pub fn new(name: &str) -> Self {
        DhcpServer {
            subnet: subnet_for(name),
            leases: BTreeMap::new(),
            router: false,
        }
    }

    pub fn server_ip(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The address leased to `mac`, if any.
    pub fn lease_of(&self, mac: &[u8; 6]) -> Option<Ipv4Addr> {
        self.leases.get(&mac_text(mac)).map(|l| l.ip)
    }

    /// The reply to `frame` if it is a DHCP request for this server, else None.
    pub fn handle(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let req = parse(frame)?;
        if let Some(s) = req.server
            && s != self.server_ip()
        {
            return None;
        }
        let mac = mac_text(&req.chaddr);
        let reply = match req.kind {
            // DISCOVER: offer the client's lease, or a new one.
            1 => (2, self.lease_for(&mac, req.hostname)?),
            // REQUEST: acknowledge the address it holds; refuse any other.
            3 => {
                let ip = self.lease_for(&mac, req.hostname)?;
                match req.requested {
                    Some(want) if want != ip => (6, Ipv4Addr::UNSPECIFIED),
                    _ => (5, ip),
                }
            }
            // RELEASE: forget it.
            7 => {
                self.leases.remove(&mac);
                return None;
            }
            _ => return None,
        };
        Some(self.reply(&req, reply.0, reply.1))
    }

    fn lease_for(&mut self, mac: &str, hostname: Option<&[u8]>) -> Option<Ipv4Addr> {
        let name = hostname
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .filter(|h| !h.is_empty() && h.len() <= 64 && h.chars().all(|c| c.is_ascii_graphic()));
        if let Some(l) = self.leases.get_mut(mac) {
            if name.is_some() {
                l.hostname = name;
            }
            return Some(l.ip);
        }
        let [a, b, c, _] = self.subnet.octets();
        let ip = (2..=254u8)
            .map(|d| Ipv4Addr::new(a, b, c, d))
            .find(|ip| self.leases.values().all(|l| l.ip != *ip))?;
        self.leases
            .insert(mac.to_string(), Lease { ip, hostname: name });
        Some(ip)
    }

    fn reply(&self, req: &Request, kind: u8, ip: Ipv4Addr) -> Vec<u8> {
        let server = self.server_ip();
        let mut bootp = vec![0u8; BOOTP_LEN];
        bootp[0] = 2; // BOOTREPLY
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&req.xid);
        bootp[10..12].copy_from_slice(&req.flags);
        bootp[16..20].copy_from_slice(&ip.octets());
        bootp[28..34].copy_from_slice(&req.chaddr);
        bootp.extend_from_slice(&MAGIC);
        let mut opt = |code: u8, data: &[u8]| {
            bootp.push(code);
            bootp.push(data.len() as u8);
            bootp.extend_from_slice(data);
        };
        opt(53, &[kind]);
        opt(54, &server.octets());
        if kind != 6 {
            opt(51, &LEASE_SECONDS.to_be_bytes());
            opt(1, &[255, 255, 255, 0]);
            if self.router {
                opt(3, &server.octets());
                opt(6, &server.octets());
            }
        }
        bootp.push(255);
        udp_frame(server, &bootp)
    }
}

/// An Ethernet broadcast of a UDP datagram from `src`:67 to 255.255.255.255:68.
fn udp_frame(src: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&SERVER_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&[255; 4]);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (optional over IPv4)
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A DHCP request (BOOTREQUEST from UDP port 68 to 67 over IPv4 in Ethernet), checked
/// field by field.
fn parse(frame: &[u8]) -> Option<Request<'_>> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 {
        return None;
    }
    // Fragments are not DHCP.
    if u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let ip = ip.get(..total)?;
    let udp = ip.get(ihl..)?;
    let (sport, dport) = (
        u16::from_be_bytes([*udp.first()?, *udp.get(1)?]),
        u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]),
    );
    if (sport, dport) != (68, 67) {
        return None;
    }
    let ulen = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    let bootp = udp.get(8..ulen.max(8))?;
    if bootp.len() < BOOTP_LEN + 4 || bootp[0] != 1 || bootp[1] != 1 || bootp[2] != 6 {
        return None;
    }
    if bootp[BOOTP_LEN..BOOTP_LEN + 4] != MAGIC {
        return None;
    }
    let mut req = Request {
        kind: 0,
        xid: bootp[4..8].try_into().ok()?,
        flags: bootp[10..12].try_into().ok()?,
        chaddr: bootp[28..34].try_into().ok()?,
        requested: None,
        server: None,
        hostname: None,
    };
    let mut opts = &bootp[BOOTP_LEN + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            0 => {
                opts = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let data = rest.get(..usize::from(len))?;
        match (code, data.len()) {
            (53, 1) => req.kind = data[0],
            (50, 4) => req.requested = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (54, 4) => req.server = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (12, _) => req.hostname = Some(data),
            _ => {}
        }
        opts = &rest[usize::from(len)..];
    }
    (req.kind != 0).then_some(req)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A DHCP request as busybox udhcpc sends it.
    pub(crate) fn request(mac: [u8; 6], kind: u8, extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut bootp = vec![0u8; BOOTP_LEN];
        bootp[0] = 1;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&[1, 2, 3, 4]);
        bootp[28..34].copy_from_slice(&mac);
        bootp.extend_from_slice(&MAGIC);
        bootp.extend_from_slice(&[53, 1, kind]);
        for (code, data) in extra {
            bootp.push(*code);
            bootp.push(data.len() as u8);
            bootp.extend_from_slice(data);
        }
        bootp.push(255);
        let mut f = udp_frame(Ipv4Addr::UNSPECIFIED, &bootp);
        f[6..12].copy_from_slice(&mac);
        // Ports 68 -> 67.
        f[34..36].copy_from_slice(&68u16.to_be_bytes());
        f[36..38].copy_from_slice(&67u16.to_be_bytes());
        f
    }

    fn yiaddr_and_type(reply: &[u8]) -> (Ipv4Addr, u8) {
        let bootp = &reply[42..];
        let ip = Ipv4Addr::new(bootp[16], bootp[17], bootp[18], bootp[19]);
        (ip, bootp[BOOTP_LEN + 4 + 2])
    }

    #[test]
    fn discover_offer_request_ack_and_stable_addresses() {
        let mut s = DhcpServer::new("lab");
        let a = [0x52, 0x54, 0, 0, 0, 1];
        let b = [0x52, 0x54, 0, 0, 0, 2];
        let (ip_a, t) = yiaddr_and_type(&s.handle(&request(a, 1, &[])).unwrap());
        assert_eq!(t, 2, "offer");
        let [n1, n2, n3, _] = s.subnet.octets();
        assert_eq!(ip_a, Ipv4Addr::new(n1, n2, n3, 2));
        let ack = s
            .handle(&request(a, 3, &[(50, &ip_a.octets()), (12, b"vm-a")]))
            .unwrap();
        assert_eq!(yiaddr_and_type(&ack), (ip_a, 5));
        assert_eq!(
            s.leases["52:54:00:00:00:01"].hostname.as_deref(),
            Some("vm-a")
        );
        let (ip_b, _) = yiaddr_and_type(&s.handle(&request(b, 1, &[])).unwrap());
        assert_ne!(ip_a, ip_b);
        // Asking for someone else's address is refused.
        let nak = s.handle(&request(b, 3, &[(50, &ip_a.octets())])).unwrap();
        assert_eq!(yiaddr_and_type(&nak).1, 6);
        // The same MAC keeps its address.
        assert_eq!(
            yiaddr_and_type(&s.handle(&request(a, 1, &[])).unwrap()).0,
            ip_a
        );
        // The reply's IPv4 header checksums to zero.
        let r = s.handle(&request(a, 1, &[])).unwrap();
        assert_eq!(checksum(&r[14..34]), 0);
        // A request for another server is not ours.
        assert!(s.handle(&request(a, 3, &[(54, &[1, 2, 3, 4])])).is_none());
    }

    #[test]
    fn malformed_frames_are_left_alone() {
        let mut s = DhcpServer::new("lab");
        let good = request([2, 0, 0, 0, 0, 1], 1, &[]);
        for cut in [0, 13, 20, 40, 100, good.len() - 1] {
            let _ = s.handle(&good[..cut]);
        }
        let mut bad_len = good.clone();
        bad_len[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(s.handle(&bad_len).is_none());
        let mut bad_opt = good.clone();
        let at = 42 + BOOTP_LEN + 4;
        bad_opt[at + 1] = 200; // option length past the end
        assert!(s.handle(&bad_opt).is_none());
        assert!(s.handle(&[0u8; 64]).is_none());
    }

    #[test]
    fn subnets_come_from_names() {
        assert_eq!(subnet_for("lab"), subnet_for("lab"));
        assert_ne!(subnet_for("lab"), subnet_for("prod"));
        assert_eq!(subnet_for("x").octets()[3], 0);
        assert_ne!(subnet_for("x").octets()[1], 0);
    }
}
