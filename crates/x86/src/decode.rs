//! iced-x86 instruction -> [`Insn`], the compact pre-decoded form the cache stores.
//!
//! Everything that can be decided once is decided here: the handler (a function pointer
//! monomorphised for the operation, operand width and operand locations), register numbers,
//! the effective-address recipe (base, index, scale, displacement, segment, address-size
//! mask) and immediates. Executing an `Insn` never looks at iced's data again.

use iced_x86::{ConditionCode, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::exception::Exception;
use crate::exec;
use crate::machine::{Machine, R, RIP, SEG_NONE, ZERO};

/// Executes one decoded instruction. On entry `regs[RIP]` already holds the address of the
/// next instruction; a handler either completes (state updated) or returns the exception
/// with the architectural state untouched (the run loop puts RIP back).
pub(crate) type Handler = fn(&mut Machine, &Insn) -> R;

#[derive(Clone, Copy)]
pub(crate) struct Insn {
    pub handler: Handler,
    /// First immediate, sign- or zero-extended as the instruction defines; for relative
    /// branches the displacement from the next instruction.
    pub imm: u64,
    /// Memory displacement (for RIP-relative operands: relative to the next instruction).
    pub disp: u64,
    /// Address-size mask applied to the effective address.
    pub amask: u64,
    /// Second immediate (enter's nesting level, extrq-style forms).
    pub imm2: u32,
    pub mnemonic: Mnemonic,
    pub len: u8,
    /// First register operand (bit 4 set: AH/CH/DH/BH). For SSE, the XMM number.
    pub d: u8,
    /// Second register operand.
    pub s: u8,
    /// Third register operand / extra selector (e.g. the count register form).
    pub t: u8,
    pub base: u8,
    pub index: u8,
    /// log2 of the index scale.
    pub scale: u8,
    /// Segment for the memory operand (SEG_NONE: base zero).
    pub seg: u8,
    /// Condition code for jcc/setcc/cmovcc, and small per-form parameters.
    pub cc: u8,
    /// Outside 64-bit mode linear addresses wrap at 4 GiB.
    pub wrap32: bool,
    /// 64-bit addressing with no segment base (not FS/GS): the effective address is the
    /// linear address, no mask or base to apply.
    pub flat: bool,
    /// False for the placeholder of an instruction the interpreter does not implement.
    pub known: bool,
    /// On a block's first instruction: the translating tier's state for the block (see
    /// `jit`).
    pub jit: u32,
}

const _: () = assert!(size_of::<Insn>() == 56);

impl std::fmt::Debug for Insn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Insn")
            .field("mnemonic", &self.mnemonic)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

pub(crate) fn unsupported(m: &mut Machine, _i: &Insn) -> R {
    m.exit |= crate::machine::EXIT_UNSUPPORTED;
    Ok(())
}

pub(crate) fn invalid_opcode(_m: &mut Machine, _i: &Insn) -> R {
    Err(Exception::InvalidOpcode.into())
}

/// What the decoder needs to know about the mode the code runs in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cx {
    pub bitness: u32,
}

impl Cx {
    pub(crate) fn long(&self) -> bool {
        self.bitness == 64
    }
}

/// GPR number for the interpreter's register file; bit 4 marks AH/CH/DH/BH.
pub(crate) fn gpr(r: Register) -> Option<u8> {
    match r {
        Register::AH => Some(0x10),
        Register::CH => Some(0x11),
        Register::DH => Some(0x12),
        Register::BH => Some(0x13),
        _ if r.is_gpr() => Some((r.full_register() as u32 - Register::RAX as u32) as u8),
        _ => None,
    }
}

/// Register number of a GPR, XMM, segment or control register operand.
fn reg_number(r: Register) -> u8 {
    if let Some(n) = gpr(r) {
        n
    } else {
        r.number() as u8
    }
}

fn seg_index(r: Register) -> u8 {
    match r {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        Register::GS => 5,
        _ => SEG_NONE,
    }
}

