//! System and privileged instructions the KVM fallback meets (cpuid, rdtsc(p), clac/stac,
//! xgetbv/xsetbv, rdmsr/wrmsr, control registers, in/out, cli/sti, hlt, invlpg, swapgs,
//! fs/gs base, descriptor-table registers). Exception and interrupt
//! delivery, far transfers and mode switches are the software CPU's (not here yet).

use iced_x86::{Code, Instruction, Mnemonic as Mn, Register};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::exception::{Ex, Exception};
use crate::machine::{EXIT_RUN, Loc, Machine, Mem, R, Rd, StopReason, W16, Width};
use crate::mmu::canonical;
use crate::state::{CpuMode, SegReg, Segment, ctl, msr, rflags};

fn gp() -> Ex {
    Exception::GeneralProtection(0).into()
}

fn require_cpl0(m: &Machine) -> R {
    if m.cpu.cpl() != 0 { Err(gp()) } else { Ok(()) }
}

/// CLI/STI (and port I/O before the bitmap) are allowed in real mode and when
/// CPL <= IOPL.
pub(crate) fn io_allowed(m: &Machine) -> bool {
    if m.cpu.mode() == CpuMode::Real {
        return true;
    }
    let iopl = ((m.cpu.rflags & rflags::IOPL) >> 12) as u8;
    m.cpu.cpl() <= iopl
}

/// Port I/O to `bytes` ports from `port`: allowed by IOPL, or else by the TSS's I/O
/// permission bitmap (every bit for the ports clear). Linux grants `iopl(3)` and
/// `ioperm` through the bitmap, not through IOPL.
pub(crate) fn port_allowed(m: &mut Machine, port: u16, bytes: usize) -> bool {
    if io_allowed(m) {
        return true;
    }
    let tr = m.cpu.tr;
    // Only an available/busy 32/64-bit TSS (type 9 or 11) has a bitmap.
    let tss = tr.attr & Segment::ATTR_UNUSABLE == 0 && tr.attr & 0x9 == 0x9;
    const BITMAP_OFFSET: u64 = 0x66;
    if !tss || u64::from(tr.limit) < BITMAP_OFFSET + 1 {
        return false;
    }
    let Ok(base) = m.system_read::<2>(tr.base.wrapping_add(BITMAP_OFFSET)) else {
        return false;
    };
    // The two bytes holding the port's bits must lie within the TSS limit.
    let at = base + u64::from(port / 8);
    if at + 1 > u64::from(tr.limit) {
        return false;
    }
    let Ok(bits) = m.system_read::<2>(tr.base.wrapping_add(at)) else {
        return false;
    };
    let mask = ((1u64 << bytes) - 1) << (port % 8);
    bits & mask == 0
}

fn cpuid(m: &mut Machine, _i: &Insn) -> R {
    let (leaf, sub) = (m.regs[0] as u32, m.regs[1] as u32);
    let r = m.platform(|p| p.cpuid(leaf, sub));
    for (reg, v) in [0usize, 3, 1, 2].into_iter().zip(r) {
        m.regs[reg] = u64::from(v);
    }
    Ok(())
}

fn rdtsc(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_TSD != 0 && m.cpu.cpl() != 0 {
        return Err(gp());
    }
    let t = m.platform(|p| p.tsc());
    m.regs[0] = t & 0xffff_ffff;
    m.regs[2] = t >> 32;
    Ok(())
}

fn rdtscp(m: &mut Machine, i: &Insn) -> R {
    rdtsc(m, i)?;
    m.regs[1] = m.cpu.msr.tsc_aux & 0xffff_ffff;
    Ok(())
}

fn rdpid(m: &mut Machine, i: &Insn) -> R {
    m.regs[(i.d & 15) as usize] = m.cpu.msr.tsc_aux & 0xffff_ffff;
    Ok(())
}

/// clac/stac: CPL 0 only (#UD otherwise).
fn set_ac<const ON: bool>(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.cpl() != 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    if ON {
        m.cpu.rflags |= rflags::AC;
    } else {
        m.cpu.rflags &= !rflags::AC;
    }
    Ok(())
}

fn xgetbv(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_OSXSAVE == 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    let v = match m.regs[1] as u32 {
        0 => m.cpu.xcr0,
        // XINUSE: report every enabled component as possibly in use.
        1 => m.cpu.xcr0,
        _ => return Err(gp()),
    };
    m.regs[0] = v & 0xffff_ffff;
    m.regs[2] = v >> 32;
    Ok(())
}

