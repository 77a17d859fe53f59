//! Guest images: bootable root disks of real distributions, built from Debian's packages
//! (`vessel image build debian-12`), kept in a cache, and copied into a VM's folder with
//! that VM's own first-boot settings (`vessel create NAME --image debian-12`).
//!
//! ```text
//! <images>/<name>/   disk.raw (ext4, sparse), vmlinuz, initrd.img, image.toml
//! ```
//! A VM made from an image gets its own sparse copy of the disk, the kernel and
//! initramfs, and a seed disk (a tar archive, virtio serial `vessel-seed`) that the
//! image's first-boot service reads: hostname, user, SSH keys. The machine ID and SSH
//! host keys are made by each VM on its first boot, so no two VMs share them.

mod builder;
mod error;
pub mod guest;
pub mod recipe;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use builder::{BuildRequest, DEFAULT_SIZE};
pub use error::ImageError;
pub use guest::{IDENTITY_PREFIX, READY_PREFIX, ROOT_LABEL, SEED_SERIAL};

pub const DISK: &str = "disk.raw";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
pub const SEED: &str = "seed.img";
const MANIFEST: &str = "image.toml";
/// Bumped whenever what vessel puts into an image changes, so older images are rebuilt.
pub const FORMAT: u32 = 4;

/// The kernel command line a VM made from an image boots with: the serial console, the
/// root by label, and no crypto self-tests (a large part of a boot on a software CPU).
pub const CMDLINE: &str = "console=ttyS0 root=LABEL=vessel-root ro quiet cryptomgr.notests";

/// What `image.toml` records about a built image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// What vessel put into the image ([`FORMAT`] when it was built; 0 before it was
    /// recorded).
    #[serde(default)]
    pub format: u32,
    pub recipe: String,
    pub kernel_version: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// Packages added to the recipe's.
    #[serde(default)]
    pub packages: Vec<String>,
    pub built_unix: u64,
    pub build_seconds: f64,
}

/// What a build does with an image of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    Replace,
    /// Keep it if it opens (complete, this format); replace it otherwise.
    KeepIfUsable,
}

/// A built image.
#[derive(Clone, Debug)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL)
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(INITRD)
    }

    /// Bytes the disk takes on the host.
    pub fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.disk()).map_or(0, |m| m.blocks() * 512)
    }
}

/// The per-VM settings a seed disk carries to the first boot.
#[derive(Clone, Debug, Default)]
pub struct Provision {
    pub hostname: String,
    /// The user to create (or, for `root`, the account whose keys to set).
    pub user: String,
    /// OpenSSH public keys, one per line.
    pub authorized_keys: String,
}

/// The files a VM's folder gets from an image (names relative to the folder).
pub struct Provisioned {
    pub disk: &'static str,
    pub kernel: &'static str,
    pub initrd: &'static str,
    pub seed: &'static str,
}

/// An image in a listing: its name, and the image or why it cannot be used.
pub type Listed = (String, Result<Image, ImageError>);

/// Where images live, and the operations on them.
#[derive(Clone, Debug)]
pub struct ImageStore {
    pub dir: PathBuf,
}

pub fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then_some(())
        .ok_or_else(|| ImageError::BadName(name.to_string()))
}

