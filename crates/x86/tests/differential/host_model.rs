//! Where x86-64 hosts differ from each other, and what the comparison accepts there.
//!
//! The oracle is the host CPU, and these hosts are not all alike (older Xeons, Xeons with
//! AVX-512, AMX and FSRM, AMD parts). Each rule below covers one behaviour the
//! architecture leaves to the implementation: vessel's CPU model picks one answer (and
//! announces it in CPUID where a bit exists); the test accepts the host's other answer
//! only where the manuals allow both.

use crate::cases::Case;
use crate::native::{RegState, X87, xcr0};

/// XSAVE components vessel's interpreter models: x87, SSE, AVX, and AVX-512 (opmask,
/// ZMM_Hi256, Hi16_ZMM). PKRU is modelled too but never moved by the harness (it could
/// revoke the harness's own access to memory); AMX and the supervisor components are not
/// offered by vessel's CPU model.
pub const MODELLED_XSAVE: u64 = 0b1110_0111;

/// The components the harness moves: the modelled ones this host has enabled.
pub fn xsave_components() -> u64 {
    xcr0() & MODELLED_XSAVE
}

/// Standard-format offset and size of XSAVE component `c` (CPUID 0xD; asked once, as
/// CPUID exits to the hypervisor on a VM).
pub fn component(c: u32) -> (usize, usize) {
    static LEAF: std::sync::OnceLock<[(usize, usize); 16]> = std::sync::OnceLock::new();
    LEAF.get_or_init(|| {
        let mut o = [(0, 0); 16];
        for (k, v) in o.iter_mut().enumerate() {
            let r = std::arch::x86_64::__cpuid_count(0xd, k as u32);
            *v = (r.ebx as usize, r.eax as usize);
        }
        o
    })[c as usize]
}

/// Bytes of a standard-format XSAVE area holding every component the harness moves.
pub fn xsave_area_len() -> usize {
    (2..8u32)
        .filter(|c| xsave_components() & (1 << c) != 0)
        .map(|c| {
            let (off, size) = component(c);
            off + size
        })
        .fold(576, usize::max)
}

fn cpuid7_ebx() -> u32 {
    std::arch::x86_64::__cpuid_count(7, 0).ebx
}

/// The host updates FDP only on unmasked x87 exceptions (CPUID.(7,0):EBX[6]).
fn host_fdp_exception_only() -> bool {
    cpuid7_ebx() & (1 << 6) != 0
}

/// The host stores FCS and FDS as zero (CPUID.(7,0):EBX[13]).
pub fn host_fcs_fds_deprecated() -> bool {
    cpuid7_ebx() & (1 << 13) != 0
}

