//! Exception and interrupt delivery (IDT in long and protected mode, IVT in real mode),
//! with the #DF/triple-fault escalation, and `iret`.

use iced_x86::{Instruction, Mnemonic as Mn};

use super::segment::{mark_accessed, null_segment, read_descriptor, sel_error};
use crate::decode::{Cx, Handler, Insn};
use crate::exception::{Class, Event, Ex, Exception, Fault};
use crate::flags::Flags;
use crate::machine::{Machine, R, W16, W32, W64, Width};
use crate::mmu::canonical;
use crate::state::{CpuMode, SegReg, Segment, ctl, rflags};

/// The event being delivered, in the form delivery needs.
#[derive(Clone, Copy, Debug)]
struct Pending {
    vector: u8,
    error: Option<u32>,
    /// int n / int3 / into: the gate's DPL is checked, no EXT bit.
    soft: bool,
    class: Class,
    /// CR2 for a page fault.
    cr2: Option<u64>,
}

impl Pending {
    fn exception(e: Exception) -> Self {
        let soft = matches!(
            e,
            Exception::SoftwareInterrupt(_) | Exception::Breakpoint | Exception::Overflow
        );
        Pending {
            vector: e.vector(),
            error: if soft { None } else { e.error_code() },
            soft,
            class: if soft { Class::Benign } else { e.class() },
            cr2: match e {
                Exception::PageFault { address, .. } => Some(address),
                _ => None,
            },
        }
    }

    fn new(event: Event) -> Self {
        match event {
            Event::Exception(e) => Self::exception(e),
            Event::Interrupt(v) => Pending {
                vector: v,
                error: None,
                soft: false,
                class: Class::Benign,
                cr2: None,
            },
            Event::Nmi => Pending {
                vector: 2,
                error: None,
                soft: false,
                class: Class::Benign,
                cr2: None,
            },
        }
    }

    /// Faults raised while delivering an external event or exception carry EXT.
    fn ext(&self) -> bool {
        !self.soft
    }

    /// Error code of a fault about this event's IDT entry.
    fn idt_error(&self) -> u16 {
        (u16::from(self.vector) << 3) | 2 | u16::from(self.ext())
    }
}

/// IDT gate types (system descriptor type field).
const INT_GATE16: u8 = 0x6;
const TRAP_GATE16: u8 = 0x7;
const INT_GATE: u8 = 0xe;
const TRAP_GATE: u8 = 0xf;

/// RFLAGS bits an interrupt or exception clears (IF only through interrupt gates).
const CLEARED: u64 = rflags::TF | rflags::NT | rflags::RF | rflags::VM;

