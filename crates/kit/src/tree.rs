//! The files of a kit guest system, described once and written either into the initramfs
//! (a cpio archive) or into a directory that `mkfs.ext4 -d` turns into the root disk.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::KitError;
use crate::cpio::CpioWriter;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Relative to the root, without a leading `/`: `bin/busybox`.
    pub path: String,
    /// Permission bits (with sticky/setuid bits), not the file type.
    pub mode: u32,
    pub node: Node,
}

/// Entries in the order they were added; adding a path again replaces its entry in place.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tree {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl Tree {
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, mode, Node::Dir);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.insert(path, mode, Node::File(data.into()));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, 0o777, Node::Symlink(target.to_string()));
    }

    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Entry> {
        let path = path.trim_start_matches('/');
        self.index.get(path).map(|&i| &self.entries[i])
    }

    #[cfg(test)]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn insert(&mut self, path: &str, mode: u32, node: Node) {
        let path = path.trim_start_matches('/').to_string();
        let entry = Entry {
            path: path.clone(),
            mode,
            node,
        };
        match self.index.get(&path) {
            Some(&i) => self.entries[i] = entry,
            None => {
                self.index.insert(path, self.entries.len());
                self.entries.push(entry);
            }
        }
    }

    /// Appends every entry to an archive (which creates missing parents as 0755).
    pub fn write_cpio<W: Write>(&self, cpio: &mut CpioWriter<W>) -> Result<(), KitError> {
        for e in &self.entries {
            match &e.node {
                Node::Dir => cpio.dir(&e.path, e.mode)?,
                Node::File(data) => cpio.file(&e.path, e.mode, data)?,
                Node::Symlink(target) => cpio.symlink(&e.path, target)?,
            }
        }
        Ok(())
    }

    /// Creates every entry under `root` (an existing directory), with exact permissions
    /// whatever the umask; missing parents become 0755 directories.
    pub fn write_dir(&self, root: &Path) -> Result<(), KitError> {
        for e in &self.entries {
            let path = root.join(&e.path);
            if let Some(parent) = Path::new(&e.path).parent() {
                ensure_dirs(root, parent)?;
            }
            match &e.node {
                Node::Dir => {
                    if !path.is_dir() {
                        fs::create_dir(&path).map_err(KitError::io(&path))?;
                    }
                }
                Node::File(data) => fs::write(&path, data).map_err(KitError::io(&path))?,
                Node::Symlink(target) => {
                    std::os::unix::fs::symlink(target, &path).map_err(KitError::io(&path))?
                }
            }
            if !matches!(e.node, Node::Symlink(_)) {
                fs::set_permissions(&path, fs::Permissions::from_mode(e.mode))
                    .map_err(KitError::io(&path))?;
            }
        }
        Ok(())
    }
}

/// Creates `rel` and its ancestors under `root` as 0755 directories where missing.
fn ensure_dirs(root: &Path, rel: &Path) -> Result<(), KitError> {
    let mut path = root.to_path_buf();
    for part in rel.components() {
        path.push(part);
        if !path.is_dir() {
            fs::create_dir(&path).map_err(KitError::io(&path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .map_err(KitError::io(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sample() -> Tree {
        let mut t = Tree::default();
        t.dir("tmp", 0o1777);
        t.file("/bin/busybox", 0o755, b"bb".to_vec());
        t.symlink("sbin/init", "/bin/busybox");
        t.file("etc/acpi/PWRF/00000080", 0o755, b"#!/bin/sh\n".to_vec());
        t
    }

    #[test]
    fn adding_a_path_again_replaces_it_in_place() {
        let mut t = sample();
        t.file("sbin/init", 0o755, b"script".to_vec());
        let paths: Vec<&str> = t.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["tmp", "bin/busybox", "sbin/init", "etc/acpi/PWRF/00000080"]
        );
        assert_eq!(
            t.get("/sbin/init").unwrap().node,
            Node::File(b"script".to_vec())
        );
    }

    #[test]
    fn a_directory_gets_exact_modes_whatever_the_umask() {
        let root = std::env::temp_dir().join(format!("kit-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        sample().write_dir(&root).unwrap();
        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("bin"), 0o755);
        assert_eq!(mode("bin/busybox"), 0o755);
        assert_eq!(mode("etc/acpi/PWRF"), 0o755);
        assert_eq!(
            fs::read_link(root.join("sbin/init")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), b"bb");
        fs::remove_dir_all(&root).unwrap();
    }
}
