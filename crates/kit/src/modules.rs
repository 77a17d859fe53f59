//! Which kernel modules the kit loads and in what order. The Debian package ships no
//! modules.dep (depmod writes it at install), so dependencies come from each `.ko`'s
//! `.modinfo` section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::KitError;
use crate::elf::Elf;

/// The `name=` and `depends=` strings of a module's `.modinfo` section.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
}

pub(crate) fn parse_modinfo(ko: &[u8]) -> Result<ModInfo, KitError> {
    let data = Elf::parse(ko)?
        .section_data(".modinfo")?
        .ok_or(KitError::Elf("no .modinfo section"))?;
    let mut info = ModInfo {
        name: None,
        depends: Vec::new(),
    };
    for entry in data.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some(name) = entry.strip_prefix("name=") {
            info.name = Some(name.to_string());
        } else if let Some(deps) = entry.strip_prefix("depends=") {
            info.depends.extend(
                deps.split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        }
    }
    Ok(info)
}

/// A module file, with its path relative to `lib/modules/<version>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Module {
    pub name: String,
    pub rel_path: PathBuf,
    pub depends: Vec<String>,
}

/// Appends `roots` and everything they depend on to `order`, dependencies first.
/// `lookup` gives a module's file and dependencies; modules already in `order` are kept.
pub(crate) fn load_order(
    roots: &[&str],
    lookup: &mut impl FnMut(&str) -> Result<Module, KitError>,
    order: &mut Vec<Module>,
) -> Result<(), KitError> {
    fn visit(
        name: &str,
        lookup: &mut impl FnMut(&str) -> Result<Module, KitError>,
        order: &mut Vec<Module>,
        visiting: &mut Vec<String>,
    ) -> Result<(), KitError> {
        if order.iter().any(|m| m.name == name) {
            return Ok(());
        }
        if visiting.iter().any(|v| v == name) {
            return Err(KitError::ModuleCycle(name.to_string()));
        }
        let module = lookup(name)?;
        visiting.push(name.to_string());
        for dep in &module.depends {
            visit(dep, lookup, order, visiting)?;
        }
        visiting.pop();
        order.push(module);
        Ok(())
    }
    for root in roots {
        visit(root, lookup, order, &mut Vec::new())?;
    }
    Ok(())
}

/// The modules under one `lib/modules/<version>` directory, by module name.
pub(crate) struct ModuleTree {
    root: PathBuf,
    files: BTreeMap<String, PathBuf>,
}

impl ModuleTree {
    pub fn scan(root: &Path) -> Result<Self, KitError> {
        let mut files = BTreeMap::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).map_err(KitError::io(&dir))? {
                let path = entry.map_err(KitError::io(&dir))?.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "ko") {
                    // The kernel names a module after its file, with '-' read as '_'.
                    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    files.insert(stem.replace('-', "_"), rel);
                }
            }
        }
        Ok(ModuleTree {
            root: root.to_path_buf(),
            files,
        })
    }

    pub fn module(&self, name: &str) -> Result<Module, KitError> {
        let err = |reason: &str| KitError::Module {
            module: name.to_string(),
            reason: reason.to_string(),
        };
        let rel = self
            .files
            .get(name)
            .ok_or_else(|| err("no .ko file for it in the kernel package"))?;
        let path = self.root.join(rel);
        let data = std::fs::read(&path).map_err(KitError::io(&path))?;
        let info = parse_modinfo(&data).map_err(|e| err(&e.to_string()))?;
        if info.name.as_deref().is_some_and(|n| n != name) {
            return Err(err(&format!(
                "{} says its name is {:?}",
                rel.display(),
                info.name
            )));
        }
        Ok(Module {
            name: name.to_string(),
            rel_path: rel.clone(),
            depends: info.depends,
        })
    }

    /// Load order for `required` (any failure is an error), then for each of `optional`
    /// that resolves (one that does not is left out with a warning).
    pub fn plan(&self, required: &[&str], optional: &[&str]) -> Result<ModulePlan, KitError> {
        let mut lookup = |name: &str| self.module(name);
        let mut required_order = Vec::new();
        load_order(required, &mut lookup, &mut required_order)?;
        let mut all = required_order.clone();
        for name in optional {
            let mut attempt = all.clone();
            match load_order(&[name], &mut lookup, &mut attempt) {
                Ok(()) => all = attempt,
                Err(e) => tracing::warn!("optional module {name} left out of the kit: {e}"),
            }
        }
        let optional_order = all.split_off(required_order.len());
        Ok(ModulePlan {
            required: required_order,
            optional: optional_order,
        })
    }
}

