//! The system calls each thread class may make. What every thread needs (the Rust and
//! glibc runtime: memory, futexes, signals, time, its own exit) is in `BASE`; each class
//! adds what its work needs. The VMM class (the monitor's main and API threads, and the
//! threads they start) holds the union of every class, since every other thread is
//! started under its filter; what no class gets at all is in [`NEVER`].

use syscalls::Sysno::{self, *};

use super::ThreadClass;

/// Every thread.
const BASE: &[Sysno] = &[
    read,
    write,
    readv,
    writev,
    close,
    futex,
    mmap,
    munmap,
    mprotect,
    madvise,
    mremap,
    brk,
    rt_sigreturn,
    rt_sigprocmask,
    sigaltstack,
    exit,
    exit_group,
    sched_yield,
    sched_getaffinity,
    clock_gettime,
    clock_nanosleep,
    nanosleep,
    gettid,
    getpid,
    getrandom,
    restart_syscall,
    // A vector's first interrupt on KVM makes its irqfd.
    eventfd2,
    epoll_create1,
    epoll_wait,
    epoll_pwait,
    epoll_ctl,
    poll,
    ppoll,
    fcntl,
    lseek,
    fstat,
    newfstatat,
    statx,
    // glibc's malloc reads two /proc and /sys files in a new thread; narrow classes get
    // EACCES for it (see `OPEN_REFUSED`).
    openat,
    timerfd_settime,
    timerfd_gettime,
    tgkill,
    // Threads (only with CLONE_THREAD; clone3, whose flags a filter cannot read, gets
    // ENOSYS so glibc falls back to clone): a thread a confined thread makes inherits its
    // filters. glibc blocks every signal around clone, so a refused clone could not
    // even be reported; clone3 must be listed for its ENOSYS rule to win.
    clone,
    clone3,
];

/// A vCPU: KVM's ioctls (or none, on the software CPU), the devices' register
/// handlers it runs (eventfds, the console's output, TAP offloads, a device's
/// activation).
const VCPU: &[Sysno] = &[
    ioctl,
    epoll_create1,
    eventfd2,
    timerfd_create,
    sendto,
    sendmsg,
    recvfrom,
    recvmsg,
    dup,
    shutdown,
];

const BLOCK: &[Sysno] = &[
    pread64, pwrite64, preadv, pwritev, preadv2, pwritev2, fsync, fdatasync, fallocate, ftruncate,
    ioctl,
];

const NET: &[Sysno] = &[
    recvfrom, sendto, recvmsg, sendmsg, shutdown, ioctl, pread64, pwrite64,
];

const RNG: &[Sysno] = &[ioctl];

const BALLOON: &[Sysno] = &[fallocate, ioctl];

const VSOCK: &[Sysno] = &[
    socket,
    connect,
    accept4,
    bind,
    listen,
    shutdown,
    recvfrom,
    sendto,
    recvmsg,
    sendmsg,
    getsockopt,
    setsockopt,
    getsockname,
    ioctl,
    unlink,
    unlinkat,
];

/// virtio-fs: the vhost-user socket to virtiofsd.
// The watchdog that ends a silent virtiofsd's connection: shutdown.
const FS: &[Sysno] = &[
    sendmsg, recvmsg, sendto, recvfrom, eventfd2, ioctl, shutdown,
];

/// A console's input or output (the serial port's socket clients, the virtio console).
const CONSOLE: &[Sysno] = &[
    accept4, recvfrom, sendto, recvmsg, sendmsg, shutdown, ioctl, pselect6,
];

/// The compression cache's threads: userfaultfd and the page map.
const MEMORY: &[Sysno] = &[ioctl, pread64];

