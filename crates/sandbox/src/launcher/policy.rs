//! What a launcher may start: not just which programs, but each with the arguments
//! vessel gives it and nothing else, checked against what the VM's configuration
//! allowed when the launcher was made (before the monitor was confined or jailed). A
//! monitor taken over by its guest can then start a switch only for its own networks,
//! virtiofsd only on its own shared folders, and passt only with port forwards: not
//! `vessel` with any command, virtiofsd on `/`, or passt writing a capture file.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::HelperCommand;

/// The programs a launcher starts, and what each may be given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// vessel itself, as the switch of one of these network folders (`__switch DIR`).
    pub switch: Option<PathBuf>,
    pub networks: Vec<PathBuf>,
    /// passt, with vessel's options: `-f -q -F FD`, `-t`/`-u` forwards, `-D` DNS.
    pub passt: Option<PathBuf>,
    /// virtiofsd, sharing one of these folders (read-only if so marked), on the
    /// listening socket it is handed (`--fd N`).
    pub virtiofsd: Option<PathBuf>,
    pub shares: Vec<(PathBuf, bool)>,
}

impl Policy {
    /// The policy as the launcher's arguments (`KEY=PATH` each).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        let mut push = |key: &str, p: &Path| {
            let mut a = OsString::from(format!("{key}="));
            a.push(p);
            out.push(a);
        };
        let one = |key, p: &Option<PathBuf>, push: &mut dyn FnMut(&str, &Path)| {
            if let Some(p) = p {
                push(key, p);
            }
        };
        one("switch", &self.switch, &mut push);
        one("passt", &self.passt, &mut push);
        one("virtiofsd", &self.virtiofsd, &mut push);
        for n in &self.networks {
            push("network", n);
        }
        for (dir, readonly) in &self.shares {
            push(if *readonly { "share-ro" } else { "share" }, dir);
        }
        out
    }

    /// The policy read back from the launcher's arguments.
    pub fn from_args(args: &[OsString]) -> Result<Policy, String> {
        let mut p = Policy::default();
        for a in args {
            let bytes = a.as_bytes();
            let at = bytes
                .iter()
                .position(|b| *b == b'=')
                .ok_or_else(|| format!("a launcher argument without '=': {a:?}"))?;
            let key = String::from_utf8_lossy(&bytes[..at]);
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[at + 1..]));
            match key.as_ref() {
                "switch" => p.switch = Some(path),
                "passt" => p.passt = Some(path),
                "virtiofsd" => p.virtiofsd = Some(path),
                "network" => p.networks.push(path),
                "share" => p.shares.push((path, false)),
                "share-ro" => p.shares.push((path, true)),
                other => return Err(format!("an unknown launcher argument {other:?}")),
            }
        }
        Ok(p)
    }

    /// Whether `cmd` may start: Ok, or why not.
    pub fn check(&self, cmd: &HelperCommand) -> Result<(), String> {
        let program = cmd.program();
        let args: Vec<&[u8]> = cmd.args.iter().map(|a| a.as_bytes()).collect();
        if self.switch.as_deref() == Some(program) {
            return match args[..] {
                [b"__switch", dir]
                    if self
                        .networks
                        .iter()
                        .any(|n| n.as_os_str().as_bytes() == dir) =>
                {
                    Ok(())
                }
                _ => Err("the switch may serve only this VM's networks".into()),
            };
        }
        if self.passt.as_deref() == Some(program) {
            return passt_args(&args);
        }
        if self.virtiofsd.as_deref() == Some(program) {
            return self.virtiofsd_args(&args);
        }
        Err(format!(
            "{} is not a program this launcher starts",
            program.display()
        ))
    }

    fn virtiofsd_args(&self, args: &[&[u8]]) -> Result<(), String> {
        let [
            b"--shared-dir",
            dir,
            b"--fd",
            fd,
            b"--sandbox",
            mode,
            b"--cache",
            b"auto",
            rest @ ..,
        ] = args
        else {
            return Err("virtiofsd gets vessel's arguments only".into());
        };
        let readonly = match rest {
            [] => false,
            [b"--readonly"] => true,
            _ => return Err("virtiofsd gets vessel's arguments only".into()),
        };
        let dir = Path::new(std::ffi::OsStr::from_bytes(dir));
        match self.shares.iter().find(|(d, _)| d == dir) {
            None => return Err(format!("{} is not one of this VM's shares", dir.display())),
            Some((_, true)) if !readonly => {
                return Err(format!("{} is shared read-only", dir.display()));
            }
            Some(_) => {}
        }
        if fd.is_empty() || !fd.iter().all(u8::is_ascii_digit) {
            return Err("virtiofsd gets vessel's arguments only".into());
        }
        if !matches!(*mode, b"namespace" | b"chroot" | b"none") {
            return Err("virtiofsd gets vessel's arguments only".into());
        }
        Ok(())
    }
}