/// The modules the kit's init loads, each list in load order.
pub(crate) struct ModulePlan {
    pub required: Vec<Module>,
    pub optional: Vec<Module>,
}

impl ModulePlan {
    /// A modules.dep for the shipped modules, so busybox modprobe works in the guest.
    pub fn modules_dep(&self) -> String {
        let all: Vec<&Module> = self.required.iter().chain(&self.optional).collect();
        let path_of = |name: &str| {
            all.iter()
                .find(|m| m.name == name)
                .map(|m| m.rel_path.display().to_string())
        };
        let mut out = String::new();
        for m in &all {
            let deps: Vec<String> = m.depends.iter().filter_map(|d| path_of(d)).collect();
            out.push_str(&format!("{}: {}\n", m.rel_path.display(), deps.join(" ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 relocatable object with a `.modinfo` section holding `modinfo`.
    fn fake_ko(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        let modinfo_off = f.len() as u64;
        f.extend_from_slice(modinfo);
        let strtab_off = f.len() as u64;
        f.extend_from_slice(shstrtab);
        let shoff = f.len() as u64;
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        for (name, ty, off, size) in [
            (0u32, 0u32, 0u64, 0u64),
            (1, 1, modinfo_off, modinfo.len() as u64),
            (10, 3, strtab_off, shstrtab.len() as u64),
        ] {
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&ty.to_le_bytes());
            sh[24..32].copy_from_slice(&off.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&sh);
        }
        f
    }

    #[test]
    fn modinfo_gives_name_and_dependencies() {
        let ko =
            fake_ko(b"license=GPL\0depends=virtio_ring,virtio\0name=virtio_rng\0vermagic=6.1\0");
        let info = parse_modinfo(&ko).unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_rng"));
        assert_eq!(info.depends, ["virtio_ring", "virtio"]);
        let none = parse_modinfo(&fake_ko(b"depends=\0name=evdev\0")).unwrap();
        assert!(none.depends.is_empty());
    }

    #[test]
    fn malformed_modules_are_errors_not_panics() {
        let ko = fake_ko(b"name=x\0");
        for cut in [0, 10, 63, 64, ko.len() - 1] {
            assert!(parse_modinfo(&ko[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..ko.len() {
            let mut bad = ko.clone();
            bad[i] = 0xff;
            let _ = parse_modinfo(&bad);
        }
    }

    fn graph(edges: &[(&str, &[&str])]) -> impl FnMut(&str) -> Result<Module, KitError> {
        let edges: Vec<(String, Vec<String>)> = edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect();
        move |name| {
            let (_, deps) = edges
                .iter()
                .find(|(n, _)| n == name)
                .ok_or(KitError::Module {
                    module: name.into(),
                    reason: "missing".into(),
                })?;
            Ok(Module {
                name: name.into(),
                rel_path: format!("{name}.ko").into(),
                depends: deps.clone(),
            })
        }
    }

    fn names(order: &[Module]) -> Vec<&str> {
        order.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_come_before_their_users_once_each() {
        let mut lookup = graph(&[
            (
                "virtio_pci",
                &["virtio_ring", "virtio_pci_modern_dev", "virtio"],
            ),
            ("virtio_ring", &["virtio"]),
            ("virtio", &[]),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
        ]);
        let mut order = Vec::new();
        load_order(&["virtio_pci", "virtio_net"], &mut lookup, &mut order).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn cycles_and_missing_modules_are_errors() {
        let mut lookup = graph(&[("a", &["b"]), ("b", &["a"]), ("c", &["nope"])]);
        let mut order = Vec::new();
        assert!(matches!(
            load_order(&["a"], &mut lookup, &mut order),
            Err(KitError::ModuleCycle(_))
        ));
        assert!(matches!(
            load_order(&["c"], &mut lookup, &mut Vec::new()),
            Err(KitError::Module { .. })
        ));
    }
}
