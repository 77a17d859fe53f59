//! Live migration between two vessel homes: where the stream goes (`tcp:HOST:PORT`,
//! `unix:PATH`), what configuration goes with it, and the destination's side, `vessel
//! receive`: it checks that it can host the VM before any page moves, receives the VM
//! into its folder as a suspended VM, and starts it there.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::migration::{MigrationError, receive, wire::Hello};

use crate::host::{self, Allocation, Host};
use crate::{Bundle, Home, ManagerError, VmSpec};

/// How long either side waits for the other before it calls the link broken.
const LINK_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a migration stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("'{s}': expected tcp:HOST:PORT"));
            }
            return Ok(Endpoint::Tcp(addr.to_string()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("'{s}': expected unix:PATH"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        Err(format!("'{s}': expected tcp:HOST:PORT or unix:PATH"))
    }

    /// Connects to a listening `vessel receive`.
    pub fn connect(&self) -> Result<File, String> {
        let fd: OwnedFd = match self {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(|e| format!("cannot connect to {a}: {e}"))?;
                let _ = s.set_nodelay(true);
                s.into()
            }
            Endpoint::Unix(p) => UnixStream::connect(p)
                .map_err(|e| format!("cannot connect to {}: {e}", p.display()))?
                .into(),
        };
        set_timeouts(&fd);
        Ok(File::from(fd))
    }

    /// Listens here; returns the listener and the address it took (a TCP port 0 becomes
    /// the port the system chose).
    pub fn listen(&self) -> Result<(Listener, String), String> {
        match self {
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| format!("cannot listen on {a}: {e}"))?;
                let bound = l.local_addr().map_err(|e| e.to_string())?;
                Ok((Listener::Tcp(l), format!("tcp:{bound}")))
            }
            Endpoint::Unix(p) => {
                let l = UnixListener::bind(p)
                    .map_err(|e| format!("cannot listen on {}: {e}", p.display()))?;
                Ok((
                    Listener::Unix(l, p.clone()),
                    format!("unix:{}", p.display()),
                ))
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    /// Its socket file goes with it.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The first connection.
    pub fn accept(&self) -> Result<File, String> {
        let fd: OwnedFd = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                s.into()
            }
            Listener::Unix(l, _) => l.accept().map_err(|e| e.to_string())?.0.into(),
        };
        set_timeouts(&fd);
        Ok(File::from(fd))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A silent peer is a broken link after [`LINK_TIMEOUT`].
fn set_timeouts(fd: &OwnedFd) {
    let tv = libc::timeval {
        tv_sec: LINK_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt on a socket we own, with a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
    }
}

/// The first connection on `listener` that greets as a source resuming a post-copy.
pub fn accept_resume(listener: &Listener) -> Result<File, String> {
    let mut link = listener.accept()?;
    vmm::migration::wire::read_greeting(&mut link).map_err(|e| e.to_string())?;
    match vmm::migration::wire::read(&mut link).map_err(|e| e.to_string())? {
        vmm::migration::wire::Frame::Resume => Ok(link),
        _ => Err("the source did not ask to resume a post-copy".into()),
    }
}

/// The VM's configuration as it travels: paths made absolute (the destination sees the
/// same shared storage under the same paths, not the same bundle folder).
pub fn travelling_spec(spec: &VmSpec, dir: &Path) -> VmSpec {
    let resolve = |p: &str| -> String {
        let path = Path::new(p);
        if path.is_absolute() || p == crate::spec::KIT {
            p.to_string()
        } else {
            dir.join(path).to_string_lossy().into_owned()
        }
    };
    let mut s = spec.clone();
    s.kernel = resolve(&s.kernel);
    s.initrd = s.initrd.as_deref().map(resolve);
    s.disks = s
        .disks
        .iter()
        .map(|d| {
            d.split(',')
                .enumerate()
                .map(|(k, part)| match part.split_once('=') {
                    Some(("path", p)) => format!("path={}", resolve(p)),
                    None if k == 0 => resolve(part),
                    _ => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    s
}

/// Where a copied disk goes in the bundle.
fn copied_disk(k: usize) -> String {
    format!("disk{k}.raw")
}

/// The configuration with each disk at its copy in the bundle: a raw image (whatever
/// the format at the source: the copy is of what the guest sees), its other options
/// kept.
fn with_copied_disks(spec: &VmSpec) -> VmSpec {
    let mut s = spec.clone();
    s.disks = s
        .disks
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let mut parts = vec![format!("path={}", copied_disk(k)), "format=raw".to_string()];
            parts.extend(d.split(',').enumerate().filter_map(
                |(i, part)| match part.split_once('=') {
                    Some(("path" | "format", _)) => None,
                    None if i == 0 => None,
                    _ => Some(part.to_string()),
                },
            ));
            parts.join(",")
        })
        .collect();
    s
}

/// What `vessel receive` did.
#[derive(Debug)]
pub struct Received {
    pub name: String,
    /// The VM runs here while the rest of its memory arrives.
    pub postcopy: bool,
    pub bytes: u64,
    pub seconds: f64,
    pub accel: String,
}

/// Why this host cannot take the VM `hello` describes (as `spec`), if it cannot.
fn refusal(home: &Home, name: &str, spec: &VmSpec, hello: &Hello) -> Result<(), String> {
    if Bundle::open(home, name).is_ok() {
        return Err(format!("a VM named {name} exists here already"));
    }
    let probe = home.vms_dir().join(name);
    let config = spec.to_vm_config(&probe).map_err(|e| e.to_string())?;
    if !hello.disks.is_empty() && hello.disks.len() != config.disks.len() {
        return Err(format!(
            "{} disks copied for a VM of {}",
            hello.disks.len(),
            config.disks.len()
        ));
    }
    for d in config.disks.iter().filter(|_| hello.disks.is_empty()) {
        if !d.path.exists() {
            return Err(format!(
                "disk {} is not here (migration expects shared storage)",
                d.path.display()
            ));
        }
    }
    if config.memory != hello.memory_bytes || config.cpus != hello.cpus {
        return Err("the configuration does not match the VM's memory or vCPUs".into());
    }
    let host = Host::load(home).map_err(|e| e.to_string())?;
    let held = host::allocations(home).map_err(|e| e.to_string())?;
    host.admit(&held, &Allocation::of(name, spec))
        .map_err(|missing| format!("admission control: {missing}"))?;
    let offered = vmm::builder::cpuid_offered(&config).map_err(|e| e.to_string())?;
    let missing = vmm::snapshot::convert::missing_features(&hello.cpuid, &offered);
    if !missing.is_empty() {
        return Err(format!(
            "the guest uses CPU features {} cannot give here: {}",
            match config.accel {
                vmm::Accel::Kvm => "kvm",
                vmm::Accel::Emu => "emu",
            },
            missing.join(", ")
        ));
    }
    Ok(())
}

/// Receives one VM on `listener` as `name` (None: the name it had), on `accel` (None:
/// as configured), and starts it with `exe`. `announce` is told the VM's name as soon
/// as the source has said it.
pub fn receive(
    home: &Home,
    listener: &Listener,
    name: Option<&str>,
    accel: Option<&str>,
    exe: &Path,
) -> Result<Received, ManagerError> {
    let fail = |e: MigrationError| ManagerError::Other(e.to_string());
    let mut link = listener.accept().map_err(ManagerError::Other)?;
    let started = Instant::now();
    let hello = receive::hello(&mut link).map_err(fail)?;
    let name = name.unwrap_or(&hello.name).to_string();
    let refuse = |link: &mut File, why: String| {
        receive::refuse(link, &why);
        ManagerError::Other(format!("refused {name}: {why}"))
    };
    let mut spec = match VmSpec::from_toml(Path::new("the migration stream"), &hello.config) {
        Ok(s) => s,
        Err(e) => return Err(refuse(&mut link, e.to_string())),
    };
    if let Err(e) = crate::bundle::check_name(&name) {
        return Err(refuse(&mut link, e.to_string()));
    }
    if let Some(a) = accel {
        spec.accel = a.to_string();
    }
    if !hello.disks.is_empty() {
        spec = with_copied_disks(&spec);
    }
    if let Err(why) = refusal(home, &name, &spec, &hello) {
        return Err(refuse(&mut link, why));
    }
    // The VM appears under its name only once all of it is here (and started from
    // there); until then it is a dot-folder nobody lists, removed on failure.
    let mut got = None;
    let created = Bundle::create_with(home, &name, |dir| {
        receive::accept(&mut link).map_err(fail)?;
        let incoming = dir.join(".incoming");
        std::fs::create_dir(&incoming).map_err(ManagerError::io(&incoming))?;
        let disks: Vec<_> = (0..hello.disks.len())
            .map(|k| dir.join(copied_disk(k)))
            .collect();
        got = Some(receive::into_folder(&mut link, &hello, &incoming, &disks).map_err(fail)?);
        let suspended = dir.join(crate::snapshots::SUSPENDED);
        std::fs::rename(&incoming, &suspended).map_err(ManagerError::io(&suspended))?;
        Ok(spec.clone())
    });
    let bundle = match created {
        Ok(b) => b,
        Err(e) => {
            let _ = receive::finish(&mut link, Err(&e.to_string()));
            return Err(e);
        }
    };
    let postcopy = got.as_ref().is_some_and(|g| g.postcopy);
    // With post-copy the monitor goes on over the link, and says itself that it runs.
    let started_vm = crate::monitor::start_with_link(home, &name, exe, postcopy.then_some(&link));
    let outcome = started_vm.as_ref().map(|_| ()).map_err(|e| e.to_string());
    let told = match (&outcome, postcopy) {
        (Ok(()), true) => Ok(()),
        _ => receive::finish(
            &mut link,
            outcome.as_ref().map(|_| ()).map_err(String::as_str),
        ),
    };
    if let Err(e) = started_vm {
        let _ = bundle.remove();
        return Err(e);
    }
    if let Err(e) = told {
        // The source, without the answer, keeps its guest paused: only this side runs.
        tracing::warn!("{e}");
    }
    Ok(Received {
        name,
        postcopy,
        bytes: got.map_or(0, |g| g.bytes),
        seconds: started.elapsed().as_secs_f64(),
        accel: spec.accel.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_what_they_expect() {
        assert_eq!(
            Endpoint::parse("tcp:10.0.0.2:4444"),
            Ok(Endpoint::Tcp("10.0.0.2:4444".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:/tmp/m.sock"),
            Ok(Endpoint::Unix("/tmp/m.sock".into()))
        );
        for bad in ["tcp:host", "tcp::1", "udp:1.2.3.4:5", "unix:", "/tmp/x"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn copied_disks_are_raw_files_in_the_bundle_with_their_other_options() {
        let spec: VmSpec = toml::from_str(
            "cpus = 1\nmemory = \"64M\"\nkernel = \"k\"\ndisks = [\"/srv/root.qcow2,readonly=on\", \"path=/d.img,format=qcow2,id=x\"]\n",
        )
        .unwrap();
        assert_eq!(
            with_copied_disks(&spec).disks,
            [
                "path=disk0.raw,format=raw,readonly=on",
                "path=disk1.raw,format=raw,id=x"
            ]
        );
    }

    #[test]
    fn a_travelling_spec_names_its_files_by_absolute_paths() {
        let spec: VmSpec = toml::from_str(
            "cpus = 1\nmemory = \"64M\"\nkernel = \"bzImage\"\ndisks = [\"root.qcow2,readonly=on\", \"path=/srv/d.raw\", \"path=data.raw,id=x\"]\n",
        )
        .unwrap();
        let s = travelling_spec(&spec, Path::new("/home/v/vms/a"));
        assert_eq!(s.kernel, "/home/v/vms/a/bzImage");
        assert_eq!(
            s.disks,
            [
                "/home/v/vms/a/root.qcow2,readonly=on",
                "path=/srv/d.raw",
                "path=/home/v/vms/a/data.raw,id=x"
            ]
        );
    }
}