/// passt's options as vessel gives them: `-f`, `-q`, `-F FD`, `-t`/`-u` forwards
/// (`[ADDR/]HOST:GUEST`), `-D ADDR`.
fn passt_args(args: &[&[u8]]) -> Result<(), String> {
    let bad = |a: &[u8]| {
        Err(format!(
            "passt may not get {:?}",
            String::from_utf8_lossy(a)
        ))
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            b"-f" | b"-q" => {}
            b"-F" => match it.next() {
                Some(fd) if !fd.is_empty() && fd.iter().all(u8::is_ascii_digit) => {}
                _ => return bad(a),
            },
            b"-t" | b"-u" => match it.next() {
                Some(spec) if forward_spec(spec) => {}
                Some(spec) => return bad(spec),
                None => return bad(a),
            },
            b"-D" => match it.next() {
                Some(addr)
                    if std::str::from_utf8(addr)
                        .is_ok_and(|s| s.parse::<std::net::IpAddr>().is_ok()) => {}
                _ => return bad(a),
            },
            other => return bad(other),
        }
    }
    Ok(())
}

/// `[ADDR/]HOST_PORT:GUEST_PORT` with an IP address and two port numbers.
fn forward_spec(spec: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(spec) else {
        return false;
    };
    let (addr, ports) = match s.split_once('/') {
        Some((a, p)) => (Some(a), p),
        None => (None, s),
    };
    let port_ok = |p: &str| p.parse::<u16>().is_ok();
    addr.is_none_or(|a| a.parse::<std::net::IpAddr>().is_ok())
        && ports
            .split_once(':')
            .is_some_and(|(h, g)| port_ok(h) && port_ok(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            switch: Some("/usr/bin/vessel".into()),
            networks: vec!["/h/networks/lan".into()],
            passt: Some("/usr/bin/passt".into()),
            virtiofsd: Some("/usr/libexec/virtiofsd".into()),
            shares: vec![("/srv/data".into(), false), ("/srv/ro".into(), true)],
        }
    }

    fn cmd(program: &str, args: &[&str]) -> HelperCommand {
        let mut c = HelperCommand::new(program);
        c.args(args.iter().copied());
        c
    }

    #[test]
    fn the_policy_round_trips_through_arguments() {
        let p = policy();
        assert_eq!(Policy::from_args(&p.to_args()), Ok(p));
        assert!(Policy::from_args(&["nonsense".into()]).is_err());
        assert!(Policy::from_args(&["shell=/bin/sh".into()]).is_err());
    }

    #[test]
    fn only_what_vessel_gives_each_program_passes() {
        let p = policy();
        let ok = |c: HelperCommand| assert_eq!(p.check(&c), Ok(()), "{c:?}");
        let refused = |c: HelperCommand| assert!(p.check(&c).is_err(), "{c:?}");
        ok(cmd("/usr/bin/vessel", &["__switch", "/h/networks/lan"]));
        refused(cmd("/usr/bin/vessel", &["__switch", "/h/networks/other"]));
        refused(cmd("/usr/bin/vessel", &["run", "--kernel", "/etc/shadow"]));
        ok(cmd(
            "/usr/bin/passt",
            &[
                "-f",
                "-q",
                "-F",
                "3",
                "-t",
                "127.0.0.1/2222:22",
                "-u",
                "53:53",
                "-D",
                "10.0.0.1",
            ],
        ));
        refused(cmd("/usr/bin/passt", &["-f", "--pcap", "/etc/passwd"]));
        refused(cmd("/usr/bin/passt", &["-t", "22:22;rm"]));
        refused(cmd("/usr/bin/passt", &["-F"]));
        let fs = |dir: &str, fd: &str, rest: &[&str]| {
            let mut a = vec![
                "--shared-dir",
                dir,
                "--fd",
                fd,
                "--sandbox",
                "namespace",
                "--cache",
                "auto",
            ];
            a.extend(rest);
            cmd("/usr/libexec/virtiofsd", &a)
        };
        ok(fs("/srv/data", "3", &[]));
        ok(fs("/srv/ro", "3", &["--readonly"]));
        refused(fs("/srv/ro", "3", &[]));
        refused(fs("/", "3", &[]));
        refused(fs("/srv/data", "3x", &[]));
        refused(fs("/srv/data", "3", &["--inode-file-handles=mandatory"]));
        refused(cmd("/bin/sh", &["-c", "id"]));
    }
}
