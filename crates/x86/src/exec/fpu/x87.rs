//! x87 arithmetic, loads, stores, compares, transcendentals and environment instructions,
//! each executed as the same instruction on the host FPU (see `host`). The handlers move
//! the guest's x87 state in and out of an FXSAVE image and memory operands through a
//! buffer, and keep the last-instruction pointers themselves, by vessel's CPU model
//! rather than by whatever the host's FPU generation does with them.

use iced_x86::{Code, Instruction, Register};

use super::host::{self, Frame};
use super::{fpu_ok, put, read_x87, write_x87};
use crate::decode::{Cx, Handler, Insn};
use crate::exception::Exception;
use crate::machine::Machine;
use crate::machine::R;
use crate::state::FpuState;
use crate::state::rflags::{AF, CF, OF, PF, SF, ZF};

/// Memory operand: none, read before the instruction, written after it.
const NONE: u8 = 0;
const LOAD: u8 = 1;
const STORE: u8 = 2;
/// RFLAGS: untouched, read (fcmov), written (fcomi).
const FL_NONE: u8 = 0;
const FL_IN: u8 = 1;
const FL_OUT: u8 = 2;
/// What an instruction does to the last-instruction pointers (FIP, FOP, FDP). vessel's
/// CPU model is the current Intel one, whatever the host's FPU does: every non-control
/// instruction sets FIP; FOP and FDP change only when it raises an unmasked exception
/// (CPUID.(7,0):EBX[6], FDP_EXCPTN_ONLY, announced); FCS and FDS read as zero
/// (EBX[13]). Control instructions leave them alone, except the environment loads and
/// fnsave's reinitialisation.
const PTR_SET: u8 = 0;
/// emms and the environment stores (fnstenv, fnsave, which also reinitialises).
const PTR_KEEP: u8 = 1;
/// fldenv, frstor: the pointers come from the image in memory.
const PTR_LOAD: u8 = 2;

/// Set in `Insn::imm2` of x87 instructions whose FOP `decode` fills in from the bytes.
pub(crate) const FOP_FROM_BYTES: u32 = 1 << 31;

/// An unmasked exception is pending: a waiting instruction raises #MF first.
pub(crate) fn pending(f: &FpuState) -> bool {
    f.fsw & 0x80 != 0 || f.fsw & !f.fcw & 0x3f != 0
}

/// Offset (segment-relative) of the memory operand, for FDP.
fn ea_offset(m: &Machine, i: &Insn) -> u64 {
    i.disp
        .wrapping_add(m.regs[(i.base & 31) as usize])
        .wrapping_add(m.regs[(i.index & 31) as usize] << (i.scale & 3))
        & i.amask
}

/// Offset of the current instruction (RIP already points past it).
fn insn_offset(m: &Machine, i: &Insn) -> u64 {
    let ip = m.rip().wrapping_sub(u64::from(i.len));
    match m.mode.bitness() {
        64 => ip,
        32 => ip & 0xffff_ffff,
        _ => ip & 0xffff,
    }
}

/// Runs stub `i.imm` with the guest's x87 state. `PTRS`: what the instruction does to
/// the last-instruction pointers (`PTR_LOAD`: fldenv/frstor, which replace the whole
/// environment, so the old one's pending exceptions must not fire on the host).
fn x87<const MEM: u8, const FLAGS: u8, const WAIT: bool, const PTRS: u8>(
    m: &mut Machine,
    i: &Insn,
) -> R {
    fpu_ok(m)?;
    if WAIT && pending(&m.cpu.fpu) {
        return Err(Exception::FloatingPoint.into());
    }
    let size = (i.imm2 & 0xff) as usize;
    let mut f = Frame::new();
    let mut ea = 0;
    if MEM != NONE {
        ea = m.ea(i);
        if MEM == LOAD {
            m.read_bytes(ea, &mut f.mem[..size])?;
        } else {
            m.probe_write(ea, size)?;
        }
    }
    write_x87(&m.cpu.fpu, &mut f.img, true);
    put(&mut f.img, 24, &0x1f80u32.to_le_bytes());
    if PTRS == PTR_LOAD {
        let fsw = m.cpu.fpu.fsw & !0x80ff;
        put(&mut f.img, 2, &fsw.to_le_bytes());
    }
    if FLAGS == FL_IN {
        f.flags_in = 0x202 | (m.flags.bits() & (CF | PF | ZF));
    }
    host::run(i.imm as usize, &mut f);
    let (ip, dp) = (insn_offset(m, i), ea_offset(m, i));
    let fpu = &mut m.cpu.fpu;
    let before = Pointers::of(fpu);
    read_x87(fpu, &f.img, true);
    let after = match PTRS {
        PTR_SET if fpu.fsw & 0x80 != 0 => Pointers {
            fip: ip,
            fop: ((i.imm2 >> 16) & 0x7ff) as u16,
            fdp: if MEM == NONE { before.fdp } else { dp },
        },
        PTR_SET => Pointers { fip: ip, ..before },
        PTR_LOAD => Pointers::from_env(&f.mem[..size]),
        // fnsave leaves the x87 unit initialised.
        _ if size > 28 => Pointers::default(),
        _ => before,
    };
    after.set(fpu);
    if MEM == STORE && PTRS == PTR_KEEP {
        before.store_env(&mut f.mem[..size]);
    }
    if MEM == STORE {
        m.write_bytes(ea, &f.mem[..size])?;
    }
    if FLAGS == FL_OUT {
        m.flags
            .set_bits(CF | PF | ZF | AF | SF | OF, f.flags_out & (CF | PF | ZF));
    }
    Ok(())
}

