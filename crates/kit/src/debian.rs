//! Fetching and unpacking Debian packages with the host's own apt-get and dpkg-deb.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::KitError;

/// A downloaded package file with its name and version.
#[derive(Debug, Clone)]
pub(crate) struct Deb {
    pub path: PathBuf,
    pub package: String,
    pub version: String,
}

fn run(tool: &'static str, args: &[&str], cwd: Option<&Path>) -> Result<Output, KitError> {
    let mut cmd = Command::new(tool);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KitError::ToolMissing { tool },
        _ => KitError::ToolFailed {
            command: format!("{tool} {}", args.join(" ")),
            detail: e.to_string(),
        },
    })
}

/// The last non-empty stderr line: apt and dpkg put the reason there.
fn reason(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().rev().find(|l| !l.trim().is_empty());
    line.unwrap_or("no error output").trim().to_string()
}

/// `apt-get download` one package (optionally `name=version`) into `dir`. On a fresh
/// machine apt's package lists are empty: as root, refresh them once and retry.
pub(crate) fn download(spec: &str, dir: &Path) -> Result<Deb, KitError> {
    static REFRESHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match download_once(spec, dir) {
        Err(KitError::AptListsEmpty { .. })
            if running_as_root() && !REFRESHED.swap(true, std::sync::atomic::Ordering::SeqCst) =>
        {
            tracing::info!("apt package lists are empty or stale: running apt-get update");
            let out = run("apt-get", &["update", "-q"], None)?;
            if !out.status.success() {
                return Err(KitError::AptDownload {
                    package: "(apt-get update)".into(),
                    detail: reason(&out),
                });
            }
            download_once(spec, dir)
        }
        result => result,
    }
}

/// Is this process root? (From /proc, to keep this crate free of unsafe code.)
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn download_once(spec: &str, dir: &Path) -> Result<Deb, KitError> {
    let package = spec.split('=').next().unwrap_or(spec).to_string();
    // As root apt drops to the `_apt` user, which cannot write into a cache under /root
    // and says so; downloading as ourselves keeps the output clean and the file ours.
    let out = run(
        "apt-get",
        &["download", "-q", "-o", "APT::Sandbox::User=root", spec],
        Some(dir),
    )?;
    if !out.status.success() {
        return Err(download_error(package, &out));
    }
    let prefix = format!("{package}_");
    let entries = std::fs::read_dir(dir).map_err(KitError::io(dir))?;
    for entry in entries {
        let path = entry.map_err(KitError::io(dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            let version = field(&path, "Version")?;
            return Ok(Deb {
                path,
                package,
                version,
            });
        }
    }
    Err(KitError::DebMissing {
        package,
        dir: dir.to_path_buf(),
    })
}

/// Tells "apt knows no way to get this package" (the lists are missing or stale) from
/// other failures, such as the network.
fn download_error(package: String, out: &Output) -> KitError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let no_source = [
        "Unable to locate package",
        "has no installation candidate",
        "Can't select",
        "Can't find a source to download",
    ];
    if no_source.iter().any(|s| stderr.contains(s)) {
        KitError::AptListsEmpty { package }
    } else {
        KitError::AptDownload {
            package,
            detail: reason(out),
        }
    }
}

/// One control field of a .deb (`dpkg-deb -f`), empty if the package has none.
pub(crate) fn field(deb: &Path, name: &str) -> Result<String, KitError> {
    let path = deb.to_string_lossy();
    let out = run("dpkg-deb", &["-f", &path, name], None)?;
    if !out.status.success() {
        return Err(KitError::ToolFailed {
            command: format!("dpkg-deb -f {path} {name}"),
            detail: reason(&out),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Unpacks a .deb's files under `dest` (`dpkg-deb -x`), without installing anything.
pub(crate) fn extract(deb: &Path, dest: &Path) -> Result<(), KitError> {
    let (deb, dest) = (deb.to_string_lossy(), dest.to_string_lossy());
    let out = run("dpkg-deb", &["-x", &deb, &dest], None)?;
    if !out.status.success() {
        return Err(KitError::ToolFailed {
            command: format!("dpkg-deb -x {deb} {dest}"),
            detail: reason(&out),
        });
    }
    Ok(())
}

/// From a Depends field, the versioned kernel image package as `name=version` (or just
/// `name` when unversioned): the one `linux-image-cloud-amd64` points at.
pub(crate) fn kernel_dependency(depends: &str) -> Option<String> {
    depends.split([',', '|']).map(str::trim).find_map(|alt| {
        let (name, rest) = alt.split_once(' ').unwrap_or((alt, ""));
        let versioned = name.starts_with("linux-image-")
            && name.ends_with("-cloud-amd64")
            && name != "linux-image-cloud-amd64"
            && name.as_bytes().get(12).is_some_and(u8::is_ascii_digit);
        if !versioned {
            return None;
        }
        let version = rest
            .trim()
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(str::trim);
        Some(match version {
            Some(v) => format!("{name}={v}"),
            None => name.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn failed(stderr: &str) -> Output {
        Output {
            status: std::process::ExitStatus::from_raw(100 << 8),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn empty_package_lists_say_run_apt_get_update() {
        for stderr in [
            "E: Unable to locate package linux-image-cloud-amd64\n",
            "E: Can't find a source to download version '1:1.35.0-4' of 'busybox-static:amd64'\n",
        ] {
            let err = download_error("p".into(), &failed(stderr));
            assert!(matches!(err, KitError::AptListsEmpty { .. }), "{stderr}");
            assert!(err.to_string().contains("run apt-get update"));
        }
        let net = "W: x\nE: Failed to fetch http://deb.debian.org/x  Could not resolve 'deb.debian.org'\n\n";
        let err = download_error("p".into(), &failed(net));
        assert_eq!(
            err.to_string(),
            "apt-get download p failed: E: Failed to fetch http://deb.debian.org/x  Could not resolve 'deb.debian.org'"
        );
    }

    #[test]
    fn a_missing_tool_names_itself() {
        let err = run("vessel-no-such-tool", &[], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vessel-no-such-tool not found: vessel kit needs a Debian host"
        );
    }

    #[test]
    fn kernel_dependency_is_read_from_depends() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64=6.1.192-2")
        );
        assert_eq!(
            kernel_dependency("kmod, linux-image-6.1.0-9-cloud-amd64 | foo").as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-9-cloud-amd64 (>= 6.1)").as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(kernel_dependency(""), None);
        assert_eq!(
            kernel_dependency("linux-image-cloud-amd64, linux-image-amd64"),
            None
        );
    }
}
