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
    /// [`Interpreter::deliver`](crate::Interpreter::deliver) met a fault while delivering
    /// a double fault: the processor shuts down. The state is as the failed delivery found
    /// it.
    #[error("triple fault")]
    TripleFault,
    /// Check mode of the translating tier: a translated block and the interpreter
    /// disagreed. The state is the interpreter's.
    #[error("{0}")]
    TranslationDiffers(crate::jit::Mismatch),
}

/// Something [`Interpreter::deliver`](crate::Interpreter::deliver) delivers through the
/// IDT (or the real-mode IVT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    /// An exception raised by an instruction (as `run`/`step` return it), or injected by
    /// the caller. `SoftwareInterrupt`, `Breakpoint` and `Overflow` are `int n`, `int3`
    /// and `into`: the gate's DPL is checked against CPL.
    Exception(Exception),
    /// An external maskable interrupt with this vector (the caller checked RFLAGS.IF and
    /// the interrupt shadow).
    Interrupt(u8),
    /// A non-maskable interrupt (vector 2); NMI blocking is the caller's.
    Nmi,
}

impl Event {
    pub fn vector(&self) -> u8 {
        match self {
            Event::Exception(e) => e.vector(),
            Event::Interrupt(v) => *v,
            Event::Nmi => 2,
        }
    }
}

/// How an exception combines with another raised while delivering it (SDM Vol. 3
/// 6.15, table 6-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

impl Exception {
    pub(crate) fn class(&self) -> Class {
        match self {
            Exception::DivideError
            | Exception::InvalidTss(_)
            | Exception::SegmentNotPresent(_)
            | Exception::StackFault(_)
            | Exception::GeneralProtection(_) => Class::Contributory,
            Exception::PageFault { .. } => Class::PageFault,
            Exception::DoubleFault => Class::DoubleFault,
            _ => Class::Benign,
        }
    }
}

/// An [`Exception`] on its way out of a handler, packed into eight non-zero bytes so that
/// a handler's `Result<(), Ex>` is one register (the hot loop tests it after every
/// instruction). Bits 0-4: the variant; bits 5-52: a page fault's address (canonical, so
/// 48 bits hold it) or the selector/vector; bits 53-62: a page fault's error code; bit 63
/// set.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ex(std::num::NonZeroU64);

impl std::fmt::Debug for Ex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl Ex {
    /// The exception this stands for.
    pub(crate) fn get(self) -> Exception {
        let v = self.0.get();
        let payload = (v >> 5) & ((1 << 48) - 1);
        let small = payload as u16;
        match v & 0x1f {
            0 => Exception::DivideError,
            1 => Exception::Debug,
            2 => Exception::Breakpoint,
            3 => Exception::Overflow,
            4 => Exception::BoundRange,
            5 => Exception::InvalidOpcode,
            6 => Exception::DeviceNotAvailable,
            7 => Exception::DoubleFault,
            8 => Exception::InvalidTss(small),
            9 => Exception::SegmentNotPresent(small),
            10 => Exception::StackFault(small),
            11 => Exception::GeneralProtection(small),
            12 => Exception::PageFault {
                address: (((payload << 16) as i64) >> 16) as u64,
                error_code: ((v >> 53) & 0x3ff) as u32,
            },
            13 => Exception::FloatingPoint,
            14 => Exception::AlignmentCheck,
            15 => Exception::SimdFloatingPoint,
            _ => Exception::SoftwareInterrupt(small as u8),
        }
    }

    pub(crate) fn is_trap(self) -> bool {
        self.get().is_trap()
    }
}

impl From<Exception> for Ex {
    #[inline]
    fn from(e: Exception) -> Ex {
        let (kind, payload, code): (u64, u64, u64) = match e {
            Exception::DivideError => (0, 0, 0),
            Exception::Debug => (1, 0, 0),
            Exception::Breakpoint => (2, 0, 0),
            Exception::Overflow => (3, 0, 0),
            Exception::BoundRange => (4, 0, 0),
            Exception::InvalidOpcode => (5, 0, 0),
            Exception::DeviceNotAvailable => (6, 0, 0),
            Exception::DoubleFault => (7, 0, 0),
            Exception::InvalidTss(s) => (8, u64::from(s), 0),
            Exception::SegmentNotPresent(s) => (9, u64::from(s), 0),
            Exception::StackFault(s) => (10, u64::from(s), 0),
            Exception::GeneralProtection(s) => (11, u64::from(s), 0),
            Exception::PageFault {
                address,
                error_code,
            } => {
                debug_assert!(
                    ((address << 16) as i64 >> 16) as u64 == address && error_code < 0x400,
                    "page faults are at canonical addresses with small error codes"
                );
                (12, address & ((1 << 48) - 1), u64::from(error_code) & 0x3ff)
            }
            Exception::FloatingPoint => (13, 0, 0),
            Exception::AlignmentCheck => (14, 0, 0),
            Exception::SimdFloatingPoint => (15, 0, 0),
            Exception::SoftwareInterrupt(n) => (16, u64::from(n), 0),
        };
        let v = (1 << 63) | (code << 53) | (payload << 5) | kind;
        Ex(std::num::NonZeroU64::new(v).expect("bit 63 is set"))
    }
}

impl From<Ex> for Exception {
    fn from(e: Ex) -> Exception {
        e.get()
    }
}

#[cfg(test)]
mod tests {
    use super::{Ex, Exception};

    #[test]
    fn packed_exceptions_round_trip() {
        let all = [
            Exception::DivideError,
            Exception::Debug,
            Exception::Breakpoint,
            Exception::Overflow,
            Exception::BoundRange,
            Exception::InvalidOpcode,
            Exception::DeviceNotAvailable,
            Exception::DoubleFault,
            Exception::InvalidTss(0xfffc),
            Exception::SegmentNotPresent(0x1b),
            Exception::StackFault(0),
            Exception::GeneralProtection(0x40b),
            Exception::PageFault {
                address: 0xffff_ffff_8123_4567,
                error_code: 0x1f,
            },
            Exception::PageFault {
                address: 0x7fff_ffff_f000,
                error_code: 0,
            },
            Exception::PageFault {
                address: 0xfff0_1234,
                error_code: 6,
            },
            Exception::FloatingPoint,
            Exception::AlignmentCheck,
            Exception::SimdFloatingPoint,
            Exception::SoftwareInterrupt(0x80),
            Exception::SoftwareInterrupt(0xff),
        ];
        for e in all {
            assert_eq!(Ex::from(e).get(), e);
        }
        assert_eq!(std::mem::size_of::<Result<(), Ex>>(), 8);
    }
}
