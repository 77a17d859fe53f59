//! Architectural CPU state: plain data that the KVM backend converts to and from
//! kvm_regs/kvm_sregs/kvm_fpu/xsave/MSRs, that snapshots save, and that the interpreter
//! executes against.

use serde::{Deserialize, Serialize};

/// RFLAGS bits the interpreter names.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    /// Bit 1 always reads as one.
    pub const FIXED: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six status flags arithmetic instructions compute (kept lazily while executing).
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
}

/// Control-register and EFER bits the interpreter consults.
pub mod ctl {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_EM: u64 = 1 << 2;
    pub const CR0_TS: u64 = 1 << 3;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_AM: u64 = 1 << 18;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_DE: u64 = 1 << 3;
    pub const CR4_PSE: u64 = 1 << 4;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_UMIP: u64 = 1 << 11;
    pub const CR4_LA57: u64 = 1 << 12;
    pub const CR4_FSGSBASE: u64 = 1 << 16;
    pub const CR4_PCIDE: u64 = 1 << 17;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const CR4_SMEP: u64 = 1 << 20;
    pub const CR4_SMAP: u64 = 1 << 21;
    pub const CR4_TSD: u64 = 1 << 2;
    pub const EFER_SCE: u64 = 1 << 0;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
}

/// Segment register numbers, in the hardware encoding order (ModRM.reg of `mov sreg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum SegReg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

/// A segment register: the visible selector plus the descriptor cache ("hidden part").
///
/// `attr` uses the VMX access-rights layout (the one KVM's `kvm_segment` fields map to
/// one-to-one): bits 0-3 type, 4 S, 5-6 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 unusable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Limit in bytes (already scaled by G).
    pub limit: u32,
    pub attr: u32,
}

impl Segment {
    pub const ATTR_S: u32 = 1 << 4;
    pub const ATTR_P: u32 = 1 << 7;
    pub const ATTR_L: u32 = 1 << 13;
    pub const ATTR_DB: u32 = 1 << 14;
    pub const ATTR_G: u32 = 1 << 15;
    pub const ATTR_UNUSABLE: u32 = 1 << 16;

    /// A flat 4 GiB segment with the given type and DPL, present, S=1, G=1, D/B=`db`, L=`long`.
    pub fn flat(selector: u16, type_: u32, dpl: u8, db: bool, long: bool) -> Self {
        let mut attr = (type_ & 0xf) | Self::ATTR_S | (u32::from(dpl & 3) << 5) | Self::ATTR_P;
        attr |= Self::ATTR_G;
        if db {
            attr |= Self::ATTR_DB;
        }
        if long {
            attr |= Self::ATTR_L;
        }
        Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            attr,
        }
    }

    /// A real-mode segment: base = selector * 16, 64 KiB limit, read/write data.
    pub fn real_mode(selector: u16) -> Self {
        Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            attr: 0x3 | Self::ATTR_S | Self::ATTR_P,
        }
    }

    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.attr & Self::ATTR_P != 0
    }
    pub fn long(&self) -> bool {
        self.attr & Self::ATTR_L != 0
    }
    pub fn db(&self) -> bool {
        self.attr & Self::ATTR_DB != 0
    }
    pub fn type_(&self) -> u8 {
        (self.attr & 0xf) as u8
    }
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// MSRs that instructions read or write and that the CPU state owns (the rest go to
/// [`Platform::rdmsr`](crate::Platform::rdmsr)). FS/GS base live in the segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msrs {
    pub kernel_gs_base: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    /// IA32_XSS: supervisor state components for xsaves/xrstors.
    pub xss: u64,
    /// IA32_MISC_ENABLE as the guest last wrote it (fast strings at reset).
    #[serde(default = "misc_enable_at_reset")]
    pub misc_enable: u64,
}

fn misc_enable_at_reset() -> u64 {
    msr::MISC_ENABLE_FAST_STRINGS
}

