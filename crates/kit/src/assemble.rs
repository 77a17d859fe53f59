//! The build itself: download, unpack, extract vmlinux, pack the initramfs and the root
//! disk, and publish the result atomically so a reader never sees half a kit.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::cpio::CpioWriter;
use crate::debian::{self, Deb};
use crate::modules::{ModulePlan, ModuleTree};
use crate::tree::Tree;
use crate::{
    AGENT_NAME, Agent, DEFAULT_CMDLINE, KIT_FORMAT, Kit, KitError, MANIFEST, bootmark, init,
    locate, rootfs,
};

const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Drivers for the devices vessel offers; the build fails without them.
const REQUIRED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
];
/// ACPI power button to input events, for acpid; shipped only if the kernel has them.
/// vsock, for the guest agent; virtio-fs, for shared folders; the memory balloon.
const OPTIONAL_MODULES: &[&str] = &[
    "button",
    "evdev",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_balloon",
];

/// Removes a build's scratch directory however the build ends.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds under the cache's lock, re-checking for a kit another process just finished.
pub(crate) fn build_locked(
    cache: &Path,
    force: bool,
    agent: Option<&Agent>,
) -> Result<Kit, KitError> {
    fs::create_dir_all(cache).map_err(KitError::io(cache))?;
    let lock_path = cache.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(KitError::io(&lock_path))?;
    lock.lock().map_err(KitError::io(&lock_path))?;
    if !force
        && let Some(kit) = locate(cache)
        && agent.is_none_or(|a| kit.agent.as_ref() == Some(&a.id))
    {
        return Ok(kit);
    }
    remove_leftovers(cache)?;
    let started = Instant::now();
    let scratch = Scratch(cache.join(format!(".build-{}", std::process::id())));
    fs::create_dir_all(&scratch.0).map_err(KitError::io(&scratch.0))?;
    let out = scratch.0.join("kit");
    let manifest = assemble(&scratch.0, &out, agent)?;
    publish(cache, &out, &manifest)?;
    let kit = locate(cache).ok_or_else(|| KitError::Manifest {
        dir: cache.join("current"),
        reason: "the kit just built is not complete".into(),
    })?;
    tracing::info!(
        "kit built in {:.1?} at {}",
        started.elapsed(),
        kit.dir.display()
    );
    Ok(kit)
}

/// Scratch directories of interrupted builds and kits no longer `current`.
fn remove_leftovers(cache: &Path) -> Result<(), KitError> {
    let current = fs::read_link(cache.join("current")).ok();
    for entry in fs::read_dir(cache).map_err(KitError::io(cache))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_kit = name.starts_with("kit-") && current.as_deref() != Some(Path::new(&name));
        if name.starts_with(".build-") || name.starts_with(".current-") || stale_kit {
            let path = entry.path();
            let removed = if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(KitError::io(&path))?;
        }
    }
    Ok(())
}

/// Moves the finished `out` directory into the cache and points `current` at it.
fn publish(cache: &Path, out: &Path, manifest: &str) -> Result<(), KitError> {
    let manifest_path = out.join(MANIFEST);
    fs::write(&manifest_path, manifest).map_err(KitError::io(&manifest_path))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!("kit-{}-{}", stamp.as_millis(), std::process::id());
    let dest = cache.join(&name);
    fs::rename(out, &dest).map_err(KitError::io(&dest))?;
    let link = cache.join(format!(".current-{}", std::process::id()));
    std::os::unix::fs::symlink(&name, &link).map_err(KitError::io(&link))?;
    let current = cache.join("current");
    let old = fs::read_link(&current).ok();
    // rename(2) replaces the old symlink in one step: readers see the old kit or the new.
    fs::rename(&link, &current).map_err(KitError::io(&current))?;
    if let Some(old) = old.filter(|o| o != Path::new(&name)) {
        let _ = fs::remove_dir_all(cache.join(old));
    }
    Ok(())
}

