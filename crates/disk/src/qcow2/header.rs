//! The qcow2 header (QEMU's docs/interop/qcow2.txt): the fields, the header extensions
//! and the backing file name, all in the first cluster. Parsed with every offset and
//! length checked against the cluster and the file, so a hostile image gets a one-line
//! refusal; also rewritten here when a copy or a snapshot needs a new backing file name.

use crate::format::QCOW_MAGIC;

pub const V2_LEN: usize = 72;
pub const V3_LEN: usize = 104;
/// Smallest and largest cluster sizes (as QEMU): 512 bytes to 2 MiB.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's bound on a backing file name.
pub const MAX_BACKING_NAME: usize = 1023;
/// Largest virtual size accepted (QEMU's limit: 32 MiB L1 table of 64 KiB clusters is
/// 2 EiB; vessel stops at 64 TiB like many tools do for sanity).
pub const MAX_SIZE: u64 = 64 << 40;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

pub mod incompatible {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

pub mod compatible {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
    Other(u8),
}

impl Compression {
    pub fn name(self) -> String {
        match self {
            Compression::Zlib => "zlib".into(),
            Compression::Zstd => "zstd".into(),
            Compression::Other(n) => format!("type {n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// Where the extensions end (after the end marker, if any).
    pub extensions_end: usize,
    /// Unknown extensions, kept (type, data) so a rewrite preserves them.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The bytes of the file the header, its extensions and the backing name may use.
    pub fn needs_bytes(first: &[u8]) -> Result<usize, String> {
        if first.len() < V2_LEN || first[..4] != QCOW_MAGIC {
            return Err("no qcow2 header".into());
        }
        let bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(format!(
                "cluster size 2^{bits} is out of range (512 B to 2 MiB)"
            ));
        }
        Ok(1 << bits)
    }

    /// Parses the first cluster of an image (`b` may be shorter when the file is).
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, String> {
        let cluster = Self::needs_bytes(b)?;
        let b = &b[..b.len().min(cluster)];
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(format!("version {version} (vessel reads versions 2 and 3)"));
        }
        let mut h = Header {
            version,
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_LEN as u32,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            extensions_end: V2_LEN,
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if b.len() < V3_LEN {
                return Err("header is cut short".into());
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            let len = h.header_length as usize;
            if len < V3_LEN || len > b.len() || !len.is_multiple_of(8) {
                return Err(format!("header length {len} is invalid"));
            }
            if len > V3_LEN {
                h.compression = match b[V3_LEN] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    n => Compression::Other(n),
                };
            }
            if h.incompatible & incompatible::COMPRESSION_TYPE == 0
                && h.compression != Compression::Zlib
            {
                return Err("compression type set without its feature bit".into());
            }
        }
        if h.size > MAX_SIZE {
            return Err(format!("virtual size {} is larger than 64 TiB", h.size));
        }
        if h.refcount_table_clusters == 0 {
            return Err("the image has no refcount table".into());
        }
        if h.refcount_order > 6 {
            return Err(format!("refcount order {} is above 6", h.refcount_order));
        }
        let align = h.cluster_size() - 1;
        for (what, off) in [
            ("L1 table", h.l1_table_offset),
            ("refcount table", h.refcount_table_offset),
        ] {
            if off & align != 0 || off == 0 {
                return Err(format!("{what} offset {off:#x} is not a cluster"));
            }
            if off >= file_len {
                return Err(format!(
                    "{what} offset {off:#x} is past the end of the file"
                ));
            }
        }
        // Every guest cluster needs an L1 entry's worth of L2 coverage.
        let l2_entries = h.cluster_size() / 8;
        let needed_l1 = h.size.div_ceil(h.cluster_size() * l2_entries);
        if u64::from(h.l1_size) < needed_l1 {
            return Err(format!(
                "L1 table of {} entries cannot map {} bytes",
                h.l1_size, h.size
            ));
        }
        h.parse_extensions(b)?;
        h.parse_backing_name(b)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, b: &[u8]) -> Result<(), String> {
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > b.len() {
                // Version 2 images may end the header without an end marker.
                self.extensions_end = at.min(b.len());
                return Ok(());
            }
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            let data_at = at + 8;
            if kind == EXT_END {
                self.extensions_end = data_at;
                return Ok(());
            }
            let Some(data) = b.get(data_at..data_at.saturating_add(len)) else {
                return Err(format!(
                    "header extension {kind:#x} runs past the first cluster"
                ));
            };
            let text = || {
                String::from_utf8(data.to_vec())
                    .map_err(|_| format!("header extension {kind:#x} is not UTF-8"))
            };
            match kind {
                EXT_BACKING_FORMAT => self.backing_format = Some(text()?),
                EXT_DATA_FILE => self.data_file = Some(text()?),
                EXT_FEATURE_TABLE => {}
                _ => self.other_extensions.push((kind, data.to_vec())),
            }
            at = data_at + len.next_multiple_of(8);
        }
    }

