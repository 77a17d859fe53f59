//! `--share` options: `HOSTDIR[,tag=T][,readonly=on]`.

use std::path::PathBuf;

use crate::virtio::options::{on_off, pairs};

/// The longest tag the device configuration holds.
pub const MAX_TAG: usize = 36;
/// The first share's tag when none is given (what the kit mounts at /mnt/share).
pub const DEFAULT_TAG: &str = "share";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory the guest sees.
    pub dir: PathBuf,
    /// What the guest mounts: `mount -t virtiofs TAG /mnt`.
    pub tag: String,
    pub readonly: bool,
}

impl ShareConfig {
    /// Parses a spec; `default_tag` names it when it says no tag.
    pub fn parse(spec: &str, default_tag: &str) -> Result<Self, String> {
        let mut dir = None;
        let mut tag = default_tag.to_string();
        let mut readonly = false;
        for (k, v) in pairs(spec, "path")? {
            match k {
                "path" if !v.is_empty() => dir = Some(PathBuf::from(v)),
                "tag" => tag = v.to_string(),
                "readonly" => readonly = on_off(k, v)?,
                _ => {
                    return Err(format!(
                        "unknown share option {k:?} (HOSTDIR[,tag=T][,readonly=on])"
                    ));
                }
            }
        }
        let dir = dir.ok_or("a share needs a host directory: HOSTDIR[,tag=T][,readonly=on]")?;
        if tag.is_empty() || tag.len() > MAX_TAG || tag.chars().any(|c| c.is_whitespace()) {
            return Err(format!("tag {tag:?}: 1 to {MAX_TAG} bytes without spaces"));
        }
        Ok(ShareConfig { dir, tag, readonly })
    }

    pub fn to_spec(&self) -> String {
        let mut s = format!("{},tag={}", self.dir.display(), self.tag);
        if self.readonly {
            s.push_str(",readonly=on");
        }
        s
    }

    /// The default tag of the share at `index`: `share`, `share1`, `share2`...
    pub fn default_tag(index: usize) -> String {
        match index {
            0 => DEFAULT_TAG.to_string(),
            i => format!("{DEFAULT_TAG}{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directory_tag_and_readonly() {
        let s = ShareConfig::parse("/srv/data", "share").unwrap();
        assert_eq!(
            (s.dir.to_str(), s.tag.as_str(), s.readonly),
            (Some("/srv/data"), "share", false)
        );
        let s = ShareConfig::parse("/srv,tag=docs,readonly=on", "share").unwrap();
        assert_eq!((s.tag.as_str(), s.readonly), ("docs", true));
        assert_eq!(ShareConfig::parse(&s.to_spec(), "x").unwrap(), s);
        for bad in [
            "",
            "tag=x",
            "/d,tag=",
            "/d,tag=a b",
            "/d,readonly=maybe",
            "/d,cache=none",
        ] {
            assert!(ShareConfig::parse(bad, "share").is_err(), "{bad}");
        }
        let long = format!("/d,tag={}", "t".repeat(MAX_TAG + 1));
        assert!(ShareConfig::parse(&long, "share").is_err());
        assert_eq!(ShareConfig::default_tag(2), "share2");
    }
}