fn xsetbv(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_OSXSAVE == 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    require_cpl0(m)?;
    if m.regs[1] as u32 != 0 {
        return Err(gp());
    }
    let v = (m.regs[2] << 32) | (m.regs[0] & 0xffff_ffff);
    let leaf = m.platform(|p| p.cpuid(0xd, 0));
    let supported = u64::from(leaf[0]) | (u64::from(leaf[3]) << 32);
    // x87 must stay enabled, AVX needs SSE, nothing the CPU does not offer.
    if v & 1 == 0 || (v & 4 != 0 && v & 2 == 0) || v & !supported != 0 {
        return Err(gp());
    }
    m.cpu.xcr0 = v;
    Ok(())
}

pub(crate) fn read_msr(m: &mut Machine, n: u32) -> R<u64> {
    let c = &m.cpu;
    Ok(match n {
        msr::EFER => c.efer,
        msr::STAR => c.msr.star,
        msr::LSTAR => c.msr.lstar,
        msr::CSTAR => c.msr.cstar,
        msr::SFMASK => c.msr.sfmask,
        msr::FS_BASE => c.seg[SegReg::Fs as usize].base,
        msr::GS_BASE => c.seg[SegReg::Gs as usize].base,
        msr::KERNEL_GS_BASE => c.msr.kernel_gs_base,
        msr::TSC_AUX => c.msr.tsc_aux,
        msr::SYSENTER_CS => c.msr.sysenter_cs,
        msr::SYSENTER_ESP => c.msr.sysenter_esp,
        msr::SYSENTER_EIP => c.msr.sysenter_eip,
        msr::PAT => c.msr.pat,
        msr::XSS => c.msr.xss,
        msr::MISC_ENABLE => c.msr.misc_enable,
        _ => return m.platform(|p| p.rdmsr(n)).ok_or_else(gp),
    })
}

pub(crate) fn write_msr(m: &mut Machine, n: u32, v: u64) -> R {
    let need_canonical = matches!(
        n,
        msr::LSTAR | msr::CSTAR | msr::FS_BASE | msr::GS_BASE | msr::KERNEL_GS_BASE
    );
    if need_canonical && !canonical(v) {
        return Err(gp());
    }
    let c = &mut *m.cpu;
    match n {
        msr::EFER => {
            // LMA is status, owned by the CPU.
            c.efer = (v & !ctl::EFER_LMA) | (c.efer & ctl::EFER_LMA);
            m.tlb.flush();
            m.reload_segments();
        }
        msr::STAR => c.msr.star = v,
        msr::LSTAR => c.msr.lstar = v,
        msr::CSTAR => c.msr.cstar = v,
        msr::SFMASK => c.msr.sfmask = v,
        msr::FS_BASE => {
            c.seg[SegReg::Fs as usize].base = v;
            m.reload_segments();
        }
        msr::GS_BASE => {
            c.seg[SegReg::Gs as usize].base = v;
            m.reload_segments();
        }
        msr::KERNEL_GS_BASE => c.msr.kernel_gs_base = v,
        msr::TSC_AUX => c.msr.tsc_aux = v & 0xffff_ffff,
        msr::SYSENTER_CS => c.msr.sysenter_cs = v,
        msr::SYSENTER_ESP => c.msr.sysenter_esp = v,
        msr::SYSENTER_EIP => c.msr.sysenter_eip = v,
        msr::PAT => c.msr.pat = v,
        msr::XSS => c.msr.xss = v,
        msr::MISC_ENABLE => c.msr.misc_enable = v,
        _ => {
            if !m.platform(|p| p.wrmsr(n, v)) {
                return Err(gp());
            }
        }
    }
    Ok(())
}

fn rdmsr(m: &mut Machine, _i: &Insn) -> R {
    require_cpl0(m)?;
    let v = read_msr(m, m.regs[1] as u32)?;
    m.regs[0] = v & 0xffff_ffff;
    m.regs[2] = v >> 32;
    Ok(())
}

fn wrmsr(m: &mut Machine, _i: &Insn) -> R {
    require_cpl0(m)?;
    let v = (m.regs[2] << 32) | (m.regs[0] & 0xffff_ffff);
    write_msr(m, m.regs[1] as u32, v)?;
    m.end_block();
    Ok(())
}

/// mov reg, crN (the CR number is in `s`).
fn mov_from_cr(m: &mut Machine, i: &Insn) -> R {
    require_cpl0(m)?;
    let v = match i.s {
        0 => m.cpu.cr0,
        2 => m.cpu.cr2,
        3 => m.cpu.cr3,
        4 => m.cpu.cr4,
        8 => m.cpu.cr8,
        _ => return Err(Exception::InvalidOpcode.into()),
    };
    let w = if m.long_mode() { u64::MAX } else { 0xffff_ffff };
    m.regs[(i.d & 15) as usize] = v & w;
    Ok(())
}

