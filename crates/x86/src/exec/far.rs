//! Far control transfers through code-segment selectors (jmp, call and ret far, as mode
//! switches and CS reloads use them) and syscall/sysret. Call gates, task gates and task
//! switches are not modelled (#GP).

use iced_x86::{Code, Instruction, OpKind};

use super::segment::{Descriptor, mark_accessed, null_segment, read_descriptor};
use crate::decode::{Cx, Handler, Insn, K, kind};
use crate::exception::{Ex, Exception};
use crate::machine::{Machine, R, W16, W32, W64, Width};
use crate::mmu::canonical;
use crate::state::{CpuMode, SegReg, Segment, ctl, rflags};

fn gp(code: u16) -> Ex {
    Exception::GeneralProtection(code).into()
}

/// The offset a far transfer into code segment `d` continues at: canonical for 64-bit
/// code, else truncated to the operand size and within the limit.
fn target_ip(m: &Machine, d: Option<&Descriptor>, off: u64, bytes: usize) -> R<u64> {
    let to64 = d.is_some_and(|d| m.long_mode() && d.long());
    if to64 {
        return if canonical(off) { Ok(off) } else { Err(gp(0)) };
    }
    let ip = match bytes {
        2 => off & 0xffff,
        _ => off & 0xffff_ffff,
    };
    let limit = d.map_or(m.cpu.seg[SegReg::Cs as usize].limit, Descriptor::limit);
    if ip > u64::from(limit) {
        return Err(gp(0));
    }
    Ok(ip)
}

/// Resolves the target of a far jmp/call: the new CS cache and RIP. Only code segments at
/// the current privilege (or conforming ones) are accepted.
fn far_target(m: &mut Machine, sel: u16, off: u64, bytes: usize) -> R<(Segment, u64)> {
    if matches!(m.mode, CpuMode::Real | CpuMode::Virtual8086) {
        let ip = target_ip(m, None, off, bytes)?;
        let mut cs = m.cpu.seg[SegReg::Cs as usize];
        cs.selector = sel;
        cs.base = u64::from(sel) << 4;
        return Ok((cs, ip));
    }
    if sel & !3 == 0 {
        return Err(gp(0));
    }
    let d = read_descriptor(m, sel, false)?;
    let cpl = m.cpu.cpl();
    let rpl = (sel & 3) as u8;
    let err = sel & !3;
    // System descriptors here would be call gates, task gates or TSSs.
    if !d.code() {
        return Err(gp(err));
    }
    if d.conforming() {
        if d.dpl() > cpl {
            return Err(gp(err));
        }
    } else if rpl > cpl || d.dpl() != cpl {
        return Err(gp(err));
    }
    if !d.present() {
        return Err(Exception::SegmentNotPresent(err).into());
    }
    if m.long_mode() && d.long() && d.big() {
        return Err(gp(err));
    }
    let ip = target_ip(m, Some(&d), off, bytes)?;
    mark_accessed(m, &d)?;
    Ok((d.segment((sel & !3) | u16::from(cpl)), ip))
}

/// The selector and offset of a far jmp/call: the immediate pointer, or m16:W.
#[inline(always)]
fn far_pointer<W: Width, const DIRECT: bool>(m: &mut Machine, i: &Insn) -> R<(u16, u64)> {
    if DIRECT {
        return Ok((i.imm2 as u16, i.imm));
    }
    let lin = m.ea(i);
    let off = W::read(m, lin)?;
    let sel = m.read::<2>(lin.wrapping_add(W::BYTES as u64))? as u16;
    Ok((sel, off))
}

fn commit_cs(m: &mut Machine, cs: Segment, ip: u64) {
    m.cpu.seg[SegReg::Cs as usize] = cs;
    m.set_rip(ip);
    m.reload_segments();
    m.end_block();
}

fn far_jmp<W: Width, const DIRECT: bool>(m: &mut Machine, i: &Insn) -> R {
    let (sel, off) = far_pointer::<W, DIRECT>(m, i)?;
    let (cs, ip) = far_target(m, sel, off, W::BYTES)?;
    commit_cs(m, cs, ip);
    Ok(())
}

