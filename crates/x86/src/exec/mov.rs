//! Data movement and flag-register odds and ends: mov/movzx/movsx/movsxd/lea, cmovcc,
//! setcc, cbw family, xlat, lahf/sahf, clc/stc/cmc/cld/std, the nop forms and fences.

use iced_x86::{Instruction, Mnemonic as Mn, OpKind, Register};

use crate::decode::{Cx, Handler, Insn, K, kind, op_size};
use crate::machine::{
    EXIT_RUN, Imm, Loc, Machine, Mem, PAUSE_LOOP, R, Rd, Rs, StopReason, W8, W16, W32, W64, Width,
    ZERO,
};
use crate::state::rflags::{AF, CF, DF, PF, SF, ZF};

pub(crate) fn mov<W: Width, D: Loc, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let v = S::get::<W>(m, i, sa)?;
    let da = D::addr(m, i);
    D::put::<W>(m, i, da, v)
}

/// movzx/movsx/movsxd: a `WS`-sized source extended into a `WD`-sized register.
fn movx<WD: Width, WS: Width, S: Loc, const SX: bool>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    let v = S::get::<WS>(m, i, sa)?;
    let v = if SX { WS::sext(v) } else { v };
    m.set_reg::<WD>(i.d, v & WD::MASK);
    Ok(())
}

fn lea<W: Width>(m: &mut Machine, i: &Insn) -> R {
    let off = i
        .disp
        .wrapping_add(m.regs[(i.base & 31) as usize])
        .wrapping_add(m.regs[(i.index & 31) as usize] << (i.scale & 3))
        & i.amask;
    m.set_reg::<W>(i.d, off & W::MASK);
    Ok(())
}

fn cmov<W: Width, S: Loc>(m: &mut Machine, i: &Insn) -> R {
    let sa = S::addr(m, i);
    // The source is read (and can fault) whatever the condition.
    let v = S::get::<W>(m, i, sa)?;
    if m.flags.cond(i.cc) {
        m.set_reg::<W>(i.d, v);
    } else if W::BYTES == 4 {
        // A 32-bit cmov writes its destination even when the condition is false.
        let cur = m.reg::<W>(i.d);
        m.set_reg::<W>(i.d, cur);
    }
    Ok(())
}

fn setcc<D: Loc>(m: &mut Machine, i: &Insn) -> R {
    let v = u64::from(m.flags.cond(i.cc));
    let da = D::addr(m, i);
    D::put::<W8>(m, i, da, v)
}

/// mov r/m, sreg: the selector, zero-extended into a 32/64-bit register.
fn mov_from_sreg<W: Width, D: Loc>(m: &mut Machine, i: &Insn) -> R {
    let v = u64::from(m.cpu.seg[usize::from(i.t & 7)].selector);
    let da = D::addr(m, i);
    D::put::<W>(m, i, da, v)
}

/// cbw/cwde/cdqe: sign-extend the low half of the accumulator into all of it (W is the
/// destination width).
fn cbw<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let half = W::BITS / 2;
    let v = m.regs[0] & ((1u64 << half) - 1);
    let sx = (((v << (64 - half)) as i64) >> (64 - half)) as u64;
    m.set_reg::<W>(0, sx & W::MASK);
    Ok(())
}

/// cwd/cdq/cqo: fill rDX with the sign of rAX.
fn cwd<W: Width>(m: &mut Machine, _i: &Insn) -> R {
    let v = if W::sign(m.reg::<W>(0)) { W::MASK } else { 0 };
    m.set_reg::<W>(2, v);
    Ok(())
}

fn xlat(m: &mut Machine, i: &Insn) -> R {
    let off = m.regs[3].wrapping_add(m.regs[0] & 0xff) & i.amask;
    let lin = m.linear(i, off);
    let v = m.read::<1>(lin)?;
    m.set_reg::<W8>(0, v);
    Ok(())
}

fn lahf(m: &mut Machine, _i: &Insn) -> R {
    let f = m.flags.bits() & (SF | ZF | AF | PF | CF);
    m.set_reg::<W8>(0x10, f | 2);
    Ok(())
}

fn sahf(m: &mut Machine, _i: &Insn) -> R {
    let ah = m.reg::<W8>(0x10);
    m.flags.set_bits(SF | ZF | AF | PF | CF, ah);
    Ok(())
}

fn clc(m: &mut Machine, _i: &Insn) -> R {
    m.flags.set_bits(CF, 0);
    Ok(())
}

fn stc(m: &mut Machine, _i: &Insn) -> R {
    m.flags.set_bits(CF, CF);
    Ok(())
}

fn cmc(m: &mut Machine, _i: &Insn) -> R {
    let cf = m.flags.cf();
    m.flags.set_bits(CF, if cf { 0 } else { CF });
    Ok(())
}

fn cld(m: &mut Machine, _i: &Insn) -> R {
    m.cpu.rflags &= !DF;
    Ok(())
}

fn std_(m: &mut Machine, _i: &Insn) -> R {
    m.cpu.rflags |= DF;
    Ok(())
}

pub(crate) fn nop(_m: &mut Machine, _i: &Insn) -> R {
    Ok(())
}