/// The VMM: building and rebuilding VMs, the control API (snapshots, settings, the
/// guest agent's client), the console server, the helpers' supervisors.
const VMM: &[Sysno] = &[
    ioctl,
    open,
    rmdir,
    creat,
    mkdir,
    mkdirat,
    unlink,
    unlinkat,
    rename,
    renameat,
    renameat2,
    link,
    linkat,
    symlink,
    symlinkat,
    readlink,
    readlinkat,
    getdents64,
    getcwd,
    access,
    faccessat,
    faccessat2,
    chmod,
    fchmod,
    fchmodat,
    fchown,
    utimensat,
    truncate,
    flock,
    statfs,
    fstatfs,
    copy_file_range,
    sendfile,
    memfd_create,
    socket,
    socketpair,
    bind,
    listen,
    accept,
    accept4,
    connect,
    getsockname,
    getpeername,
    setsockopt,
    getsockopt,
    pipe,
    pipe2,
    dup,
    dup2,
    dup3,
    epoll_create,
    epoll_create1,
    eventfd,
    eventfd2,
    timerfd_create,
    signalfd4,
    rt_sigaction,
    kill,
    pidfd_open,
    pidfd_send_signal,
    wait4,
    waitid,
    prlimit64,
    getrlimit,
    getuid,
    geteuid,
    getgid,
    getegid,
    getppid,
    getpgid,
    uname,
    sysinfo,
    sched_setaffinity,
    sched_getparam,
    sched_getscheduler,
    setpriority,
    getpriority,
    set_robust_list,
    rseq,
    prctl,
    // A new thread adds its own class's filter.
    seccomp,
    arch_prctl,
    set_tid_address,
    membarrier,
    mlock,
    munlock,
    msync,
    mincore,
    select,
    pselect6,
    alarm,
    umask,
    sync_file_range,
];

/// Never allowed to any thread of a confined monitor: running programs, changing
/// identity or namespaces, mounting, tracing, loading code into the kernel.
pub const NEVER: &[Sysno] = &[
    execve,
    execveat,
    fork,
    vfork,
    ptrace,
    process_vm_readv,
    process_vm_writev,
    mount,
    umount2,
    pivot_root,
    chroot,
    unshare,
    setns,
    setuid,
    setgid,
    setreuid,
    setregid,
    setresuid,
    setresgid,
    capset,
    bpf,
    perf_event_open,
    init_module,
    finit_module,
    delete_module,
    kexec_load,
    kexec_file_load,
    reboot,
    swapon,
    swapoff,
    keyctl,
    add_key,
    request_key,
    io_uring_setup,
    io_uring_enter,
    io_uring_register,
    personality,
    syslog,
    acct,
    userfaultfd,
];

/// The system calls `class` may make (without the runtime's [`BASE`]).
fn own(class: ThreadClass) -> &'static [Sysno] {
    match class {
        ThreadClass::Vmm => VMM,
        ThreadClass::Vcpu => VCPU,
        ThreadClass::Block => BLOCK,
        ThreadClass::Net => NET,
        ThreadClass::Rng => RNG,
        ThreadClass::Balloon => BALLOON,
        ThreadClass::Vsock => VSOCK,
        ThreadClass::Fs => FS,
        ThreadClass::Console => CONSOLE,
        ThreadClass::Memory => MEMORY,
    }
}

/// Everything `class` may call, sorted and without repeats.
pub fn allowed(class: ThreadClass) -> Vec<Sysno> {
    let mut all: Vec<Sysno> = BASE.to_vec();
    if class == ThreadClass::Vmm {
        for c in ThreadClass::ALL {
            all.extend_from_slice(own(c));
        }
    } else {
        all.extend_from_slice(own(class));
    }
    all.sort_by_key(|s| s.id());
    all.dedup();
    all
}

/// Whether `class` opens files of its own (the others get EACCES on open).
pub fn opens_files(class: ThreadClass) -> bool {
    matches!(class, ThreadClass::Vmm)
}

/// The ioctl requests a class may make: whole request types (bits 8-15), or single
/// requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ioctl {
    Type(u8),
    Request(u32),
}

