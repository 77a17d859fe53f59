//! Confining the process that runs a VM (a monitor, or `vessel run`): its launcher may
//! start vessel itself (a network's switch), passt and virtiofsd, and nothing else;
//! then, with the sandbox on, it enters a jail holding only what its VM uses; then its
//! threads are held to their seccomp lists (see the sandbox crate).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use devices::virtio::net::Attachment;
use sandbox::jail::Jail;

use crate::ManagerError;

/// Confines this process as `mode` says, from the calling (main) thread, for a VM
/// configured as `config` (whose helper programs, if it has any, then start through a
/// launcher), in `jail` if given.
pub fn confine(
    mode: sandbox::Mode,
    config: &vmm::VmConfig,
    jail: Option<&Jail>,
) -> Result<(), ManagerError> {
    let exe = sandbox::own_exe()
        .map_err(|e| ManagerError::Other(format!("cannot find vessel's own program: {e}")))?;
    // Checked here, where the host's files are still in sight.
    for s in &config.shares {
        if !s.dir.is_dir() {
            return Err(ManagerError::Other(format!(
                "share {}: {} is not a directory",
                s.tag,
                s.dir.display()
            )));
        }
    }
    let helpers = !config.shares.is_empty()
        || config
            .nets
            .iter()
            .any(|n| matches!(n.attach, Attachment::User { .. } | Attachment::Network(_)));
    // A KVM VM's launcher also keeps the VM for its teardown after vessel exits.
    let launcher = helpers || config.accel == vmm::Accel::Kvm;
    let policy = if launcher && (mode != sandbox::Mode::Off || jail.is_some()) {
        policy(config, &exe)
    } else {
        sandbox::launcher::Policy::default()
    };
    sandbox::confine(mode, &exe, &policy, jail).map_err(ManagerError::Other)
}

/// What the launcher of a VM configured as `config` may start: the switch of each of
/// its networks, passt, virtiofsd on each of its shares.
fn policy(config: &vmm::VmConfig, exe: &Path) -> sandbox::launcher::Policy {
    let networks: Vec<PathBuf> = config
        .nets
        .iter()
        .filter_map(|n| match &n.attach {
            Attachment::Network(name) => Some(config.networks.join(name)),
            _ => None,
        })
        .collect();
    let user = config
        .nets
        .iter()
        .any(|n| matches!(n.attach, Attachment::User { .. }));
    sandbox::launcher::Policy {
        switch: (!networks.is_empty()).then(|| exe.to_path_buf()),
        networks,
        passt: user.then(|| network::passt::find_passt().ok()).flatten(),
        virtiofsd: (!config.shares.is_empty())
            .then(devices::virtio::fs::find_virtiofsd)
            .flatten(),
        shares: config
            .shares
            .iter()
            .map(|s| (s.dir.clone(), s.readonly))
            .collect(),
    }
}