fn size_mask(bytes: usize) -> u64 {
    match bytes {
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Operand-kind classes handler selection matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum K {
    Reg,
    Mem,
    Imm,
    /// Relative branch target.
    Rel,
    /// String-instruction memory operand ([rsi]/[rdi]).
    Str,
    Other,
    Absent,
}

pub(crate) fn kind(i: &Instruction, n: u32) -> K {
    if n >= i.op_count() {
        return K::Absent;
    }
    match i.op_kind(n) {
        OpKind::Register => K::Reg,
        OpKind::Memory => K::Mem,
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => K::Rel,
        OpKind::Immediate8
        | OpKind::Immediate8_2nd
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => K::Imm,
        OpKind::MemorySegSI
        | OpKind::MemorySegESI
        | OpKind::MemorySegRSI
        | OpKind::MemorySegDI
        | OpKind::MemorySegEDI
        | OpKind::MemorySegRDI
        | OpKind::MemoryESDI
        | OpKind::MemoryESEDI
        | OpKind::MemoryESRDI => K::Str,
        _ => K::Other,
    }
}

/// Size in bytes of operand `n` (register or memory).
pub(crate) fn op_size(i: &Instruction, n: u32) -> usize {
    match kind(i, n) {
        K::Reg => i.op_register(n).size(),
        K::Mem | K::Str => i.memory_size().size(),
        _ => 0,
    }
}

/// Decodes `i` (whose encoding is `bytes`) into an `Insn` for mode `cx`.
pub(crate) fn decode(i: &Instruction, cx: &Cx, bytes: &[u8]) -> Insn {
    let next = i.next_ip();
    let mut d = Insn {
        handler: unsupported,
        imm: 0,
        disp: 0,
        amask: u64::MAX,
        imm2: 0,
        mnemonic: i.mnemonic(),
        len: i.len() as u8,
        d: ZERO,
        s: ZERO,
        t: ZERO,
        base: ZERO,
        index: ZERO,
        scale: 0,
        seg: SEG_NONE,
        cc: 0,
        wrap32: !cx.long(),
        flat: false,
        known: true,
        jit: 0,
    };
    let mut regs = 0;
    let mut imms = 0;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = reg_number(i.op_register(n));
                match regs {
                    0 => d.d = r,
                    1 => d.s = r,
                    _ => d.t = r,
                }
                regs += 1;
            }
            OpKind::Memory => decode_mem(i, &mut d, cx),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                d.imm = i.near_branch_target().wrapping_sub(next);
            }
            OpKind::Immediate8_2nd => d.imm2 = u32::from(i.immediate8_2nd()),
            _ if kind(i, n) == K::Imm => {
                let v = i.immediate(n);
                if imms == 0 {
                    d.imm = v;
                } else {
                    d.imm2 = v as u32;
                }
                imms += 1;
            }
            OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI => {
                d.seg = effective_seg(i.memory_segment(), cx);
                d.amask = size_mask(match i.op_kind(n) {
                    OpKind::MemorySegSI => 2,
                    OpKind::MemorySegESI => 4,
                    _ => 8,
                });
            }
            OpKind::MemorySegDI | OpKind::MemorySegEDI | OpKind::MemorySegRDI => {
                // maskmovq/maskmovdqu: DS:rDI.
                d.seg = effective_seg(i.memory_segment(), cx);
                d.amask = size_mask(match i.op_kind(n) {
                    OpKind::MemorySegDI => 2,
                    OpKind::MemorySegEDI => 4,
                    _ => 8,
                });
            }
            OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI => {
                d.amask = size_mask(match i.op_kind(n) {
                    OpKind::MemoryESDI => 2,
                    OpKind::MemoryESEDI => 4,
                    _ => 8,
                });
                // The source segment (if any) was set by a preceding operand.
            }
            _ => {}
        }
    }
    if i.condition_code() != ConditionCode::None {
        // iced numbers conditions from 1 in opcode order; the opcode nibble is one less.
        d.cc = i.condition_code() as u8 - 1;
    }
    if i.is_invalid() {
        d.handler = invalid_opcode;
        return d;
    }
    match exec::select(i, &mut d, cx) {
        Some(h) => d.handler = h,
        None => d.known = false,
    }
    if d.imm2 & exec::fpu::FOP_FROM_BYTES != 0 {
        // x87 memory forms: FOP holds the ModRM as encoded (mod and rm included).
        let fop = exec::fpu::fop_from_bytes(bytes).unwrap_or(0);
        d.imm2 = (d.imm2 & 0xff) | (fop << 16);
    }
    d
}