/// Downloads and unpacks the packages under `work`, writes the kit files into `out`, and
/// returns the manifest text.
fn assemble(work: &Path, out: &Path, agent: Option<&Agent>) -> Result<String, KitError> {
    let debs = work.join("debs");
    let mkdir = |d: &Path| fs::create_dir_all(d).map_err(KitError::io(d));
    mkdir(&debs)?;
    mkdir(out)?;

    let meta = debian::download(KERNEL_META_PACKAGE, &debs)?;
    let depends = debian::field(&meta.path, "Depends")?;
    let kernel_spec =
        debian::kernel_dependency(&depends).ok_or_else(|| KitError::NoKernelDependency {
            package: KERNEL_META_PACKAGE.into(),
            depends: depends.clone(),
        })?;
    let kernel = debian::download(&kernel_spec, &debs)?;
    let busybox = debian::download(BUSYBOX_PACKAGE, &debs)?;
    tracing::info!(
        "downloaded {} {} and {} {}",
        kernel.package,
        kernel.version,
        busybox.package,
        busybox.version
    );

    let kernel_root = work.join("kernel");
    let busybox_root = work.join("busybox");
    debian::extract(&kernel.path, &kernel_root)?;
    debian::extract(&busybox.path, &busybox_root)?;

    let (bzimage_path, kernel_version) = find_bzimage(&kernel_root)?;
    let bzimage = fs::read(&bzimage_path).map_err(KitError::io(&bzimage_path))?;
    let vmlinux = crate::extract_vmlinux(&bzimage)?;

    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| kernel_root.join(d).join(&kernel_version))
        .find(|d| d.is_dir())
        .ok_or_else(|| KitError::PackageContent {
            what: "lib/modules/<version>",
            dir: kernel_root.clone(),
        })?;
    let plan = ModuleTree::scan(&modules_root)?.plan(REQUIRED_MODULES, OPTIONAL_MODULES)?;
    let mut system = system_tree(&busybox_root, &modules_root, &kernel_version, &plan)?;
    if let Some(a) = agent {
        tree_agent(&mut system, stripped(&a.path, work)?);
    } else {
        tracing::warn!(
            "no {AGENT_NAME} beside vessel: the kit has no guest agent (cargo build --release builds it)"
        );
    }
    let initrd = initramfs(system.clone(), &kernel_version, &plan)?;
    root_disk(
        system,
        &kernel_version,
        &plan,
        work,
        &out.join(rootfs::ROOTFS_FILE),
    )?;

    for (name, data) in [
        ("bzImage", &bzimage),
        ("vmlinux", &vmlinux),
        ("initrd.img", &initrd),
    ] {
        let path = out.join(name);
        fs::write(&path, data).map_err(KitError::io(&path))?;
    }
    manifest(
        &kernel_version,
        &[&meta, &kernel, &busybox],
        &plan,
        agent.map(|a| a.id.as_str()),
    )
}

/// The agent without its symbols and debug information: smaller in the initramfs.
fn stripped(path: &Path, work: &Path) -> Result<Vec<u8>, KitError> {
    agent::install::stripped(path, work).map_err(KitError::io(path))
}

/// The guest agent at `/sbin/vessel-agent`, started by both inits.
fn tree_agent(tree: &mut Tree, binary: Vec<u8>) {
    tree.file(init::AGENT_PATH, 0o755, binary);
}

/// `boot/vmlinuz-<version>` in the unpacked kernel package.
fn find_bzimage(kernel_root: &Path) -> Result<(PathBuf, String), KitError> {
    let boot = kernel_root.join("boot");
    let missing = || KitError::PackageContent {
        what: "boot/vmlinuz-*",
        dir: kernel_root.to_path_buf(),
    };
    fs::read_dir(&boot)
        .map_err(|_| missing())?
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            Some((e.path(), version))
        })
        .ok_or_else(missing)
}

/// What both the initramfs and the root disk hold: busybox and its applet links, the
/// modules, the boot-mark program, a minimal /etc, acpid's power-button action and the
/// halt script.
fn system_tree(
    busybox_root: &Path,
    modules_root: &Path,
    kernel_version: &str,
    plan: &ModulePlan,
) -> Result<Tree, KitError> {
    let mut tree = Tree::default();
    for dir in [
        "dev", "proc", "sys", "run", "etc", "bin", "sbin", "usr/bin", "usr/sbin", "mnt", "var",
    ] {
        tree.dir(dir, 0o755);
    }
    tree.dir("tmp", 0o1777);
    tree.dir("root", 0o700);

    let busybox_path = busybox_root.join("bin/busybox");
    let busybox = fs::read(&busybox_path).map_err(|_| KitError::PackageContent {
        what: "bin/busybox",
        dir: busybox_root.to_path_buf(),
    })?;
    tree.file("bin/busybox", 0o755, busybox);
    for applet in busybox_applets(&busybox_path)? {
        if applet != "bin/busybox" {
            tree.symlink(&applet, "/bin/busybox");
        }
    }

    let modules_dir = format!("lib/modules/{kernel_version}");
    for module in plan.required.iter().chain(&plan.optional) {
        let src = modules_root.join(&module.rel_path);
        let data = fs::read(&src).map_err(KitError::io(&src))?;
        tree.file(
            &format!("{modules_dir}/{}", module.rel_path.display()),
            0o644,
            data,
        );
    }
    tree.file(
        &format!("{modules_dir}/modules.dep"),
        0o644,
        plan.modules_dep(),
    );

    tree.file(bootmark::BOOT_MARK_PATH, 0o755, bootmark::boot_mark_elf()?);
    tree.file("etc/hostname", 0o644, "vessel\n");
    tree.file(
        "etc/hosts",
        0o644,
        "127.0.0.1\tlocalhost\n127.0.1.1\tvessel\n",
    );
    tree.file("etc/passwd", 0o644, "root::0:0:root:/root:/bin/sh\n");
    tree.file("etc/group", 0o644, "root:x:0:\n");
    tree.symlink("etc/mtab", "/proc/self/mounts");
    tree.file("etc/acpid.conf", 0o644, init::ACPID_CONF);
    tree.file(
        init::POWER_BUTTON_HANDLER_PATH,
        0o755,
        init::power_button_handler(),
    );
    tree.file(init::HALT_PATH, 0o755, init::halt_script());
    tree.file(init::DHCP_SCRIPT_PATH, 0o755, init::dhcp_script());
    Ok(tree)
}