impl Machine<'_> {
    /// Delivers `event`, escalating faults raised during delivery to #DF, and a fault
    /// while delivering #DF to a triple fault. `trap_len`: the length of the int n/int3/
    /// into instruction RIP is after (0 if unknown): a fault delivering it is reported at
    /// the instruction.
    pub(crate) fn deliver(&mut self, event: Event, trap_len: u8) -> Result<(), Fault> {
        let mut ev = Pending::new(event);
        loop {
            let saved_set = self.tlb_set;
            match self.deliver_once(&ev) {
                Ok(()) => {
                    self.cpu.interrupt_shadow = false;
                    self.end_block();
                    return Ok(());
                }
                Err(e) => {
                    self.tlb_set = saved_set;
                    if ev.soft {
                        let ip = self.rip().wrapping_sub(u64::from(trap_len));
                        self.set_rip(ip);
                    }
                    if ev.class == Class::DoubleFault {
                        return Err(Fault::TripleFault);
                    }
                    let double = matches!(
                        (ev.class, e.get().class()),
                        (Class::Contributory, Class::Contributory)
                            | (Class::PageFault, Class::Contributory)
                            | (Class::PageFault, Class::PageFault)
                    );
                    ev = Pending::exception(if double {
                        Exception::DoubleFault
                    } else {
                        e.get()
                    });
                }
            }
        }
    }

    fn deliver_once(&mut self, ev: &Pending) -> R {
        if let Some(a) = ev.cr2 {
            // CR2 is written when the fault is delivered, even if delivery fails.
            self.cpu.cr2 = a;
        }
        if self.cpu.cr0 & ctl::CR0_PE == 0 {
            self.deliver_real(ev)
        } else if self.long_mode() {
            self.deliver_long(ev)
        } else if self.cpu.rflags & rflags::VM != 0 {
            // Virtual-8086 mode is not modelled.
            Err(Exception::GeneralProtection(0).into())
        } else {
            self.deliver_protected(ev)
        }
    }

    /// Real mode: the IVT holds 4-byte far pointers; FLAGS, CS and IP are pushed.
    fn deliver_real(&mut self, ev: &Pending) -> R {
        let off = u64::from(ev.vector) * 4;
        if off + 3 > u64::from(self.cpu.idtr.limit) {
            return Err(Exception::GeneralProtection(ev.idt_error()).into());
        }
        let entry = self.system_read::<4>(self.cpu.idtr.base.wrapping_add(off) & 0xffff_ffff)?;
        let flags = self.rflags();
        let cs = self.cpu.seg[SegReg::Cs as usize].selector;
        let ss_base = self.seg_base[SegReg::Ss as usize];
        let sp = self.regs[4];
        let new_sp = self.push_frame(
            ss_base,
            sp,
            self.stack_mask,
            false,
            2,
            &[flags, u64::from(cs), self.rip()],
            false,
        )?;
        self.regs[4] = (sp & !self.stack_mask) | new_sp;
        let new = flags & !(rflags::IF | rflags::TF | rflags::AC | rflags::RF);
        self.set_rflags(new);
        let sel = (entry >> 16) as u16;
        let s = &mut self.cpu.seg[SegReg::Cs as usize];
        s.selector = sel;
        s.base = u64::from(sel) << 4;
        self.set_rip(entry & 0xffff);
        self.reload_segments();
        Ok(())
    }

    /// Reads a gate of the IDT: (low, high) quadwords (high only in long mode).
    fn read_gate(&mut self, ev: &Pending, long: bool) -> R<(u64, u64)> {
        let size = if long { 16 } else { 8 };
        let off = u64::from(ev.vector) * size;
        if off + size - 1 > u64::from(self.cpu.idtr.limit) {
            return Err(Exception::GeneralProtection(ev.idt_error()).into());
        }
        let base = self.cpu.idtr.base.wrapping_add(off);
        let base = if long { base } else { base & 0xffff_ffff };
        let lo = self.system_read::<8>(base)?;
        let hi = if long {
            self.system_read::<8>(base.wrapping_add(8))?
        } else {
            0
        };
        let typ = ((lo >> 40) & 0x1f) as u8;
        let ok = if long {
            matches!(typ, INT_GATE | TRAP_GATE)
        } else {
            // Task gates (0x5) are not modelled.
            matches!(typ, INT_GATE | TRAP_GATE | INT_GATE16 | TRAP_GATE16)
        };
        if !ok {
            return Err(Exception::GeneralProtection(ev.idt_error()).into());
        }
        let dpl = ((lo >> 45) & 3) as u8;
        if ev.soft && dpl < self.cpu.cpl() {
            return Err(Exception::GeneralProtection(ev.idt_error()).into());
        }
        if lo & (1 << 47) == 0 {
            return Err(Exception::SegmentNotPresent(ev.idt_error()).into());
        }
        Ok((lo, hi))
    }

    /// The handler's code segment: (descriptor cache, new CPL).
    fn gate_code_segment(&mut self, ev: &Pending, sel: u16, long: bool) -> R<(Segment, u8)> {
        let ext = ev.ext();
        if sel & !3 == 0 {
            return Err(Exception::GeneralProtection(u16::from(ext)).into());
        }
        let d = read_descriptor(self, sel, ext)?;
        let cpl = self.cpu.cpl();
        let err = sel_error(sel, ext);
        if !d.code() || d.dpl() > cpl || (long && (!d.long() || d.big())) {
            return Err(Exception::GeneralProtection(err).into());
        }
        if !d.present() {
            return Err(Exception::SegmentNotPresent(err).into());
        }
        mark_accessed(self, &d)?;
        let new_cpl = if d.conforming() { cpl } else { d.dpl() };
        let sel = (sel & !3) | u16::from(new_cpl);
        Ok((d.segment(sel), new_cpl))
    }

    /// Reads `N` bytes at `offset` in the current TSS (#TS beyond its limit).
    fn tss_read<const N: usize>(&mut self, offset: u64, ext: bool) -> R<u64> {
        let tr = self.cpu.tr;
        if tr.attr & Segment::ATTR_UNUSABLE != 0 || offset + N as u64 - 1 > u64::from(tr.limit) {
            return Err(Exception::InvalidTss(sel_error(tr.selector, ext)).into());
        }
        let lin = tr.base.wrapping_add(offset);
        let lin = if self.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        };
        self.system_read::<N>(lin)
    }

    /// IA-32e mode: 16-byte gates, 64-bit handlers, stacks from the TSS (RSPn or IST),
    /// SS:RSP always pushed, RSP aligned to 16 bytes.
    fn deliver_long(&mut self, ev: &Pending) -> R {
        let (lo, hi) = self.read_gate(ev, true)?;
        let sel = (lo >> 16) as u16;
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let ist = (lo >> 32) & 7;
        let gate_type = ((lo >> 40) & 0xf) as u8;
        let (cs, new_cpl) = self.gate_code_segment(ev, sel, true)?;
        let cpl = self.cpu.cpl();
        let ext = ev.ext();
        let old_ss = self.cpu.seg[SegReg::Ss as usize];
        let old_rsp = self.regs[4];
        let mut rsp = old_rsp;
        let new_ss = if new_cpl < cpl {
            rsp = self.tss_read::<8>(4 + 8 * u64::from(new_cpl), ext)?;
            Some(null_segment(u16::from(new_cpl)))
        } else {
            None
        };
        if ist != 0 {
            rsp = self.tss_read::<8>(0x24 + 8 * (ist - 1), ext)?;
        }
        if !canonical(target) {
            return Err(Exception::GeneralProtection(u16::from(ext)).into());
        }
        rsp &= !0xf;
        let flags = self.rflags();
        let old_cs = self.cpu.seg[SegReg::Cs as usize].selector;
        let mut frame = [
            u64::from(old_ss.selector),
            old_rsp,
            flags,
            u64::from(old_cs),
            self.rip(),
            0,
        ];
        let n = if let Some(e) = ev.error {
            frame[5] = u64::from(e);
            6
        } else {
            5
        };
        let new_rsp = self.push_frame(0, rsp, u64::MAX, true, 8, &frame[..n], new_cpl == 3)?;
        // Commit.
        self.regs[4] = new_rsp;
        if let Some(ss) = new_ss {
            self.cpu.seg[SegReg::Ss as usize] = ss;
        }
        self.cpu.seg[SegReg::Cs as usize] = cs;
        let mut new = flags & !CLEARED;
        if gate_type == INT_GATE {
            new &= !rflags::IF;
        }
        self.set_rflags(new);
        self.set_rip(target);
        self.reload_segments();
        Ok(())
    }

    /// Protected mode: 8-byte gates (16- or 32-bit), stack switch through the TSS's
    /// SSn:ESPn on a privilege change.
    fn deliver_protected(&mut self, ev: &Pending) -> R {
        let (lo, _) = self.read_gate(ev, false)?;
        let sel = (lo >> 16) as u16;
        let gate_type = ((lo >> 40) & 0xf) as u8;
        let wide = gate_type & 8 != 0;
        let mut target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if !wide {
            target &= 0xffff;
        }
        let (cs, new_cpl) = self.gate_code_segment(ev, sel, false)?;
        if target > u64::from(cs.limit) {
            return Err(Exception::GeneralProtection(u16::from(ev.ext())).into());
        }
        let cpl = self.cpu.cpl();
        let ext = ev.ext();
        let size = if wide { 4 } else { 2 };
        let flags = self.rflags();
        let old_cs = self.cpu.seg[SegReg::Cs as usize].selector;
        let old_ss = self.cpu.seg[SegReg::Ss as usize];
        let old_sp = self.regs[4];
        let mut frame = [0u64; 6];
        let mut n = 0;
        let (ss, sp_base) = if new_cpl < cpl {
            // The TSS's stack for the new privilege level (32- or 16-bit TSS).
            let tss32 = self.cpu.tr.type_() & 8 != 0;
            let (esp, ss_sel) = if tss32 {
                let o = 4 + 8 * u64::from(new_cpl);
                (
                    self.tss_read::<4>(o, ext)?,
                    self.tss_read::<2>(o + 4, ext)? as u16,
                )
            } else {
                let o = 2 + 4 * u64::from(new_cpl);
                (
                    self.tss_read::<2>(o, ext)?,
                    self.tss_read::<2>(o + 2, ext)? as u16,
                )
            };
            let ss = self.stack_segment_for(ss_sel, new_cpl, ext, true)?;
            frame[0] = u64::from(old_ss.selector);
            frame[1] = old_sp;
            n = 2;
            (ss, esp)
        } else {
            (old_ss, old_sp)
        };
        frame[n] = flags;
        frame[n + 1] = u64::from(old_cs);
        frame[n + 2] = self.rip();
        n += 3;
        if let Some(e) = ev.error {
            frame[n] = u64::from(e);
            n += 1;
        }
        let mask = if ss.db() { 0xffff_ffff } else { 0xffff };
        let new_sp = self.push_frame(
            ss.base,
            sp_base,
            mask,
            false,
            size,
            &frame[..n],
            new_cpl == 3,
        )?;
        // Commit.
        self.cpu.seg[SegReg::Ss as usize] = ss;
        self.regs[4] = (sp_base & !mask & 0xffff_ffff) | new_sp;
        self.cpu.seg[SegReg::Cs as usize] = cs;
        let mut new = flags & !CLEARED;
        if gate_type & 7 == INT_GATE & 7 {
            new &= !rflags::IF;
        }
        self.set_rflags(new);
        self.set_rip(target);
        self.reload_segments();
        Ok(())
    }

    /// Checks the stack segment `sel` for privilege level `cpl` and returns its cache.
    /// `tss`: the selector came from the TSS (faults are #TS rather than #GP).
    fn stack_segment_for(&mut self, sel: u16, cpl: u8, ext: bool, tss: bool) -> R<Segment> {
        let err = sel_error(sel, ext);
        let bad = |_| -> Ex {
            if tss {
                Exception::InvalidTss(err).into()
            } else {
                Exception::GeneralProtection(err).into()
            }
        };
        if sel & !3 == 0 || (sel & 3) as u8 != cpl {
            return Err(bad(()));
        }
        let d = read_descriptor(self, sel, ext).map_err(|e| match e.get() {
            Exception::GeneralProtection(_) => bad(()),
            _ => e,
        })?;
        if !d.writable_data() || d.dpl() != cpl {
            return Err(bad(()));
        }
        if !d.present() {
            return Err(Exception::StackFault(err).into());
        }
        mark_accessed(self, &d)?;
        Ok(d.segment(sel))
    }

    /// Pushes `vals` (`size` bytes each, the first at the highest address) below `sp` in
    /// the stack segment at `ss_base`, all or nothing, with the privilege of `user`.
    /// Returns the new stack pointer (within `mask`).
    #[allow(clippy::too_many_arguments)]
    fn push_frame(
        &mut self,
        ss_base: u64,
        sp: u64,
        mask: u64,
        long: bool,
        size: u64,
        vals: &[u64],
        user: bool,
    ) -> R<u64> {
        let total = size * vals.len() as u64;
        let new_sp = sp.wrapping_sub(total) & mask;
        let lin = |off: u64| {
            let a = ss_base.wrapping_add(off & mask);
            if long { a } else { a & 0xffff_ffff }
        };
        if long && (!canonical(new_sp) || !canonical(new_sp.wrapping_add(total - 1))) {
            return Err(Exception::StackFault(0).into());
        }
        let saved = self.tlb_set;
        self.tlb_set = usize::from(user);
        let r = (|| {
            // Probe every slot first so a fault leaves memory untouched.
            for k in 0..vals.len() as u64 {
                self.probe_write(lin(new_sp.wrapping_add(k * size)), size as usize)?;
            }
            for (k, &v) in vals.iter().enumerate() {
                let a = lin(sp.wrapping_sub(size * (k as u64 + 1)));
                match size {
                    2 => self.write::<2>(a, v)?,
                    4 => self.write::<4>(a, v)?,
                    _ => self.write::<8>(a, v)?,
                }
            }
            Ok(())
        })();
        self.tlb_set = saved;
        r.map(|()| new_sp)
    }

    /// Replaces RFLAGS (all of it, including the lazily kept status flags).
    pub(crate) fn set_rflags(&mut self, v: u64) {
        let v = v | rflags::FIXED;
        self.cpu.rflags = v;
        self.flags = Flags::from_bits(v);
    }
}