fn far_call<W: Width, const DIRECT: bool>(m: &mut Machine, i: &Insn) -> R {
    let (sel, off) = far_pointer::<W, DIRECT>(m, i)?;
    let (cs, ip) = far_target(m, sel, off, W::BYTES)?;
    let n = W::BYTES as u64;
    // Both pushes must be possible before anything changes.
    let low = m.stack_lin((2 * n).wrapping_neg());
    m.probe_write(low, 2 * W::BYTES)
        .map_err(|e| match e.get() {
            Exception::GeneralProtection(0) => Exception::StackFault(0).into(),
            _ => e,
        })?;
    let old_cs = u64::from(m.cpu.seg[SegReg::Cs as usize].selector);
    let ret = m.rip();
    m.push::<W>(old_cs)?;
    m.push::<W>(ret)?;
    commit_cs(m, cs, ip);
    Ok(())
}

/// ret far [imm16]: to the same privilege level, or to an outer one (popping SS:rSP too).
fn far_ret<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let n = W::BYTES as u64;
    let imm = i.imm & 0xffff;
    let off = m.peek::<W>(0)?;
    let sel = m.peek::<W>(n)? as u16;
    if matches!(m.mode, CpuMode::Real | CpuMode::Virtual8086) {
        let (cs, ip) = far_target(m, sel, off, W::BYTES)?;
        m.bump_rsp((2 * n).wrapping_add(imm));
        commit_cs(m, cs, ip);
        return Ok(());
    }
    if sel & !3 == 0 {
        return Err(gp(0));
    }
    let d = read_descriptor(m, sel, false)?;
    let cpl = m.cpu.cpl();
    let rpl = (sel & 3) as u8;
    let err = sel & !3;
    if !d.code()
        || rpl < cpl
        || (d.conforming() && d.dpl() > rpl)
        || (!d.conforming() && d.dpl() != rpl)
        || (m.long_mode() && d.long() && d.big())
    {
        return Err(gp(err));
    }
    if !d.present() {
        return Err(Exception::SegmentNotPresent(err).into());
    }
    let ip = target_ip(m, Some(&d), off, W::BYTES)?;
    let to64 = m.long_mode() && d.long();
    let outer = rpl > cpl;
    let mut new_ss = None;
    let mut new_sp = 0;
    if outer {
        new_sp = m.peek::<W>((2 * n).wrapping_add(imm))?;
        let ss_sel = m.peek::<W>((3 * n).wrapping_add(imm))? as u16;
        if ss_sel & !3 == 0 {
            if !(to64 && rpl != 3) {
                return Err(gp(0));
            }
            new_ss = Some(null_segment(ss_sel & !3 | u16::from(rpl)));
        } else {
            let ss_err = ss_sel & !3;
            let sd = read_descriptor(m, ss_sel, false)?;
            if (ss_sel & 3) as u8 != rpl || !sd.writable_data() || sd.dpl() != rpl {
                return Err(gp(ss_err));
            }
            if !sd.present() {
                return Err(Exception::StackFault(ss_err).into());
            }
            mark_accessed(m, &sd)?;
            new_ss = Some(sd.segment(ss_sel));
        }
    }
    mark_accessed(m, &d)?;
    m.cpu.seg[SegReg::Cs as usize] = d.segment(sel);
    match new_ss {
        Some(ss) => {
            let mask = if to64 {
                u64::MAX
            } else if ss.db() {
                0xffff_ffff
            } else {
                0xffff
            };
            m.cpu.seg[SegReg::Ss as usize] = ss;
            let sp = (new_sp & W::MASK).wrapping_add(imm);
            m.regs[4] = if mask == 0xffff {
                (m.regs[4] & !0xffff) | (sp & 0xffff)
            } else {
                sp & mask
            };
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
        None => {
            // Reload first so the stack size is the (unchanged) SS's.
            m.bump_rsp((2 * n).wrapping_add(imm));
        }
    }
    m.set_rip(ip);
    m.reload_segments();
    m.end_block();
    Ok(())
}

