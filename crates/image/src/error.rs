use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("no image named {0} (see vessel image ls; vessel image build debian-12 makes one)")]
    NoSuchImage(String),
    #[error("unknown image recipe {0:?}: vessel builds {recipes}", recipes = crate::recipe::NAMES.join(", "))]
    UnknownRecipe(String),
    #[error(
        "invalid image name {0:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    BadName(String),
    #[error("an image named {0} already exists (vessel image rm {0}, or build with --force)")]
    Exists(String),
    #[error(
        "image {name} is incomplete: {what} is missing (rebuild it: vessel image build {recipe} --force)"
    )]
    Incomplete {
        name: String,
        recipe: String,
        what: String,
    },
    #[error(
        "image {name} was built by another version of vessel: rebuild it (vessel image build {recipe} --force)"
    )]
    Outdated { name: String, recipe: String },
    #[error("{tool} not found: install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("the disk ({size}) is too small for the packages: give a larger --size")]
    DiskTooSmall { size: String },
    #[error("building {name} failed: {reason}")]
    BuildFailed { name: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
}

impl ImageError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }
}