/// iret (W = operand size): real mode, same privilege, return to an outer privilege
/// level, and the 64-bit form that always pops SS:RSP.
fn iret<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let n = W::BYTES as u64;
    if m.cpu.cr0 & ctl::CR0_PE == 0 {
        return iret_real::<W>(m);
    }
    let old = m.rflags();
    if old & rflags::VM != 0 {
        // Virtual-8086 mode is not modelled.
        return Err(Exception::GeneralProtection(0).into());
    }
    if old & rflags::NT != 0 {
        // A task return (or #GP in IA-32e mode): task switches are not modelled.
        return Err(Exception::GeneralProtection(0).into());
    }
    let long64 = m.mode == CpuMode::Long64;
    let new_ip = m.peek::<W>(0)?;
    let sel = m.peek::<W>(n)? as u16;
    let new_flags = m.peek::<W>(2 * n)?;
    let cpl = m.cpu.cpl();
    if W::BYTES == 4 && new_flags & rflags::VM != 0 && cpl == 0 && !m.long_mode() {
        // Return to virtual-8086 mode: not modelled.
        return Err(Exception::GeneralProtection(0).into());
    }
    // The new code segment.
    if sel & !3 == 0 {
        return Err(Exception::GeneralProtection(0).into());
    }
    let d = read_descriptor(m, sel, false)?;
    let rpl = (sel & 3) as u8;
    let err = sel & !3;
    if !d.code()
        || rpl < cpl
        || (d.conforming() && d.dpl() > rpl)
        || (!d.conforming() && d.dpl() != rpl)
        || (m.long_mode() && d.long() && d.big())
    {
        return Err(Exception::GeneralProtection(err).into());
    }
    if !d.present() {
        return Err(Exception::SegmentNotPresent(err).into());
    }
    let to64 = m.long_mode() && d.long();
    let outer = rpl > cpl;
    let pops_stack = long64 || outer;
    let mut new_ss = None;
    let mut new_sp = 0;
    if pops_stack {
        new_sp = m.peek::<W>(3 * n)?;
        let ss_sel = m.peek::<W>(4 * n)? as u16;
        if ss_sel & !3 == 0 {
            // A null SS is allowed only when returning to 64-bit code below CPL 3.
            if !(to64 && rpl != 3) {
                return Err(Exception::GeneralProtection(0).into());
            }
            new_ss = Some(null_segment(ss_sel & !3 | u16::from(rpl)));
        } else {
            let ss_err = ss_sel & !3;
            if (ss_sel & 3) as u8 != rpl {
                return Err(Exception::GeneralProtection(ss_err).into());
            }
            let sd = read_descriptor(m, ss_sel, false)?;
            if !sd.writable_data() || sd.dpl() != rpl {
                return Err(Exception::GeneralProtection(ss_err).into());
            }
            if !sd.present() {
                return Err(Exception::StackFault(ss_err).into());
            }
            mark_accessed(m, &sd)?;
            new_ss = Some(sd.segment(ss_sel));
        }
    }
    let ip = if to64 {
        if !canonical(new_ip) {
            return Err(Exception::GeneralProtection(0).into());
        }
        new_ip
    } else {
        let ip = new_ip & W::MASK & 0xffff_ffff;
        if ip > u64::from(d.limit()) {
            return Err(Exception::GeneralProtection(0).into());
        }
        ip
    };
    mark_accessed(m, &d)?;
    // RFLAGS: IF only if CPL <= IOPL, IOPL (and VIF/VIP) only at CPL 0.
    let iopl = ((old & rflags::IOPL) >> 12) as u8;
    let mut mask =
        rflags::ARITH | rflags::TF | rflags::DF | rflags::NT | rflags::RF | rflags::AC | rflags::ID;
    if cpl <= iopl {
        mask |= rflags::IF;
    }
    if cpl == 0 {
        mask |= rflags::IOPL | rflags::VIF | rflags::VIP;
    }
    mask &= W::MASK;
    let flags = (old & !mask) | (new_flags & mask);
    // Commit.
    m.cpu.seg[SegReg::Cs as usize] = d.segment(sel);
    if let Some(ss) = new_ss {
        let mask = if to64 {
            u64::MAX
        } else if ss.db() {
            0xffff_ffff
        } else {
            0xffff
        };
        m.cpu.seg[SegReg::Ss as usize] = ss;
        let sp = new_sp & W::MASK;
        m.regs[4] = if mask == 0xffff {
            (m.regs[4] & !0xffff) | (sp & 0xffff)
        } else {
            sp & mask
        };
    } else {
        m.bump_rsp(3 * n);
    }
    if outer {
        // Data segments the new privilege level may not use become null (the base is kept:
        // 64-bit code still addresses through FS/GS bases).
        for s in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
            let seg = &mut m.cpu.seg[s as usize];
            let code_conforming = seg.attr & 0x1c == 0x1c;
            let unusable = seg.attr & Segment::ATTR_UNUSABLE != 0;
            if !unusable && !code_conforming && seg.dpl() < rpl {
                seg.selector = 0;
                seg.attr = Segment::ATTR_UNUSABLE;
            }
        }
    }
    m.set_rflags(flags);
    m.set_rip(ip);
    m.reload_segments();
    m.end_block();
    Ok(())
}

fn iret_real<W: Width>(m: &mut Machine) -> R {
    let n = W::BYTES as u64;
    let ip = m.peek::<W>(0)?;
    let cs = m.peek::<W>(n)? as u16;
    let fl = m.peek::<W>(2 * n)?;
    if ip > 0xffff {
        return Err(Exception::GeneralProtection(0).into());
    }
    m.bump_rsp(3 * n);
    let old = m.rflags();
    let keep = if W::BYTES == 2 {
        !0xffff
    } else {
        rflags::VM | rflags::VIF | rflags::VIP
    };
    m.set_rflags((old & keep) | (fl & !keep & W::MASK));
    let s = &mut m.cpu.seg[SegReg::Cs as usize];
    s.selector = cs;
    s.base = u64::from(cs) << 4;
    m.set_rip(ip);
    m.reload_segments();
    m.end_block();
    Ok(())
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Iret => Some(iret::<W16> as Handler),
        Mn::Iretd => Some(iret::<W32> as Handler),
        Mn::Iretq => Some(iret::<W64> as Handler),
        _ => None,
    }
}