/// MSR numbers of [`Msrs`] and the segment bases.
pub mod msr {
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const PAT: u32 = 0x277;
    pub const XSS: u32 = 0xda0;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const MISC_ENABLE_FAST_STRINGS: u64 = 1;
}

/// x87, SSE and the AVX/AVX-512 register state that xsave/xrstor move.
///
/// The interpreter executes SSE only; the AVX and AVX-512 parts are carried as data so that
/// an `xsave`/`xrstor` emulated for a guest that enabled them in XCR0 loses nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word (one bit per register, 1 = valid), as fxsave stores it.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    /// ST0-ST7 / MM0-MM7: 80-bit values in the low bits.
    pub st: [u128; 8],
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    /// Upper halves of YMM0-15 (XSAVE component 2).
    pub ymm_hi: [u128; 16],
    /// k0-k7 (component 5).
    pub opmask: [u64; 8],
    /// Upper 256 bits of ZMM0-15 (component 6).
    pub zmm_hi256: [[u128; 2]; 16],
    /// ZMM16-31 (component 7).
    pub hi16_zmm: [[u128; 4]; 16],
    /// Protection-key rights register (component 9).
    pub pkru: u32,
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            st: [0; 8],
            xmm: [0; 16],
            mxcsr: 0x1f80,
            ymm_hi: [0; 16],
            opmask: [0; 8],
            zmm_hi256: [[0; 2]; 16],
            hi16_zmm: [[0; 4]; 16],
            pkru: 0,
        }
    }
}

/// The operating mode that decides how instructions decode and address memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuMode {
    Real,
    Virtual8086,
    Protected16,
    Protected32,
    Long64,
    Compat16,
    Compat32,
}

impl CpuMode {
    /// Default code size in bits (16, 32 or 64).
    pub fn bitness(self) -> u32 {
        match self {
            CpuMode::Real | CpuMode::Virtual8086 | CpuMode::Protected16 | CpuMode::Compat16 => 16,
            CpuMode::Protected32 | CpuMode::Compat32 => 32,
            CpuMode::Long64 => 64,
        }
    }
}

/// GPR numbers in the hardware encoding.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
}

/// The complete architectural state of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS, indexed by [`SegReg`].
    pub seg: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub xcr0: u64,
    pub msr: Msrs,
    pub fpu: FpuState,
    /// DR0-DR7 (DR4 and DR5 alias DR6 and DR7 and are not used). Stored only: the
    /// interpreter raises no debug exceptions.
    #[serde(default = "default_dr")]
    pub dr: [u64; 8],
    /// Maskable interrupts (and NMIs) are blocked until the next instruction completes:
    /// the previous one was `sti` enabling interrupts, or `mov ss`/`pop ss`. `run` keeps it
    /// up to date; event delivery clears it.
    #[serde(default)]
    pub interrupt_shadow: bool,
}

/// DR6 and DR7 after reset: their fixed bits.
fn default_dr() -> [u64; 8] {
    [0, 0, 0, 0, 0, 0, dr::DR6_FIXED, dr::DR7_FIXED]
}

/// Debug-register constants.
pub mod dr {
    /// Bits of DR6 that read as one.
    pub const DR6_FIXED: u64 = 0xffff_0ff0;
    /// Bit 10 of DR7 reads as one.
    pub const DR7_FIXED: u64 = 0x400;
}

impl Default for CpuState {
    /// The reset state: real mode at F000:FFF0.
    fn default() -> Self {
        let mut seg = [Segment::real_mode(0); 6];
        seg[SegReg::Cs as usize] = Segment {
            selector: 0xf000,
            base: 0xffff_0000,
            limit: 0xffff,
            attr: 0xb | Segment::ATTR_S | Segment::ATTR_P,
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: rflags::FIXED,
            seg,
            ldtr: Segment {
                attr: 0x2 | Segment::ATTR_P,
                limit: 0xffff,
                ..Segment::default()
            },
            tr: Segment {
                attr: 0xb | Segment::ATTR_P,
                limit: 0xffff,
                ..Segment::default()
            },
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: 0x6000_0010,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            xcr0: 1,
            msr: Msrs {
                pat: 0x0007_0406_0007_0406,
                misc_enable: msr::MISC_ENABLE_FAST_STRINGS,
                ..Msrs::default()
            },
            fpu: FpuState::default(),
            dr: default_dr(),
            interrupt_shadow: false,
        }
    }
}

