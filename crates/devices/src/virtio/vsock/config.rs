//! `--vsock` options: `cid=N,socket=PATH`.

use std::path::{Path, PathBuf};

use super::MIN_GUEST_CID;
use crate::virtio::options::pairs;

/// The CID a guest gets when none is asked for. The host side is Unix sockets, not
/// the host kernel's vsock, so guests need not have different CIDs.
pub const DEFAULT_CID: u64 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    /// Where host programs connect (`CONNECT <port>\n`); guest connections to host
    /// port P go to `<socket>_P`.
    pub socket: PathBuf,
}

impl VsockConfig {
    /// `cid=N` and `socket=PATH`, in any order; either may be left out (`""` is
    /// all defaults), the socket then being `default_socket`.
    pub fn parse(spec: &str, default_socket: &Path) -> Result<Self, String> {
        let mut c = VsockConfig {
            cid: DEFAULT_CID,
            socket: default_socket.to_path_buf(),
        };
        if spec.is_empty() {
            return Ok(c);
        }
        for (k, v) in pairs(spec, "cid")? {
            match k {
                "cid" => {
                    c.cid = v
                        .parse()
                        .ok()
                        .filter(|&n| (MIN_GUEST_CID..u64::from(u32::MAX)).contains(&n))
                        .ok_or_else(|| {
                            format!("cid={v}: a guest CID is a number from 3 to 4294967294")
                        })?
                }
                "socket" if !v.is_empty() => c.socket = v.into(),
                _ => return Err(format!("unknown vsock option {k:?} (cid=N,socket=PATH)")),
            }
        }
        // sockaddr_un holds 108 bytes; `_<port>` is added for guest connections.
        if c.socket.as_os_str().len() > 90 {
            return Err(format!(
                "socket path {} is too long for a Unix socket (at most 90 bytes)",
                c.socket.display()
            ));
        }
        Ok(c)
    }

    /// The option string that parses back to this.
    pub fn to_spec(&self) -> String {
        format!("cid={},socket={}", self.cid, self.socket.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cid_and_socket_with_defaults() {
        let d = Path::new("/run/v.sock");
        assert_eq!(VsockConfig::parse("", d).unwrap().cid, DEFAULT_CID);
        let c = VsockConfig::parse("cid=7,socket=/tmp/x.sock", d).unwrap();
        assert_eq!((c.cid, c.socket.as_path()), (7, Path::new("/tmp/x.sock")));
        assert_eq!(VsockConfig::parse(&c.to_spec(), d).unwrap(), c);
        assert_eq!(VsockConfig::parse("9", d).unwrap().socket, d);
        for bad in ["cid=2", "cid=x", "cid=4294967295", "port=1", "socket="] {
            assert!(VsockConfig::parse(bad, d).is_err(), "{bad}");
        }
        let long = format!("socket=/{}", "a".repeat(100));
        assert!(
            VsockConfig::parse(&long, d)
                .unwrap_err()
                .contains("too long")
        );
    }
}