/// syscall: to the kernel's 64-bit entry (LSTAR; CSTAR from compatibility mode, as AMD
/// does) with CS/SS from STAR[47:32], RCX = return RIP, R11 = RFLAGS.
fn syscall(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.efer & ctl::EFER_SCE == 0 || !m.long_mode() {
        return Err(Exception::InvalidOpcode.into());
    }
    let sel = ((m.cpu.msr.star >> 32) & 0xfffc) as u16;
    let flags = m.rflags();
    m.regs[1] = m.rip();
    m.regs[11] = flags & !rflags::RF;
    let target = if m.mode == CpuMode::Long64 {
        m.cpu.msr.lstar
    } else {
        m.cpu.msr.cstar
    };
    m.cpu.seg[SegReg::Cs as usize] = Segment::flat(sel, 0xb, 0, false, true);
    m.cpu.seg[SegReg::Ss as usize] = Segment::flat(sel + 8, 0x3, 0, true, false);
    m.set_rflags(flags & !m.cpu.msr.sfmask & !(rflags::RF | rflags::VM));
    m.set_rip(target);
    m.reload_segments();
    m.end_block();
    Ok(())
}

/// sysret (W64: to 64-bit code at RCX, else compatibility mode at ECX) with CS/SS from
/// STAR[63:48], RFLAGS from R11.
fn sysret<const W64: bool>(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.efer & ctl::EFER_SCE == 0 || m.mode != CpuMode::Long64 {
        return Err(Exception::InvalidOpcode.into());
    }
    if m.cpu.cpl() != 0 {
        return Err(gp(0));
    }
    let base = ((m.cpu.msr.star >> 48) & 0xffff) as u16;
    let (cs, ip) = if W64 {
        let rcx = m.regs[1];
        if !canonical(rcx) {
            return Err(gp(0));
        }
        (Segment::flat((base + 16) | 3, 0xb, 3, false, true), rcx)
    } else {
        (
            Segment::flat(base | 3, 0xb, 3, true, false),
            m.regs[1] & 0xffff_ffff,
        )
    };
    m.cpu.seg[SegReg::Cs as usize] = cs;
    m.cpu.seg[SegReg::Ss as usize] = Segment::flat((base + 8) | 3, 0x3, 3, true, false);
    m.set_rflags((m.regs[11] & 0x3c_7fd7) | rflags::FIXED);
    m.set_rip(ip);
    m.reload_segments();
    m.end_block();
    Ok(())
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let direct = matches!(i.op_kind(0), OpKind::FarBranch16 | OpKind::FarBranch32);
    if direct {
        d.imm = if i.op_kind(0) == OpKind::FarBranch16 {
            u64::from(i.far_branch16())
        } else {
            u64::from(i.far_branch32())
        };
        d.imm2 = u32::from(i.far_branch_selector());
    }
    let mem = kind(i, 0) == K::Mem;
    Some(match i.code() {
        Code::Jmp_ptr1616 => far_jmp::<W16, true> as Handler,
        Code::Jmp_ptr1632 => far_jmp::<W32, true>,
        Code::Jmp_m1616 if mem => far_jmp::<W16, false>,
        Code::Jmp_m1632 if mem => far_jmp::<W32, false>,
        Code::Jmp_m1664 if mem => far_jmp::<W64, false>,
        Code::Call_ptr1616 => far_call::<W16, true>,
        Code::Call_ptr1632 => far_call::<W32, true>,
        Code::Call_m1616 if mem => far_call::<W16, false>,
        Code::Call_m1632 if mem => far_call::<W32, false>,
        Code::Call_m1664 if mem => far_call::<W64, false>,
        Code::Retfw | Code::Retfw_imm16 => far_ret::<W16>,
        Code::Retfd | Code::Retfd_imm16 => far_ret::<W32>,
        Code::Retfq | Code::Retfq_imm16 => far_ret::<W64>,
        Code::Syscall => syscall,
        Code::Sysretd => sysret::<false>,
        Code::Sysretq => sysret::<true>,
        _ => return None,
    })
}
