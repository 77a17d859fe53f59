//! Where vessel keeps its VMs: `$VESSEL_HOME`, else `/var/lib/vessel` for root, else
//! `~/.local/share/vessel`. VMs live under `vms/`; `host.toml` describes the host.

use std::path::{Path, PathBuf};

use crate::error::ManagerError;

#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Home {
    pub fn from_env() -> Result<Self, ManagerError> {
        let root = match std::env::var_os("VESSEL_HOME") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ if is_root() => PathBuf::from("/var/lib/vessel"),
            _ => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".local/share/vessel"),
                None => {
                    return Err(ManagerError::Other(
                        "neither VESSEL_HOME nor HOME is set: nowhere to keep VMs".into(),
                    ));
                }
            },
        };
        Ok(Home::at(root))
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Home { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn host_config(&self) -> PathBuf {
        self.root.join("host.toml")
    }

    /// Held while admitting and starting a VM, so two starts cannot both take the last
    /// of the host's memory.
    pub fn admission_lock(&self) -> PathBuf {
        self.root.join(".admission.lock")
    }
}
