//! Requests from the guest to the machine: power off, reset.

use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// ACPI S5 (soft off).
    PowerOff,
    /// Keyboard-controller reset, the ACPI reset register, or the reset control port.
    Reset,
}

/// Where devices send guest requests; the VMM decides what they mean (end the VM,
/// restart a managed VM).
pub type RequestSink = Arc<dyn Fn(GuestRequest) + Send + Sync>;