    fn parse_backing_name(&mut self, b: &[u8]) -> Result<(), String> {
        let off = be64(b, 8);
        let len = be32(b, 16) as usize;
        if off == 0 {
            return Ok(());
        }
        if len == 0 || len > MAX_BACKING_NAME {
            return Err(format!("backing file name length {len} is invalid"));
        }
        let Some(name) = usize::try_from(off)
            .ok()
            .and_then(|off| b.get(off..off.checked_add(len)?))
        else {
            return Err("backing file name lies outside the first cluster".into());
        };
        let name = std::str::from_utf8(name).map_err(|_| "backing file name is not UTF-8")?;
        if name.contains('\0') {
            return Err("backing file name holds a NUL byte".into());
        }
        self.backing_file = Some(name.to_string());
        Ok(())
    }

    /// Which features of this image vessel cannot serve; None when it can.
    pub fn unsupported(&self) -> Option<String> {
        use incompatible::*;
        if self.crypt_method != 0 {
            return Some("the image is encrypted (vessel does not open encrypted images)".into());
        }
        if self.incompatible & CORRUPT != 0 {
            return Some(
                "the image is marked corrupt: check and repair it with `qemu-img check -r all`"
                    .into(),
            );
        }
        if self.incompatible & DIRTY != 0 {
            return Some(
                "the image was not closed cleanly (its dirty bit is set): repair its refcounts with `qemu-img check -r all`"
                    .into(),
            );
        }
        if self.incompatible & DATA_FILE != 0 {
            return Some(
                "the image keeps its data in an external data file, which vessel does not open"
                    .into(),
            );
        }
        if self.incompatible & EXTENDED_L2 != 0 {
            return Some(
                "the image uses extended L2 entries (subclusters), which vessel does not read"
                    .into(),
            );
        }
        if let Compression::Other(n) = self.compression {
            return Some(format!(
                "the image's compressed clusters use compression type {n}; vessel reads zlib and zstd"
            ));
        }
        let unknown = self.incompatible & !KNOWN;
        if unknown != 0 {
            return Some(format!(
                "the image uses unknown incompatible features {unknown:#x}"
            ));
        }
        None
    }

