//! Getting the agent into a guest: where its binary is on the host, a stripped copy of it
//! for an image, and the systemd unit that runs it in a distribution.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary's name.
pub const BINARY: &str = "vessel-agent";
/// Where images (and the documented manual install) put it.
pub const INSTALL_PATH: &str = "/usr/local/sbin/vessel-agent";
/// The unit's name and text, for distributions with systemd.
pub const UNIT_NAME: &str = "vessel-agent.service";
pub const UNIT: &str = include_str!("../vessel-agent.service");

/// `$VESSEL_AGENT`, else `vessel-agent` next to the running program (or one directory
/// up, for cargo's test binaries in `deps/`).
pub fn beside_exe() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VESSEL_AGENT").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(BINARY))
        .find(|p| p.is_file())
}

/// The binary at `path` without symbols and debug information (binutils' strip, via a
/// file in `scratch`), or as it is when strip is not installed.
pub fn stripped(path: &Path, scratch: &Path) -> std::io::Result<Vec<u8>> {
    let out = scratch.join(format!(".{BINARY}.stripped-{}", std::process::id()));
    let done = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&out)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    let bytes = std::fs::read(if done { &out } else { path });
    let _ = std::fs::remove_file(&out);
    bytes
}
