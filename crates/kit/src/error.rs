//! The one error type of the kit: every way building or finding the kit can fail.

use std::path::PathBuf;

/// Why the kit could not be built or read; each message names the problem in one line.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("no cache directory: set VESSEL_KIT_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} not found: vessel kit needs a Debian host")]
    ToolMissing { tool: &'static str },
    #[error("{tool} not found: install the {package} package")]
    ToolNeedsPackage {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{command} failed: {detail}")]
    ToolFailed { command: String, detail: String },
    #[error(
        "apt-get cannot find package {package}: the package lists are empty or stale (run apt-get update)"
    )]
    AptListsEmpty { package: String },
    #[error("apt-get download {package} failed: {detail}")]
    AptDownload { package: String, detail: String },
    #[error("apt-get download {package} left no .deb file in {dir}")]
    DebMissing { package: String, dir: PathBuf },
    #[error(
        "{package} does not depend on a linux-image-*-cloud-amd64 package (Depends: {depends})"
    )]
    NoKernelDependency { package: String, depends: String },
    #[error("{what} not found in the extracted package at {dir}")]
    PackageContent { what: &'static str, dir: PathBuf },
    #[error("bzImage: {0}")]
    BzImage(&'static str),
    #[error("lz4 payload: {0}")]
    Lz4(String),
    #[error("vmlinux: {0}")]
    Vmlinux(&'static str),
    #[error("ELF: {0}")]
    Elf(&'static str),
    #[error("kernel module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("kernel module dependency cycle through {0}")]
    ModuleCycle(String),
    #[error("cpio: {0}")]
    Cpio(String),
    #[error("boot-mark program could not be assembled: {0}")]
    Assemble(String),
    #[error("kit.toml in {dir}: {reason}")]
    Manifest { dir: PathBuf, reason: String },
}

impl KitError {
    /// Wraps an I/O error with the path it concerns, so the message says which file.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> KitError {
        let path = path.into();
        move |source| KitError::Io { path, source }
    }
}