impl ImageStore {
    /// `$VESSEL_IMAGE_DIR`, else `$XDG_CACHE_HOME/vessel/images`, else
    /// `~/.cache/vessel/images`.
    pub fn from_env() -> Result<Self, ImageError> {
        let var = |n| {
            std::env::var_os(n)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = var("VESSEL_IMAGE_DIR")
            .or_else(|| {
                var("XDG_CACHE_HOME")
                    .filter(|p| p.is_absolute())
                    .map(|p| p.join("vessel/images"))
            })
            .or_else(|| var("HOME").map(|h| h.join(".cache/vessel/images")))
            .ok_or_else(|| ImageError::Io {
                path: "~/.cache/vessel/images".into(),
                source: std::io::Error::other("no HOME to keep images under"),
            })?;
        Ok(ImageStore { dir })
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        ImageStore { dir: dir.into() }
    }

    /// The image called `name`, complete (disk, kernel, initramfs and manifest there).
    pub fn open(&self, name: &str) -> Result<Image, ImageError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        let manifest_path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NoSuchImage(name.to_string()));
            }
            Err(e) => return Err(ImageError::io(&manifest_path)(e)),
        };
        let manifest: Manifest = toml::from_str(&text).map_err(|e| ImageError::BadManifest {
            path: manifest_path.clone(),
            reason: e.message().to_string(),
        })?;
        if manifest.format != FORMAT {
            return Err(ImageError::Outdated {
                name: name.to_string(),
                recipe: manifest.recipe,
            });
        }
        for (file, what) in [
            (DISK, "the disk (disk.raw)"),
            (KERNEL, "the kernel (vmlinuz)"),
            (INITRD, "the initramfs (initrd.img)"),
        ] {
            if !dir.join(file).is_file() {
                return Err(ImageError::Incomplete {
                    name: name.to_string(),
                    recipe: manifest.recipe.clone(),
                    what: what.to_string(),
                });
            }
        }
        Ok(Image {
            name: name.to_string(),
            dir,
            manifest,
        })
    }

    /// Every image, sorted by name; an unusable one is listed with its error.
    pub fn list(&self) -> Result<Vec<Listed>, ImageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Builds in progress are hidden (".build-*").
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let image = self.open(&name);
            out.push((name, image));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(ImageError::NoSuchImage(name.to_string()));
        }
        std::fs::remove_dir_all(&dir).map_err(ImageError::io(&dir))
    }

    /// Builds an image. Concurrent builds (another process, another test) wait for each
    /// other; a build that fails leaves nothing in the store. `existing` says what to do
    /// with an image of the same name.
    pub fn build(
        &self,
        req: &BuildRequest,
        existing: Existing,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Image, ImageError> {
        let recipe = recipe::find(&req.recipe)
            .ok_or_else(|| ImageError::UnknownRecipe(req.recipe.clone()))?;
        let name = req.name.clone().unwrap_or_else(|| recipe.name.to_string());
        check_name(&name)?;
        std::fs::create_dir_all(&self.dir).map_err(ImageError::io(&self.dir))?;
        let _lock = self.lock()?;
        let dir = self.dir.join(&name);
        if dir.exists() {
            match existing {
                Existing::Refuse => return Err(ImageError::Exists(name)),
                Existing::KeepIfUsable => {
                    if let Ok(image) = self.open(&name) {
                        return Ok(image);
                    }
                }
                Existing::Replace => {}
            }
        }
        let tmp = self
            .dir
            .join(format!(".build-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(ImageError::io(&tmp))?;
        let built = builder::build_into(&recipe, req, &name, &tmp, progress).and_then(|m| {
            let path = tmp.join(MANIFEST);
            let text = toml::to_string(&m).map_err(|e| ImageError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            std::fs::write(&path, text).map_err(ImageError::io(&path))
        });
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(ImageError::io(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(ImageError::io(&dir))?;
        self.open(&name)
    }

    /// The image `name`, built from the recipe of the same name if it is missing or
    /// unusable (waiting for a build another process has started).
    pub fn get_or_build(
        &self,
        name: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Image, ImageError> {
        if let Ok(image) = self.open(name) {
            return Ok(image);
        }
        let req = BuildRequest {
            recipe: name.to_string(),
            name: None,
            size: DEFAULT_SIZE,
            packages: Vec::new(),
            agent: agent::install::beside_exe(),
        };
        self.build(&req, Existing::KeepIfUsable, progress)
    }

    /// An exclusive lock on the store, held while building.
    fn lock(&self) -> Result<File, ImageError> {
        let path = self.dir.join(".lock");
        let f = File::create(&path).map_err(ImageError::io(&path))?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ImageError::io(&path)(std::io::Error::last_os_error()));
        }
        Ok(f)
    }
}

/// Fills `dir` (a VM's folder) from `image`: a sparse copy of the disk, the kernel and
/// initramfs, and the seed disk with `p`. On error, what was copied is removed.
pub fn provision(image: &Image, dir: &Path, p: &Provision) -> Result<Provisioned, ImageError> {
    let out = Provisioned {
        disk: DISK,
        kernel: KERNEL,
        initrd: INITRD,
        seed: SEED,
    };
    let result = (|| {
        disk::sparse_copy(&image.disk(), &dir.join(out.disk))?;
        for (from, to) in [(image.kernel(), out.kernel), (image.initrd(), out.initrd)] {
            std::fs::copy(&from, dir.join(to)).map_err(ImageError::io(&from))?;
        }
        write_seed(&dir.join(out.seed), p)
    })();
    if let Err(e) = result {
        for f in [out.disk, out.kernel, out.initrd, out.seed] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        return Err(e);
    }
    Ok(out)
}

/// The seed disk: a tar archive (block-aligned, as a disk must be) of the settings.
pub fn write_seed(path: &Path, p: &Provision) -> Result<(), ImageError> {
    let file = File::create(path).map_err(ImageError::io(path))?;
    let mut tar = tar::Builder::new(file);
    for (name, text) in [
        ("hostname", format!("{}\n", p.hostname)),
        ("user", format!("{}\n", p.user)),
        ("authorized_keys", p.authorized_keys.clone()),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_size(text.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(now_unix());
        header.set_cksum();
        tar.append_data(&mut header, name, text.as_bytes())
            .map_err(ImageError::io(path))?;
    }
    let file = tar.into_inner().map_err(ImageError::io(path))?;
    file.sync_all().map_err(ImageError::io(path))
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A byte count as people write it: `8 GiB`, `512 MiB`, `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in units {
        if bytes >= unit {
            let v = bytes as f64 / unit as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.1} {name}")
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_lists_and_refuses_what_is_not_there_or_not_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::at(tmp.path());
        assert!(store.list().unwrap().is_empty());
        assert_eq!(
            store.open("nope").unwrap_err().to_string(),
            "no image named nope (see vessel image ls; vessel image build debian-12 makes one)"
        );
        let dir = tmp.path().join("d12");
        std::fs::create_dir(&dir).unwrap();
        let m = Manifest {
            format: FORMAT,
            recipe: "debian-12".into(),
            kernel_version: "6.1.0-x".into(),
            size: 8 << 30,
            packages: vec![],
            built_unix: 0,
            build_seconds: 1.0,
        };
        std::fs::write(dir.join(MANIFEST), toml::to_string(&m).unwrap()).unwrap();
        std::fs::write(dir.join(DISK), b"").unwrap();
        std::fs::write(dir.join(INITRD), b"").unwrap();
        let err = store.open("d12").unwrap_err().to_string();
        assert_eq!(
            err,
            "image d12 is incomplete: the kernel (vmlinuz) is missing \
             (rebuild it: vessel image build debian-12 --force)"
        );
        std::fs::create_dir(tmp.path().join(".build-x-1")).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1, "builds in progress are not listed");
        assert!(listed[0].1.is_err());
        std::fs::write(dir.join(KERNEL), b"").unwrap();
        assert_eq!(store.open("d12").unwrap().manifest, m);
        store.remove("d12").unwrap();
        assert!(matches!(store.open("d12"), Err(ImageError::NoSuchImage(_))));
        assert!(matches!(store.open("../x"), Err(ImageError::BadName(_))));
    }

    #[test]
    fn unknown_recipes_are_refused_before_anything_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let req = BuildRequest {
            recipe: "windows-95".into(),
            name: None,
            size: DEFAULT_SIZE,
            packages: vec![],
            agent: None,
        };
        let err = ImageStore::at(tmp.path())
            .build(&req, Existing::Refuse, &mut |_| {})
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown image recipe \"windows-95\": vessel builds debian-12"
        );
    }

    #[test]
    fn the_seed_is_a_block_aligned_tar_with_the_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SEED);
        let p = Provision {
            hostname: "web".into(),
            user: "ada".into(),
            authorized_keys: "ssh-ed25519 AAAA ada@host\n".into(),
        };
        write_seed(&path, &p).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len % 512, 0);
        let mut a = tar::Archive::new(File::open(&path).unwrap());
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            seen.push((e.path().unwrap().display().to_string(), s));
        }
        assert_eq!(
            seen,
            [
                ("hostname".to_string(), "web\n".to_string()),
                ("user".into(), "ada\n".into()),
                (
                    "authorized_keys".into(),
                    "ssh-ed25519 AAAA ada@host\n".into()
                ),
            ]
        );
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(8 << 30), "8 GiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(300 << 20), "300 MiB");
    }
}
