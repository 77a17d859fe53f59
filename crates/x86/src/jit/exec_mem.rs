//! Executable memory for translated blocks, never writable and executable at once: the
//! pages a new block goes to are made read-write, written, and made read-execute again
//! before anything runs (W^X by mprotect flips). Each vCPU has its own buffer, so no
//! other thread can be executing a page while it is writable.

use std::ptr::NonNull;

pub(crate) struct CodeBuffer {
    base: NonNull<u8>,
    len: usize,
    used: usize,
}

// SAFETY: the buffer is a private mapping owned by this value; it holds no thread-local
// state and is only written through `&mut self`.
unsafe impl Send for CodeBuffer {}

const PAGE: usize = 4096;

impl CodeBuffer {
    /// Reserves `len` bytes of address space (no memory until written).
    pub(crate) fn new(len: usize) -> Option<Self> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; nothing
        // else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(CodeBuffer {
            base: NonNull::new(p.cast())?,
            len,
            used: 0,
        })
    }

    /// Where the next block will start (code is assembled for this address).
    pub(crate) fn next_addr(&self) -> u64 {
        self.base.as_ptr() as u64 + self.used.next_multiple_of(16) as u64
    }

    /// Copies `code` to `next_addr()`; returns its address, or `None` when full.
    pub(crate) fn append(&mut self, code: &[u8]) -> Option<u64> {
        let start = self.used.next_multiple_of(16);
        let end = start.checked_add(code.len())?;
        if end > self.len {
            return None;
        }
        let first = start / PAGE * PAGE;
        let span = end.next_multiple_of(PAGE) - first;
        // SAFETY: [first, first + span) lies inside this mapping (end <= len, and len is
        // what was mapped, rounded up by the kernel to pages).
        let page = unsafe { self.base.as_ptr().add(first) };
        // SAFETY: as above; making our own pages writable affects nothing else.
        if unsafe { libc::mprotect(page.cast(), span, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
            return None;
        }
        // SAFETY: the destination is inside the mapping, writable now, and not
        // overlapping `code` (a Rust slice elsewhere).
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.as_ptr().add(start), code.len())
        };
        // SAFETY: as above.
        if unsafe { libc::mprotect(page.cast(), span, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
            return None;
        }
        self.used = end;
        Some(self.base.as_ptr() as u64 + start as u64)
    }

    /// Forgets every block (the pages are reused by later appends).
    pub(crate) fn reset(&mut self) {
        self.used = 0;
    }
}

impl Drop for CodeBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; nothing can run from it any more
        // (blocks are only entered through `&mut` of the owner).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
