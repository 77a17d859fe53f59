use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::format::Foreign;

/// Why a disk image cannot be opened, made or changed: one line each, naming the file.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a regular file or block device", path = .0.display())]
    NotAFile(PathBuf),
    #[error("{path}: in use by another process (it holds a lock on the image)", path = .0.display())]
    Locked(PathBuf),
    #[error("{path}: smaller than one 512-byte sector", path = .0.display())]
    TooSmall(PathBuf),
    #[error("{path}: not a valid qcow2 image: {why}", path = .path.display())]
    BadQcow2 { path: PathBuf, why: String },
    #[error("{path}: {why}", path = .path.display())]
    Unsupported { path: PathBuf, why: String },
    #[error(
        "{path}: a {format} image; vessel serves raw and qcow2 disks: import it with `vessel disk convert {path} NEW.qcow2`",
        path = .path.display(), format = .format.name()
    )]
    Foreign { path: PathBuf, format: Foreign },
    #[error("{path}: the image says it is {said}, but --disk said format={given}", path = .path.display())]
    FormatMismatch {
        path: PathBuf,
        said: &'static str,
        given: &'static str,
    },
    #[error("{path}: backing file {backing}: {why}", path = .path.display())]
    Backing {
        path: PathBuf,
        backing: String,
        why: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{tool} not found: install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed: {message}")]
    ToolFailed { tool: &'static str, message: String },
}

impl DiskError {
    /// `map_err(DiskError::io(path))`.
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
        move |source| DiskError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn bad_qcow2(path: &Path, why: impl Into<String>) -> DiskError {
        DiskError::BadQcow2 {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, why: impl Into<String>) -> DiskError {
        DiskError::Unsupported {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }
}
