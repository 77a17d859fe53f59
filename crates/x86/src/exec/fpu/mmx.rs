//! MMX: the arithmetic, compare, pack/unpack, logic and shift instructions run on the host
//! (see `host`, normalised to `op mm0, mm1` or `op mm0, [rax]`); moves, shuffles, inserts
//! and extracts are done here. Every MMX instruction but emms switches the x87 unit to
//! MMX state: TOP = 0 and all registers valid; a written MMn has its exponent bits set.

use iced_x86::{Code, Instruction, Mnemonic as Mn, Register};

use super::host::{self, Frame};
use super::{fpu_ok, put};
use crate::decode::{Cx, Handler, Insn, K, kind};
use crate::exception::Exception;
use crate::machine::{Loc, Machine, Mem, R, Rd, Rs, W16, W32, W64, Width};
use crate::state::FpuState;

fn top(f: &FpuState) -> usize {
    usize::from((f.fsw >> 11) & 7)
}

/// MMn: the mantissa of physical register n (`st` is indexed from TOP).
fn mm(m: &Machine, n: u8) -> u64 {
    let f = &m.cpu.fpu;
    f.st[(usize::from(n & 7) + 8 - top(f)) & 7] as u64
}

/// The MMX state transition: TOP = 0 (physical register k becomes ST(k)), all valid.
fn enter(m: &mut Machine) {
    let f = &mut m.cpu.fpu;
    let t = top(f);
    if t != 0 {
        let old = f.st;
        for (k, s) in f.st.iter_mut().enumerate() {
            *s = old[(k + 8 - t) & 7];
        }
        f.fsw &= !(7 << 11);
    }
    f.ftw = 0xff;
}

/// Writes MMn (after `enter`): the value with all-ones exponent bits, as the hardware does.
fn set_mm(m: &mut Machine, n: u8, v: u64) {
    m.cpu.fpu.st[usize::from(n & 7)] = u128::from(v) | (0xffff << 64);
}

/// MMX instructions need CR0.EM clear (#UD), CR0.TS clear (#NM), no pending x87
/// exception (#MF).
fn mmx_ok(m: &Machine) -> R {
    fpu_ok(m)?;
    if super::x87::pending(&m.cpu.fpu) {
        return Err(Exception::FloatingPoint.into());
    }
    Ok(())
}

/// op mm, mm/m64 (or a shift by an immediate, run as the shift by a memory count) on the
/// host, stub `i.imm`.
fn host_op<const MEM: bool, const SHIFT_IMM: bool>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let mut f = Frame::new();
    let a = mm(m, i.d);
    let mut b = 0;
    if SHIFT_IMM {
        put(&mut f.mem, 0, &(i.imm2 as u64 & 0xff).to_le_bytes());
    } else if MEM {
        let lin = m.ea(i);
        let v = m.read::<8>(lin)?;
        put(&mut f.mem, 0, &v.to_le_bytes());
    } else {
        b = mm(m, i.s);
    }
    put(&mut f.img, 0, &0x37fu16.to_le_bytes());
    f.img[4] = 0xff;
    put(&mut f.img, 24, &0x1f80u32.to_le_bytes());
    put(&mut f.img, 32, &a.to_le_bytes());
    put(&mut f.img, 48, &b.to_le_bytes());
    host::run(i.imm as usize, &mut f);
    let r = u64::from_le_bytes(f.img[32..40].try_into().expect("8 bytes"));
    enter(m);
    set_mm(m, i.d, r);
    Ok(())
}

/// movd/movq mm, r/m (W-sized, zero-extended) and movq mm, mm/m64.
fn load<W: Width, S: Loc, const FROM_MM: bool>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let v = if FROM_MM {
        mm(m, i.s)
    } else {
        let a = S::addr(m, i);
        S::get::<W>(m, i, a)?
    };
    enter(m);
    set_mm(m, i.d, v & W::MASK);
    Ok(())
}

/// movd/movq r/m, mm and movq/movntq m64, mm (the MMX register in `s`).
fn store<W: Width, D: Loc>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let v = mm(m, i.s) & W::MASK;
    let a = D::addr(m, i);
    if D::IS_MEM {
        // The store must succeed before the state changes.
        W::write(m, a, v)?;
        enter(m);
    } else {
        enter(m);
        D::put::<W>(m, i, a, v)?;
    }
    Ok(())
}

/// movq mm, mm written through the 0f 7f form (destination in `d`, source in `s`).
fn move_rr(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let v = mm(m, i.s);
    enter(m);
    set_mm(m, i.d, v);
    Ok(())
}