/// The gzip-compressed newc initramfs: the system, `/dev/console` and `/init`.
fn initramfs(mut tree: Tree, kernel_version: &str, plan: &ModulePlan) -> Result<Vec<u8>, KitError> {
    tree.file("init", 0o755, init::initramfs_init(kernel_version, plan));
    let mut cpio = CpioWriter::new(GzEncoder::new(Vec::new(), Compression::default()));
    tree.write_cpio(&mut cpio)?;
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    let mut gz = cpio.finish()?;
    gz.flush()
        .map_err(|e| KitError::Cpio(format!("gzip: {e}")))?;
    gz.finish()
        .map_err(|e| KitError::Cpio(format!("gzip: {e}")))
}

/// The root disk image at `image`: the system with the disk's own `/sbin/init` (in place
/// of busybox's), staged under `work` and packed by mkfs.ext4.
fn root_disk(
    mut tree: Tree,
    kernel_version: &str,
    plan: &ModulePlan,
    work: &Path,
    image: &Path,
) -> Result<(), KitError> {
    let started = Instant::now();
    tree.file("sbin/init", 0o755, init::disk_init(kernel_version, plan));
    let staging = work.join("rootfs");
    fs::create_dir_all(&staging).map_err(KitError::io(&staging))?;
    tree.write_dir(&staging)?;
    rootfs::make_image(&staging, image, rootfs::ROOTFS_SIZE)?;
    let allocated = fs::metadata(image).map_err(KitError::io(image))?.blocks() * 512;
    tracing::info!(
        "root disk built in {:.1?}: {} MiB, {:.1} MiB allocated",
        started.elapsed(),
        rootfs::ROOTFS_SIZE >> 20,
        allocated as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// The applets busybox offers, with their install paths (`sbin/insmod`), from
/// `busybox --list-full`; the binary is static, so the host can run it.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, KitError> {
    let command = format!("{} --list-full", busybox.display());
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| KitError::ToolFailed {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if !out.status.success() || !applets.iter().any(|a| a.ends_with("/sh")) {
        return Err(KitError::ToolFailed {
            command,
            detail: "no usable applet list (no sh)".into(),
        });
    }
    Ok(applets)
}

/// The kit.toml text: format, kernel version, package versions and modules.
fn manifest(
    kernel_version: &str,
    debs: &[&Deb],
    plan: &ModulePlan,
    agent: Option<&str>,
) -> Result<String, KitError> {
    let quote = |v: &str| -> Result<String, KitError> {
        if v.chars()
            .all(|c| (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ')
        {
            Ok(format!("\"{v}\""))
        } else {
            Err(KitError::Manifest {
                dir: PathBuf::from(MANIFEST),
                reason: format!("value {v:?} cannot be written"),
            })
        }
    };
    let mut text = String::from("# The vessel kit; `vessel kit --force` rebuilds it.\n");
    text.push_str(&format!("format = {KIT_FORMAT}\n"));
    text.push_str(&format!("kernel_version = {}\n", quote(kernel_version)?));
    text.push_str(&format!("cmdline = {}\n", quote(DEFAULT_CMDLINE)?));
    text.push_str(&format!("rootfs = {}\n", quote(rootfs::ROOTFS_FILE)?));
    text.push_str(&format!("rootfs_size = {}\n", rootfs::ROOTFS_SIZE));
    let names = |mods: &[crate::modules::Module]| -> Result<String, KitError> {
        let quoted: Result<Vec<String>, KitError> = mods.iter().map(|m| quote(&m.name)).collect();
        Ok(format!("[{}]", quoted?.join(", ")))
    };
    text.push_str(&format!("modules = {}\n", names(&plan.required)?));
    text.push_str(&format!("optional_modules = {}\n", names(&plan.optional)?));
    if let Some(id) = agent {
        text.push_str(&format!("agent = {}\n", quote(id)?));
    }
    text.push_str("\n[packages]\n");
    for deb in debs {
        text.push_str(&format!(
            "{} = {}\n",
            quote(&deb.package)?,
            quote(&deb.version)?
        ));
    }
    Ok(text)
}
