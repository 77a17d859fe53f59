//! Bridged networking (root): a TAP interface made for the VM, attached to an existing
//! Linux bridge and brought up, so the VM is one more host on the bridge's segment.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use devices::virtio::net::Tap;

use crate::error::NetError;

const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// struct ifreq with the union as an index or flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    value: libc::c_int,
    _pad: [u8; 20],
}

fn ifreq(name: &str, value: libc::c_int) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        value,
        _pad: [0; 20],
    };
    let n = name.len().min(15);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn control_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(sock: &OwnedFd, op: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: the interface ioctls used here read and write one ifreq, which `req` is
    // laid out as.
    if unsafe { libc::ioctl(sock.as_raw_fd(), op, req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new TAP named `tap`, attached to `bridge` and up.
pub fn attach(bridge: &str, tap: &str) -> Result<Tap, NetError> {
    let err = |reason: String| NetError::Bridge {
        bridge: bridge.to_string(),
        reason,
    };
    if !std::path::Path::new("/sys/class/net")
        .join(bridge)
        .join("bridge")
        .is_dir()
    {
        return Err(err(
            "no such bridge (create it with: ip link add NAME type bridge)".into(),
        ));
    }
    let t = Tap::open(tap).map_err(|e| err(format!("creating TAP {tap}: {e} (needs root)")))?;
    let sock = control_socket().map_err(|e| err(e.to_string()))?;
    let mut idx = ifreq(tap, 0);
    ioctl(&sock, libc::SIOCGIFINDEX, &mut idx).map_err(|e| err(format!("{tap}: {e}")))?;
    let mut add = ifreq(bridge, idx.value);
    ioctl(&sock, SIOCBRADDIF, &mut add).map_err(|e| err(format!("adding {tap}: {e}")))?;
    let mut flags = ifreq(tap, 0);
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut flags).map_err(|e| err(format!("{tap}: {e}")))?;
    flags.value |= libc::IFF_UP;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut flags).map_err(|e| err(format!("{tap} up: {e}")))?;
    Ok(t)
}