/// emms, on the host (stub `i.imm`).
pub(crate) fn emms(m: &mut Machine, i: &Insn) -> R {
    x87::<NONE, FL_NONE, true, PTR_KEEP>(m, i)
}

/// The last-instruction pointers, kept by vessel rather than read back from the host
/// FPU (whose behaviour differs between CPU generations and vendors).
#[derive(Clone, Copy, Default)]
struct Pointers {
    fip: u64,
    fop: u16,
    fdp: u64,
}

impl Pointers {
    fn of(f: &FpuState) -> Self {
        Pointers {
            fip: f.fip,
            fop: f.fop,
            fdp: f.fdp,
        }
    }

    fn set(self, f: &mut FpuState) {
        f.fip = self.fip;
        f.fop = self.fop;
        f.fdp = self.fdp;
    }

    /// From a protected-mode environment image (the first 14 or 28 bytes of an fnsave
    /// image): the 16-bit format holds no FOP.
    fn from_env(env: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([env[o], env[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(env[o..o + 4].try_into().expect("4 bytes"));
        if env.len() == 14 || env.len() == 94 {
            Pointers {
                fip: u64::from(u16_at(6)),
                fop: 0,
                fdp: u64::from(u16_at(10)),
            }
        } else {
            Pointers {
                fip: u64::from(u32_at(12)),
                fop: u16_at(18) & 0x7ff,
                fdp: u64::from(u32_at(20)),
            }
        }
    }

    /// Writes the pointers into an environment image the host stored, with FCS and FDS
    /// zero (deprecated).
    fn store_env(self, env: &mut [u8]) {
        if env.len() == 14 || env.len() == 94 {
            put(env, 6, &(self.fip as u16).to_le_bytes());
            put(env, 8, &0u16.to_le_bytes());
            put(env, 10, &(self.fdp as u16).to_le_bytes());
            put(env, 12, &0u16.to_le_bytes());
        } else {
            put(env, 12, &(self.fip as u32).to_le_bytes());
            put(env, 16, &(u32::from(self.fop) << 16).to_le_bytes());
            put(env, 20, &(self.fdp as u32).to_le_bytes());
            // FDS only: the reserved upper half keeps what the host stored (ones).
            put(env, 24, &0u16.to_le_bytes());
        }
    }
}

/// The 387-era no-ops fneni, fndisi, fnsetpm.
fn x87_nop(m: &mut Machine, _i: &Insn) -> R {
    fpu_ok(m)
}

/// FOP of an x87 instruction from its bytes: the low 3 bits of the opcode and the ModRM.
pub(crate) fn fop_from_bytes(bytes: &[u8]) -> Option<u32> {
    let k = bytes.iter().position(|&b| (0xd8..=0xdf).contains(&b))?;
    let modrm = *bytes.get(k + 1)?;
    Some((u32::from(bytes[k] & 7) << 8) | u32::from(modrm))
}

/// How an x87 form executes: (opcode byte, ModRM reg field or register-form base, memory
/// kind, memory size).
fn form(code: Code) -> Option<(u8, u8, u8, u8)> {
    use Code as C;
    const R: u8 = NONE;
    Some(match code {
        // d8: m32fp arithmetic and st(0), st(i).
        C::Fadd_m32fp => (0xd8, 0, LOAD, 4),
        C::Fmul_m32fp => (0xd8, 1, LOAD, 4),
        C::Fcom_m32fp => (0xd8, 2, LOAD, 4),
        C::Fcomp_m32fp => (0xd8, 3, LOAD, 4),
        C::Fsub_m32fp => (0xd8, 4, LOAD, 4),
        C::Fsubr_m32fp => (0xd8, 5, LOAD, 4),
        C::Fdiv_m32fp => (0xd8, 6, LOAD, 4),
        C::Fdivr_m32fp => (0xd8, 7, LOAD, 4),
        C::Fadd_st0_sti => (0xd8, 0xc0, R, 0),
        C::Fmul_st0_sti => (0xd8, 0xc8, R, 0),
        C::Fcom_st0_sti => (0xd8, 0xd0, R, 0),
        C::Fcomp_st0_sti => (0xd8, 0xd8, R, 0),
        C::Fsub_st0_sti => (0xd8, 0xe0, R, 0),
        C::Fsubr_st0_sti => (0xd8, 0xe8, R, 0),
        C::Fdiv_st0_sti => (0xd8, 0xf0, R, 0),
        C::Fdivr_st0_sti => (0xd8, 0xf8, R, 0),
        // d9
        C::Fld_m32fp => (0xd9, 0, LOAD, 4),
        C::Fst_m32fp => (0xd9, 2, STORE, 4),
        C::Fstp_m32fp => (0xd9, 3, STORE, 4),
        C::Fldenv_m28byte => (0xd9, 4, LOAD, 28),
        C::Fnstenv_m28byte => (0xd9, 6, STORE, 28),
        C::Fld_sti => (0xd9, 0xc0, R, 0),
        C::Fxch_st0_sti => (0xd9, 0xc8, R, 0),
        C::Fnop => (0xd9, 0xd0, R, 0),
        C::Fstpnce_sti => (0xd9, 0xd8, R, 0),
        C::Fchs => (0xd9, 0xe0, R, 0),
        C::Fabs => (0xd9, 0xe1, R, 0),
        C::Ftst => (0xd9, 0xe4, R, 0),
        C::Fxam => (0xd9, 0xe5, R, 0),
        C::Fld1 => (0xd9, 0xe8, R, 0),
        C::Fldl2t => (0xd9, 0xe9, R, 0),
        C::Fldl2e => (0xd9, 0xea, R, 0),
        C::Fldpi => (0xd9, 0xeb, R, 0),
        C::Fldlg2 => (0xd9, 0xec, R, 0),
        C::Fldln2 => (0xd9, 0xed, R, 0),
        C::Fldz => (0xd9, 0xee, R, 0),
        C::F2xm1 => (0xd9, 0xf0, R, 0),
        C::Fyl2x => (0xd9, 0xf1, R, 0),
        C::Fptan => (0xd9, 0xf2, R, 0),
        C::Fpatan => (0xd9, 0xf3, R, 0),
        C::Fxtract => (0xd9, 0xf4, R, 0),
        C::Fprem1 => (0xd9, 0xf5, R, 0),
        C::Fdecstp => (0xd9, 0xf6, R, 0),
        C::Fincstp => (0xd9, 0xf7, R, 0),
        C::Fprem => (0xd9, 0xf8, R, 0),
        C::Fyl2xp1 => (0xd9, 0xf9, R, 0),
        C::Fsqrt => (0xd9, 0xfa, R, 0),
        C::Fsincos => (0xd9, 0xfb, R, 0),
        C::Frndint => (0xd9, 0xfc, R, 0),
        C::Fscale => (0xd9, 0xfd, R, 0),
        C::Fsin => (0xd9, 0xfe, R, 0),
        C::Fcos => (0xd9, 0xff, R, 0),
        // da
        C::Fiadd_m32int => (0xda, 0, LOAD, 4),
        C::Fimul_m32int => (0xda, 1, LOAD, 4),
        C::Ficom_m32int => (0xda, 2, LOAD, 4),
        C::Ficomp_m32int => (0xda, 3, LOAD, 4),
        C::Fisub_m32int => (0xda, 4, LOAD, 4),
        C::Fisubr_m32int => (0xda, 5, LOAD, 4),
        C::Fidiv_m32int => (0xda, 6, LOAD, 4),
        C::Fidivr_m32int => (0xda, 7, LOAD, 4),
        C::Fcmovb_st0_sti => (0xda, 0xc0, R, 0),
        C::Fcmove_st0_sti => (0xda, 0xc8, R, 0),
        C::Fcmovbe_st0_sti => (0xda, 0xd0, R, 0),
        C::Fcmovu_st0_sti => (0xda, 0xd8, R, 0),
        C::Fucompp => (0xda, 0xe9, R, 0),
        // db
        C::Fild_m32int => (0xdb, 0, LOAD, 4),
        C::Fisttp_m32int => (0xdb, 1, STORE, 4),
        C::Fist_m32int => (0xdb, 2, STORE, 4),
        C::Fistp_m32int => (0xdb, 3, STORE, 4),
        C::Fld_m80fp => (0xdb, 5, LOAD, 10),
        C::Fstp_m80fp => (0xdb, 7, STORE, 10),
        C::Fcmovnb_st0_sti => (0xdb, 0xc0, R, 0),
        C::Fcmovne_st0_sti => (0xdb, 0xc8, R, 0),
        C::Fcmovnbe_st0_sti => (0xdb, 0xd0, R, 0),
        C::Fcmovnu_st0_sti => (0xdb, 0xd8, R, 0),
        C::Fucomi_st0_sti => (0xdb, 0xe8, R, 0),
        C::Fcomi_st0_sti => (0xdb, 0xf0, R, 0),
        // dc: m64fp arithmetic and st(i), st(0).
        C::Fadd_m64fp => (0xdc, 0, LOAD, 8),
        C::Fmul_m64fp => (0xdc, 1, LOAD, 8),
        C::Fcom_m64fp => (0xdc, 2, LOAD, 8),
        C::Fcomp_m64fp => (0xdc, 3, LOAD, 8),
        C::Fsub_m64fp => (0xdc, 4, LOAD, 8),
        C::Fsubr_m64fp => (0xdc, 5, LOAD, 8),
        C::Fdiv_m64fp => (0xdc, 6, LOAD, 8),
        C::Fdivr_m64fp => (0xdc, 7, LOAD, 8),
        C::Fadd_sti_st0 => (0xdc, 0xc0, R, 0),
        C::Fmul_sti_st0 => (0xdc, 0xc8, R, 0),
        C::Fcom_st0_sti_DCD0 => (0xdc, 0xd0, R, 0),
        C::Fcomp_st0_sti_DCD8 => (0xdc, 0xd8, R, 0),
        C::Fsubr_sti_st0 => (0xdc, 0xe0, R, 0),
        C::Fsub_sti_st0 => (0xdc, 0xe8, R, 0),
        C::Fdivr_sti_st0 => (0xdc, 0xf0, R, 0),
        C::Fdiv_sti_st0 => (0xdc, 0xf8, R, 0),
        // dd
        C::Fld_m64fp => (0xdd, 0, LOAD, 8),
        C::Fisttp_m64int => (0xdd, 1, STORE, 8),
        C::Fst_m64fp => (0xdd, 2, STORE, 8),
        C::Fstp_m64fp => (0xdd, 3, STORE, 8),
        C::Frstor_m108byte => (0xdd, 4, LOAD, 108),
        C::Fnsave_m108byte => (0xdd, 6, STORE, 108),
        C::Ffree_sti => (0xdd, 0xc0, R, 0),
        C::Fxch_st0_sti_DDC8 => (0xdd, 0xc8, R, 0),
        C::Fst_sti => (0xdd, 0xd0, R, 0),
        C::Fstp_sti => (0xdd, 0xd8, R, 0),
        C::Fucom_st0_sti => (0xdd, 0xe0, R, 0),
        C::Fucomp_st0_sti => (0xdd, 0xe8, R, 0),
        // de: m16int arithmetic and the popping st(i), st(0) forms.
        C::Fiadd_m16int => (0xde, 0, LOAD, 2),
        C::Fimul_m16int => (0xde, 1, LOAD, 2),
        C::Ficom_m16int => (0xde, 2, LOAD, 2),
        C::Ficomp_m16int => (0xde, 3, LOAD, 2),
        C::Fisub_m16int => (0xde, 4, LOAD, 2),
        C::Fisubr_m16int => (0xde, 5, LOAD, 2),
        C::Fidiv_m16int => (0xde, 6, LOAD, 2),
        C::Fidivr_m16int => (0xde, 7, LOAD, 2),
        C::Faddp_sti_st0 => (0xde, 0xc0, R, 0),
        C::Fmulp_sti_st0 => (0xde, 0xc8, R, 0),
        C::Fcomp_st0_sti_DED0 => (0xde, 0xd0, R, 0),
        C::Fcompp => (0xde, 0xd9, R, 0),
        C::Fsubrp_sti_st0 => (0xde, 0xe0, R, 0),
        C::Fsubp_sti_st0 => (0xde, 0xe8, R, 0),
        C::Fdivrp_sti_st0 => (0xde, 0xf0, R, 0),
        C::Fdivp_sti_st0 => (0xde, 0xf8, R, 0),
        // df
        C::Fild_m16int => (0xdf, 0, LOAD, 2),
        C::Fisttp_m16int => (0xdf, 1, STORE, 2),
        C::Fist_m16int => (0xdf, 2, STORE, 2),
        C::Fistp_m16int => (0xdf, 3, STORE, 2),
        C::Fbld_m80bcd => (0xdf, 4, LOAD, 10),
        C::Fild_m64int => (0xdf, 5, LOAD, 8),
        C::Fbstp_m80bcd => (0xdf, 6, STORE, 10),
        C::Fistp_m64int => (0xdf, 7, STORE, 8),
        C::Ffreep_sti => (0xdf, 0xc0, R, 0),
        C::Fxch_st0_sti_DFC8 => (0xdf, 0xc8, R, 0),
        C::Fstp_sti_DFD0 => (0xdf, 0xd0, R, 0),
        C::Fstp_sti_DFD8 => (0xdf, 0xd8, R, 0),
        C::Fucomip_st0_sti => (0xdf, 0xe8, R, 0),
        C::Fcomip_st0_sti => (0xdf, 0xf0, R, 0),
        _ => return None,
    })
}

/// The x87 stack register operand of a register form (st(i)), if any.
fn sti(i: &Instruction) -> u8 {
    (0..i.op_count())
        .filter(|&n| i.op_kind(n) == iced_x86::OpKind::Register)
        .map(|n| i.op_register(n))
        .find(|r| (Register::ST1 as u32..=Register::ST7 as u32).contains(&(*r as u32)))
        .map_or(0, |r| (r as u32 - Register::ST0 as u32) as u8)
}

pub(crate) fn select(i: &Instruction, d: &mut Insn, _cx: &Cx) -> Option<Handler> {
    use Code as C;
    let code = i.code();
    match code {
        C::Fneni | C::Fndisi | C::Fnsetpm => return Some(x87_nop),
        // The 16-bit environment images (operand-size prefix).
        C::Fldenv_m14byte | C::Fnstenv_m14byte | C::Frstor_m94byte | C::Fnsave_m94byte => {
            let (k, size) = match code {
                C::Fldenv_m14byte => (0, 14),
                C::Fnstenv_m14byte => (1, 14),
                C::Frstor_m94byte => (2, 94),
                _ => (3, 94),
            };
            d.imm = host::env16_index(k) as u64;
            d.imm2 = size | FOP_FROM_BYTES;
            return Some(match k {
                0 | 2 => x87::<LOAD, FL_NONE, false, PTR_LOAD> as Handler,
                _ => x87::<STORE, FL_NONE, false, PTR_KEEP>,
            });
        }
        _ => {}
    }
    let (op, modrm, mem, size) = form(code)?;
    let modrm = if modrm >= 0xc0 {
        modrm + sti(i)
    } else {
        modrm << 3
    };
    d.imm = host::x87_index(op, modrm) as u64;
    d.imm2 = u32::from(size);
    if mem == NONE {
        d.imm2 |= ((u32::from(op & 7) << 8) | u32::from(modrm)) << 16;
    } else {
        d.imm2 |= FOP_FROM_BYTES;
    }
    let fcmov = matches!(
        code,
        C::Fcmovb_st0_sti
            | C::Fcmove_st0_sti
            | C::Fcmovbe_st0_sti
            | C::Fcmovu_st0_sti
            | C::Fcmovnb_st0_sti
            | C::Fcmovne_st0_sti
            | C::Fcmovnbe_st0_sti
            | C::Fcmovnu_st0_sti
    );
    let fcomi = matches!(
        code,
        C::Fucomi_st0_sti | C::Fcomi_st0_sti | C::Fucomip_st0_sti | C::Fcomip_st0_sti
    );
    let env_load = matches!(code, C::Fldenv_m28byte | C::Frstor_m108byte);
    let no_wait = matches!(code, C::Fnstenv_m28byte | C::Fnsave_m108byte);
    Some(match (mem, fcmov, fcomi) {
        // fldenv/frstor do not check for pending exceptions (they replace them).
        _ if env_load => x87::<LOAD, FL_NONE, false, PTR_LOAD> as Handler,
        _ if no_wait => x87::<STORE, FL_NONE, false, PTR_KEEP>,
        (LOAD, _, _) => x87::<LOAD, FL_NONE, true, PTR_SET>,
        (STORE, _, _) => x87::<STORE, FL_NONE, true, PTR_SET>,
        (_, true, _) => x87::<NONE, FL_IN, true, PTR_SET>,
        (_, _, true) => x87::<NONE, FL_OUT, true, PTR_SET>,
        _ => x87::<NONE, FL_NONE, true, PTR_SET>,
    })
}