/// The jail for a VM configured as `config` whose folder, if any, is `dir` (read-write:
/// its logs, sockets, status, snapshots and disks), rooted at `mount_point`: its kernel
/// and initrd read-only, its disks (their backing images read-only), the sockets it
/// makes elsewhere, its networks' folders, the memory cgroups when a governor reads
/// them; /dev/kvm, /dev/net/tun for TAP NICs, /dev/userfaultfd for compression. When
/// root starts the VM, what the jail's user must use is given to it and the TAP
/// interfaces it cannot make are made for it.
pub fn prepare_jail(
    config: &vmm::VmConfig,
    dir: Option<&Path>,
    mount_point: &Path,
    governed: bool,
) -> Result<Jail, ManagerError> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut jail = Jail::new(mount_point, sandbox::jail::DEFAULT_ID);
    let mut folders: Vec<PathBuf> = dir.map(abs).into_iter().collect();
    if let Some(dir) = dir {
        jail.bind(abs(dir), true);
    }
    jail.bind(abs(&config.kernel), false);
    if let Some(initrd) = &config.initrd {
        jail.bind(abs(initrd), false);
    }
    for d in &config.disks {
        let layers = disk::info(&d.path, d.format)
            .map_err(|e| ManagerError::Other(format!("disk {}: {e}", d.path.display())))?;
        for (i, layer) in layers.iter().enumerate() {
            jail.bind(abs(&layer.path), i == 0 && !d.readonly);
        }
    }
    let socket_dirs = config
        .vsock
        .as_ref()
        .map(|v| v.socket.as_path())
        .into_iter()
        .chain(match &config.hvc {
            Some(vmm::Hvc::Socket(p)) => Some(p.as_path()),
            _ => None,
        });
    for s in socket_dirs {
        if let Some(parent) = abs(s).parent() {
            jail.bind(parent, true);
        }
    }
    if !config.shares.is_empty() {
        jail.bind(abs(&config.runtime_dir), true);
    }
    for n in &config.nets {
        match &n.attach {
            Attachment::Network(name) => {
                // Made now if new: the jail shows only what exists.
                let folder = abs(&config.networks.join(name));
                std::fs::create_dir_all(&folder).map_err(ManagerError::io(&folder))?;
                jail.bind(&folder, true);
                folders.push(folder);
            }
            Attachment::Tap(_) | Attachment::Bridge(_) => {
                jail.device("/dev/net/tun");
            }
            Attachment::User { .. } => {}
        }
    }
    // Its own cgroups, read-only: `vessel info` and the metrics report CPU time and
    // throttling from them.
    for dir in own_cgroups() {
        jail.bind(dir, false);
    }
    if governed {
        for cgroups in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
            if Path::new(cgroups).is_dir() {
                jail.bind(cgroups, false);
                break;
            }
        }
    }
    if config.memory_compress.is_some() {
        jail.device("/dev/userfaultfd");
    }
    jail.device("/dev/kvm");
    std::fs::create_dir_all(mount_point).map_err(ManagerError::io(mount_point))?;
    if sandbox::jail::is_root() {
        give_to_jail(&jail, &folders)?;
        vmm::builder::prepare_taps(&config.nets, jail.id)
            .map_err(|e| ManagerError::Other(e.to_string()))?;
    }
    Ok(jail)
}

/// The folders of this process's cgroups (none for a root cgroup), as /proc says.
fn own_cgroups() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let path = path.trim_start_matches('/');
            if path.is_empty() {
                return None;
            }
            let base = Path::new("/sys/fs/cgroup");
            let hierarchy = match controllers {
                "" => base.to_path_buf(),
                c => base.join(c.trim_start_matches("name=")),
            };
            Some(hierarchy.join(path)).filter(|d| d.is_dir())
        })
        .collect()
}

/// Gives the jail's user what it must use: `folders` (the VM's and its networks',
/// with all they hold), and each bound file outside them that the user could not use
/// as bound (an image a VM writes, a kernel only root reads), as libvirt's dynamic
/// ownership gives images to QEMU's user. Each file given is said on stderr (the
/// monitor's log).
fn give_to_jail(jail: &Jail, folders: &[PathBuf]) -> Result<(), ManagerError> {
    let id = jail.id;
    let give = |p: &Path, meta: &std::fs::Metadata, mode: Option<u32>| {
        if meta.uid() != id || meta.gid() != id {
            std::os::unix::fs::lchown(p, Some(id), Some(id)).map_err(ManagerError::io(p))?;
        }
        if let Some(mode) = mode {
            let perms = std::os::unix::fs::PermissionsExt::from_mode(mode);
            std::fs::set_permissions(p, perms).map_err(ManagerError::io(p))?;
        }
        Ok::<_, ManagerError>(())
    };
    let mut stack: Vec<PathBuf> = folders.to_vec();
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(ManagerError::io(&p))?;
        give(&p, &meta, None)?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).map_err(ManagerError::io(&p))? {
                stack.push(e.map_err(ManagerError::io(&p))?.path());
            }
        }
    }
    for b in &jail.binds {
        let Ok(meta) = std::fs::metadata(&b.path) else {
            continue;
        };
        if meta.is_dir() || folders.iter().any(|d| b.path.starts_with(d)) {
            continue;
        }
        let want = if b.writable { 0o6 } else { 0o4 };
        let allowed = if meta.uid() == id {
            (meta.mode() >> 6) & want == want
        } else if meta.gid() == id {
            (meta.mode() >> 3) & want == want
        } else {
            meta.mode() & want == want
        };
        if !allowed {
            let mode = meta.mode() & 0o7777 | (want << 6);
            give(&b.path, &meta, Some(mode))?;
            eprintln!(
                "vessel: {} now belongs to the jail's user (uid {id}); it was {}:{} mode {:o}",
                b.path.display(),
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}
