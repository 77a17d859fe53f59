//! Host CPUs for a VM's threads: sched_setaffinity, which needs no cgroup and no root
//! for one's own processes. New threads inherit their creator's mask, so pinning the
//! monitor before it starts covers every vCPU and device thread; pinning it live
//! covers each thread it has.

use std::io;

use crate::error::CgroupError;
use crate::policy::CpuSet;

fn mask(set: &CpuSet) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut m: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in set.cpus() {
        // SAFETY: CpuSet holds numbers below cpu_set_t's 1024 bits.
        unsafe { libc::CPU_SET(c, &mut m) };
    }
    m
}

fn set_affinity(tid: libc::pid_t, m: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `m` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), m) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pins the calling thread (and the threads it will create); safe between fork and
/// exec: no allocation, one system call.
pub fn pin_current_thread(set: &CpuSet) -> io::Result<()> {
    set_affinity(0, &mask(set))
}

/// Pins every thread process `pid` has now.
pub fn pin_process(pid: u32, set: &CpuSet) -> Result<(), CgroupError> {
    let m = mask(set);
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(CgroupError::io(&dir))?;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        match set_affinity(tid, &m) {
            // A thread that ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            r => r.map_err(CgroupError::Affinity)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pinned_runs_where_it_was_told() {
        let set: CpuSet = "0".parse().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(&set).unwrap();
            // SAFETY: sched_getcpu has no preconditions.
            assert_eq!(unsafe { libc::sched_getcpu() }, 0);
        })
        .join()
        .unwrap();
    }
}
