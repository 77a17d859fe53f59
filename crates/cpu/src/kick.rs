//! Getting a vCPU thread out of guest mode: a real-time signal whose handler sets the
//! running vCPU's `immediate_exit`, so KVM_RUN returns EINTR now or, if the signal
//! lands just before entry, at once on entry (no lost wake-up).

use std::cell::Cell;
use std::sync::Once;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

thread_local! {
    /// The `immediate_exit` byte of the vCPU this thread runs, if any.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // The handler runs on the signalled thread, which registered the pointer; the
        // registration is cleared before the vCPU (and its kvm_run mapping) is dropped.
        // SAFETY: so the pointer points into this thread's live kvm_run mapping.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Registers (or, with null, clears) this thread's `immediate_exit` byte.
pub(crate) fn set_current(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag));
}

/// Sends the kick signal to a thread.
fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a valid thread id and a signal whose handler is
    // installed; an already-exited thread yields ESRCH, which we ignore.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// Wakes a vCPU that sleeps in user space (the software CPU in HLT).
pub type Waker = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A vCPU's "come out" request: set by the kicker, consumed by the vCPU's `run`.
#[derive(Clone, Default)]
pub struct KickFlag {
    pending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    waker: Option<Waker>,
}

impl std::fmt::Debug for KickFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KickFlag")
            .field("pending", &self.pending)
            .finish()
    }
}

impl KickFlag {
    /// A flag whose kicks also call `waker` (for vCPUs that sleep in user space).
    pub fn with_waker(waker: Waker) -> Self {
        KickFlag {
            pending: Default::default(),
            waker: Some(waker),
        }
    }

    /// Consumes a pending kick.
    pub fn take(&self) -> bool {
        self.pending
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Asks the vCPU running on `thread` to return from `run` soon.
    ///
    /// `thread` must not have been joined yet (its id could be reused).
    pub fn kick(&self, thread: libc::pthread_t) {
        self.pending
            .store(true, std::sync::atomic::Ordering::Release);
        kick(thread);
        if let Some(wake) = &self.waker {
            wake();
        }
    }
}
