//! x87/SSE/AVX state management: fxsave/fxrstor, xsave/xsaveopt/xsavec/xsaves,
//! xrstor/xrstors, ldmxcsr/stmxcsr, and the x87 control instructions that only move
//! control/status words (fninit, fnstcw, fldcw, fnstsw, fnclex, fwait). x87 arithmetic is
//! not implemented; its registers are carried as data.
//!
//! XSAVE component layout (standard-format offsets, sizes, compacted alignment) comes from
//! the guest's CPUID leaf 0xD, so saved images are exactly what the guest expects. The
//! components held in [`crate::FpuState`] are x87 (0), SSE (1), AVX (2), opmask (5),
//! ZMM_Hi256 (6), Hi16_ZMM (7) and PKRU (9); others are saved as absent (init) and
//! restores ignore them.

use iced_x86::{Code, Instruction, Mnemonic as Mn};

use crate::decode::{Cx, Handler, Insn, K, kind};
use crate::exception::{Ex, Exception};
use crate::machine::{Machine, R};
use crate::state::{FpuState, ctl};

mod host;
mod mmx;
mod x87;
mod xsave;
pub(crate) use x87::{FOP_FROM_BYTES, fop_from_bytes};
use xsave::{XSAVE, XSAVEC, XSAVES, xrstor, xsave};

pub(super) const FX_SIZE: usize = 512;
/// Largest XSAVE image handled (x87 through AVX-512 and PKRU fit in 2.7 KiB); components
/// laid out beyond it are treated as absent. A stack buffer keeps xsave allocation-free.
pub(super) const XSAVE_MAX: usize = 0x3000;
pub(super) const HEADER: usize = 512;
/// Components this interpreter holds state for.
pub(super) const HELD: u64 = 0b10_1110_0111;

pub(super) fn gp() -> Ex {
    Exception::GeneralProtection(0).into()
}

/// x87 instructions (and fxsave & co) need CR0.EM clear and CR0.TS clear.
pub(super) fn fpu_ok(m: &Machine) -> R {
    if m.cpu.cr0 & ctl::CR0_EM != 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    if m.cpu.cr0 & ctl::CR0_TS != 0 {
        return Err(Exception::DeviceNotAvailable.into());
    }
    Ok(())
}

pub(super) fn xsave_ok(m: &Machine) -> R {
    if m.cpu.cr4 & ctl::CR4_OSXSAVE == 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    if m.cpu.cr0 & ctl::CR0_TS != 0 {
        return Err(Exception::DeviceNotAvailable.into());
    }
    Ok(())
}

/// The MXCSR bits the guest CPU supports: DAZ always, MM (bit 17) where CPUID reports
/// misaligned-SSE mode.
pub(super) fn mxcsr_mask(m: &mut Machine) -> u32 {
    let ecx = m.platform(|p| p.cpuid(0x8000_0001, 0))[2];
    0xffff | if ecx & (1 << 7) != 0 { 1 << 17 } else { 0 }
}

pub(super) fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

pub(super) fn get<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    buf[off..off + N].try_into().expect("in bounds")
}

pub(super) fn u16_at(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(get::<2>(buf, off))
}

pub(super) fn u32_at(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(get::<4>(buf, off))
}

pub(super) fn u64_at(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(get::<8>(buf, off))
}

/// Writes the x87 part of the legacy area (bytes 0..24 and 32..160). `wide`: the 64-bit
/// instruction-pointer format (REX.W), else FIP/FCS/FDP/FDS 32-bit.
pub(super) fn write_x87(f: &FpuState, buf: &mut [u8], wide: bool) {
    put(buf, 0, &f.fcw.to_le_bytes());
    put(buf, 2, &f.fsw.to_le_bytes());
    buf[4] = f.ftw;
    buf[5] = 0;
    put(buf, 6, &f.fop.to_le_bytes());
    if wide {
        put(buf, 8, &f.fip.to_le_bytes());
        put(buf, 16, &f.fdp.to_le_bytes());
    } else {
        put(buf, 8, &(f.fip as u32).to_le_bytes());
        put(buf, 12, &[0; 4]);
        put(buf, 16, &(f.fdp as u32).to_le_bytes());
        put(buf, 20, &[0; 4]);
    }
    for k in 0..8 {
        let mut slot = [0u8; 16];
        slot[..10].copy_from_slice(&f.st[k].to_le_bytes()[..10]);
        put(buf, 32 + 16 * k, &slot);
    }
}