    /// The first cluster rewritten with another backing file (or none): the fixed
    /// fields kept, the backing-format extension replaced, other extensions kept, the
    /// name after them. `first` is the current first cluster.
    pub fn with_backing(
        &self,
        first: &[u8],
        backing: Option<(&str, &str)>,
    ) -> Result<Vec<u8>, String> {
        let cluster = self.cluster_size() as usize;
        let mut out = first[..self.header_length as usize].to_vec();
        let push_ext = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some((_, format)) = backing {
            push_ext(&mut out, EXT_BACKING_FORMAT, format.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push_ext(&mut out, EXT_DATA_FILE, d.as_bytes());
        }
        for (kind, data) in &self.other_extensions {
            push_ext(&mut out, *kind, data);
        }
        out.extend_from_slice(&[0u8; 8]);
        let (off, len) = match backing {
            Some((name, _)) => {
                if name.is_empty() || name.len() > MAX_BACKING_NAME {
                    return Err(format!("backing file name of {} bytes", name.len()));
                }
                let off = out.len();
                out.extend_from_slice(name.as_bytes());
                (off as u64, name.len() as u32)
            }
            None => (0, 0),
        };
        if out.len() > cluster {
            return Err("the header and backing file name do not fit in the first cluster".into());
        }
        out[8..16].copy_from_slice(&off.to_be_bytes());
        out[16..20].copy_from_slice(&len.to_be_bytes());
        // Clear what the old header used past the new end.
        let old_end = self.used_bytes(first).max(out.len());
        out.resize(old_end, 0);
        Ok(out)
    }

    /// How far into the first cluster the header, extensions and name reach.
    fn used_bytes(&self, first: &[u8]) -> usize {
        let name_end = if self.backing_file.is_some() {
            (be64(first, 8) + u64::from(be32(first, 16))) as usize
        } else {
            0
        };
        self.extensions_end.max(name_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header as qemu-img writes it: 64 KiB clusters, 1 GiB.
    pub(crate) fn v3(size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(&QCOW_MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn reads_a_plain_header_and_refuses_damage() {
        let b = v3(1 << 30);
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size), (3, 65536, 1 << 30));
        assert_eq!(h.backing_file, None);
        assert_eq!(h.unsupported(), None);
        let damage: [(usize, &[u8]); 8] = [
            (4, &[0, 0, 0, 4]),               // version
            (20, &[0, 0, 0, 30]),             // cluster bits
            (24, &[0xff; 8]),                 // size
            (40, &[0, 0, 0, 0, 0, 0, 0, 1]),  // L1 offset unaligned
            (36, &[0, 0, 0, 0]),              // L1 too small
            (100, &[0xff, 0xff, 0xff, 0xf8]), // header length
            (96, &[0, 0, 0, 7]),              // refcount order
            (56, &[0, 0, 0, 0]),              // no refcount table
        ];
        for (at, bytes) in damage {
            let mut bad = b.clone();
            bad[at..at + bytes.len()].copy_from_slice(bytes);
            let e = Header::parse(&bad, 1 << 20).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(Header::parse(&b[..50], 1 << 20).is_err());
        assert!(Header::parse(&b, 0x20000).is_err(), "L1 past the end");
    }

    #[test]
    fn backing_names_round_trip_through_a_rewrite() {
        let b = v3(1 << 30);
        let h = Header::parse(&b, 1 << 20).unwrap();
        let new = h
            .with_backing(&b, Some(("../base.qcow2", "qcow2")))
            .unwrap();
        let mut first = b.clone();
        first[..new.len()].copy_from_slice(&new);
        let h2 = Header::parse(&first, 1 << 20).unwrap();
        assert_eq!(h2.backing_file.as_deref(), Some("../base.qcow2"));
        assert_eq!(h2.backing_format.as_deref(), Some("qcow2"));
        let none = h2.with_backing(&first, None).unwrap();
        first[..none.len()].copy_from_slice(&none);
        let h3 = Header::parse(&first, 1 << 20).unwrap();
        assert_eq!((h3.backing_file, h3.backing_format), (None, None));
        assert!(
            h.with_backing(&b, Some((&"x".repeat(2000), "raw")))
                .is_err()
        );
    }

    #[test]
    fn unsupported_features_are_named() {
        let mut b = v3(1 << 30);
        b[79] = incompatible::DIRTY as u8;
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert!(h.unsupported().unwrap().contains("qemu-img check -r all"));
        let mut b = v3(1 << 30);
        b[79] = incompatible::COMPRESSION_TYPE as u8;
        b[104] = 1;
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(h.compression, Compression::Zstd);
        assert_eq!(h.unsupported(), None);
        b[104] = 7;
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert!(h.unsupported().unwrap().contains("type 7"));
    }
}