fn mfence(_m: &mut Machine, _i: &Insn) -> R {
    // Guest accesses are host atomics; a SeqCst fence orders them as mfence would.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// A spin-wait hint; every [`PAUSE_LOOP`]th in a run leaves it, so the vCPU's thread
/// can give way to the one holding what it waits for.
fn pause(m: &mut Machine, _i: &Insn) -> R {
    std::hint::spin_loop();
    m.pauses += 1;
    if m.pauses.is_multiple_of(PAUSE_LOOP) {
        m.stop = Some(StopReason::PauseLoop);
        m.exit |= EXIT_RUN;
    }
    Ok(())
}

/// clflush/clflushopt/clwb: no cache to manage, but the address is checked like a load.
fn clflush(m: &mut Machine, i: &Insn) -> R {
    let lin = m.ea(i);
    m.probe_read(lin, 1)
}

fn movx_sel<WD: Width>(i: &Instruction, sx: bool) -> Option<Handler> {
    let mem = kind(i, 1) == K::Mem;
    let ws = op_size(i, 1);
    Some(match (ws, mem, sx) {
        (1, false, false) => movx::<WD, W8, Rs, false> as Handler,
        (1, true, false) => movx::<WD, W8, Mem, false>,
        (2, false, false) => movx::<WD, W16, Rs, false>,
        (2, true, false) => movx::<WD, W16, Mem, false>,
        (1, false, true) => movx::<WD, W8, Rs, true>,
        (1, true, true) => movx::<WD, W8, Mem, true>,
        (2, false, true) => movx::<WD, W16, Rs, true>,
        (2, true, true) => movx::<WD, W16, Mem, true>,
        (4, false, true) => movx::<WD, W32, Rs, true>,
        (4, true, true) => movx::<WD, W32, Mem, true>,
        _ => return None,
    })
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    let (k0, k1) = (kind(i, 0), kind(i, 1));
    match i.mnemonic() {
        Mn::Mov => {
            if k1 == K::Reg && i.op_register(1).is_segment_register() {
                d.t = i.op_register(1).number() as u8;
                return sized!(op_size(i, 0), |W| Some(match k0 {
                    K::Reg => mov_from_sreg::<W, Rd> as Handler,
                    _ => mov_from_sreg::<W, Mem>,
                }));
            }
            let non_gpr = (0..i.op_count())
                .any(|n| i.op_kind(n) == OpKind::Register && !i.op_register(n).is_gpr());
            if non_gpr {
                return None; // control/debug/segment register loads: see system.rs
            }
            sized!(op_size(i, 0), |W| Some(match (k0, k1) {
                (K::Reg, K::Reg) => mov::<W, Rd, Rs> as Handler,
                (K::Reg, K::Mem) => mov::<W, Rd, Mem>,
                (K::Reg, K::Imm) => mov::<W, Rd, Imm>,
                (K::Mem, K::Reg) => mov::<W, Mem, Rd>,
                (K::Mem, K::Imm) => mov::<W, Mem, Imm>,
                _ => return None,
            }))
        }
        Mn::Movzx | Mn::Movsx | Mn::Movsxd => {
            let sx = i.mnemonic() != Mn::Movzx;
            sized!(op_size(i, 0), |W| movx_sel::<W>(i, sx))
        }
        Mn::Lea => sized!(op_size(i, 0), |W| Some(lea::<W> as Handler)),
        Mn::Cmovo
        | Mn::Cmovno
        | Mn::Cmovb
        | Mn::Cmovae
        | Mn::Cmove
        | Mn::Cmovne
        | Mn::Cmovbe
        | Mn::Cmova
        | Mn::Cmovs
        | Mn::Cmovns
        | Mn::Cmovp
        | Mn::Cmovnp
        | Mn::Cmovl
        | Mn::Cmovge
        | Mn::Cmovle
        | Mn::Cmovg => sized!(op_size(i, 0), |W| Some(match k1 {
            K::Reg => cmov::<W, Rs> as Handler,
            _ => cmov::<W, Mem>,
        })),
        Mn::Seto
        | Mn::Setno
        | Mn::Setb
        | Mn::Setae
        | Mn::Sete
        | Mn::Setne
        | Mn::Setbe
        | Mn::Seta
        | Mn::Sets
        | Mn::Setns
        | Mn::Setp
        | Mn::Setnp
        | Mn::Setl
        | Mn::Setge
        | Mn::Setle
        | Mn::Setg => Some(match k0 {
            K::Reg => setcc::<Rd> as Handler,
            _ => setcc::<Mem>,
        }),
        Mn::Cbw => Some(cbw::<W16> as Handler),
        Mn::Cwde => Some(cbw::<W32> as Handler),
        Mn::Cdqe => Some(cbw::<W64> as Handler),
        Mn::Cwd => Some(cwd::<W16> as Handler),
        Mn::Cdq => Some(cwd::<W32> as Handler),
        Mn::Cqo => Some(cwd::<W64> as Handler),
        Mn::Xlatb => {
            d.index = ZERO;
            d.amask = match i.memory_base() {
                Register::BX => 0xffff,
                Register::EBX => 0xffff_ffff,
                _ => u64::MAX,
            };
            Some(xlat)
        }
        Mn::Lahf => Some(lahf),
        Mn::Sahf => Some(sahf),
        Mn::Clc => Some(clc),
        Mn::Stc => Some(stc),
        Mn::Cmc => Some(cmc),
        Mn::Cld => Some(cld),
        Mn::Std => Some(std_),
        Mn::Nop
        | Mn::Endbr64
        | Mn::Endbr32
        | Mn::Lfence
        | Mn::Sfence
        | Mn::Prefetchnta
        | Mn::Prefetcht0
        | Mn::Prefetcht1
        | Mn::Prefetcht2
        | Mn::Prefetchw
        | Mn::Prefetch
        | Mn::Reservednop => Some(nop),
        Mn::Mfence => Some(mfence),
        Mn::Pause => Some(pause),
        Mn::Clflush | Mn::Clflushopt | Mn::Clwb => Some(clflush),
        _ => None,
    }
}
