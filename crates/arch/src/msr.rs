//! Model-specific registers a kernel expects initialised at entry.

pub const IA32_TSC: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

const MISC_ENABLE_FAST_STRINGS: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
/// The power-on PAT value.
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// (index, value) pairs written to every vCPU before it first runs.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (IA32_STAR, 0),
        (IA32_CSTAR, 0),
        (IA32_KERNEL_GS_BASE, 0),
        (IA32_FMASK, 0),
        (IA32_LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRINGS),
        (IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
        (IA32_PAT, PAT_DEFAULT),
    ]
}
