//! What an instruction can end with besides completing: an architectural exception for the
//! caller to deliver, or an instruction the interpreter does not implement.

use iced_x86::Mnemonic;
use serde::{Deserialize, Serialize};

/// An architectural exception raised by an instruction.
///
/// RIP convention: for faults (everything except the traps below) the interpreter leaves
/// RIP at the faulting instruction and the state as it was before it, so the caller can
/// deliver the exception and the guest can restart the instruction. For the traps
/// [`Exception::Breakpoint`] (int3), [`Exception::Overflow`] (into) and
/// [`Exception::SoftwareInterrupt`] (int n) RIP already points after the instruction,
/// which is the return address the delivery pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum Exception {
    #[error("#DE divide error")]
    DivideError,
    #[error("#DB debug")]
    Debug,
    #[error("#BP breakpoint")]
    Breakpoint,
    #[error("#OF overflow")]
    Overflow,
    #[error("#BR bound range exceeded")]
    BoundRange,
    #[error("#UD invalid opcode")]
    InvalidOpcode,
    #[error("#NM device not available")]
    DeviceNotAvailable,
    #[error("#DF double fault")]
    DoubleFault,
    #[error("#TS({0:#x}) invalid TSS")]
    InvalidTss(u16),
    #[error("#NP({0:#x}) segment not present")]
    SegmentNotPresent(u16),
    #[error("#SS({0:#x}) stack fault")]
    StackFault(u16),
    #[error("#GP({0:#x}) general protection")]
    GeneralProtection(u16),
    #[error("#PF at {address:#x} (error code {error_code:#x})")]
    PageFault { address: u64, error_code: u32 },
    #[error("#MF x87 floating point")]
    FloatingPoint,
    #[error("#AC alignment check")]
    AlignmentCheck,
    #[error("#XM SIMD floating point")]
    SimdFloatingPoint,
    /// `int n`: a software interrupt through IDT vector n.
    #[error("software interrupt {0:#x}")]
    SoftwareInterrupt(u8),
}

/// Page-fault error-code bits.
pub mod pf {
    pub const PRESENT: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const USER: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const FETCH: u32 = 1 << 4;
}

impl Exception {
    /// IDT vector.
    pub fn vector(&self) -> u8 {
        match self {
            Exception::DivideError => 0,
            Exception::Debug => 1,
            Exception::Breakpoint => 3,
            Exception::Overflow => 4,
            Exception::BoundRange => 5,
            Exception::InvalidOpcode => 6,
            Exception::DeviceNotAvailable => 7,
            Exception::DoubleFault => 8,
            Exception::InvalidTss(_) => 10,
            Exception::SegmentNotPresent(_) => 11,
            Exception::StackFault(_) => 12,
            Exception::GeneralProtection(_) => 13,
            Exception::PageFault { .. } => 14,
            Exception::FloatingPoint => 16,
            Exception::AlignmentCheck => 17,
            Exception::SimdFloatingPoint => 19,
            Exception::SoftwareInterrupt(n) => *n,
        }
    }

    /// The error code the delivery pushes, if this exception has one.
    pub fn error_code(&self) -> Option<u32> {
        match *self {
            Exception::DoubleFault | Exception::AlignmentCheck => Some(0),
            Exception::InvalidTss(s)
            | Exception::SegmentNotPresent(s)
            | Exception::StackFault(s)
            | Exception::GeneralProtection(s) => Some(u32::from(s)),
            Exception::PageFault { error_code, .. } => Some(error_code),
            _ => None,
        }
    }

    /// Traps report RIP after the instruction (see the type's documentation).
    pub fn is_trap(&self) -> bool {
        matches!(
            self,
            Exception::Breakpoint | Exception::Overflow | Exception::SoftwareInterrupt(_)
        )
    }
}

/// An instruction the interpreter cannot execute, with what the caller needs to report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedInstruction {
    pub rip: u64,
    pub bytes: [u8; 15],
    pub len: u8,
    pub mnemonic: Mnemonic,
}

impl UnsupportedInstruction {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Display for UnsupportedInstruction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} at {:#x} (", self.mnemonic, self.rip)?;
        for (i, b) in self.bytes().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// Why `step`/`run` stopped without completing an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The instruction raised an exception; the state is as described on [`Exception`].
    #[error("guest exception: {0}")]
    Exception(#[from] Exception),
    /// The instruction is not implemented; the state is unchanged, RIP at the instruction.
    #[error("unsupported instruction: {0}")]
    Unsupported(UnsupportedInstruction),
}
