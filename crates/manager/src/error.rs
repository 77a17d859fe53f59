use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error(
        "invalid VM name {0:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 64"
    )]
    BadName(String),
    #[error("no VM named {0}")]
    NoSuchVm(String),
    #[error("a VM named {0} already exists")]
    Exists(String),
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {name} is {state}: {what}")]
    WrongState {
        name: String,
        state: String,
        what: String,
    },
    #[error("cannot start {name}: {missing}")]
    Admission { name: String, missing: String },
    #[error("{name}: cgroup controls: {reason}")]
    Cgroup { name: String, reason: String },
    #[error("{0}")]
    Api(#[from] api::ClientError),
    #[error("{0}")]
    Other(String),
}

impl ManagerError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ManagerError {
        let path = path.into();
        move |source| ManagerError::Io { path, source }
    }
}
