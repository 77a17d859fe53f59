//! What a thread that broke its filter says before the monitor stops: the kernel sends
//! SIGSYS (the filters' TRAP action), and the handler writes one line naming the thread,
//! its class and the call to standard error (the monitor's log), then ends the process.
//! Only async-signal-safe work here: a fixed buffer, `write`, `_exit`.

use std::cell::Cell;

use super::ThreadClass;

/// The exit status of a monitor stopped by its filter (128 + SIGSYS, as the shell
/// reports a process the signal killed).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

thread_local! {
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Remembers the calling thread's class and name for the report.
pub(super) fn set_thread(class: ThreadClass) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    CLASS.with(|c| c.set(Some(class)));
    NAME.with(|c| c.set(name));
}

pub(super) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with our handler, SA_SIGINFO and an empty mask is a
    // valid argument; the handler only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A line in a fixed buffer.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The message for thread `name` of `class` calling `nr`.
fn message(name: &[u8], class: Option<ThreadClass>, nr: i64) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(b"vessel: seccomp: thread ");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    l.push(if end == 0 { b"?" } else { &name[..end] });
    l.push(b" (");
    l.push(class.map_or("unconfined", ThreadClass::name).as_bytes());
    l.push(b") made system call ");
    l.number(nr as u64);
    if let Some(s) = usize::try_from(nr).ok().and_then(syscalls::Sysno::new) {
        l.push(b" (");
        l.push(s.name().as_bytes());
        l.push(b")");
    }
    l.push(b", outside its list: the monitor stops\n");
    l
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SIGSYS's siginfo: after signo, errno, code and padding (16 bytes) come the
    // calling address (8 bytes), then the system call number (an int).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; SIGSYS from
    // seccomp fills this layout (include/uapi/asm-generic/siginfo.h, _sigsys).
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let class = CLASS.with(Cell::get);
    let name = NAME.with(Cell::get);
    let line = message(&name, class, i64::from(nr));
    // SAFETY: write(2) of our own buffer, then _exit: both async-signal-safe and in
    // every class's list.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_thread_its_class_and_the_call() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let l = message(&name, Some(ThreadClass::Vcpu), 103);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "vessel: seccomp: thread vcpu0 (vcpu) made system call 103 (syslog), outside its list: the monitor stops\n"
        );
        let l = message(&[0; 16], None, 100_000);
        assert!(
            std::str::from_utf8(&l.buf[..l.len])
                .unwrap()
                .contains("thread ? (unconfined) made system call 100000, outside")
        );
    }
}