pub(super) fn read_x87(f: &mut FpuState, buf: &[u8], wide: bool) {
    f.fcw = u16_at(buf, 0);
    f.fsw = u16_at(buf, 2);
    f.ftw = buf[4];
    f.fop = u16_at(buf, 6) & 0x7ff;
    if wide {
        f.fip = u64_at(buf, 8);
        f.fdp = u64_at(buf, 16);
    } else {
        f.fip = u64::from(u32_at(buf, 8));
        f.fdp = u64::from(u32_at(buf, 16));
    }
    for k in 0..8 {
        let mut b = [0u8; 16];
        b[..10].copy_from_slice(&buf[32 + 16 * k..42 + 16 * k]);
        f.st[k] = u128::from_le_bytes(b);
    }
}

pub(super) fn init_x87(f: &mut FpuState) {
    f.fcw = 0x37f;
    f.fsw = 0;
    f.ftw = 0;
    f.fop = 0;
    f.fip = 0;
    f.fdp = 0;
    f.st = [0; 8];
}

pub(super) fn xmm_count(m: &Machine) -> usize {
    if m.mode == crate::state::CpuMode::Long64 {
        16
    } else {
        8
    }
}

/// Checks alignment and that the whole area is writable before anything is stored.
pub(super) fn area(m: &mut Machine, i: &Insn, align: u64, len: usize, write: bool) -> R<u64> {
    let lin = m.ea(i);
    if lin & (align - 1) != 0 {
        return Err(gp());
    }
    let mut off = 0;
    while off < len {
        let n = (len - off).min(4096);
        if write {
            m.probe_write(lin.wrapping_add(off as u64), n)?;
        } else {
            m.probe_read(lin.wrapping_add(off as u64), n)?;
        }
        off += n;
    }
    Ok(lin)
}

pub(super) fn read_area(m: &mut Machine, lin: u64, buf: &mut [u8]) -> R {
    for (k, chunk) in buf.chunks_mut(4096).enumerate() {
        m.read_bytes(lin.wrapping_add(4096 * k as u64), chunk)?;
    }
    Ok(())
}

pub(super) fn write_area(m: &mut Machine, lin: u64, buf: &[u8]) -> R {
    for (k, chunk) in buf.chunks(4096).enumerate() {
        m.write_bytes(lin.wrapping_add(4096 * k as u64), chunk)?;
    }
    Ok(())
}

fn fxsave<const WIDE: bool>(m: &mut Machine, i: &Insn) -> R {
    fpu_ok(m)?;
    let lin = area(m, i, 16, FX_SIZE, true)?;
    // Bytes 416..511 are not written; start from what is there.
    let buf = &mut [0u8; FX_SIZE];
    read_area(m, lin, buf)?;
    let mask = mxcsr_mask(m);
    let f = &m.cpu.fpu;
    write_x87(f, buf, WIDE);
    put(buf, 24, &f.mxcsr.to_le_bytes());
    put(buf, 28, &mask.to_le_bytes());
    for k in 0..xmm_count(m) {
        put(buf, 160 + 16 * k, &f.xmm[k].to_le_bytes());
    }
    write_area(m, lin, &buf[..416])
}

fn fxrstor<const WIDE: bool>(m: &mut Machine, i: &Insn) -> R {
    fpu_ok(m)?;
    let lin = area(m, i, 16, FX_SIZE, false)?;
    let buf = &mut [0u8; FX_SIZE];
    read_area(m, lin, buf)?;
    let mxcsr = u32_at(buf, 24);
    if mxcsr & !mxcsr_mask(m) != 0 {
        return Err(gp());
    }
    let n = xmm_count(m);
    let f = &mut m.cpu.fpu;
    read_x87(f, buf, WIDE);
    f.mxcsr = mxcsr;
    for k in 0..n {
        f.xmm[k] = u128::from_le_bytes(get::<16>(buf, 160 + 16 * k));
    }
    Ok(())
}

fn ldmxcsr(m: &mut Machine, i: &Insn) -> R {
    super::sse::sse_ok(m)?;
    let lin = m.ea(i);
    let v = m.read::<4>(lin)? as u32;
    if v & !mxcsr_mask(m) != 0 {
        return Err(gp());
    }
    m.cpu.fpu.mxcsr = v;
    Ok(())
}

fn stmxcsr(m: &mut Machine, i: &Insn) -> R {
    super::sse::sse_ok(m)?;
    let lin = m.ea(i);
    m.write::<4>(lin, u64::from(m.cpu.fpu.mxcsr))
}

