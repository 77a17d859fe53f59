//! The kit: vessel's default guest, a Debian cloud kernel plus a busybox initramfs and a
//! busybox ext4 root disk, built from the host's own Debian packages so `vessel run` works
//! with no kernel at hand.
//!
//! Layout of the cache directory (see [`default_cache_dir`]):
//! ```text
//! <cache>/current -> kit-<stamp>   symlink, swapped atomically when a build completes
//! <cache>/kit-<stamp>/             bzImage, vmlinux, initrd.img, root.ext4, kit.toml
//! <cache>/.build-<pid>/            scratch space of a running build
//! <cache>/.lock                    serialises builds
//! ```

mod assemble;
mod bootmark;
pub mod bzimage;
pub mod cpio;
mod debian;
mod elf;
mod error;
mod init;
mod modules;
mod rootfs;
mod tree;

use std::path::{Path, PathBuf};

pub use bootmark::{BOOT_MARK_PATH, BOOT_TIMER_PORT};
pub use bzimage::{extract_vmlinux, pvh_entry};
pub use error::KitError;
pub use init::{
    ADDRESS_MARKER_PREFIX, AGENT_MARKER, INIT_MARKER, POWER_BUTTON_MARKER, ROOT_MARKER_PREFIX,
    SHARE_MARKER_PREFIX,
};
pub use rootfs::fresh_rootfs;

/// The kernel command line the kit expects: serial console, quiet (every console byte is
/// a port exit for the VMM), reboot on panic so a broken guest ends instead of hanging,
/// and no crypto self-tests (they verify the kernel's own crypto code at every boot: more
/// than half the boot's instructions on a software CPU).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 cryptomgr.notests";
/// What init prints after running a command from the command line, before the status.
pub const EXIT_STATUS_PREFIX: &str = "VESSEL-KIT: exit status ";
/// Bumped whenever the kit's contents change meaning, so older kits are rebuilt.
const KIT_FORMAT: u32 = 7;
const MANIFEST: &str = "kit.toml";

/// How to get a kit.
#[derive(Debug, Clone, Default)]
pub struct KitOptions {
    /// Where kits are cached; `None` means [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Rebuild even if a complete kit is cached.
    pub force: bool,
    /// The guest agent to put in the kit (`/sbin/vessel-agent`); `None` means the
    /// one built beside this program (`agent::install::beside_exe`), if any. A cached kit with
    /// another agent is rebuilt.
    pub agent: Option<PathBuf>,
}

/// The name of the guest agent's binary.
pub const AGENT_NAME: &str = agent::install::BINARY;

/// An identity for an agent binary: FNV-1a over its bytes, in hex.
fn agent_id(path: &Path) -> Result<String, KitError> {
    let bytes = std::fs::read(path).map_err(KitError::io(path))?;
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    Ok(format!("{hash:016x}"))
}

/// A complete kit on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    pub dir: PathBuf,
    /// The kernel as Debian ships it (x86 boot protocol).
    pub bzimage: PathBuf,
    /// The same kernel as an ELF file with a PVH entry note.
    pub vmlinux: PathBuf,
    /// gzip-compressed cpio initramfs with busybox, the virtio modules and `/init`.
    pub initrd: PathBuf,
    /// A raw ext4 image (sparse) holding the same system with its own `/sbin/init`: the
    /// initramfs switches to it with `root=/dev/vda` on the command line. The cached one
    /// stays pristine: boot a copy from [`fresh_rootfs`].
    pub rootfs: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// The identity of the guest agent in the kit, if it has one.
    pub agent: Option<String>,
}

/// The kernel command line for the kit: [`DEFAULT_CMDLINE`], then `extra`, then (after
/// ` -- `) a shell command init runs before powering off. The command is passed quoted, so
/// it reaches init as one argument (the kernel allows at most 32).
pub fn cmdline(extra: &str, command: Option<&str>) -> String {
    let mut line = DEFAULT_CMDLINE.to_string();
    if !extra.trim().is_empty() {
        line.push(' ');
        line.push_str(extra.trim());
    }
    if let Some(cmd) = command {
        line.push_str(" -- ");
        if cmd.contains('"') {
            line.push_str(cmd);
        } else {
            line.push_str(&format!("\"{cmd}\""));
        }
    }
    line
}

/// `$VESSEL_KIT_DIR`, else `$XDG_CACHE_HOME/vessel/kit`, else `$HOME/.cache/vessel/kit`.
pub fn default_cache_dir() -> Result<PathBuf, KitError> {
    cache_dir_from(|name| std::env::var_os(name))
}

fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf, KitError> {
    let var = |name| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("VESSEL_KIT_DIR") {
        return Ok(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Ok(xdg.join("vessel/kit"));
    }
    var("HOME")
        .map(|home| home.join(".cache/vessel/kit"))
        .ok_or(KitError::NoCacheDir)
}

/// The complete kit in `dir` (a cache directory, or a kit directory itself), if there is
/// one of the current format; never touches the network.
pub fn locate(dir: &Path) -> Option<Kit> {
    let kit_dir = if dir.join(MANIFEST).is_file() {
        dir.to_path_buf()
    } else {
        dir.join("current")
    };
    let manifest = std::fs::read_to_string(kit_dir.join(MANIFEST)).ok()?;
    if manifest_value(&manifest, "format")? != KIT_FORMAT.to_string() {
        return None;
    }
    let kit = Kit {
        bzimage: kit_dir.join("bzImage"),
        vmlinux: kit_dir.join("vmlinux"),
        initrd: kit_dir.join("initrd.img"),
        rootfs: kit_dir.join(rootfs::ROOTFS_FILE),
        kernel_version: manifest_value(&manifest, "kernel_version")?.to_string(),
        agent: manifest_value(&manifest, "agent").map(str::to_string),
        dir: kit_dir,
    };
    let complete = [&kit.bzimage, &kit.vmlinux, &kit.initrd, &kit.rootfs]
        .iter()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0));
    complete.then_some(kit)
}

/// The kit: the cached one if complete (unless `force`), else a fresh build from Debian's
/// packages, which needs apt-get, dpkg-deb and the network.
pub fn build(opts: &KitOptions) -> Result<Kit, KitError> {
    let cache = match &opts.cache_dir {
        Some(dir) => dir.clone(),
        None => default_cache_dir()?,
    };
    let agent = match opts.agent.clone().or_else(agent::install::beside_exe) {
        Some(path) => Some(Agent {
            id: agent_id(&path)?,
            path,
        }),
        None => None,
    };
    if !opts.force
        && let Some(kit) = locate(&cache)
        && agent
            .as_ref()
            .is_none_or(|a| kit.agent.as_ref() == Some(&a.id))
    {
        return Ok(kit);
    }
    assemble::build_locked(&cache, opts.force, agent.as_ref())
}

/// The guest agent a build puts in.
pub(crate) struct Agent {
    pub path: PathBuf,
    pub id: String,
}

/// A `key = value` line's value from the manifest, without TOML string quotes.
fn manifest_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_quotes_the_command_into_one_init_argument() {
        assert_eq!(cmdline("", None), DEFAULT_CMDLINE);
        assert_eq!(
            cmdline(" vessel.poweroff ", Some("echo hello; ls /")),
            format!("{DEFAULT_CMDLINE} vessel.poweroff -- \"echo hello; ls /\"")
        );
        assert_eq!(
            cmdline("", Some("echo \"x\"")),
            format!("{DEFAULT_CMDLINE} -- echo \"x\"")
        );
    }

    #[test]
    fn cache_dir_prefers_the_override_then_xdg_then_home() {
        fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
        }
        let all = [
            ("VESSEL_KIT_DIR", "/k"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)).unwrap(), Path::new("/k"));
        assert_eq!(
            cache_dir_from(env(&all[1..])).unwrap(),
            Path::new("/x/vessel/kit")
        );
        let relative_xdg = [
            ("VESSEL_KIT_DIR", ""),
            ("XDG_CACHE_HOME", "x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            cache_dir_from(env(&relative_xdg)).unwrap(),
            Path::new("/h/.cache/vessel/kit")
        );
        assert!(matches!(
            cache_dir_from(env(&[])),
            Err(KitError::NoCacheDir)
        ));
    }

    #[test]
    fn locate_wants_a_complete_kit_of_this_format() {
        let dir = std::env::temp_dir().join(format!("kit-locate-{}", std::process::id()));
        let kit_dir = dir.join("kit-1");
        std::fs::create_dir_all(&kit_dir).unwrap();
        std::os::unix::fs::symlink("kit-1", dir.join("current")).unwrap();
        assert_eq!(locate(&dir), None);
        for f in ["bzImage", "vmlinux", "initrd.img", "root.ext4"] {
            std::fs::write(kit_dir.join(f), b"x").unwrap();
        }
        assert_eq!(locate(&dir), None, "no manifest");
        let manifest = kit_dir.join(MANIFEST);
        std::fs::write(&manifest, "format = 0\nkernel_version = \"6.1.0-x\"\n").unwrap();
        assert_eq!(locate(&dir), None, "old format");
        std::fs::write(
            &manifest,
            format!("format = {KIT_FORMAT}\nkernel_version = \"6.1.0-x\"\n"),
        )
        .unwrap();
        let kit = locate(&dir).unwrap();
        assert_eq!(kit.kernel_version, "6.1.0-x");
        assert_eq!(kit.initrd, dir.join("current/initrd.img"));
        assert_eq!(locate(&kit_dir).unwrap().dir, kit_dir);
        std::fs::write(kit_dir.join("vmlinux"), b"").unwrap();
        assert_eq!(locate(&dir), None, "empty vmlinux");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