/// 64-bit mode ignores ES/CS/SS/DS bases; FS/GS still apply.
fn effective_seg(r: Register, cx: &Cx) -> u8 {
    let s = seg_index(r);
    if cx.long() && s < 4 { SEG_NONE } else { s }
}

fn decode_mem(i: &Instruction, d: &mut Insn, cx: &Cx) {
    let base = i.memory_base();
    let index = i.memory_index();
    d.seg = effective_seg(i.memory_segment(), cx);
    d.scale = i.memory_index_scale().trailing_zeros() as u8;
    let asize = if base == Register::RIP || base == Register::EIP {
        d.base = RIP;
        let target = i.memory_displacement64();
        d.disp = target.wrapping_sub(i.next_ip());
        if base == Register::RIP { 8 } else { 4 }
    } else {
        d.disp = i.memory_displacement64();
        if base != Register::None {
            d.base = gpr(base).unwrap_or(ZERO);
        }
        if index != Register::None {
            d.index = gpr(index).unwrap_or(ZERO);
        }
        if base != Register::None {
            base.size()
        } else if index != Register::None {
            index.size()
        } else {
            // Absolute address: iced already extended the displacement as the address
            // size requires.
            (cx.bitness / 8) as usize
        }
    };
    d.amask = size_mask(asize);
    d.flat = cx.long() && d.seg == SEG_NONE && d.amask == u64::MAX;
}

/// Whether decoding must stop after this instruction: control flow (but conditional
/// branches, which end the block only when taken), or anything that can change how the
/// following bytes decode or translate.
pub(crate) fn ends_block(i: &Instruction) -> bool {
    if !matches!(
        i.flow_control(),
        FlowControl::Next | FlowControl::ConditionalBranch
    ) {
        return true;
    }
    matches!(
        i.mnemonic(),
        Mnemonic::Popf
            | Mnemonic::Popfd
            | Mnemonic::Popfq
            | Mnemonic::Sti
            | Mnemonic::Cli
            | Mnemonic::Wrmsr
            | Mnemonic::Xsetbv
            | Mnemonic::Lgdt
            | Mnemonic::Lidt
            | Mnemonic::Lldt
            | Mnemonic::Ltr
            | Mnemonic::Lmsw
            | Mnemonic::Clts
            | Mnemonic::Invlpg
            | Mnemonic::Swapgs
            | Mnemonic::Stac
            | Mnemonic::Clac
            | Mnemonic::Wbinvd
            | Mnemonic::Invd
            | Mnemonic::Hlt
            | Mnemonic::Cpuid
            | Mnemonic::Xrstor
            | Mnemonic::Xrstor64
            | Mnemonic::Fxrstor
            | Mnemonic::Fxrstor64
            | Mnemonic::Ldmxcsr
    ) || (i.mnemonic() == Mnemonic::Mov
        && (0..i.op_count()).any(|n| {
            i.op_kind(n) == OpKind::Register && {
                let r = i.op_register(n);
                r.is_cr() || r.is_dr() || r.is_segment_register()
            }
        }))
        || (i.mnemonic() == Mnemonic::Pop
            && i.op_kind(0) == OpKind::Register
            && i.op_register(0).is_segment_register())
}