/// pmovmskb r32/r64, mm.
fn pmovmskb<W: Width>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let v = mm(m, i.s);
    let mask = (0..8).fold(0u64, |acc, k| acc | (((v >> (8 * k + 7)) & 1) << k));
    enter(m);
    m.set_reg::<W>(i.d, mask);
    Ok(())
}

/// pextrw r32/r64, mm, imm8.
fn pextrw<W: Width>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let v = mm(m, i.s);
    let w = (v >> (16 * (i.imm & 3))) & 0xffff;
    enter(m);
    m.set_reg::<W>(i.d, w);
    Ok(())
}

/// pinsrw mm, r32/m16, imm8.
fn pinsrw<S: Loc>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let a = S::addr(m, i);
    let w = if S::IS_MEM {
        W16::read(m, a)?
    } else {
        m.reg::<W16>(i.s)
    };
    let sh = 16 * (i.imm & 3);
    let v = (mm(m, i.d) & !(0xffff << sh)) | (w << sh);
    enter(m);
    set_mm(m, i.d, v);
    Ok(())
}

/// pshufw mm, mm/m64, imm8.
fn pshufw<const MEM: bool>(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let src = if MEM {
        let lin = m.ea(i);
        m.read::<8>(lin)?
    } else {
        mm(m, i.s)
    };
    let imm = i.imm & 0xff;
    let v = (0..4).fold(0u64, |acc, k| {
        let sel = (imm >> (2 * k)) & 3;
        acc | (((src >> (16 * sel)) & 0xffff) << (16 * k))
    });
    enter(m);
    set_mm(m, i.d, v);
    Ok(())
}

/// movq2dq xmm, mm.
fn movq2dq(m: &mut Machine, i: &Insn) -> R {
    crate::exec::sse::sse_ok(m)?;
    mmx_ok(m)?;
    let v = mm(m, i.s);
    enter(m);
    m.cpu.fpu.xmm[usize::from(i.d & 15)] = u128::from(v);
    Ok(())
}

/// movdq2q mm, xmm.
fn movdq2q(m: &mut Machine, i: &Insn) -> R {
    crate::exec::sse::sse_ok(m)?;
    mmx_ok(m)?;
    let v = m.cpu.fpu.xmm[usize::from(i.s & 15)] as u64;
    enter(m);
    set_mm(m, i.d, v);
    Ok(())
}

/// maskmovq mm1, mm2: the bytes of mm1 whose mm2 byte has its top bit set, to DS:rDI.
fn maskmovq(m: &mut Machine, i: &Insn) -> R {
    mmx_ok(m)?;
    let data = mm(m, i.d);
    let mask = mm(m, i.s);
    let base = m.linear(i, m.regs[7] & i.amask);
    for k in 0..8u64 {
        if (mask >> (8 * k + 7)) & 1 != 0 {
            m.probe_write(base.wrapping_add(k), 1)?;
        }
    }
    for k in 0..8u64 {
        if (mask >> (8 * k + 7)) & 1 != 0 {
            m.write::<1>(base.wrapping_add(k), (data >> (8 * k)) & 0xff)?;
        }
    }
    enter(m);
    Ok(())
}

/// The host opcode (0f xx) of an MMX operation, or of the shift-by-register form a
/// shift by an immediate runs as.
fn opcode(mn: Mn) -> Option<u8> {
    Some(match mn {
        Mn::Punpcklbw => 0x60,
        Mn::Punpcklwd => 0x61,
        Mn::Punpckldq => 0x62,
        Mn::Packsswb => 0x63,
        Mn::Pcmpgtb => 0x64,
        Mn::Pcmpgtw => 0x65,
        Mn::Pcmpgtd => 0x66,
        Mn::Packuswb => 0x67,
        Mn::Punpckhbw => 0x68,
        Mn::Punpckhwd => 0x69,
        Mn::Punpckhdq => 0x6a,
        Mn::Packssdw => 0x6b,
        Mn::Pcmpeqb => 0x74,
        Mn::Pcmpeqw => 0x75,
        Mn::Pcmpeqd => 0x76,
        Mn::Psrlw => 0xd1,
        Mn::Psrld => 0xd2,
        Mn::Psrlq => 0xd3,
        Mn::Paddq => 0xd4,
        Mn::Pmullw => 0xd5,
        Mn::Psubusb => 0xd8,
        Mn::Psubusw => 0xd9,
        Mn::Pminub => 0xda,
        Mn::Pand => 0xdb,
        Mn::Paddusb => 0xdc,
        Mn::Paddusw => 0xdd,
        Mn::Pmaxub => 0xde,
        Mn::Pandn => 0xdf,
        Mn::Pavgb => 0xe0,
        Mn::Psraw => 0xe1,
        Mn::Psrad => 0xe2,
        Mn::Pavgw => 0xe3,
        Mn::Pmulhuw => 0xe4,
        Mn::Pmulhw => 0xe5,
        Mn::Psubsb => 0xe8,
        Mn::Psubsw => 0xe9,
        Mn::Pminsw => 0xea,
        Mn::Por => 0xeb,
        Mn::Paddsb => 0xec,
        Mn::Paddsw => 0xed,
        Mn::Pmaxsw => 0xee,
        Mn::Pxor => 0xef,
        Mn::Psllw => 0xf1,
        Mn::Pslld => 0xf2,
        Mn::Psllq => 0xf3,
        Mn::Pmuludq => 0xf4,
        Mn::Pmaddwd => 0xf5,
        Mn::Psadbw => 0xf6,
        Mn::Psubb => 0xf8,
        Mn::Psubw => 0xf9,
        Mn::Psubd => 0xfa,
        Mn::Psubq => 0xfb,
        Mn::Paddb => 0xfc,
        Mn::Paddw => 0xfd,
        Mn::Paddd => 0xfe,
        _ => return None,
    })
}

