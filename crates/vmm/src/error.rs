//! Everything that can stop a VM from being built or run, each with one clear line.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    #[error(transparent)]
    Acpi(#[from] arch::acpi::AcpiError),
    #[error(transparent)]
    Kvm(#[from] cpu::kvm::KvmError),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("device layout: {0}")]
    Bus(#[from] devices::BusError),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Device(String),
    #[error("{0}")]
    Backend(String),
    #[error("this KVM supports at most {max} vCPUs; asked for {asked}")]
    TooManyVcpus { asked: u16, max: usize },
}