/// mov crN, reg (the CR number is in `d`).
fn mov_to_cr(m: &mut Machine, i: &Insn) -> R {
    require_cpl0(m)?;
    let mut v = m.regs[(i.s & 15) as usize];
    if !m.long_mode() {
        v &= 0xffff_ffff;
    }
    match i.d {
        0 => {
            if v >> 32 != 0 || (v & ctl::CR0_PG != 0 && v & ctl::CR0_PE == 0) {
                return Err(gp());
            }
            // IA-32e mode is left from compatibility mode: 64-bit code cannot clear PG.
            if v & ctl::CR0_PG == 0 && m.cpu.mode() == CpuMode::Long64 {
                return Err(gp());
            }
            // ET is hardwired.
            v |= 1 << 4;
            let c = &mut *m.cpu;
            if v & ctl::CR0_PG != 0 && c.efer & ctl::EFER_LME != 0 {
                if c.cr4 & ctl::CR4_PAE == 0 {
                    return Err(gp());
                }
                c.efer |= ctl::EFER_LMA;
            } else if v & ctl::CR0_PG == 0 {
                c.efer &= !ctl::EFER_LMA;
            }
            c.cr0 = v;
        }
        2 => {
            m.cpu.cr2 = v;
            return Ok(());
        }
        3 => {
            m.cpu.cr3 = v & !(1 << 63);
            // Global translations survive a CR3 write.
            if m.cpu.cr4 & ctl::CR4_PGE != 0 {
                m.tlb.flush_nonglobal();
            } else {
                m.tlb.flush();
            }
            m.end_block();
            return Ok(());
        }
        4 => {
            let reserved = m.cr4_reserved();
            let (old, long) = (m.cpu.cr4, m.long_mode());
            let pcid_on = v & !old & ctl::CR4_PCIDE != 0;
            if v & reserved != 0
                || long && v & ctl::CR4_PAE == 0
                || long && (v ^ old) & ctl::CR4_LA57 != 0
                || pcid_on && (!long || m.cpu.cr3 & 0xfff != 0)
            {
                return Err(gp());
            }
            m.cpu.cr4 = v;
        }
        8 => {
            // The task priority: the caller may now deliver interrupts it held back.
            m.cpu.cr8 = v & 0xf;
            m.end_block();
            return Ok(());
        }
        _ => return Err(Exception::InvalidOpcode.into()),
    }
    m.tlb.flush();
    m.reload_segments();
    m.end_block();
    Ok(())
}

fn cli(m: &mut Machine, _i: &Insn) -> R {
    if !io_allowed(m) {
        return Err(gp());
    }
    m.cpu.rflags &= !rflags::IF;
    m.end_block();
    Ok(())
}

/// mov reg, drN (the DR number in `s`).
fn mov_from_dr(m: &mut Machine, i: &Insn) -> R {
    let n = dr_index(m, i.s)?;
    let v = m.cpu.dr[n];
    let w = if m.mode == CpuMode::Long64 {
        u64::MAX
    } else {
        0xffff_ffff
    };
    m.regs[(i.d & 15) as usize] = v & w;
    Ok(())
}

/// mov drN, reg (the DR number in `d`).
fn mov_to_dr(m: &mut Machine, i: &Insn) -> R {
    let n = dr_index(m, i.d)?;
    let mut v = m.regs[(i.s & 15) as usize];
    if m.mode != CpuMode::Long64 {
        v &= 0xffff_ffff;
    }
    m.cpu.dr[n] = match n {
        6 | 7 if v >> 32 != 0 => return Err(gp()),
        6 => (v & 0x0001_e00f) | crate::state::dr::DR6_FIXED,
        7 => (v & !0xd800) | crate::state::dr::DR7_FIXED,
        _ => v,
    };
    Ok(())
}

/// DR4/DR5 alias DR6/DR7 unless CR4.DE (then #UD); CPL 0 only.
fn dr_index(m: &Machine, r: u8) -> R<usize> {
    require_cpl0(m)?;
    Ok(match r & 7 {
        4 | 5 if m.cpu.cr4 & ctl::CR4_DE != 0 => return Err(Exception::InvalidOpcode.into()),
        4 => 6,
        5 => 7,
        n => usize::from(n),
    })
}

fn sti(m: &mut Machine, _i: &Insn) -> R {
    if !io_allowed(m) {
        return Err(gp());
    }
    if m.cpu.rflags & rflags::IF == 0 {
        // Interrupts stay blocked until after the next instruction (`sti; hlt` is atomic).
        m.cpu.interrupt_shadow = true;
    }
    m.cpu.rflags |= rflags::IF;
    m.end_block();
    Ok(())
}