fn fninit(m: &mut Machine, _i: &Insn) -> R {
    fpu_ok(m)?;
    let f = &mut m.cpu.fpu;
    // `st` is indexed relative to TOP (as fxsave stores it); TOP becomes 0, so the
    // physical registers keep their contents under new names.
    let top = usize::from((f.fsw >> 11) & 7);
    let old = f.st;
    for (k, s) in f.st.iter_mut().enumerate() {
        *s = old[(k + 8 - top) % 8];
    }
    f.fcw = 0x37f;
    f.fsw = 0;
    f.ftw = 0;
    f.fop = 0;
    f.fip = 0;
    f.fdp = 0;
    Ok(())
}

fn fnstcw(m: &mut Machine, i: &Insn) -> R {
    fpu_ok(m)?;
    let lin = m.ea(i);
    m.write::<2>(lin, u64::from(m.cpu.fpu.fcw))
}

fn fldcw(m: &mut Machine, i: &Insn) -> R {
    fpu_ok(m)?;
    let lin = m.ea(i);
    let v = m.read::<2>(lin)? as u16;
    let f = &mut m.cpu.fpu;
    // Reserved bits read back as the hardware keeps them (bit 6 set, 13-15 clear).
    f.fcw = (v & 0x1f3f) | 0x40;
    // Unmasking a pending exception flag sets the summary (ES) and busy (B) bits;
    // masking every pending one clears them.
    let pending = f.fsw & 0x3f & !f.fcw & 0x3f != 0;
    f.fsw = (f.fsw & !0x8080) | if pending { 0x8080 } else { 0 };
    Ok(())
}

/// fnstsw m16 / fnstsw ax.
fn fnstsw<const AX: bool>(m: &mut Machine, i: &Insn) -> R {
    fpu_ok(m)?;
    let v = u64::from(m.cpu.fpu.fsw);
    if AX {
        m.regs[0] = (m.regs[0] & !0xffff) | v;
        Ok(())
    } else {
        let lin = m.ea(i);
        m.write::<2>(lin, v)
    }
}

fn fnclex(m: &mut Machine, _i: &Insn) -> R {
    fpu_ok(m)?;
    // Clear the exception flags, stack fault, summary and busy bits.
    m.cpu.fpu.fsw &= !0x80ff;
    Ok(())
}

fn fwait(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.cr0 & (ctl::CR0_MP | ctl::CR0_TS) == ctl::CR0_MP | ctl::CR0_TS {
        return Err(Exception::DeviceNotAvailable.into());
    }
    // A pending unmasked x87 exception would be delivered here (#MF).
    let f = &m.cpu.fpu;
    if f.fsw & 0x3f & !f.fcw & 0x3f != 0 {
        return Err(Exception::FloatingPoint.into());
    }
    Ok(())
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, cx: &Cx) -> Option<Handler> {
    if let Some(h) = x87::select(i, d, cx).or_else(|| mmx::select(i, d, cx)) {
        return Some(h);
    }
    let mem = kind(i, 0) == K::Mem;
    Some(match i.mnemonic() {
        Mn::Fxsave if mem => fxsave::<false>,
        Mn::Fxsave64 if mem => fxsave::<true>,
        Mn::Fxrstor if mem => fxrstor::<false>,
        Mn::Fxrstor64 if mem => fxrstor::<true>,
        Mn::Xsave | Mn::Xsaveopt if mem => xsave::<XSAVE, false>,
        Mn::Xsave64 | Mn::Xsaveopt64 if mem => xsave::<XSAVE, true>,
        Mn::Xsavec if mem => xsave::<XSAVEC, false>,
        Mn::Xsavec64 if mem => xsave::<XSAVEC, true>,
        Mn::Xsaves if mem => xsave::<XSAVES, false>,
        Mn::Xsaves64 if mem => xsave::<XSAVES, true>,
        Mn::Xrstor if mem => xrstor::<false, false>,
        Mn::Xrstor64 if mem => xrstor::<false, true>,
        Mn::Xrstors if mem => xrstor::<true, false>,
        Mn::Xrstors64 if mem => xrstor::<true, true>,
        Mn::Ldmxcsr if mem => ldmxcsr,
        Mn::Stmxcsr if mem => stmxcsr,
        Mn::Fninit => fninit,
        Mn::Fnstcw if mem => fnstcw,
        Mn::Fldcw if mem => fldcw,
        Mn::Fnstsw if i.code() == Code::Fnstsw_AX => fnstsw::<true>,
        Mn::Fnstsw if mem => fnstsw::<false>,
        Mn::Fnclex => fnclex,
        Mn::Wait => fwait,
        _ => return None,
    })
}
