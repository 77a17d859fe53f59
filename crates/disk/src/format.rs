//! What kind of image a file holds, told by its content (magic numbers), never by its
//! name. A raw disk is whatever is not recognised, so a guest that writes an image
//! header into its raw disk could change what the next probe says: vessel records the
//! format when a VM is created, and a raw disk whose format was only probed refuses
//! guest writes that would make it look like another format (as QEMU does).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

/// The formats vessel serves to a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// `raw` or `qcow2` (QEMU's names; `file` is QEMU's old name for raw).
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" | "file" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Formats vessel recognises but serves only after conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    Vmdk,
    Vdi,
    Vhd,
    Vhdx,
    Qcow1,
    Qed,
}

impl Foreign {
    pub fn name(self) -> &'static str {
        match self {
            Foreign::Vmdk => "VMDK",
            Foreign::Vdi => "VDI",
            Foreign::Vhd => "VHD",
            Foreign::Vhdx => "VHDX",
            Foreign::Qcow1 => "qcow (version 1)",
            Foreign::Qed => "QED",
        }
    }

    /// The name `qemu-img -f` takes.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Foreign::Vmdk => "vmdk",
            Foreign::Vdi => "vdi",
            Foreign::Vhd => "vpc",
            Foreign::Vhdx => "vhdx",
            Foreign::Qcow1 => "qcow",
            Foreign::Qed => "qed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Raw,
    Qcow2,
    Foreign(Foreign),
}

pub const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bytes the probe looks at.
pub const PROBE_LEN: usize = 512;

/// What the first sector of an image says it is.
pub fn detect_bytes(b: &[u8]) -> Detected {
    let at = |off: usize, magic: &[u8]| b.get(off..off + magic.len()) == Some(magic);
    if at(0, &QCOW_MAGIC) {
        let version = b
            .get(4..8)
            .map(|v| u32::from_be_bytes(v.try_into().unwrap()));
        return match version {
            Some(1) => Detected::Foreign(Foreign::Qcow1),
            _ => Detected::Qcow2,
        };
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        return Detected::Foreign(Foreign::Vmdk);
    }
    if at(0x40, &0xbeda_107fu32.to_le_bytes()) {
        return Detected::Foreign(Foreign::Vdi);
    }
    if at(0, b"vhdxfile") {
        return Detected::Foreign(Foreign::Vhdx);
    }
    if at(0, b"conectix") {
        return Detected::Foreign(Foreign::Vhd);
    }
    if at(0, b"QED\0") {
        return Detected::Foreign(Foreign::Qed);
    }
    Detected::Raw
}

/// Probes an open file.
pub fn detect(file: &File) -> io::Result<Detected> {
    let mut b = [0u8; PROBE_LEN];
    let mut got = 0;
    while got < b.len() {
        match file.read_at(&mut b[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(detect_bytes(&b[..got]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers() {
        let mut q = vec![0u8; 512];
        q[..4].copy_from_slice(&QCOW_MAGIC);
        q[7] = 3;
        assert_eq!(detect_bytes(&q), Detected::Qcow2);
        q[7] = 1;
        assert_eq!(detect_bytes(&q), Detected::Foreign(Foreign::Qcow1));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(detect_bytes(&vdi), Detected::Foreign(Foreign::Vdi));
        assert_eq!(detect_bytes(b"KDMV"), Detected::Foreign(Foreign::Vmdk));
        assert_eq!(detect_bytes(b"vhdxfile"), Detected::Foreign(Foreign::Vhdx));
        assert_eq!(detect_bytes(b"conectix"), Detected::Foreign(Foreign::Vhd));
        assert_eq!(detect_bytes(&[0u8; 512]), Detected::Raw);
        assert_eq!(detect_bytes(b"QF"), Detected::Raw);
        assert_eq!(detect_bytes(&[]), Detected::Raw);
    }
}
