//! `Freeze` and `Thaw`: the guest's disk file systems held still for a snapshot.
//!
//! Every writable mount of a `/dev/...` device is frozen (FIFREEZE on its mount point);
//! they are thawed on `Thaw`, when the connection ends or breaks, or after
//! [`THAW_AFTER`] without a `Thaw` — whichever comes first. Only the file systems this
//! connection froze are thawed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::{Connection, GuestError, Receiver, Sender, io_text, log};
use crate::protocol::{self, Frame, Message, ProtocolError};

/// How long file systems stay frozen without a `Thaw`.
pub const THAW_AFTER: Duration = Duration::from_secs(60);

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// The mount points to freeze, in mount order, from the text of `/proc/self/mounts`:
/// mounts of a `/dev/...` source without the `ro` option, each point once.
pub fn freezable_mounts(mounts: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(point), Some(_fstype), Some(options)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !source.starts_with("/dev/") || options.split(',').any(|o| o == "ro") {
            continue;
        }
        let point = unescape(point);
        if !out.contains(&point) {
            out.push(point);
        }
    }
    out
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mounts field.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file systems this connection froze; thawed when dropped.
struct Frozen(Vec<(String, File)>);

impl Frozen {
    fn freeze(points: Vec<String>) -> Frozen {
        let mut frozen = Vec::new();
        for point in points {
            match freeze_one(&point) {
                Ok(dir) => frozen.push((point, dir)),
                Err(e) => log(format!("freeze: skipping {point}: {}", io_text(&e))),
            }
        }
        Frozen(frozen)
    }

    fn points(&self) -> Vec<String> {
        self.0.iter().map(|(point, _)| point.clone()).collect()
    }

    fn thaw(&mut self) {
        while let Some((point, dir)) = self.0.pop() {
            if let Err(e) = ioctl(&dir, FITHAW) {
                log(format!("thaw: {point}: {}", io_text(&e)));
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

fn freeze_one(point: &str) -> io::Result<File> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(point)?;
    ioctl(&dir, FIFREEZE)?;
    Ok(dir)
}

fn ioctl(dir: &File, request: libc::c_ulong) -> io::Result<()> {
    let arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take an int argument the kernel ignores; the descriptor
    // is open for the call.
    if unsafe { libc::ioctl(dir.as_raw_fd(), request as _, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn freeze<C: Connection>(
    mut receiver: Receiver<C>,
    sender: &Sender<C>,
) -> Result<(), GuestError> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|e| GuestError::io("/proc/self/mounts", &e))?;
    let mut frozen = Frozen::freeze(freezable_mounts(&mounts));
    sender.message(&Message::Frozen {
        filesystems: frozen.points(),
    })?;
    receiver.get_ref().set_read_timeout(Some(THAW_AFTER))?;
    match protocol::read_frame(&mut receiver) {
        Ok(Frame::Message(Message::Thaw)) => {
            frozen.thaw();
            sender.message(&Message::Done)
        }
        Ok(_) => Err(GuestError::UnexpectedFrame("freeze")),
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(GuestError::Failed(format!(
                "no thaw within {} s: thawed",
                THAW_AFTER.as_secs()
            )))
        }
        Err(e) => Err(e.into()),
    }
    // Whatever happened, `frozen` thaws what is left when it goes.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writable_device_mounts_are_frozen() {
        let mounts = "\
proc /proc proc rw,relatime 0 0
/dev/vda / ext4 rw,relatime,discard 0 0
devtmpfs /dev devtmpfs rw,relatime,size=1k 0 0
/dev/vdb /mnt/read\\040only ext4 ro,relatime 0 0
/dev/vdc /mnt/my\\040data xfs rw,noatime 0 0
/dev/vdc /mnt/my\\040data xfs rw,noatime 0 0
tmpfs /tmp tmpfs rw 0 0
/dev/mapper/vg-home /home ext4 rw,errors=remount-ro 0 0
/dev/vdd /srv btrfs rw,ro_compat 0 0
short line
";
        assert_eq!(
            freezable_mounts(mounts),
            ["/", "/mnt/my data", "/home", "/srv"]
        );
        assert!(freezable_mounts("").is_empty());
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape("/x\\999"), "/x\\999");
    }
}