fn is_mm(r: Register) -> bool {
    (Register::MM0 as u32..=Register::MM7 as u32).contains(&(r as u32))
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    if i.code() == Code::Emms {
        // Run on the host: whether emms also resets TOP differs between vendors.
        d.imm = host::env16_index(4) as u64;
        return Some(super::x87::emms);
    }
    let regs: Vec<Register> = (0..i.op_count())
        .filter(|&n| i.op_kind(n) == iced_x86::OpKind::Register)
        .map(|n| i.op_register(n))
        .collect();
    if !regs.iter().copied().any(is_mm) || i.encoding() != iced_x86::EncodingKind::Legacy {
        return None;
    }
    let (k0, k1) = (kind(i, 0), kind(i, 1));
    let mn = i.mnemonic();
    if let Some(op) = opcode(mn) {
        if k1 == K::Imm {
            // psrlw mm, imm8 & co: the shift by a count in memory, the count in imm2.
            d.imm2 = i.immediate8().into();
            d.imm = host::mmx_index(op, true)? as u64;
            return Some(host_op::<false, true>);
        }
        let mem = k1 == K::Mem;
        d.imm = host::mmx_index(op, mem)? as u64;
        return Some(if mem {
            host_op::<true, false>
        } else {
            host_op::<false, false>
        });
    }
    let to_mm = k0 == K::Reg && is_mm(i.op_register(0));
    Some(match i.code() {
        Code::Movd_mm_rm32 => match k1 {
            K::Mem => load::<W32, Mem, false> as Handler,
            _ => load::<W32, Rs, false>,
        },
        Code::Movq_mm_rm64 => match k1 {
            K::Mem => load::<W64, Mem, false> as Handler,
            _ => load::<W64, Rs, false>,
        },
        Code::Movq_mm_mmm64 => match k1 {
            K::Mem => load::<W64, Mem, false> as Handler,
            _ => load::<W64, Rs, true>,
        },
        Code::Movd_rm32_mm | Code::Movq_rm64_mm | Code::Movq_mmm64_mm | Code::Movntq_m64_mm
            if !to_mm =>
        {
            let wide = i.code() != Code::Movd_rm32_mm;
            if k0 == K::Mem {
                // The MMX register is the only register operand: decode put it in `d`.
                d.s = d.d;
            }
            match (k0, wide) {
                (K::Mem, false) => store::<W32, Mem> as Handler,
                (K::Mem, true) => store::<W64, Mem>,
                (_, false) => store::<W32, Rd>,
                (_, true) => store::<W64, Rd>,
            }
        }
        Code::Movq_mmm64_mm => move_rr,
        Code::Pmovmskb_r32_mm => pmovmskb::<W32>,
        Code::Pmovmskb_r64_mm => pmovmskb::<W64>,
        Code::Pextrw_r32_mm_imm8 => pextrw::<W32>,
        Code::Pextrw_r64_mm_imm8 => pextrw::<W64>,
        Code::Pinsrw_mm_r32m16_imm8 | Code::Pinsrw_mm_r64m16_imm8 => match k1 {
            K::Mem => pinsrw::<Mem> as Handler,
            _ => pinsrw::<Rs>,
        },
        Code::Pshufw_mm_mmm64_imm8 => match k1 {
            K::Mem => pshufw::<true> as Handler,
            _ => pshufw::<false>,
        },
        Code::Movq2dq_xmm_mm => movq2dq,
        Code::Movdq2q_mm_xmm => movdq2q,
        Code::Maskmovq_rDI_mm_mm => maskmovq,
        _ => return None,
    })
}