impl CpuState {
    /// A 64-bit long-mode state with flat segments at the given privilege level, paging on
    /// with the given CR3, SSE and XSAVE enabled. Convenient for tests and for the KVM
    /// fallback's unit tests; the VMM builds states from KVM's registers instead.
    pub fn long_mode(cr3: u64, cpl: u8) -> Self {
        let (cs, ds) = if cpl == 3 { (0x33, 0x2b) } else { (0x10, 0x18) };
        let mut s = CpuState {
            seg: [Segment::flat(ds, 0x3, cpl, true, false); 6],
            ..CpuState::default()
        };
        s.seg[SegReg::Cs as usize] = Segment::flat(cs, 0xb, cpl, false, true);
        s.rip = 0;
        s.cr0 = ctl::CR0_PE | ctl::CR0_MP | 1 << 4 | ctl::CR0_WP | ctl::CR0_AM | ctl::CR0_PG;
        s.cr3 = cr3;
        s.cr4 =
            ctl::CR4_PAE | ctl::CR4_PGE | ctl::CR4_OSFXSR | ctl::CR4_OSXMMEXCPT | ctl::CR4_OSXSAVE;
        s.efer = ctl::EFER_SCE | ctl::EFER_LME | ctl::EFER_LMA | ctl::EFER_NXE;
        s.xcr0 = 0x3;
        s
    }

    /// A 32-bit protected-mode state with flat segments, paging off.
    pub fn protected_mode32(cpl: u8) -> Self {
        let mut s = CpuState {
            seg: [Segment::flat(0x18 | u16::from(cpl), 0x3, cpl, true, false); 6],
            ..CpuState::default()
        };
        s.seg[SegReg::Cs as usize] = Segment::flat(0x10 | u16::from(cpl), 0xb, cpl, true, false);
        s.rip = 0;
        s.cr0 = ctl::CR0_PE | ctl::CR0_MP | 1 << 4;
        s.cr4 = ctl::CR4_OSFXSR | ctl::CR4_OSXMMEXCPT;
        s
    }

    /// The state of an application processor after INIT and a startup IPI with `vector`:
    /// real mode at `vector << 12` (CS = vector << 8, IP = 0), everything else as after
    /// reset.
    pub fn startup_ipi(vector: u8) -> Self {
        let mut s = CpuState::default();
        s.seg[SegReg::Cs as usize] = Segment {
            selector: u16::from(vector) << 8,
            base: u64::from(vector) << 12,
            limit: 0xffff,
            attr: 0xb | Segment::ATTR_S | Segment::ATTR_P,
        };
        s.rip = 0;
        s
    }

    pub fn segment(&self, s: SegReg) -> &Segment {
        &self.seg[s as usize]
    }

    pub fn mode(&self) -> CpuMode {
        let cs = &self.seg[SegReg::Cs as usize];
        if self.cr0 & ctl::CR0_PE == 0 {
            CpuMode::Real
        } else if self.efer & ctl::EFER_LMA != 0 {
            if cs.long() {
                CpuMode::Long64
            } else if cs.db() {
                CpuMode::Compat32
            } else {
                CpuMode::Compat16
            }
        } else if self.rflags & rflags::VM != 0 {
            CpuMode::Virtual8086
        } else if cs.db() {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        }
    }

    /// Current privilege level: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL (the
    /// convention VMX and SVM use; CS.RPL is stale between `mov cr0` and the far jump that
    /// enters protected mode).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & ctl::CR0_PE == 0 {
            0
        } else if self.rflags & rflags::VM != 0 {
            3
        } else {
            self.seg[SegReg::Ss as usize].dpl()
        }
    }
}