fn hlt(m: &mut Machine, _i: &Insn) -> R {
    require_cpl0(m)?;
    m.stop = Some(StopReason::Halt);
    m.exit |= EXIT_RUN;
    Ok(())
}

fn invlpg(m: &mut Machine, i: &Insn) -> R {
    require_cpl0(m)?;
    let lin = m.ea(i);
    m.tlb.flush_page(lin);
    Ok(())
}

fn privileged_nop(m: &mut Machine, _i: &Insn) -> R {
    require_cpl0(m)
}

fn clts(m: &mut Machine, _i: &Insn) -> R {
    require_cpl0(m)?;
    m.cpu.cr0 &= !ctl::CR0_TS;
    Ok(())
}

fn swapgs(m: &mut Machine, _i: &Insn) -> R {
    if m.cpu.mode() != CpuMode::Long64 {
        return Err(Exception::InvalidOpcode.into());
    }
    require_cpl0(m)?;
    let c = &mut *m.cpu;
    std::mem::swap(
        &mut c.seg[SegReg::Gs as usize].base,
        &mut c.msr.kernel_gs_base,
    );
    m.reload_segments();
    Ok(())
}

/// rdfsbase/rdgsbase (SEG 4/5, W = 4 or 8).
fn rd_base<W: Width, const SEG: usize>(m: &mut Machine, i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_FSGSBASE == 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    let v = m.cpu.seg[SEG].base;
    m.set_reg::<W>(i.d, v & W::MASK);
    Ok(())
}

fn wr_base<W: Width, const SEG: usize>(m: &mut Machine, i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_FSGSBASE == 0 {
        return Err(Exception::InvalidOpcode.into());
    }
    let v = m.reg::<W>(i.d);
    if !canonical(v) {
        return Err(gp());
    }
    m.cpu.seg[SEG].base = v;
    m.reload_segments();
    Ok(())
}

/// lgdt/lidt (IDT when IDT is true): limit:base, base 8 bytes in 64-bit mode, 24 bits
/// with a 16-bit operand size (O16).
fn load_dt<const IDT: bool, const O16: bool>(m: &mut Machine, i: &Insn) -> R {
    require_cpl0(m)?;
    let lin = m.ea(i);
    let limit = m.read::<2>(lin)? as u16;
    let base = if m.mode == CpuMode::Long64 {
        let b = m.read::<8>(lin.wrapping_add(2))?;
        if !canonical(b) {
            return Err(gp());
        }
        b
    } else if O16 {
        m.read::<4>(lin.wrapping_add(2))? & 0xff_ffff
    } else {
        m.read::<4>(lin.wrapping_add(2))?
    };
    let t = if IDT {
        &mut m.cpu.idtr
    } else {
        &mut m.cpu.gdtr
    };
    t.limit = limit;
    t.base = base;
    Ok(())
}

fn store_dt<const IDT: bool>(m: &mut Machine, i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_UMIP != 0 && m.cpu.cpl() != 0 {
        return Err(gp());
    }
    let t = if IDT { m.cpu.idtr } else { m.cpu.gdtr };
    let lin = m.ea(i);
    m.probe_write(lin, if m.mode == CpuMode::Long64 { 10 } else { 6 })?;
    m.write::<2>(lin, u64::from(t.limit))?;
    if m.mode == CpuMode::Long64 {
        m.write::<8>(lin.wrapping_add(2), t.base)
    } else {
        m.write::<4>(lin.wrapping_add(2), t.base & 0xffff_ffff)
    }
}

fn smsw<W: Width, D: Loc>(m: &mut Machine, i: &Insn) -> R {
    if m.cpu.cr4 & ctl::CR4_UMIP != 0 && m.cpu.cpl() != 0 {
        return Err(gp());
    }
    let v = m.cpu.cr0 & W::MASK;
    let a = D::addr(m, i);
    D::put::<W>(m, i, a, v)
}

fn lmsw<S: Loc>(m: &mut Machine, i: &Insn) -> R {
    require_cpl0(m)?;
    let a = S::addr(m, i);
    let v = S::get::<W16>(m, i, a)?;
    // Sets PE/MP/EM/TS; cannot clear PE.
    let c = &mut *m.cpu;
    c.cr0 = (c.cr0 & !0xe) | (v & 0xf) | (c.cr0 & 1);
    m.reload_segments();
    m.end_block();
    Ok(())
}

