//! Building an image: mmdebstrap installs the recipe's packages from Debian's archive
//! into a temporary root, a customize hook adds vessel's files and turns the root into an
//! ext4 disk (`mke2fs -d`, no loop mounts, so it works wherever mmdebstrap does), and the
//! kernel and initramfs are kept beside the disk for direct boot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::error::ImageError;
use crate::guest::{self, ROOT_LABEL};
use crate::recipe::Recipe;
use crate::{DISK, INITRD, KERNEL, Manifest};

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// A recipe name (`debian-12`).
    pub recipe: String,
    /// The name to store it under (default: the recipe's).
    pub name: Option<String>,
    /// The disk's size in bytes (sparse).
    pub size: u64,
    /// Packages on top of the recipe's.
    pub packages: Vec<String>,
    /// The guest agent to install (with its systemd unit, enabled); None: no agent.
    pub agent: Option<PathBuf>,
}

pub const DEFAULT_SIZE: u64 = 8 << 30;

/// Finds a tool on PATH, also in the sbin directories a non-root PATH leaves out.
pub(crate) fn tool(name: &'static str, package: &'static str) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(ImageError::MissingTool {
            tool: name,
            package,
        })
}

/// Builds `recipe` into `out` (an empty directory), reporting progress line by line.
pub(crate) fn build_into(
    recipe: &Recipe,
    req: &BuildRequest,
    name: &str,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ImageError> {
    let mmdebstrap = tool("mmdebstrap", "mmdebstrap")?;
    let mke2fs = tool("mke2fs", "e2fsprogs")?;
    let started = Instant::now();
    let staged = out.join("files");
    stage_files(&staged)?;
    let mut enable: Vec<&str> = guest::ENABLED_UNITS.to_vec();
    if let Some(agent) = &req.agent {
        stage_agent(&staged, agent)?;
        enable.push(agent::install::UNIT_NAME);
    }
    let hook = out.join("customize.sh");
    std::fs::write(
        &hook,
        customize_script(&staged, out, &mke2fs, req.size, &enable),
    )
    .map_err(ImageError::io(&hook))?;
    let mut packages: Vec<&str> = recipe.packages.to_vec();
    packages.extend(req.packages.iter().map(String::as_str));
    let mut cmd = Command::new(&mmdebstrap);
    cmd.arg("--variant=apt")
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!("--customize-hook=sh {} \"$1\"", hook.display()))
        .arg(recipe.suite)
        .arg("/dev/null")
        .args(recipe.sources)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(ImageError::io(&mmdebstrap))?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            progress(&line);
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(ImageError::io(&mmdebstrap))?;
    let _ = std::fs::remove_dir_all(&staged);
    let _ = std::fs::remove_file(&hook);
    if !status.success() {
        return Err(failure(name, req.size, &tail));
    }
    let kernel_version = std::fs::read_to_string(out.join("kernel-version"))
        .map_err(ImageError::io(out.join("kernel-version")))?
        .trim()
        .to_string();
    let _ = std::fs::remove_file(out.join("kernel-version"));
    Ok(Manifest {
        format: crate::FORMAT,
        recipe: recipe.name.to_string(),
        kernel_version,
        size: req.size,
        packages: req.packages.clone(),
        built_unix: crate::now_unix(),
        build_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The one line a failed build deserves, from the end of mmdebstrap's output.
fn failure(name: &str, size: u64, tail: &[String]) -> ImageError {
    let text = tail.join("\n");
    if text.contains("Could not allocate block") || text.contains("No space left") {
        return ImageError::DiskTooSmall {
            size: crate::human_size(size),
        };
    }
    let reason = tail
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("vessel-image: "))
        .or_else(|| {
            tail.iter()
                .rev()
                .find(|l| l.starts_with("E: ") && !l.contains("mmdebstrap failed"))
                .map(String::as_str)
        })
        .unwrap_or("mmdebstrap failed")
        .to_string();
    ImageError::BuildFailed {
        name: name.to_string(),
        reason,
    }
}

/// Writes vessel's guest files into `dir`, laid out as in the image.
fn stage_files(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for f in guest::files() {
        let path = dir.join(f.path.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(ImageError::io(parent))?;
        }
        std::fs::write(&path, &f.text).map_err(ImageError::io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode))
            .map_err(ImageError::io(&path))?;
    }
    Ok(())
}

/// The guest agent (stripped) and its unit, laid out as in the image.
fn stage_agent(dir: &Path, binary: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let bytes = agent::install::stripped(binary, dir).map_err(ImageError::io(binary))?;
    let unit = format!("etc/systemd/system/{}", agent::install::UNIT_NAME);
    for (path, mode, data) in [
        (
            agent::install::INSTALL_PATH.trim_start_matches('/'),
            0o755,
            bytes.as_slice(),
        ),
        (unit.as_str(), 0o644, agent::install::UNIT.as_bytes()),
    ] {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(ImageError::io(parent))?;
        }
        std::fs::write(&path, data).map_err(ImageError::io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(ImageError::io(&path))?;
    }
    Ok(())
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// The customize hook: runs with the finished root as `$1` (inside mmdebstrap's user
/// namespace when it is not run as root, so ownership comes out right).
fn customize_script(
    staged: &Path,
    out: &Path,
    mke2fs: &Path,
    size: u64,
    enable: &[&str],
) -> String {
    let enable = enable.join(" ");
    let disable = guest::DISABLED_UNITS.join(" ");
    format!(
        r#"#!/bin/sh
set -eu
root="$1"
fail() {{ echo "vessel-image: $*" >&2; exit 1; }}
cp -R {staged}/. "$root/"
(cd {staged} && find . -type f) | while read -r f; do chown 0:0 "$root/$f"; done
chroot "$root" systemctl enable {enable}
chroot "$root" systemctl disable {disable}
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# Per-VM identity is made on each VM's first boot, never shared through the image.
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
kernel=$(ls "$root"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || fail "the packages installed no kernel in /boot"
version=${{kernel##*/vmlinuz-}}
[ -f "$root/boot/initrd.img-$version" ] || fail "no initramfs for kernel $version"
cp "$kernel" {out}/{KERNEL}
cp "$root/boot/initrd.img-$version" {out}/{INITRD}
echo "$version" >{out}/kernel-version
# mmdebstrap has /proc, /sys and /dev mounted in the root: a plain bind mount of the root
# shows them as the empty directories the disk must hold.
view={out}/root-view
mkdir "$view"
mount --bind "$root" "$view" || fail "cannot bind-mount the root to copy it"
made=0
{mke2fs} -q -t ext4 -L {ROOT_LABEL} -d "$view" {out}/{DISK} {kib}k || made=$?
umount "$view"
rmdir "$view"
[ $made -eq 0 ] || fail "mke2fs could not make the disk"
"#,
        staged = quote(staged),
        out = quote(out),
        mke2fs = quote(mke2fs),
        kib = size / 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_is_valid_shell() {
        let s = customize_script(
            Path::new("/tmp/it's"),
            Path::new("/o"),
            Path::new("/sbin/mke2fs"),
            8 << 30,
            &["vessel-ready.service", agent::install::UNIT_NAME],
        );
        let out = Command::new("sh").args(["-n", "-c", &s]).output().unwrap();
        assert!(out.status.success(), "{out:?}\n{s}");
        assert!(s.contains("'/tmp/it'\\''s'/."), "{s}");
        assert!(s.contains(" 8388608k "), "{s}");
        assert!(
            s.contains("systemctl enable vessel-ready.service vessel-agent.service"),
            "{s}"
        );
    }

    #[test]
    fn failures_are_one_line_with_the_cause() {
        let e = failure(
            "d",
            1 << 30,
            &["Could not allocate block in ext2 filesystem".into()],
        );
        assert_eq!(
            e.to_string(),
            "the disk (1 GiB) is too small for the packages: give a larger --size"
        );
        let e = failure(
            "d",
            1 << 30,
            &[
                "E: Unable to locate package nope".into(),
                "E: mmdebstrap failed to run".into(),
            ],
        );
        assert_eq!(
            e.to_string(),
            "building d failed: E: Unable to locate package nope"
        );
    }
}
