//! What `--net` asks for, and vessel's default MAC addresses.

use serde::{Deserialize, Serialize};

use crate::virtio::options::pairs;

/// IFNAMSIZ less the terminating NUL.
pub const MAX_TAP_NAME: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The TAP interface: opened if it exists, created (for the VM's lifetime) if not.
    pub tap: String,
    /// None: [`generated_mac`].
    pub mac: Option<[u8; 6]>,
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=52:54:00:12:34:56]` (a bare first item is the TAP name).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        for (k, v) in pairs(s, "tap")? {
            match k {
                "tap" => {
                    if v.is_empty() || v.len() > MAX_TAP_NAME || v.contains(['/', ' ', '\0']) {
                        return Err(format!(
                            "tap name '{v}' must be 1 to {MAX_TAP_NAME} characters without '/' or spaces"
                        ));
                    }
                    tap = Some(v.to_string());
                }
                "mac" => mac = Some(parse_mac(v)?),
                _ => return Err(format!("unknown option '{k}' (expected tap, mac)")),
            }
        }
        let tap = tap.ok_or("tap=NAME is missing")?;
        Ok(NetConfig { tap, mac })
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
        assert_eq!(c.tap, "vtap0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(NetConfig::parse("tap1").unwrap().mac, None);
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
