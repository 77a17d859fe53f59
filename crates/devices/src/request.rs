//! Requests from the guest to the machine: power off, reset, exit with a status.

use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// ACPI S5 (soft off).
    PowerOff,
    /// Keyboard-controller reset, the ACPI reset register, or the reset control port.
    Reset,
    /// The debug exit port: end the VM, with this process exit status.
    DebugExit(u8),
}

/// Where devices send guest requests; the VMM decides what they mean (end the VM,
/// restart a managed VM).
pub type RequestSink = Arc<dyn Fn(GuestRequest) + Send + Sync>;
