//! Whether the guest's CPUID offers an instruction: one it does not offer raises #UD,
//! as on hardware, rather than stopping the VM; only an offered instruction the
//! interpreter cannot run stops it.

use iced_x86::{CpuidFeature, Decoder, DecoderOptions};

/// Where CPUID reports `feature`: leaf, subleaf, register (0 eax ... 3 edx), bit. None
/// for features without one bit to look at (the base instruction sets and the rest).
fn bit(feature: CpuidFeature) -> Option<(u32, u32, usize, u32)> {
    use CpuidFeature::*;
    const EBX: usize = 1;
    const ECX: usize = 2;
    const EAX: usize = 0;
    Some(match feature {
        SSE3 => (1, 0, ECX, 0),
        PCLMULQDQ => (1, 0, ECX, 1),
        VMX => (1, 0, ECX, 5),
        SMX => (1, 0, ECX, 6),
        SSSE3 => (1, 0, ECX, 9),
        FMA => (1, 0, ECX, 12),
        SSE4_1 => (1, 0, ECX, 19),
        SSE4_2 => (1, 0, ECX, 20),
        MOVBE => (1, 0, ECX, 22),
        POPCNT => (1, 0, ECX, 23),
        AES => (1, 0, ECX, 25),
        AVX => (1, 0, ECX, 28),
        F16C => (1, 0, ECX, 29),
        RDRAND => (1, 0, ECX, 30),
        FSGSBASE => (7, 0, EBX, 0),
        BMI1 => (7, 0, EBX, 3),
        AVX2 => (7, 0, EBX, 5),
        BMI2 => (7, 0, EBX, 8),
        INVPCID => (7, 0, EBX, 10),
        RDSEED => (7, 0, EBX, 18),
        ADX => (7, 0, EBX, 19),
        CLFLUSHOPT => (7, 0, EBX, 23),
        CLWB => (7, 0, EBX, 24),
        SHA => (7, 0, EBX, 29),
        WAITPKG => (7, 0, ECX, 5),
        RDPID => (7, 0, ECX, 22),
        XSAVEOPT => (0xd, 1, EAX, 0),
        XSAVEC => (0xd, 1, EAX, 1),
        SVM => (0x8000_0001, 0, ECX, 2),
        LZCNT => (0x8000_0001, 0, ECX, 5),
        RDPRU => (0x8000_0008, 0, EBX, 4),
        _ => return None,
    })
}

/// Whether the instruction in `bytes` (decoded as `bitness`-bit code) is offered by
/// the CPUID `lookup` answers: Some(false) when a feature it needs is known not to be,
/// Some(true) when every feature it needs is, None when that cannot be told.
pub fn offered(bytes: &[u8], bitness: u32, lookup: impl Fn(u32, u32) -> [u32; 4]) -> Option<bool> {
    let mut decoder = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let ins = decoder.decode();
    if ins.is_invalid() {
        return None;
    }
    let mut all_known = true;
    for f in ins.cpuid_features() {
        match bit(*f) {
            Some((leaf, sub, reg, b)) => {
                if lookup(leaf, sub)[reg] & (1 << b) == 0 {
                    return Some(false);
                }
            }
            None => all_known = false,
        }
    }
    all_known.then_some(true)
}

/// What a CPU without `ins`'s feature runs for its encoding, where that is an older
/// instruction rather than #UD: tzcnt is rep bsf, lzcnt rep bsr.
pub(crate) fn without_prefix_meaning(ins: &iced_x86::Instruction) -> Option<iced_x86::Instruction> {
    use iced_x86::Code::*;
    let code = match ins.code() {
        Tzcnt_r16_rm16 => Bsf_r16_rm16,
        Tzcnt_r32_rm32 => Bsf_r32_rm32,
        Tzcnt_r64_rm64 => Bsf_r64_rm64,
        Lzcnt_r16_rm16 => Bsr_r16_rm16,
        Lzcnt_r32_rm32 => Bsr_r32_rm32,
        Lzcnt_r64_rm64 => Bsr_r64_rm64,
        _ => return None,
    };
    let mut older = *ins;
    older.set_code(code);
    Some(older)
}

/// The features the guest's CPUID offers, by iced-x86's feature numbers (those
/// without one bit to look at count as offered): asked once, then looked up for every
/// instruction decoded.
pub(crate) struct OfferedSet {
    offered: Vec<bool>,
}

impl OfferedSet {
    pub(crate) fn new(mut lookup: impl FnMut(u32, u32) -> [u32; 4]) -> Self {
        let offered = CpuidFeature::values()
            .map(|f| match bit(f) {
                Some((leaf, sub, reg, b)) => lookup(leaf, sub)[reg] & (1 << b) != 0,
                None => true,
            })
            .collect();
        OfferedSet { offered }
    }

    /// Whether every feature `ins` needs is offered.
    pub(crate) fn allows(&self, ins: &iced_x86::Instruction) -> bool {
        ins.cpuid_features()
            .iter()
            .all(|f| self.offered.get(*f as usize).copied().unwrap_or(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: u32, _: u32) -> [u32; 4] {
        [0; 4]
    }

    #[test]
    fn instructions_of_features_not_offered_are_told_apart() {
        // vmcall (VMX), invpcid rax, [rcx] (INVPCID), rdpru (RDPRU), popcnt eax, ebx.
        for code in [
            &[0x0f, 0x01, 0xc1][..],
            &[0x66, 0x0f, 0x38, 0x82, 0x01],
            &[0x0f, 0x01, 0xfd],
            &[0xf3, 0x0f, 0xb8, 0xc3],
        ] {
            assert_eq!(offered(code, 64, none), Some(false), "{code:02x?}");
        }
        let popcnt = |leaf: u32, _| {
            if leaf == 1 {
                [0, 0, 1 << 23, 0]
            } else {
                [0; 4]
            }
        };
        assert_eq!(offered(&[0xf3, 0x0f, 0xb8, 0xc3], 64, popcnt), Some(true));
        // A plain add needs only the base instruction set: nothing to look at.
        assert_eq!(offered(&[0x01, 0xd8], 64, none), None);
    }
}