/// An Intel host: AMD's FXSAVE/XSAVE store FIP, FDP and FOP only while an exception is
/// pending (AMD APM Vol. 5, FXSAVE), so random error pointers carry no signal there.
pub fn host_keeps_x87_pointers() -> bool {
    let r = std::arch::x86_64::__cpuid(0);
    [r.ebx, r.edx, r.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
}

/// FOP of an x87 instruction from its bytes (the low 3 opcode bits and the ModRM).
fn own_fop(bytes: &[u8]) -> Option<u16> {
    let k = bytes.iter().position(|&b| (0xd8..=0xdf).contains(&b))?;
    let modrm = *bytes.get(k + 1)?;
    Some((u16::from(bytes[k] & 7) << 8) | u16::from(modrm))
}

/// The offset of the case's memory operand (what FDP holds when a host updates it).
fn operand_offset(case: &Case, bits: u32) -> Option<u64> {
    let i = &case.instr;
    if !(0..i.op_count()).any(|n| i.op_kind(n) == iced_x86::OpKind::Memory) {
        return None;
    }
    let gpr = &case.regs.gpr;
    let va = i.virtual_address(0, 0, |reg, _, _| {
        let full = reg.full_register();
        let n = full as u32 - iced_x86::Register::RAX as u32;
        Some(match reg.size() {
            8 => gpr[n as usize],
            4 => gpr[n as usize] & 0xffff_ffff,
            _ => 0,
        })
    })?;
    Some(if bits == 32 { va & 0xffff_ffff } else { va })
}

/// Whether the host's x87 state matches the interpreter's, allowing the host behaviours
/// the manuals leave open for the last-instruction pointers when no unmasked exception
/// was raised:
/// - FOP: "only valid" after an unmasked exception (SDM Vol. 1 §8.1.9.1); parts in FOP
///   compatibility mode store every non-control instruction's opcode;
/// - FDP: parts without FDP_EXCPTN_ONLY (CPUID.(7,0):EBX[6] = 0) store every memory
///   operand's offset (SDM Vol. 1 §8.1.8);
/// - AMD's FXSAVE/XSAVE write FIP, FDP and FOP as zero while ES is clear.
///
/// vessel's model: FIP always, FOP and FDP only on unmasked exceptions.
pub fn x87_matches(case: &Case, bits: u32, native: &X87, interp: &X87) -> bool {
    let same = |a: &X87, b: &X87| {
        (a.fcw, a.fsw, a.ftw, a.st) == (b.fcw, b.fsw, b.ftw, b.st)
            && a.fip == b.fip
            && (a.fop == b.fop || Some(a.fop) == own_fop(&case.bytes))
            && (a.fdp == b.fdp
                || (!host_fdp_exception_only() && Some(a.fdp) == operand_offset(case, bits)))
    };
    if same(native, interp) {
        return true;
    }
    let amd_view = X87 {
        fip: 0,
        fdp: 0,
        fop: 0,
        ..*interp
    };
    native.fsw & 0x80 == 0 && *native == amd_view
}

/// Whether two GPR files match, allowing what string instructions with a 32-bit address
/// size and a zero count do to the upper halves of RCX, RSI and RDI: the SDM's REP
/// operation runs no iteration at count 0 (Vol. 2B, REP), and processors with fast short
/// REP MOV (CPUID.(7,0):EDX[4]) zero-extend the 32-bit registers anyway. vessel's model
/// writes nothing, as the pseudo-code says.
pub fn gprs_match(case: &Case, native: &RegState, interp: &[u64; 16], mask: u64) -> bool {
    let i = &case.instr;
    let zero_count_a32 = i.is_string_instruction()
        && (i.has_rep_prefix() || i.has_repne_prefix())
        && (0..i.op_count()).any(|n| {
            matches!(
                i.op_kind(n),
                iced_x86::OpKind::MemoryESEDI | iced_x86::OpKind::MemorySegESI
            )
        })
        && case.regs.gpr[1] & 0xffff_ffff == 0;
    (0..16).all(|k| {
        let (n, i) = (native.gpr[k] & mask, interp[k] & mask);
        n == i || (zero_count_a32 && matches!(k, 1 | 6 | 7) && n == i & 0xffff_ffff)
    })
}

/// Data-window offsets of the FCS and FDS fields of an fnstenv/fnsave image the case
/// stores, with the selector (CS, DS) a host may put there: before CPUID.(7,0):EBX[13]
/// parts store the selectors (SDM Vol. 1 §8.1.8); vessel's model stores zero, as later
/// parts do.
pub fn env_selector_fields(
    case: &Case,
    bits: u32,
    data_base: u64,
    (cs, ds): (u16, u16),
) -> Vec<(usize, u16)> {
    use iced_x86::Code as C;
    if host_fcs_fds_deprecated() {
        return Vec::new();
    }
    let (fcs, fds) = match case.instr.code() {
        C::Fnstenv_m28byte | C::Fnsave_m108byte => (16, 24),
        C::Fnstenv_m14byte | C::Fnsave_m94byte => (8, 12),
        _ => return Vec::new(),
    };
    let Some(at) = operand_offset(case, bits) else {
        return Vec::new();
    };
    [(fcs, cs), (fds, ds)]
        .iter()
        .map(|&(off, sel)| ((at + off).wrapping_sub(data_base) as usize, sel))
        .collect()
}
