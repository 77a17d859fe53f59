//! The KVM backend: a thin layer over kvm-ioctls. On hosts with VT-x/AMD-V guests run
//! natively; on hosts without (see HOST.md), KVM runs them through its own emulator,
//! and vessel's interpreter takes over where that emulator gives up.

mod irq;
mod msi;
pub mod regs;
pub mod state;
mod vcpu;
mod vm;

pub use irq::{KvmEdgeIrq, KvmLevelIrq, register_notify};
pub use msi::{KvmMsi, MAX_MSI_ROUTES};
pub use vcpu::{KvmVcpu, KvmVcpuExtra};
pub use vm::{Kvm, KvmDirtyLog, KvmVm};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: this host has no KVM (try --accel emu)")]
    NoDevice,
    #[error("cannot open /dev/kvm: permission denied (run as root or join the kvm group)")]
    NoPermission,
    #[error("cannot open /dev/kvm: {0}")]
    Open(vmm_sys_util::errno::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability vessel needs: {0}")]
    MissingCapability(&'static str),
    #[error("KVM: {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: vmm_sys_util::errno::Error,
    },
}

/// Wraps an ioctl error with what vessel was doing.
fn ioctl(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// Does this host have hardware virtualization (VT-x or AMD-V) behind /dev/kvm?
pub fn host_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}
