//! What `--disk` asks for.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use disk::Format;

use crate::virtio::options::{on_off, pairs};
use crate::virtio::rate_limit::Limits;

/// The most bytes of a disk ID (the serial the guest reads with GET_ID).
pub const ID_BYTES: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// The image (or a block device).
    pub path: PathBuf,
    /// raw or qcow2; None: told by the content when opened (vessel create records it).
    #[serde(default)]
    pub format: Option<Format>,
    pub readonly: bool,
    /// The serial the guest sees (`/sys/block/vda/serial`); at most 20 bytes. Default:
    /// the image's file name, cut to 20 bytes.
    pub id: Option<String>,
    /// Rate limits (bytes and operations per second).
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
    /// Disks naming one group share one set of buckets (its first disk's limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl BlockConfig {
    /// Parses `path=FILE[,format=raw|qcow2][,readonly=on][,id=NAME][,bw=RATE]
    /// [,bw_burst=SIZE][,iops=N][,iops_burst=N][,group=NAME]` (a bare first item is the
    /// path; RATE is bytes per second, e.g. 10M).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut format = None;
        let mut readonly = false;
        let mut id = None;
        let mut limits = Limits::default();
        let mut group = None;
        for (k, v) in pairs(s, "path")? {
            if limits.parse_option(k, v)? {
                continue;
            }
            match k {
                "group" if v.is_empty() => return Err("group is empty".into()),
                "group" => group = Some(v.to_string()),
                "path" if v.is_empty() => return Err("path is empty".into()),
                "path" => path = Some(PathBuf::from(v)),
                "format" => {
                    format = Some(Format::parse(v).ok_or_else(|| {
                        format!("format '{v}' (vessel serves raw and qcow2 disks)")
                    })?)
                }
                "readonly" | "ro" => readonly = on_off(k, v)?,
                "id" | "serial" => {
                    if v.len() > ID_BYTES {
                        return Err(format!("id '{v}' is longer than {ID_BYTES} bytes"));
                    }
                    id = Some(v.to_string());
                }
                _ => {
                    return Err(format!(
                        "unknown option '{k}' (expected path, format, readonly, id, bw, bw_burst, iops, iops_burst, group)"
                    ));
                }
            }
        }
        let path = path.ok_or("path=FILE is missing")?;
        limits.validate()?;
        Ok(BlockConfig {
            path,
            format,
            readonly,
            id,
            limits,
            group,
        })
    }

    /// The spec `parse` reads back.
    pub fn to_spec(&self) -> String {
        let mut s = format!("path={}", self.path.display());
        if let Some(f) = self.format {
            s += &format!(",format={f}");
        }
        if self.readonly {
            s += ",readonly=on";
        }
        if let Some(id) = &self.id {
            s += &format!(",id={id}");
        }
        s += &self.limits.to_spec();
        if let Some(g) = &self.group {
            s += &format!(",group={g}");
        }
        s
    }

    /// The serial the guest sees, as text (the ID, or the image's file name, cut to 20
    /// bytes): what a copy of the disk must keep.
    pub fn serial(&self) -> String {
        let bytes = self.id_bytes();
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(ID_BYTES);
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    /// The ID bytes GET_ID answers with (NUL-padded).
    pub fn id_bytes(&self) -> [u8; ID_BYTES] {
        let name = match &self.id {
            Some(id) => id.clone(),
            None => self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut id = [0u8; ID_BYTES];
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let c = BlockConfig::parse("path=/img/a.raw,readonly=on,id=root").unwrap();
        assert_eq!(c.path, PathBuf::from("/img/a.raw"));
        assert_eq!(c.format, None);
        let q = BlockConfig::parse("path=a.qcow2,format=qcow2,bw=10M,iops=50,group=g").unwrap();
        assert_eq!(q.limits.bytes.unwrap().per_second, 10 << 20);
        assert_eq!(q.group.as_deref(), Some("g"));
        assert_eq!(q.format, Some(Format::Qcow2));
        assert_eq!(BlockConfig::parse(&q.to_spec()).unwrap(), q);
        assert!(c.readonly);
        assert_eq!(c.id.as_deref(), Some("root"));
        assert_eq!(&c.id_bytes()[..5], b"root\0");
        let c = BlockConfig::parse("disk.img").unwrap();
        assert!(!c.readonly);
        assert_eq!(&c.id_bytes()[..9], b"disk.img\0");
        for bad in [
            "",
            "readonly=on",
            "path=a,readonly=maybe",
            "path=a,colour=red",
            "path=a,format=vmdk",
            "path=a,id=123456789012345678901",
            "path=a,bw=lots",
            "path=a,iops_burst=3",
            "path=",
            "a,b",
        ] {
            let e = BlockConfig::parse(bad).unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
