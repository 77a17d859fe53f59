//! `GetFacts`: what `vessel info` shows about the guest.

use std::ffi::CStr;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::protocol::GuestFacts;

/// The guest's facts, now. What cannot be read is left empty (or zero).
pub fn gather_facts() -> GuestFacts {
    let os = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|path| parse_os_release(&fs::read_to_string(path).ok()?))
        .unwrap_or_else(|| "Linux".into());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (memory_total_kib, memory_available_kib) = parse_meminfo(&meminfo);
    GuestFacts {
        os,
        kernel: kernel_release().unwrap_or_default(),
        uptime_seconds: uptime().unwrap_or(0.0),
        addresses: addresses(),
        memory_total_kib,
        memory_available_kib,
        clock_unix_ns: clock_now_ns(),
    }
}

/// `PRETTY_NAME` of an os-release file, unquoted.
pub fn parse_os_release(text: &str) -> Option<String> {
    let value = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("PRETTY_NAME="))?
        .trim();
    let unquoted = match value.as_bytes() {
        [q @ (b'"' | b'\''), .., last] if last == q => &value[1..value.len() - 1],
        _ => value,
    };
    let mut out = String::with_capacity(unquoted.len());
    let mut chars = unquoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo, in KiB (0 when missing).
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("MemTotal"), field("MemAvailable"))
}

fn uptime() -> Option<f64> {
    fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain bytes; all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) fills the struct it is given, which lives across the call.
    if unsafe { libc::uname(&mut uts) } < 0 {
        return None;
    }
    // SAFETY: uname wrote a NUL-terminated string into `release`; a zeroed tail keeps it
    // terminated even if it did not.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

/// CLOCK_REALTIME in Unix nanoseconds.
pub(crate) fn clock_now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

/// `interface address/prefix` for every address but loopback and IPv6 link-local ones.
fn addresses() -> Vec<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) stores a list head into `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } < 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        if let Some(text) = describe(ifa) {
            out.push(text);
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(list) };
    out
}

/// An entry as `eth0 10.0.2.15/24`, if it is an address worth showing.
fn describe(ifa: &libc::ifaddrs) -> Option<String> {
    if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
        return None;
    }
    if ifa.ifa_flags & libc::IFF_LOOPBACK as libc::c_uint != 0 {
        return None;
    }
    // SAFETY: getifaddrs gives a NUL-terminated interface name.
    let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
    // SAFETY: every sockaddr starts with its family.
    let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
    let (address, prefix) = match family {
        libc::AF_INET => {
            // SAFETY: an AF_INET address (and netmask) is a sockaddr_in.
            let addr = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            let prefix = (!ifa.ifa_netmask.is_null()).then(|| {
                // SAFETY: as above, for the netmask.
                let mask = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                mask.sin_addr.s_addr.count_ones()
            });
            (ip.to_string(), prefix)
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address (and netmask) is a sockaddr_in6.
            let addr = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            if ip.is_loopback() || ip.is_unicast_link_local() {
                return None;
            }
            let prefix = (!ifa.ifa_netmask.is_null()).then(|| {
                // SAFETY: as above, for the netmask.
                let mask = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                mask.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
            });
            (ip.to_string(), prefix)
        }
        _ => return None,
    };
    Some(match prefix {
        Some(prefix) => format!("{name} {address}/{prefix}"),
        None => format!("{name} {address}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::testing::round_trip;
    use crate::protocol::{Frame, Message};

    #[test]
    fn os_release_and_meminfo_parse() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            parse_os_release(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(
            parse_os_release("PRETTY_NAME='A \\\"b\\\"'").as_deref(),
            Some("A \"b\"")
        );
        assert_eq!(
            parse_os_release("PRETTY_NAME=Alpine").as_deref(),
            Some("Alpine")
        );
        assert_eq!(parse_os_release("NAME=x\nPRETTY_NAME=\"\""), None);
        assert_eq!(parse_os_release(""), None);
        let meminfo = "MemTotal:        8000000 kB\nMemFree: 1 kB\nMemAvailable:    123 kB\n";
        assert_eq!(parse_meminfo(meminfo), (8_000_000, 123));
        assert_eq!(parse_meminfo("garbage\nMemTotal: x kB"), (0, 0));
    }

    #[test]
    fn facts_come_back() {
        let (frames, result) = round_trip(&Message::GetFacts);
        result.unwrap();
        let [Frame::Message(Message::Facts(facts))] = &frames[..] else {
            panic!("{frames:?}");
        };
        assert!(!facts.kernel.is_empty());
        assert!(!facts.os.is_empty());
        assert!(facts.memory_total_kib > 0);
        assert!(facts.memory_available_kib <= facts.memory_total_kib);
        assert!(facts.uptime_seconds > 0.0);
        assert!(facts.clock_unix_ns > 1_600_000_000_000_000_000);
        assert!(facts.addresses.iter().all(|a| !a.starts_with("lo ")));
    }
}
