//! A vCPU as plain data, for snapshots: the architectural state both backends share
//! ([`x86::CpuState`]), whether it sits in HLT, and what only its backend holds.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub index: u8,
    pub cpu: x86::CpuState,
    /// Waiting in HLT for an interrupt.
    pub halted: bool,
    pub backend: BackendVcpu,
}

/// What a vCPU holds beyond the architectural state, by backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BackendVcpu {
    /// The software CPU: its local APIC is in the interrupt controller's state.
    Emu,
    /// KVM: the in-kernel local APIC's register page, pending events, MP state, TSC.
    Kvm(Box<crate::kvm::KvmVcpuExtra>),
}
