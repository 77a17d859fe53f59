use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup CPU controller on this host (neither a cgroup v1 `cpu` hierarchy nor `cpu` in cgroup v2's controllers)"
    )]
    NoCpuController,
    #[error("{path}: {source}{hint}", path = .path.display(), hint = hint(.source))]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    BadPolicy(String),
    #[error("host CPU affinity: {0}")]
    Affinity(io::Error),
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            " (cgroup controls need root, or a cgroup delegated to this user)"
        }
        _ => "",
    }
}

impl CgroupError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CgroupError {
        let path = path.into();
        move |source| CgroupError::Io { path, source }
    }
}
