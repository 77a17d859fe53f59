//! A VM bundle: one folder per VM under `<home>/vms/NAME`.

use std::path::PathBuf;

use crate::error::ManagerError;
use crate::home::Home;
use crate::spec::VmSpec;
use crate::status::Status;

/// A bundle and its config, or why the config is unusable.
pub type Listed = (Bundle, Result<VmSpec, ManagerError>);

#[derive(Clone, Debug)]
pub struct Bundle {
    pub name: String,
    pub dir: PathBuf,
}

pub fn check_name(name: &str) -> Result<(), ManagerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ManagerError::BadName(name.to_string()))
    }
}

impl Bundle {
    fn at(home: &Home, name: &str) -> Result<Self, ManagerError> {
        check_name(name)?;
        Ok(Bundle {
            name: name.to_string(),
            dir: home.vms_dir().join(name),
        })
    }

    /// A new bundle with `spec`, in state "created".
    pub fn create(home: &Home, name: &str, spec: &VmSpec) -> Result<Self, ManagerError> {
        // The spec comes from the command line here, not from a file.
        spec.validate().map_err(ManagerError::Other)?;
        Self::create_with(home, name, |_| Ok(spec.clone()))
    }

    /// A new bundle whose folder `fill` populates (disks, kernel...) and describes, before
    /// it appears under its name: a failure anywhere leaves no folder behind.
    pub fn create_with(
        home: &Home,
        name: &str,
        fill: impl FnOnce(&std::path::Path) -> Result<VmSpec, ManagerError>,
    ) -> Result<Self, ManagerError> {
        let b = Self::at(home, name)?;
        std::fs::create_dir_all(home.vms_dir()).map_err(ManagerError::io(home.vms_dir()))?;
        if b.dir.exists() {
            return Err(ManagerError::Exists(name.to_string()));
        }
        // Dot-folders are not bundles (`list` skips them).
        let tmp = home
            .vms_dir()
            .join(format!(".{name}.new-{}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(ManagerError::io(&tmp))?;
        let staged = Bundle {
            name: b.name.clone(),
            dir: tmp.clone(),
        };
        let filled = fill(&tmp)
            .and_then(|spec| spec.validate().map_err(ManagerError::Other).map(|()| spec))
            .and_then(|spec| staged.save_spec(&spec))
            .and_then(|()| Status::created().write(&staged.status_path()));
        if let Err(e) = filled {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // rename(2) would replace an empty directory: another create of the same name
        // in the meantime must win instead.
        match std::fs::create_dir(&b.dir) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ManagerError::Exists(name.to_string())
                } else {
                    ManagerError::io(&b.dir)(e)
                });
            }
        }
        if let Err(e) = std::fs::rename(&tmp, &b.dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::remove_dir(&b.dir);
            return Err(ManagerError::io(&b.dir)(e));
        }
        Ok(b)
    }

    pub fn open(home: &Home, name: &str) -> Result<Self, ManagerError> {
        let b = Self::at(home, name)?;
        if !b.vm_toml().is_file() {
            return Err(ManagerError::NoSuchVm(name.to_string()));
        }
        Ok(b)
    }

    /// Every bundle, sorted by name; a folder whose config is invalid is reported as an
    /// error in the list, never skipped.
    pub fn list(home: &Home) -> Result<Vec<Listed>, ManagerError> {
        let dir = home.vms_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ManagerError::io(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ManagerError::io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Folders being made by `create_with` are not VMs yet.
            if !entry.path().is_dir() || name.starts_with('.') {
                continue;
            }
            let bundle = Bundle {
                dir: entry.path(),
                name: name.clone(),
            };
            let spec = check_name(&name).and_then(|()| bundle.spec());
            out.push((bundle, spec));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    pub fn vm_toml(&self) -> PathBuf {
        self.dir.join("vm.toml")
    }
    pub fn status_path(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// The monitor's own messages (stderr).
    pub fn monitor_log(&self) -> PathBuf {
        self.dir.join("monitor.log")
    }
    /// Held by the monitor's processes while any of them lives.
    pub fn monitor_lock(&self) -> PathBuf {
        self.dir.join("monitor.lock")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    pub fn spec(&self) -> Result<VmSpec, ManagerError> {
        let path = self.vm_toml();
        let text = std::fs::read_to_string(&path).map_err(ManagerError::io(&path))?;
        VmSpec::from_toml(&path, &text)
    }

    pub fn save_spec(&self, spec: &VmSpec) -> Result<(), ManagerError> {
        let path = self.vm_toml();
        let tmp = path.with_extension("toml.tmp");
        let text = format!(
            "# vessel VM {}. Paths are relative to this folder; kernel = \"kit\" is the default guest.\n{}",
            self.name,
            spec.to_toml()
        );
        std::fs::write(&tmp, text).map_err(ManagerError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(ManagerError::io(&path))
    }

    /// The state, with a dead monitor read as crashed. A bundle copied without its
    /// status file counts as created.
    pub fn status(&self) -> Status {
        Status::read(&self.status_path())
            .map(Status::effective)
            .unwrap_or_else(|_| Status::created())
    }

    /// The last `n` lines of the serial log.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let text = std::fs::read(self.serial_log()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    pub fn remove(self) -> Result<(), ManagerError> {
        std::fs::remove_dir_all(&self.dir).map_err(ManagerError::io(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Restart;

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 1,
            memory: "64M".into(),
            kernel: "kit".into(),
            initrd: None,
            cmdline: None,
            accel: "kvm".into(),
            restart: Restart::OnReboot,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            shares: Vec::new(),
            memory_backing: None,
            balloon: false,
            memory_merge: false,
            memory_min: None,
            memory_shares: None,
            seccomp: None,
            sandbox: None,
            memory_compress: None,
            cpu_model: None,
            vmgenid: None,
            cpu: Default::default(),
        }
    }

    #[test]
    fn create_open_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let b = Bundle::create(&home, "web", &spec()).unwrap();
        assert!(matches!(
            Bundle::create(&home, "web", &spec()),
            Err(ManagerError::Exists(_))
        ));
        assert_eq!(Bundle::open(&home, "web").unwrap().spec().unwrap(), spec());
        assert!(matches!(
            Bundle::open(&home, "db"),
            Err(ManagerError::NoSuchVm(_))
        ));
        assert_eq!(b.status().state, crate::status::VmState::Created);
        // A broken bundle is listed with its error.
        Bundle::create(&home, "broken", &spec()).unwrap();
        std::fs::write(home.vms_dir().join("broken/vm.toml"), "cpus = \"two\"").unwrap();
        let list = Bundle::list(&home).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].1.is_err() && list[1].1.is_ok());
        b.remove().unwrap();
        assert_eq!(Bundle::list(&home).unwrap().len(), 1);
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "web-1", "db_2.test", "9lives"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn a_bundle_whose_filling_fails_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let err = Bundle::create_with(&home, "img", |d| {
            std::fs::write(d.join("disk.raw"), b"half").unwrap();
            Err(ManagerError::Other("copy failed".into()))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "copy failed");
        assert_eq!(std::fs::read_dir(home.vms_dir()).unwrap().count(), 0);
        let b = Bundle::create_with(&home, "img", |d| {
            std::fs::write(d.join("disk.raw"), b"whole").map_err(ManagerError::io(d))?;
            Ok(spec())
        })
        .unwrap();
        assert_eq!(std::fs::read(b.dir.join("disk.raw")).unwrap(), b"whole");
        assert_eq!(Bundle::list(&home).unwrap().len(), 1);
    }

    #[test]
    fn a_copied_folder_is_a_vm() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let b = Bundle::create(&home, "orig", &spec()).unwrap();
        let copy = home.vms_dir().join("copy");
        std::fs::create_dir(&copy).unwrap();
        std::fs::copy(b.vm_toml(), copy.join("vm.toml")).unwrap();
        assert_eq!(Bundle::open(&home, "copy").unwrap().spec().unwrap(), spec());
    }
}
