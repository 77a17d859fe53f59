//! Conversions between vessel's backend-neutral CPU state and KVM's structures.

use arch::entry::{EntryState, Segment};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

pub fn segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.kind,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

pub fn regs(e: &EntryState) -> kvm_regs {
    kvm_regs {
        rip: e.rip,
        rsp: e.rsp,
        rbp: e.rbp,
        rsi: e.rsi,
        rbx: e.rbx,
        rax: e.rax,
        rflags: e.rflags,
        ..Default::default()
    }
}

/// Applies the entry state to `sregs` (read from KVM first, so fields vessel does not
/// manage, such as the APIC base, keep KVM's values).
pub fn apply_sregs(e: &EntryState, sregs: &mut kvm_sregs) {
    sregs.cs = segment(&e.cs);
    sregs.ds = segment(&e.ds);
    sregs.es = segment(&e.es);
    sregs.fs = segment(&e.fs);
    sregs.gs = segment(&e.gs);
    sregs.ss = segment(&e.ss);
    sregs.tr = segment(&e.tr);
    sregs.gdt = kvm_dtable {
        base: e.gdt.base,
        limit: e.gdt.limit,
        ..Default::default()
    };
    sregs.idt = kvm_dtable {
        base: e.idt.base,
        limit: e.idt.limit,
        ..Default::default()
    };
    sregs.cr0 = e.cr0;
    sregs.cr3 = e.cr3;
    sregs.cr4 = e.cr4;
    sregs.efer = e.efer;
}