/// in acc, imm8/dx. W is the accumulator width; the port is the immediate, or DX
/// when `t` marks the DX form.
fn in_<W: Width, const DX: bool>(m: &mut Machine, i: &Insn) -> R {
    let port = if DX { m.regs[2] as u16 } else { i.imm as u16 };
    if !port_allowed(m, port, W::BYTES) {
        return Err(gp());
    }
    let mut b = [0u8; 8];
    m.platform(|p| p.io_in(port, &mut b[..W::BYTES]));
    m.set_reg::<W>(0, u64::from_le_bytes(b));
    Ok(())
}

fn out<W: Width, const DX: bool>(m: &mut Machine, i: &Insn) -> R {
    let port = if DX { m.regs[2] as u16 } else { i.imm as u16 };
    if !port_allowed(m, port, W::BYTES) {
        return Err(gp());
    }
    let b = m.reg::<W>(0).to_le_bytes();
    m.platform(|p| p.io_out(port, &b[..W::BYTES]));
    Ok(())
}

pub(crate) fn select(i: &Instruction, _d: &mut Insn, cx: &Cx) -> Option<Handler> {
    let (k0, k1) = (kind(i, 0), kind(i, 1));
    let reg = |n| i.op_register(n);
    match i.mnemonic() {
        Mn::Cpuid => Some(cpuid),
        Mn::Rdtsc => Some(rdtsc),
        Mn::Rdtscp => Some(rdtscp),
        Mn::Rdpid => Some(rdpid),
        Mn::Clac => Some(set_ac::<false>),
        Mn::Stac => Some(set_ac::<true>),
        Mn::Xgetbv => Some(xgetbv),
        Mn::Xsetbv => Some(xsetbv),
        Mn::Rdmsr => Some(rdmsr),
        Mn::Wrmsr => Some(wrmsr),
        Mn::Mov if k0 == K::Reg && reg(0).is_cr() => Some(mov_to_cr),
        Mn::Mov if k1 == K::Reg && reg(1).is_cr() => Some(mov_from_cr),
        Mn::Cli => Some(cli),
        Mn::Sti => Some(sti),
        Mn::Hlt => Some(hlt),
        Mn::Invlpg => Some(invlpg),
        Mn::Wbinvd | Mn::Invd | Mn::Wbnoinvd => Some(privileged_nop),
        Mn::Clts => Some(clts),
        Mn::Swapgs => Some(swapgs),
        Mn::Rdfsbase | Mn::Rdgsbase | Mn::Wrfsbase | Mn::Wrgsbase if cx.long() => {
            let fs = matches!(i.mnemonic(), Mn::Rdfsbase | Mn::Wrfsbase);
            let rd = matches!(i.mnemonic(), Mn::Rdfsbase | Mn::Rdgsbase);
            sized!(op_size(i, 0), |W| Some(match (rd, fs) {
                (true, true) => rd_base::<W, 4> as Handler,
                (true, false) => rd_base::<W, 5>,
                (false, true) => wr_base::<W, 4>,
                (false, false) => wr_base::<W, 5>,
            }))
        }
        Mn::Lgdt | Mn::Lidt => {
            let idt = i.mnemonic() == Mn::Lidt;
            let o16 = matches!(i.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16);
            Some(match (idt, o16) {
                (false, false) => load_dt::<false, false> as Handler,
                (false, true) => load_dt::<false, true>,
                (true, false) => load_dt::<true, false>,
                (true, true) => load_dt::<true, true>,
            })
        }
        Mn::Mov if k0 == K::Reg && reg(0).is_dr() => Some(mov_to_dr),
        Mn::Mov if k1 == K::Reg && reg(1).is_dr() => Some(mov_from_dr),
        Mn::Sgdt => Some(store_dt::<false>),
        Mn::Sidt => Some(store_dt::<true>),
        Mn::Smsw => sized!(op_size(i, 0), |W| Some(match k0 {
            K::Mem => smsw::<W, Mem> as Handler,
            _ => smsw::<W, Rd>,
        })),
        Mn::Lmsw => Some(match k0 {
            K::Mem => lmsw::<Mem> as Handler,
            _ => lmsw::<Rd>,
        }),
        Mn::In => {
            let dx = k1 == K::Reg && reg(1) == Register::DX;
            sized!(op_size(i, 0), |W| Some(if dx {
                in_::<W, true> as Handler
            } else {
                in_::<W, false>
            }))
        }
        Mn::Out => {
            let dx = k0 == K::Reg && reg(0) == Register::DX;
            sized!(op_size(i, 1), |W| Some(if dx {
                out::<W, true> as Handler
            } else {
                out::<W, false>
            }))
        }
        _ => None,
    }
}
