//! The userfaultfd operations the compressor needs (MISSING faults, COPY, ZEROPAGE, WAKE
//! and MOVE), over the raw ioctls. The `userfaultfd` crate generates its bindings with
//! bindgen at build time (libclang on every build machine) and has no MOVE: the five
//! ioctls are written here instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, nr, size)`, `_IOR(0xaa, nr, size)`.
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xaa << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const UFFDIO_MOVE: u64 = iowr(0x05, 40);
const REGISTER_MODE_MISSING: u64 = 1;
const FEATURE_MOVE: u64 = 1 << 16;
const EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copied: i64,
}

#[repr(C)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct Move {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// One message read from the descriptor (struct uffd_msg, 32 bytes).
#[repr(C)]
#[derive(Default)]
struct Msg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    flags: u64,
    address: u64,
    _arg: u64,
}

pub struct Uffd(OwnedFd);

fn ioctl<T>(fd: RawFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the struct the userfaultfd ioctl `request` takes, alive across the
    // call; the kernel reads and writes only within it.
    let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// A userfaultfd with UFFDIO_MOVE, handling kernel faults too (KVM's): through
    /// /dev/userfaultfd when it is there, else the system call (which then needs
    /// CAP_SYS_PTRACE).
    pub fn new() -> io::Result<Uffd> {
        let fd = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(dev) => {
                const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
                // SAFETY: the device's one ioctl, with the flags of the new descriptor.
                let fd = unsafe {
                    libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC)
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                fd
            }
            Err(_) => {
                // SAFETY: the userfaultfd system call with flags only.
                let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                fd as RawFd
            }
        };
        // SAFETY: a descriptor just returned to us, owned by nobody else.
        let uffd = Uffd(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = Api {
            api: UFFD_API,
            features: FEATURE_MOVE,
            ioctls: 0,
        };
        ioctl(uffd.fd(), UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reports MISSING faults in `[start, start + len)` to this descriptor.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Register {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd(), UFFDIO_REGISTER, &mut r)
    }

    /// Stops reporting faults in `[start, start + len)`: missing pages there are filled
    /// with zeros by the kernel again.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.fd(), UFFDIO_UNREGISTER, &mut r)
    }

    /// Fills the missing page(s) at `dst` with a copy of `src` and wakes the waiters.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<()> {
        let mut c = Copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copied: 0,
        };
        ioctl(self.fd(), UFFDIO_COPY, &mut c)
    }

    /// Maps the zero page at the missing `dst` and wakes the waiters.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<()> {
        let mut z = Zeropage {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        ioctl(self.fd(), UFFDIO_ZEROPAGE, &mut z)
    }

    /// Wakes threads waiting on `[start, start + len)` (another fault filled it first).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.fd(), UFFDIO_WAKE, &mut r)
    }

    /// Moves the page(s) at `src` to the missing `dst` (a range registered here): `src`
    /// is left missing, atomically with respect to every access to it.
    pub fn move_pages(&self, dst: u64, src: u64, len: u64) -> io::Result<()> {
        let mut m = Move {
            dst,
            src,
            len,
            mode: 0,
            moved: 0,
        };
        ioctl(self.fd(), UFFDIO_MOVE, &mut m)
    }

    /// The address of the next MISSING fault; None when none is pending (the
    /// descriptor is polled first).
    pub fn next_fault(&self) -> io::Result<Option<u64>> {
        let mut msg = Msg::default();
        // SAFETY: reads at most one uffd_msg into `msg`, which has its size and layout.
        let n = unsafe {
            libc::read(
                self.fd(),
                (&mut msg as *mut Msg).cast(),
                std::mem::size_of::<Msg>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok((msg.event == EVENT_PAGEFAULT).then_some(msg.address))
    }

    /// Makes reads return at once when no fault is pending (and poll(2) report faults:
    /// on a blocking userfaultfd it reports only POLLERR).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        // SAFETY: fcntl on a descriptor we own; no memory is involved.
        let flags = unsafe { libc::fcntl(self.fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(self.fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn anon(pages: usize) -> *mut u8 {
        // SAFETY: a fresh anonymous private mapping; unmapped by the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    #[test]
    fn a_moved_page_leaves_a_hole_that_a_copy_fills() {
        let Ok(uffd) = Uffd::new() else {
            eprintln!("skipped: no userfaultfd with MOVE here");
            return;
        };
        let (guest, staging) = (anon(1), anon(1));
        // Written before it is registered: no thread here serves faults.
        // SAFETY: one page mapped above.
        unsafe {
            std::ptr::write_bytes(guest, 0x5a, PAGE);
        }
        uffd.register(staging as u64, PAGE as u64).unwrap();
        uffd.register(guest as u64, PAGE as u64).unwrap();
        uffd.move_pages(staging as u64, guest as u64, PAGE as u64)
            .unwrap();
        // SAFETY: the staging page now holds the moved page.
        let moved = unsafe { std::slice::from_raw_parts(staging, PAGE) };
        assert!(moved.iter().all(|&b| b == 0x5a));
        // The guest page is missing now: fill it before touching it.
        let data = vec![0xa5u8; PAGE];
        uffd.copy(guest as u64, &data).unwrap();
        // SAFETY: the guest page, present again.
        let back = unsafe { std::slice::from_raw_parts(guest, PAGE) };
        assert!(back.iter().all(|&b| b == 0xa5));
        // SAFETY: unmapping what `anon` mapped.
        unsafe {
            libc::munmap(guest.cast(), PAGE);
            libc::munmap(staging.cast(), PAGE);
        }
    }
}
