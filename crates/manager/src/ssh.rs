//! SSH access to VMs made from images: vessel's own key pair (so `vessel ssh` works even
//! for a user without one), the user's public keys, and the user's name.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::ManagerError;
use crate::home::Home;

/// vessel's private key for reaching its VMs, `<home>/ssh/id_ed25519`, made with
/// `ssh-keygen` on first use; None when ssh-keygen is not installed.
pub fn vessel_key(home: &Home) -> Result<Option<PathBuf>, ManagerError> {
    let dir = home.root().join("ssh");
    let key = dir.join("id_ed25519");
    if key.is_file() && key.with_extension("pub").is_file() {
        return Ok(Some(key));
    }
    let Some(keygen) = find("ssh-keygen") else {
        return Ok(None);
    };
    std::fs::create_dir_all(&dir).map_err(ManagerError::io(&dir))?;
    let _ = std::fs::remove_file(&key);
    let out = Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vessel"])
        .arg("-f")
        .arg(&key)
        .output()
        .map_err(ManagerError::io(&key))?;
    if !out.status.success() {
        return Err(ManagerError::Other(format!(
            "ssh-keygen could not make {}: {}",
            key.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(Some(key))
}

/// The public keys a new VM's user gets: vessel's own, then `explicit` or else the
/// user's `~/.ssh/id_*.pub`.
pub fn authorized_keys(home: &Home, explicit: Option<&Path>) -> Result<String, ManagerError> {
    let mut keys = String::new();
    if let Some(k) = vessel_key(home)? {
        let pubkey = k.with_extension("pub");
        keys += &std::fs::read_to_string(&pubkey).map_err(ManagerError::io(&pubkey))?;
    }
    let user_keys: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("HOME")
            .map(|h| {
                ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
                    .iter()
                    .map(|n| Path::new(&h).join(".ssh").join(n))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default(),
    };
    for p in user_keys {
        let text = std::fs::read_to_string(&p).map_err(ManagerError::io(&p))?;
        let text = text.trim();
        if !text.starts_with("ssh-") && !text.starts_with("ecdsa-") {
            return Err(ManagerError::Other(format!(
                "{}: not an OpenSSH public key",
                p.display()
            )));
        }
        keys += text;
        keys.push('\n');
    }
    Ok(keys)
}

/// The name of the user running vessel (`$USER`, else the password database).
pub fn user_name() -> String {
    if let Some(u) = std::env::var("USER").ok().filter(|u| valid_user(u)) {
        return u;
    }
    // SAFETY: getpwuid returns a pointer to static storage or null; the name is copied
    // out before any other call could overwrite it.
    let name = unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            None
        } else {
            Some(
                std::ffi::CStr::from_ptr((*pw).pw_name)
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    };
    name.filter(|u| valid_user(u))
        .unwrap_or_else(|| "vessel".to_string())
}

/// A name Debian's useradd takes (and a shell script can hold unquoted).
fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && u.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

/// `tool` from PATH (or /usr/bin, /usr/sbin).
pub fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_checked() {
        assert!(valid_user("ada") && valid_user("root") && valid_user("b_2-x"));
        assert!(!valid_user("Ada") && !valid_user("a b") && !valid_user("") && !valid_user("-x"));
        assert!(valid_user(&user_name()));
    }

    #[test]
    fn a_file_that_is_not_a_public_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let bad = dir.path().join("key");
        std::fs::write(&bad, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        let err = authorized_keys(&home, Some(&bad)).unwrap_err().to_string();
        assert!(err.ends_with("key: not an OpenSSH public key"), "{err}");
        let good = dir.path().join("key.pub");
        std::fs::write(&good, "ssh-ed25519 AAAAC3Nz me@host\n").unwrap();
        let keys = authorized_keys(&home, Some(&good)).unwrap();
        assert!(keys.ends_with("ssh-ed25519 AAAAC3Nz me@host\n"), "{keys}");
    }
}
