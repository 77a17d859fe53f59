//! Where a software vCPU starts: the kernel's entry state (boot vCPU) or real mode at
//! a SIPI vector (application processors).

use arch::entry::{EntryState, Segment as EntrySegment};
use x86::{CpuState, DescriptorTable, SegReg, Segment};

fn segment(s: &EntrySegment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        attr: u32::from(s.kind & 0xf)
            | u32::from(s.s) << 4
            | u32::from(s.dpl & 3) << 5
            | u32::from(s.present) << 7
            | u32::from(s.l) << 13
            | u32::from(s.db) << 14
            | u32::from(s.g) << 15
            | u32::from(!s.present) << 16,
    }
}

/// The boot vCPU at the kernel's entry point.
pub fn entry_state(e: &EntryState) -> CpuState {
    let mut s = CpuState::default();
    s.gpr[x86::gpr::RSP] = e.rsp;
    s.gpr[x86::gpr::RBP] = e.rbp;
    s.gpr[x86::gpr::RSI] = e.rsi;
    s.gpr[x86::gpr::RBX] = e.rbx;
    s.gpr[x86::gpr::RAX] = e.rax;
    s.rip = e.rip;
    s.rflags = e.rflags;
    for (reg, seg) in [
        (SegReg::Es, &e.es),
        (SegReg::Cs, &e.cs),
        (SegReg::Ss, &e.ss),
        (SegReg::Ds, &e.ds),
        (SegReg::Fs, &e.fs),
        (SegReg::Gs, &e.gs),
    ] {
        s.seg[reg as usize] = segment(seg);
    }
    s.tr = segment(&e.tr);
    s.ldtr = segment(&e.ldt);
    s.gdtr = DescriptorTable {
        base: e.gdt.base,
        limit: e.gdt.limit,
    };
    s.idtr = DescriptorTable {
        base: e.idt.base,
        limit: e.idt.limit,
    };
    s.cr0 = e.cr0;
    s.cr3 = e.cr3;
    s.cr4 = e.cr4;
    s.efer = e.efer;
    for (msr, value) in arch::msr::boot_msrs() {
        if msr == arch::msr::IA32_PAT {
            s.msr.pat = value;
        }
    }
    s
}

/// An application processor started by SIPI `vector`: real mode at vector << 12.
pub fn startup_state(vector: u8) -> CpuState {
    let mut s = CpuState::default();
    let selector = u16::from(vector) << 8;
    s.seg[SegReg::Cs as usize] = Segment {
        selector,
        base: u64::from(selector) << 4,
        limit: 0xffff,
        attr: 0xb | Segment::ATTR_S | Segment::ATTR_P,
    };
    s.rip = 0;
    s
}
