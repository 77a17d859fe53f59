//! Why a vCPU stopped running guest code.

/// An exit the dispatcher routes. Data buffers belong to the backend and live until
/// the next `run`.
#[derive(Debug)]
pub enum Exit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// HLT with no interrupt controller in the backend to wait on.
    Halt,
    /// Another thread asked this vCPU to come out (pause, stop).
    Interrupted,
    /// The backend could not run the instruction at RIP (KVM's emulator gave up).
    EmulationFailure,
    /// The guest reset or powered off through the backend itself (KVM_SYSTEM_EVENT).
    SystemReset,
    SystemPowerOff,
    /// The vCPU cannot go on.
    Fatal(FatalExit),
}

/// Unrecoverable vCPU states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FatalExit {
    /// A triple fault: the processor shut down.
    TripleFault,
    /// VM entry failed (invalid guest state).
    EntryFailure { reason: u64 },
    /// KVM reported an internal error other than emulation failure.
    InternalError { suberror: u32 },
    /// An exit vessel does not handle.
    Unhandled(String),
}

impl std::fmt::Display for FatalExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FatalExit::TripleFault => write!(f, "triple fault"),
            FatalExit::EntryFailure { reason } => {
                write!(f, "VM entry failed (hardware reason {reason:#x})")
            }
            FatalExit::InternalError { suberror } => {
                write!(f, "KVM internal error (suberror {suberror})")
            }
            FatalExit::Unhandled(what) => write!(f, "unhandled exit: {what}"),
        }
    }
}
