//! A writer for the cpio "newc" archives the kernel unpacks as its initramfs.

use std::collections::BTreeSet;
use std::io::Write;

use crate::KitError;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes newc entries in order, creating missing parent directories first, because the
/// kernel's unpacker does not create them.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), KitError> {
        let path = normalize(path)?;
        if self.dirs.contains(&path) {
            return Ok(());
        }
        self.entry(&path, S_IFDIR | perm, 2, (0, 0), b"")?;
        self.dirs.insert(path);
        Ok(())
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), KitError> {
        self.entry(&normalize(path)?, S_IFREG | perm, 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), KitError> {
        self.entry(
            &normalize(path)?,
            S_IFLNK | 0o777,
            1,
            (0, 0),
            target.as_bytes(),
        )
    }

    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), KitError> {
        self.entry(&normalize(path)?, S_IFCHR | perm, 1, (major, minor), b"")
    }

    /// Writes the trailer and gives back the output.
    pub fn finish(mut self) -> Result<W, KitError> {
        self.header("TRAILER!!!", 0, 1, (0, 0), 0, 0)?;
        self.write(b"TRAILER!!!\0")?;
        self.pad()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), KitError> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        let size = u32::try_from(data.len())
            .map_err(|_| KitError::Cpio(format!("{path} is over 4 GiB")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, mode, nlink, rdev, size, ino)?;
        self.write(path.as_bytes())?;
        self.write(b"\0")?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
        ino: u32,
    ) -> Result<(), KitError> {
        let namesize = name.len() as u32 + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), KitError> {
        self.out
            .write_all(bytes)
            .map_err(|e| KitError::Cpio(format!("write failed: {e}")))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// newc aligns every header and every file body to 4 bytes.
    fn pad(&mut self) -> Result<(), KitError> {
        let n = self.written.next_multiple_of(4) - self.written;
        self.write(&[0; 3][..n as usize])
    }
}

/// Archive paths are relative ("bin/sh"), without empty, "." or ".." parts.
fn normalize(path: &str) -> Result<String, KitError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty()
        || parts
            .iter()
            .any(|p| *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(KitError::Cpio(format!("bad archive path {path:?}")));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdevmajor, rdevminor, data) of every entry, checking alignment.
    fn parse(mut a: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let total = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - a.len()) % 4, 0, "header not 4-aligned");
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&a[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[110 + namesize - 1], 0);
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = a[data_start..data_start + size].to_vec();
            a = &a[(data_start + size).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty());
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn archive_round_trips_with_parents_first() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.file("bin/busybox", 0o755, b"12345").unwrap();
        w.symlink("/usr/bin/env", "../../bin/busybox").unwrap();
        w.dir("bin", 0o755).unwrap();
        let entries = parse(&w.finish().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "bin",
                "bin/busybox",
                "usr",
                "usr/bin",
                "usr/bin/env"
            ]
        );
        assert_eq!(entries[1].1, 0o020600);
        assert_eq!((entries[1].2, entries[1].3), (5, 1));
        assert_eq!(entries[3].1, 0o100755);
        assert_eq!(entries[3].4, b"12345");
        assert_eq!(entries[6].1, 0o120777);
        assert_eq!(entries[6].4, b"../../bin/busybox");
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for p in ["", "/", "a/../b", "./x", "a\0b"] {
            assert!(w.file(p, 0o644, b"").is_err(), "{p:?}");
        }
    }
}
