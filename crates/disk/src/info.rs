//! What an image is: its format, sizes and the whole backing chain, read from the
//! headers alone (nothing is opened for writing, nothing is locked).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::DiskError;
use crate::chain::{Seen, backing_format, file_len, read_header, resolve_backing};
use crate::format::{Detected, Format, detect};
use crate::qcow2::header::{compatible, incompatible};

#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes the host file system holds for the file (holes not counted).
    pub allocated: u64,
    pub file_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<Qcow2Info>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub compression: String,
    pub lazy_refcounts: bool,
    pub dirty: bool,
    pub corrupt: bool,
    pub internal_snapshots: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<String>,
}

/// The image and every image below it, top first.
pub fn chain(path: &Path, format: Option<Format>) -> Result<Vec<Layer>, DiskError> {
    let mut out = Vec::new();
    let mut seen = Seen::default();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((path, format)) = next.take() {
        seen.enter(&path)?;
        let file = File::open(&path).map_err(DiskError::io(&path))?;
        let format = match format {
            Some(f) => f,
            None => match detect(&file).map_err(DiskError::io(&path))? {
                Detected::Raw => Format::Raw,
                Detected::Qcow2 => Format::Qcow2,
                Detected::Foreign(format) => return Err(DiskError::Foreign { path, format }),
            },
        };
        let meta = file.metadata().map_err(DiskError::io(&path))?;
        let file_size = file_len(&path, &file)?;
        let mut layer = Layer {
            path: path.clone(),
            format,
            virtual_size: file_size,
            allocated: meta.blocks() * 512,
            file_size,
            qcow2: None,
        };
        if format == Format::Qcow2 {
            let (h, _) = read_header(&path, &file)?;
            layer.virtual_size = h.size;
            if let Some(name) = &h.backing_file {
                let below = resolve_backing(&path, name);
                let below_file = File::open(&below).map_err(|e| DiskError::Backing {
                    path: path.clone(),
                    backing: name.clone(),
                    why: e.to_string(),
                })?;
                let f = backing_format(&path, name, h.backing_format.as_deref(), &below_file)?;
                next = Some((below, Some(f)));
            }
            layer.qcow2 = Some(Qcow2Info {
                version: h.version,
                cluster_size: h.cluster_size(),
                refcount_bits: 1 << h.refcount_order,
                compression: h.compression.name(),
                lazy_refcounts: h.compatible & compatible::LAZY_REFCOUNTS != 0,
                dirty: h.incompatible & incompatible::DIRTY != 0,
                corrupt: h.incompatible & incompatible::CORRUPT != 0,
                internal_snapshots: h.nb_snapshots,
                backing_file: h.backing_file.clone(),
                backing_format: h.backing_format.clone(),
            });
        }
        out.push(layer);
    }
    Ok(out)
}