/// What a device worker signals a KVM guest with: an MSI, a legacy interrupt line, or
/// the MSI route and irqfd it sets up on a vector's first use (`_IOW(KVMIO, 0xa5,
/// struct kvm_msi)`, `_IOW(KVMIO, 0x61, struct kvm_irq_level)`, `_IOWR(KVMIO, 0x67,
/// ...)`, `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`, `_IOW(KVMIO, 0x76, struct
/// kvm_irqfd)`).
pub const KVM_SIGNAL_MSI: u32 = 0x4020_aea5;
pub const KVM_IRQ_LINE: u32 = 0x4008_ae61;
pub const KVM_IRQ_LINE_STATUS: u32 = 0xc008_ae67;
pub const KVM_SET_GSI_ROUTING: u32 = 0x4008_ae6a;
pub const KVM_IRQFD: u32 = 0x4020_ae76;

/// The ioctls `class` may make; None: any.
pub fn ioctls(class: ThreadClass) -> Option<&'static [Ioctl]> {
    use Ioctl::{Request, Type};
    const KVM: u8 = 0xae;
    const TTY_AND_TUN: u8 = b'T';
    const UFFD: u8 = 0xaa;
    const BLOCK: u8 = 0x12;
    const FS: u8 = b'f';
    const CLONE: u8 = 0x94;
    const INTERRUPTS: [Ioctl; 5] = [
        Request(KVM_SIGNAL_MSI),
        Request(KVM_IRQ_LINE),
        Request(KVM_IRQ_LINE_STATUS),
        Request(KVM_SET_GSI_ROUTING),
        Request(KVM_IRQFD),
    ];
    match class {
        ThreadClass::Vmm => None,
        ThreadClass::Vcpu => Some(&[Type(KVM), Type(TTY_AND_TUN)]),
        ThreadClass::Block => Some(&[
            Type(BLOCK),
            Type(FS),
            Type(CLONE),
            Type(TTY_AND_TUN),
            INTERRUPTS[0],
            INTERRUPTS[1],
            INTERRUPTS[2],
            INTERRUPTS[3],
            INTERRUPTS[4],
        ]),
        ThreadClass::Net | ThreadClass::Vsock | ThreadClass::Console => Some(&[
            Type(TTY_AND_TUN),
            INTERRUPTS[0],
            INTERRUPTS[1],
            INTERRUPTS[2],
            INTERRUPTS[3],
            INTERRUPTS[4],
        ]),
        ThreadClass::Memory => Some(&[Type(UFFD)]),
        ThreadClass::Rng | ThreadClass::Balloon | ThreadClass::Fs => Some(&INTERRUPTS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_class_is_given_what_none_may_have() {
        for c in ThreadClass::ALL {
            let allowed = allowed(c);
            for s in NEVER {
                assert!(!allowed.contains(s), "{c:?} allows {}", s.name());
            }
        }
    }

    #[test]
    fn the_kvm_interrupt_requests_are_what_the_kernel_defines() {
        // _IOW/_IOWR: direction << 30 | size << 16 | type << 8 | number.
        let io = |dir: u32, size: u32, nr: u32| dir << 30 | size << 16 | 0xae << 8 | nr;
        assert_eq!(KVM_SIGNAL_MSI, io(1, 32, 0xa5));
        assert_eq!(KVM_IRQ_LINE, io(1, 8, 0x61));
        assert_eq!(KVM_IRQ_LINE_STATUS, io(3, 8, 0x67));
        assert_eq!(KVM_SET_GSI_ROUTING, io(1, 8, 0x6a));
        assert_eq!(KVM_IRQFD, io(1, 32, 0x76));
    }

    #[test]
    fn the_vmm_class_holds_every_other_class() {
        let vmm = allowed(ThreadClass::Vmm);
        for c in ThreadClass::ALL {
            for s in allowed(c) {
                assert!(vmm.contains(&s), "{c:?}'s {} not in the VMM's", s.name());
            }
        }
    }
}
