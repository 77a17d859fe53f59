//! Leaving KVM's VM teardown to another process (a forked child, or a confined
//! process's launcher). Destroying a VM with an in-kernel
//! irqchip costs the kernel 8-24 ms (measured here); a process that exits when its VM
//! ends need not wait for that. A forked child keeps only the VM descriptor, waits for
//! vessel to exit, then closes it. Guest RAM is MADV_DONTFORK, so the fork copies no
//! guest page tables and the child never holds guest memory.

use std::os::fd::RawFd;

/// Hands the last reference to the VM behind `vm_fd` to a child that drops it once
/// this process has exited. Call right before the process exits; on failure the
/// teardown simply happens in this process.
pub fn defer_vm_teardown(vm_fd: RawFd) {
    // A confined process may not fork: its launcher keeps a copy of the descriptor
    // instead, and drops it when it dies with this process.
    if sandbox::seccomp::mode() != sandbox::Mode::Off {
        // SAFETY: `vm_fd` is the VM's open descriptor; the borrow ends before it closes.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm_fd) };
        if let Ok(copy) = fd.try_clone_to_owned() {
            sandbox::launcher::hold(&copy);
        }
        return;
    }
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: `pipe` is a valid array of two descriptors to fill.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return;
    }
    let [wait_end, alive_end] = pipe;
    // SAFETY: the child only makes async-signal-safe system calls (close_range, read,
    // _exit) before exiting, as required after fork in a multi-threaded process.
    match unsafe { libc::fork() } {
        0 => {
            keep_only(&mut [vm_fd, wait_end]);
            let mut byte = 0u8;
            // Returns (EOF) when the parent exits and its end of the pipe closes.
            // SAFETY: reading one byte into a valid local buffer.
            unsafe { libc::read(wait_end, (&raw mut byte).cast(), 1) };
            // SAFETY: ends the child without running any parent state's destructors.
            unsafe { libc::_exit(0) }
        }
        -1 => {
            // SAFETY: closing the two descriptors this function opened.
            unsafe {
                libc::close(wait_end);
                libc::close(alive_end);
            }
        }
        _ => {
            // The parent keeps `alive_end` open until it exits.
            // SAFETY: closing a descriptor this function opened.
            unsafe { libc::close(wait_end) };
        }
    }
}

/// Closes every descriptor but `keep` (in the child: no terminal, no pipes the parent's
/// caller waits on, no sockets).
fn keep_only(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut from: u32 = 0;
    for &fd in keep.iter() {
        if fd as u32 > from {
            // SAFETY: close_range only closes descriptors of this (child) process.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd as u32 - 1, 0) };
        }
        from = fd as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
}
