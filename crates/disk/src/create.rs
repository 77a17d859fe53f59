//! New images: raw files and qcow2 images, optionally on a backing file.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, StorageOpenOptions};

use crate::DiskError;
use crate::format::Format;
use crate::image::{Image, OpenOptions, SECTOR_SIZE};

pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

#[derive(Clone, Debug)]
pub struct Backing {
    pub path: PathBuf,
    /// None: told by its content.
    pub format: Option<Format>,
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub format: Format,
    /// None: the backing file's size.
    pub size: Option<u64>,
    pub backing: Option<Backing>,
    pub cluster_size: Option<u64>,
}

/// Makes a new image at `path` (which must not exist). Sizes round up to whole sectors.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), DiskError> {
    if path.exists() {
        return Err(DiskError::Usage(format!(
            "{} exists: vessel never overwrites an image (remove it first)",
            path.display()
        )));
    }
    let backing = match &opts.backing {
        None => None,
        Some(b) => {
            if opts.format != Format::Qcow2 {
                return Err(DiskError::Usage(
                    "a backing file needs a qcow2 image (--format qcow2)".into(),
                ));
            }
            let base = Image::open(
                &b.path,
                OpenOptions {
                    format: b.format,
                    readonly: true,
                },
            )?;
            Some((backing_name(path, &b.path)?, base.format(), base.size()))
        }
    };
    let size = match (opts.size, &backing) {
        (Some(s), _) => s,
        (None, Some((_, _, s))) => *s,
        (None, None) => return Err(DiskError::Usage("the image needs a size".into())),
    };
    let size = size.next_multiple_of(SECTOR_SIZE);
    if size == 0 || size > crate::qcow2::header::MAX_SIZE {
        return Err(DiskError::Usage(format!(
            "size {size} is out of range (512 bytes to 64 TiB)"
        )));
    }
    let cluster = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    if !cluster.is_power_of_two() || !(4096..=2 << 20).contains(&cluster) {
        return Err(DiskError::Usage(format!(
            "cluster size {cluster} is not a power of two from 4 KiB to 2 MiB"
        )));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(DiskError::io(path))?;
    let result = match opts.format {
        Format::Raw => file.set_len(size).map_err(DiskError::io(path)),
        Format::Qcow2 => qcow2(path, &file, size, cluster, backing.map(|(n, f, _)| (n, f))),
    }
    .and_then(|()| file.sync_all().map_err(DiskError::io(path)));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn qcow2(
    path: &Path,
    file: &File,
    size: u64,
    cluster: u64,
    backing: Option<(String, Format)>,
) -> Result<(), DiskError> {
    let io = DiskError::io(path);
    let dup = file.try_clone().map_err(DiskError::io(path))?;
    let opts = StorageOpenOptions::new().write(true).filename(path);
    let storage = imago::file::File::from_open_file(dup, opts).map_err(DiskError::io(path))?;
    let mut builder = Qcow2::<imago::file::File>::create_builder(storage)
        .size(size)
        .cluster_size(cluster as usize);
    if let Some((name, format)) = backing {
        builder = builder.backing(name, format.name().to_string());
    }
    builder.create().map_err(io)
}

/// The name an overlay at `overlay` records for `base`: the bare file name when both
/// sit in one directory (the pair can move together), else the absolute path.
pub fn backing_name(overlay: &Path, base: &Path) -> Result<String, DiskError> {
    let base_real = std::fs::canonicalize(base).map_err(DiskError::io(base))?;
    let dir = overlay
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir_real = std::fs::canonicalize(dir).map_err(DiskError::io(dir))?;
    let name = if base_real.parent() == Some(dir_real.as_path()) {
        PathBuf::from(base_real.file_name().unwrap_or_default())
    } else {
        base_real
    };
    name.into_os_string()
        .into_string()
        .map_err(|_| DiskError::Usage(format!("{}: the path is not UTF-8", base.display())))
}
