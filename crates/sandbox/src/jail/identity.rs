//! Who runs in the jail: its PID (and, for a user who is not root, user) namespace,
//! its rlimits, and the identity it ends with: no capabilities, in any set.

use std::io;

use super::{JailError, setup};

fn check(r: libc::c_int, what: &str) -> Result<(), JailError> {
    if r == -1 {
        Err(setup(what)(io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// The calling process's uid map, as the kernel shows it: `(inside, outside, count)`.
fn uid_map() -> Vec<(u32, u32, u64)> {
    std::fs::read_to_string("/proc/self/uid_map")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u64>);
            match (f.next(), f.next(), f.next()) {
                (Some(Ok(i)), Some(Ok(o)), Some(Ok(n))) => Some((i as u32, o as u32, n)),
                _ => None,
            }
        })
        .collect()
}

/// Whether this process started as root in the host's own user namespace (not root
/// mapped from a user in a namespace of its own): asked once, before any jail, and
/// remembered (a jailed process answers for how it started).
pub fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        euid == 0 && uid_map() == [(0, 0, u64::from(u32::MAX))]
    })
}

/// The host uid that the caller's uid 0 stands for in its user namespace.
pub(super) fn outer_uid() -> u32 {
    uid_map()
        .iter()
        .find(|(inside, _, _)| *inside == 0)
        .map_or(u32::MAX, |m| m.1)
}

/// Makes the PID namespace the caller's next child starts (and becomes PID 1) in. As
/// root that is all; for another user, a user namespace comes first, mapping the user
/// to root inside it (the only id it holds), so the child may make its jail. A user
/// namespace needs a single-threaded caller.
fn pid_namespace_for_children() -> Result<(), JailError> {
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        // SAFETY: unshare with a flag constant; it changes only the caller's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        return check(r, "a PID namespace");
    }
    // SAFETY: as above.
    let r = unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) };
    check(
        r,
        "a user namespace (the host may forbid unprivileged ones: kernel.unprivileged_userns_clone, user.max_user_namespaces)",
    )?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text).map_err(setup(format!("{file} map")))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {uid} 1"))?;
    write("gid_map", format!("0 {gid} 1"))
}

/// Limits: at most `open_files` descriptors, no core dumps (guest memory stays out of
/// files), 64 KiB of locked memory.
pub(super) fn limit(open_files: u64) -> Result<(), JailError> {
    let set = |resource, value: u64, what: &str| {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `old`, which lives across the call.
        check(unsafe { libc::getrlimit(resource, &mut old) }, what)?;
        let value = value.min(old.rlim_max);
        let new = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads one rlimit from `new`, which lives across the call.
        check(unsafe { libc::setrlimit(resource, &new) }, what)
    };
    set(libc::RLIMIT_NOFILE, open_files, "the open files limit")?;
    set(libc::RLIMIT_CORE, 0, "the core dump limit")?;
    set(libc::RLIMIT_MEMLOCK, 64 << 10, "the locked memory limit")
}

/// Ends as `id` (uid and gid, no supplementary groups) when given, else as the caller's uid, with
/// every capability gone from every set (bounding and ambient included) and no way to
/// gain one (no_new_privs).
pub(super) fn drop_to(id: Option<u32>) -> Result<(), JailError> {
    let last_cap: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only; EINVAL (a capability this kernel
        // does not know) is harmless.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(r, "clearing ambient capabilities")?;
    if let Some(id) = id {
        // SAFETY: setgroups with no groups reads nothing; setresgid and setresuid take
        // integers.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()), "setting groups")?;
            check(libc::setresgid(id, id, id), "setting the gid")?;
            check(libc::setresuid(id, id, id), "setting the uid")?;
        }
    }
    clear_capabilities()?;
    // A change of uid made the process undumpable, which gives its /proc files to root:
    // the monitor reads its own (pagemap, ksm_merging_pages). Nobody else in the jail
    // could trace it, and core dumps are off.
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    check(r, "dumpable")?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(r, "no_new_privs")
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn clear_capabilities() -> Result<(), JailError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two data structs (version 3), all of which
    // live across the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int };
    check(r, "dropping capabilities")?;
    let mut now = [CapData::default(); 2];
    // SAFETY: capget writes two data structs (version 3) into `now`.
    let r =
        unsafe { libc::syscall(libc::SYS_capget, &mut header, now.as_mut_ptr()) as libc::c_int };
    check(r, "reading capabilities")?;
    if now
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(setup("dropping capabilities")(io::Error::other(
            "some remain",
        )));
    }
    Ok(())
}

/// Moves the rest of this program into a PID namespace of its own, as its PID 1: the
/// process forks there. Returns None in that child; in the caller's process, which
/// stays outside only to wait, the child's exit code once it has ended (128 + the
/// signal if one killed it). The caller must be single-threaded.
pub fn fork_into_pid_namespace() -> Result<Option<i32>, JailError> {
    pid_namespace_for_children()?;
    // SAFETY: the caller is single-threaded, so the child may go on running anything.
    match unsafe { libc::fork() } {
        -1 => Err(setup("fork")(io::Error::last_os_error())),
        0 => {
            // SAFETY: prctl with integer arguments only: the jailed process dies with
            // the one waiting for it.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            Ok(None)
        }
        child => {
            let mut status = 0;
            // SAFETY: the terminal's signals are the child's to handle; waitpid writes
            // one int the stack holds.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGQUIT, libc::SIG_IGN);
                while libc::waitpid(child, &mut status, 0) == -1
                    && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                {
                }
            }
            Ok(Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            }))
        }
    }
}

/// This process's PID as the host sees it (in the first PID namespace it has a number
/// in): read before the jail's /proc replaces the host's, then remembered.
pub fn host_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or_else(std::process::id)
    })
}
