//! A TAP interface with the virtio-net header (IFF_VNET_HDR), so checksum and
//! segmentation offloads pass between the guest and the host stack untouched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{HEADER_LEN, NetBackend, feature_bits};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;

/// struct ifreq as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens TAP interface `name`, creating it if it does not exist (a created
    /// interface lasts as long as vessel holds it). Needs CAP_NET_ADMIN to create.
    pub fn open(name: &str) -> io::Result<Tap> {
        if name.is_empty() || name.len() > super::config::MAX_TAP_NAME {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad TAP name"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and updates) an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr = HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = req.name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok(Tap { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes TAP `name` (if it does not exist) last after vessel lets go of it, owned
    /// by `owner`, who may then open it without CAP_NET_ADMIN (what a jailed monitor
    /// is given). Needs CAP_NET_ADMIN.
    pub fn make_persistent(name: &str, owner: u32) -> io::Result<()> {
        let tap = Tap::open(name)?;
        tap.set(TUNSETPERSIST, 1)?;
        tap.set(TUNSETOWNER, libc::c_ulong::from(owner))
    }

    /// Undoes [`Tap::make_persistent`] for TAP `name`: it goes when its last opener
    /// lets go. Its owner may do this.
    pub fn release(name: &str) -> io::Result<()> {
        Tap::open(name)?.set(TUNSETPERSIST, 0)
    }

    fn set(&self, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST and TUNSETOWNER take their argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), request, value) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl NetBackend for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    fn set_offloads(&self, guest_features: u64) -> io::Result<()> {
        let mut flags = 0;
        if guest_features & feature_bits::GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if guest_features & feature_bits::GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if guest_features & feature_bits::GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
            if guest_features & feature_bits::GUEST_ECN != 0
                && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0
            {
                flags |= TUN_F_TSO_ECN;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
