//! The jail's file system: a mount namespace whose root is a small read-only tmpfs
//! holding the bound paths at their own places, /dev with the bound device nodes, and
//! a /proc of the jail's PID namespace.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Jail, JailError, setup};

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| setup(format!("{}", p.display()))(io::Error::other("a path with a NUL byte")))
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let what = || format!("mounting {}", target.display());
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives across the
    // call; mount copies what it needs.
    let r = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r == -1 {
        return Err(setup(what())(io::Error::last_os_error()));
    }
    Ok(())
}

/// The mount flags a remount of `path`'s mount must keep (a mount made in a less
/// privileged namespace locks them).
fn locked_flags(path: &Path) -> Result<libc::c_ulong, JailError> {
    let c = cstr(path)?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path; both live
    // across the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } == -1 {
        return Err(setup(format!("{}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    let mut flags = 0;
    for (st, ms) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if s.f_flag & st != 0 {
            flags |= ms;
        }
    }
    Ok(flags)
}

/// Binds `source` at `root` + `source`, then remounts it with `extra` flags.
fn bind_into(root: &Path, source: &Path, extra: libc::c_ulong) -> Result<(), JailError> {
    let target = inside(root, source);
    let meta = std::fs::metadata(source).map_err(setup(format!("{}", source.display())))?;
    let made = |e| setup(format!("making {}", target.display()))(e);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(made)?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(made)?;
    } else if !target.exists() {
        std::fs::File::create(&target).map_err(made)?;
    }
    mount(
        Some(source),
        &target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    let flags = locked_flags(&target)? | extra;
    mount(
        None,
        &target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes the jail's root and moves the calling process into it for good.
/// `owner`: the uid and gid the jail's device nodes are made for, when the caller may
/// make nodes (root); else the host's nodes are bound in as they are.
pub(super) fn build_root(jail: &Jail, owner: Option<u32>) -> Result<(), JailError> {
    // SAFETY: unshare with a flag constant changes only the caller's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } == -1 {
        return Err(setup("a mount namespace")(io::Error::last_os_error()));
    }
    // Nothing mounted from here on reaches the host's namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = jail.mount_point.as_path();
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )?;
    for b in &jail.binds {
        let ro = if b.writable { 0 } else { libc::MS_RDONLY };
        // A disk may be a block device: its node must work.
        let device = std::fs::metadata(&b.path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        let nodev = if device { 0 } else { libc::MS_NODEV };
        bind_into(
            root,
            &b.path,
            libc::MS_NOSUID | nodev | libc::MS_NOEXEC | ro,
        )?;
    }
    make_dev(jail, root, owner)?;
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(setup("making /proc"))?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    pivot(root)?;
    // The root itself is read-only: the monitor writes only where it was bound to.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
}

/// The jail's /dev: the device nodes it needs (those the host has). Root makes them
/// anew on a tmpfs of their own, owned by the jail's user (as Firecracker's jailer
/// does), so it needs no group and no change on the host; a user binds the host's.
fn make_dev(jail: &Jail, root: &Path, owner: Option<u32>) -> Result<(), JailError> {
    let present = jail.devices.iter().filter(|d| d.exists());
    let Some(id) = owner else {
        for d in present {
            bind_into(root, d, libc::MS_NOSUID | libc::MS_NOEXEC)?;
        }
        return Ok(());
    };
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(setup("making /dev"))?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    for d in present {
        let meta = std::fs::metadata(d).map_err(setup(format!("{}", d.display())))?;
        let node = inside(root, d);
        let made = |e| setup(format!("making {}", node.display()))(e);
        if let Some(parent) = node.parent() {
            std::fs::create_dir_all(parent).map_err(made)?;
        }
        let c = cstr(&node)?;
        // Everyone may use the harmless ones, as on the host.
        let shared = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
            .iter()
            .any(|p| d == Path::new(p));
        let mode = if shared { 0o666 } else { 0o600 };
        // SAFETY: mknod, chmod and chown take a NUL-terminated path that lives across
        // the calls.
        unsafe {
            if libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, meta.rdev()) == -1
                || libc::chmod(c.as_ptr(), mode) == -1
                || libc::chown(c.as_ptr(), id, id) == -1
            {
                return Err(made(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// pivot_root(".", "."): the new root stacks over the old one, which then goes.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(setup("entering the jail's root"))?;
    let dot = cstr(Path::new("."))?;
    // SAFETY: pivot_root and umount2 take NUL-terminated paths that live across the
    // calls; they change only this mount namespace.
    unsafe {
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == -1 {
            return Err(setup("pivot_root")(io::Error::last_os_error()));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) == -1 {
            return Err(setup("detaching the host's root")(
                io::Error::last_os_error(),
            ));
        }
    }
    std::env::set_current_dir("/").map_err(setup("entering the jail's root"))
}

/// Whether the caller may use `path` as `mode` (R_OK, W_OK) says; directories are
/// also entered (X_OK).
pub(super) fn accessible(path: &Path, mode: libc::c_int) -> bool {
    let Ok(c) = cstr(path) else { return false };
    let mode = if path.is_dir() {
        mode | libc::X_OK
    } else {
        mode
    };
    // SAFETY: access takes a NUL-terminated path that lives across the call.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}
