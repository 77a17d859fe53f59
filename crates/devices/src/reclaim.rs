//! Giving guest memory back to the host: the one place that knows how, for each
//! backing. Private anonymous memory is dropped with MADV_DONTNEED; a shared memfd (what
//! virtiofsd maps) needs MADV_REMOVE to free the file's pages. Either way the guest
//! reads zeros if it touches the range again, and the range counts as written (the
//! software CPU's decoded code there is dropped; a dirty log sees it).

use std::sync::{Arc, OnceLock};

use vm_memory::{GuestAddress, GuestMemory};

use crate::virtio::Segment;
use crate::virtio::guest_io::GuestRam;

/// The host's page size for guest RAM.
pub const PAGE: u64 = 4096;

/// How guest RAM is backed, which decides how it is freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    Private,
    Shared,
}

impl Backing {
    fn advice(self) -> libc::c_int {
        match self {
            Backing::Private => libc::MADV_DONTNEED,
            Backing::Shared => libc::MADV_REMOVE,
        }
    }
}

/// What a range given up by the guest also drops elsewhere (the compression cache's
/// copies of its pages): called with the guest-physical start and length.
pub type ForgetHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The reclaim path of one VM: its backing, and who else holds its pages.
pub struct Reclaimer {
    backing: Backing,
    forget: OnceLock<ForgetHook>,
}

impl Reclaimer {
    pub fn new(backing: Backing) -> Arc<Reclaimer> {
        Arc::new(Reclaimer {
            backing,
            forget: OnceLock::new(),
        })
    }

    /// Tells `hook` about every range given up from now on.
    pub fn set_forget(&self, hook: ForgetHook) {
        let _ = self.forget.set(hook);
    }

    /// Frees the whole pages of `[addr, addr + len)` (see [`discard`]) and drops what
    /// else holds them.
    pub fn discard<M: GuestMemory + ?Sized>(
        &self,
        ram: &GuestRam<'_, M>,
        addr: GuestAddress,
        len: u64,
    ) -> bool {
        let freed = discard(ram, self.backing, addr, len);
        if freed && let Some(f) = self.forget.get() {
            f(addr.0, len);
        }
        freed
    }
}

/// Frees the whole pages of `[addr, addr + len)`; false when the range is not all guest
/// RAM (nothing is freed then) or the kernel refused.
pub fn discard<M: GuestMemory + ?Sized>(
    ram: &GuestRam<'_, M>,
    backing: Backing,
    addr: GuestAddress,
    len: u64,
) -> bool {
    let start = addr.0.div_ceil(PAGE) * PAGE;
    let Some(end) = addr.0.checked_add(len).map(|e| e / PAGE * PAGE) else {
        return false;
    };
    if end <= start {
        return true;
    }
    let size = (end - start) as usize;
    let Some(host) = ram.host_range(GuestAddress(start), size) else {
        return false;
    };
    // SAFETY: `host` is `size` bytes of guest RAM mapped by vm-memory (checked above);
    // dropping its pages only makes them read as zeros, which the guest asked for.
    let r = unsafe { libc::madvise(host.cast(), size, backing.advice()) };
    if r != 0 {
        tracing::debug!(
            "reclaim: madvise {start:#x}+{size:#x}: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    let mut at = start;
    while at < end {
        let n = (end - at).min(1 << 30);
        ram.mark_written(&[Segment {
            addr: GuestAddress(at),
            len: n as u32,
        }]);
        at += n;
    }
    true
}
