//! Random instruction cases: every legacy-encoded 64-bit form (iced `Code`) of a mnemonic,
//! with random registers, flags, XMM state and memory, and operands generated from iced's
//! opcode tables. Memory operands always land in the data window (often across its page
//! boundary); registers the instruction needs to hold particular values (divisors, stack
//! slots, branch targets) are fixed up per mnemonic.

use iced_x86::{
    Code, Decoder, DecoderOptions, Encoder, Instruction, MemoryOperand, Mnemonic,
    OpCodeOperandKind as OK, Register,
};

use crate::common::Rng;
use crate::native::{DATA_LEN, Native, RegState};

pub const RFLAGS_ARITH: u64 = 0x8d5;
pub const DF: u64 = 1 << 10;

pub struct Case {
    pub bytes: Vec<u8>,
    pub regs: RegState,
    pub data: Vec<u8>,
    /// RFLAGS bits that must match (the others are undefined for this instruction).
    pub flags_mask: u64,
    pub instr: Instruction,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    R(Register),
    M(MemoryOperand),
    I(i32),
    U(u32),
    U64(u64),
    Br(u64),
}

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

fn gpr_of_size(n: usize, size: usize) -> Register {
    let base = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    if size == 1 && n >= 16 {
        // AH, CH, DH, BH (iced places them after AL..BL).
        return [Register::AH, Register::CH, Register::DH, Register::BH][n - 16];
    }
    let r = base as u32 + n as u32;
    let r = if size == 1 && n >= 4 {
        // iced orders the byte registers AL CL DL BL AH CH DH BH SPL BPL SIL DIL R8L...
        base as u32 + n as u32 + 4
    } else {
        r
    };
    Register::values().nth(r as usize).expect("register")
}

/// Converts iced's RflagsBits to RFLAGS bit positions.
pub fn rflags_from_iced(bits: u32) -> u64 {
    use iced_x86::RflagsBits as F;
    let map = [
        (F::OF, 1u64 << 11),
        (F::SF, 1 << 7),
        (F::ZF, 1 << 6),
        (F::AF, 1 << 4),
        (F::CF, 1),
        (F::PF, 1 << 2),
        (F::DF, 1 << 10),
        (F::IF, 1 << 9),
        (F::AC, 1 << 18),
    ];
    map.iter()
        .filter(|(f, _)| bits & f != 0)
        .map(|(_, b)| b)
        .fold(0, |a, b| a | b)
}

/// Every legacy-encoded form of `mnemonics` valid in `bits`-bit mode.
pub fn forms(mnemonics: &[Mnemonic], bits: u32) -> Vec<Code> {
    Code::values()
        .filter(|c| {
            let o = c.op_code();
            o.is_instruction()
                && if bits == 64 { o.mode64() } else { o.mode32() }
                && o.encoding() == iced_x86::EncodingKind::Legacy
                && mnemonics.contains(&c.mnemonic())
        })
        .collect()
}

/// Whether the generator can produce operands for every operand of `code` (forms with
/// segment, control or debug registers, far pointers and x87/MMX operands are covered
/// elsewhere or not at all).
pub fn generatable(code: Code) -> bool {
    let oc = code.op_code();
    let far = matches!(
        oc.memory_size(),
        iced_x86::MemorySize::SegPtr16
            | iced_x86::MemorySize::SegPtr32
            | iced_x86::MemorySize::SegPtr64
    );
    !far && (0..oc.op_count()).all(|n| {
        matches!(
            oc.op_kind(n),
            OK::r8_or_mem
                | OK::r16_or_mem
                | OK::r32_or_mem
                | OK::r64_or_mem
                | OK::mem
                | OK::mem_offs
                | OK::r8_reg
                | OK::r8_opcode
                | OK::r16_reg
                | OK::r16_opcode
                | OK::r16_rm
                | OK::r16_reg_mem
                | OK::r32_reg
                | OK::r32_opcode
                | OK::r32_rm
                | OK::r32_reg_mem
                | OK::r64_reg
                | OK::r64_opcode
                | OK::r64_rm
                | OK::r64_reg_mem
                | OK::al
                | OK::cl
                | OK::ax
                | OK::dx
                | OK::eax
                | OK::rax
                | OK::imm8
                | OK::imm8_const_1
                | OK::imm8sex16
                | OK::imm8sex32
                | OK::imm8sex64
                | OK::imm16
                | OK::imm32
                | OK::imm32sex64
                | OK::imm64
                | OK::br16_1
                | OK::br32_1
                | OK::br64_1
                | OK::br16_2
                | OK::br32_4
                | OK::br64_4
                | OK::xmm_reg
                | OK::xmm_rm
                | OK::xmm_or_mem
                | OK::st0
                | OK::sti_opcode
                | OK::mm_reg
                | OK::mm_rm
                | OK::mm_or_mem
        )
    })
}

/// Per-mnemonic knowledge the generator needs.
#[derive(Clone, Copy, Default)]
pub struct Tweaks {
    /// Random MXCSR (rounding, FTZ/DAZ, sticky flags; exceptions stay masked).
    pub random_mxcsr: bool,
    /// Random DF.
    pub random_df: bool,
    /// Size and alignment of memory operands (0: from the instruction form).
    pub mem_size: usize,
    pub mem_align: usize,
    /// XMM registers and data hold float-shaped values (zeros, infinities, NaNs,
    /// denormals, ordinary numbers) rather than random bits.
    pub float_values: bool,
}

/// A 32-bit float bit pattern biased to the cases float arithmetic treats specially.
fn f32_bits(rng: &mut Rng) -> u32 {
    let sign = (rng.below(2) as u32) << 31;
    sign | match rng.below(10) {
        0 => 0,
        1 => 0x7f80_0000,                                   // infinity
        2 => 0x7fc0_0000 | (rng.next() as u32 & 0x3f_ffff), // quiet NaN
        3 => 0x7f80_0001 | (rng.next() as u32 & 0x1f_ffff), // signalling NaN
        4 => rng.next() as u32 & 0x7f_ffff,                 // denormal
        5 => 0x3f80_0000,                                   // 1.0
        6 => (rng.next() as u32 & 0x7fff_ffff) | 0x0080_0000,
        _ => ((127 + rng.below(40) as u32 - 20) << 23) | (rng.next() as u32 & 0x7f_ffff),
    }
}

fn f64_bits(rng: &mut Rng) -> u64 {
    let sign = rng.below(2) << 63;
    sign | match rng.below(10) {
        0 => 0,
        1 => 0x7ff0_0000_0000_0000,
        2 => 0x7ff8_0000_0000_0000 | (rng.next() & 0x7_ffff_ffff_ffff),
        3 => 0x7ff0_0000_0000_0001 | (rng.next() & 0x3_ffff_ffff_ffff),
        4 => rng.next() & 0xf_ffff_ffff_ffff,
        5 => 0x3ff0_0000_0000_0000,
        6 => rng.next() & 0x7fff_ffff_ffff_ffff,
        // Around 1.0, and around the int32 range for conversions.
        7 => ((1023 + rng.below(40) - 20) << 52) | (rng.next() & 0xf_ffff_ffff_ffff),
        _ => ((1023 + 20 + rng.below(45)) << 52) | (rng.next() & 0xf_ffff_ffff_ffff),
    }
}

/// 128 bits of float lanes: four singles or two doubles.
pub fn float_vector(rng: &mut Rng) -> u128 {
    if rng.chance(2) {
        (0..4).fold(0u128, |v, k| v | (u128::from(f32_bits(rng)) << (32 * k)))
    } else {
        (0..2).fold(0u128, |v, k| v | (u128::from(f64_bits(rng)) << (64 * k)))
    }
}

pub struct Gen<'a> {
    pub rng: &'a mut Rng,
    pub native: &'a Native,
    regs: RegState,
    data: Vec<u8>,
    /// Registers whose values something else decides (never a base/index register).
    pinned: u16,
    /// Offsets in the data window of the memory operands generated.
    targets: Vec<u64>,
    used_base: u16,
    align: usize,
    /// 64, or 32 for compatibility-mode cases.
    bits: u32,
}

impl<'a> Gen<'a> {
    pub fn new(rng: &'a mut Rng, native: &'a Native) -> Self {
        Gen {
            rng,
            native,
            regs: RegState::default(),
            data: vec![0; DATA_LEN],
            pinned: 0,
            targets: Vec::new(),
            used_base: 0,
            align: 1,
            bits: 64,
        }
    }

    /// A generator for 32-bit code (run in compatibility mode).
    pub fn new32(rng: &'a mut Rng, native: &'a Native) -> Self {
        Gen {
            bits: 32,
            ..Gen::new(rng, native)
        }
    }

    fn nregs(&self) -> usize {
        if self.bits == 64 { 16 } else { 8 }
    }

    fn insn_addr(&self) -> u64 {
        if self.bits == 64 {
            self.native.insn_addr()
        } else {
            self.native.insn32_addr()
        }
    }

    fn exit_b(&self) -> u64 {
        if self.bits == 64 {
            self.native.exit_b()
        } else {
            self.native.exit_b32()
        }
    }

    fn data_base(&self) -> u64 {
        self.native.data_addr()
    }

    fn reset(&mut self, t: &Tweaks) {
        for k in 0..16 {
            self.regs.gpr[k] = self.rng.interesting();
            if self.bits == 32 {
                // The 32-bit stub loads and stores the low halves only.
                self.regs.gpr[k] &= if k < 8 { 0xffff_ffff } else { 0 };
            }
        }
        // The stack pointer always points into the middle of the data window.
        self.regs.gpr[4] = self.data_base() + 0x800 + (self.rng.below(0x1000) & !7);
        let mut fl = 0x202 | (self.rng.next() & RFLAGS_ARITH);
        if t.random_df && self.rng.chance(2) {
            fl |= DF;
        }
        self.regs.rflags = fl;
        for x in self.regs.xmm.iter_mut() {
            *x = if t.float_values {
                float_vector(self.rng)
            } else {
                u128::from(self.rng.next()) | (u128::from(self.rng.next()) << 64)
            };
        }
        // x87 state: random data, every exception masked and none pending (the harness
        // must never take #MF).
        let x = &mut self.regs.x87;
        x.fcw = 0x037f | (self.rng.next() as u16 & 0x0f00);
        x.fsw = self.rng.next() as u16 & 0x7f3f;
        x.ftw = self.rng.next() as u8;
        // Random error pointers, so that what an instruction leaves unchanged is seen;
        // zero on AMD, whose FXSAVE stores them as zero while no exception is pending.
        if crate::host_model::host_keeps_x87_pointers() {
            x.fop = self.rng.next() as u16 & 0x7ff;
            x.fip = self.rng.next() & 0xffff_ffff_ffff;
            x.fdp = self.rng.next() & 0xffff_ffff_ffff;
        } else {
            x.fop = 0;
            x.fip = 0;
            x.fdp = 0;
        }
        for s in x.st.iter_mut() {
            *s = (u128::from(self.rng.next()) | (u128::from(self.rng.next()) << 64))
                & ((1 << 80) - 1);
        }
        for v in self.regs.ymm_hi.iter_mut() {
            *v = u128::from(self.rng.next()) | (u128::from(self.rng.next()) << 64);
        }
        for v in self.regs.opmask.iter_mut() {
            *v = self.rng.next();
        }
        for v in self.regs.zmm_hi256.iter_mut().flatten() {
            *v = u128::from(self.rng.next()) | (u128::from(self.rng.next()) << 64);
        }
        for v in self.regs.hi16_zmm.iter_mut().flatten() {
            *v = u128::from(self.rng.next()) | (u128::from(self.rng.next()) << 64);
        }
        self.regs.mxcsr = 0x1f80;
        if t.random_mxcsr {
            let rc = self.rng.below(4) << 13;
            let ftz = (self.rng.below(2) << 15) as u32;
            let daz = (self.rng.below(2) << 6) as u32;
            self.regs.mxcsr = 0x1f80 | rc as u32 | ftz | daz | (self.rng.below(64) as u32);
        }
        if t.float_values {
            for chunk in self.data.chunks_mut(16) {
                let v = float_vector(self.rng).to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        } else {
            for chunk in self.data.chunks_mut(8) {
                let v = self.rng.interesting().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
        self.pinned = 1 << 4;
        self.targets.clear();
        self.used_base = 0;
    }

    fn pin(&mut self, r: usize) {
        self.pinned |= 1 << r;
    }

    fn free_reg(&mut self) -> Option<usize> {
        let avail: Vec<usize> = (0..self.nregs())
            .filter(|k| self.pinned & (1 << k) == 0 && self.used_base & (1 << k) == 0)
            .collect();
        if avail.is_empty() {
            return None;
        }
        Some(avail[self.rng.below(avail.len() as u64) as usize])
    }

    /// A memory operand of `size` bytes whose address lies in the data window.
    fn mem(&mut self, size: usize, align: usize) -> Option<MemoryOperand> {
        let span = size.max(1) as u64;
        let mut off = if span > 16 {
            0x100 + self.rng.below(0x1e00 - span)
        } else if self.rng.chance(4) {
            // Straddle the page boundary in the middle of the window.
            0x1000 - 1 - self.rng.below(span.min(16))
        } else {
            0x100 + self.rng.below(0x1c00)
        };
        if align > 1 {
            off &= !(align as u64 - 1);
        } else if self.rng.chance(2) {
            off &= !(span.next_power_of_two().min(16) - 1);
        }
        let target = self.data_base() + off;
        self.targets.push(off);
        let disp: i64 = match self.rng.below(4) {
            0 => 0,
            1 => self.rng.below(256) as i64 - 128,
            _ => self.rng.below(0x1000) as i64 - 0x800,
        };
        let bits = self.bits;
        let wide = move |k: usize| {
            if bits == 64 {
                GPR64[k]
            } else {
                Register::values()
                    .nth(Register::EAX as usize + k)
                    .expect("reg")
            }
        };
        Some(match self.rng.below(10) {
            0 if self.bits == 64 => MemoryOperand::with_base_displ(Register::RIP, target as i64),
            0 | 1 => MemoryOperand::with_displ(target, 4),
            2 => {
                let rsp = self.regs.gpr[4];
                MemoryOperand::with_base_displ(wide(4), target as i64 - rsp as i64)
            }
            3 if self.bits == 64 => {
                // 32-bit addressing (0x67): the window is below 4 GiB.
                let b = self.free_reg()?;
                self.used_base |= 1 << b;
                self.regs.gpr[b] =
                    (target as i64 - disp) as u64 & 0xffff_ffff | (self.rng.next() << 32);
                let reg = Register::values()
                    .nth(Register::EAX as usize + b)
                    .expect("reg");
                MemoryOperand::with_base_displ(reg, disp)
            }
            4..=6 => {
                let b = self.free_reg()?;
                self.used_base |= 1 << b;
                let i = self.free_reg()?;
                self.used_base |= 1 << i;
                if i == 4 {
                    return None;
                }
                let scale = 1u64 << self.rng.below(4);
                let iv = self.rng.below(32);
                self.regs.gpr[i] = iv;
                self.regs.gpr[b] = (target as i64 - disp - (iv * scale) as i64) as u64;
                if self.bits == 32 {
                    self.regs.gpr[b] &= 0xffff_ffff;
                }
                MemoryOperand::with_base_index_scale_displ_size(
                    wide(b),
                    wide(i),
                    scale as u32,
                    disp,
                    if disp == 0 { 0 } else { 4 },
                )
            }
            _ => {
                let b = self.free_reg()?;
                self.used_base |= 1 << b;
                self.regs.gpr[b] = (target as i64 - disp) as u64;
                if self.bits == 32 {
                    self.regs.gpr[b] &= 0xffff_ffff;
                }
                MemoryOperand::with_base_displ(wide(b), disp)
            }
        })
    }

    fn reg(&mut self, size: usize) -> Register {
        if self.bits == 32 {
            let n = self.rng.below(8) as usize;
            return if size == 1 {
                [
                    Register::AL,
                    Register::CL,
                    Register::DL,
                    Register::BL,
                    Register::AH,
                    Register::CH,
                    Register::DH,
                    Register::BH,
                ][n]
            } else {
                gpr_of_size(n, size)
            };
        }
        let n = if size == 1 {
            self.rng.below(20) as usize
        } else {
            self.rng.below(16) as usize
        };
        gpr_of_size(n, size)
    }

    fn xmm(&mut self) -> Register {
        let n = self.nregs() as u64;
        Register::values()
            .nth(Register::XMM0 as usize + self.rng.below(n) as usize)
            .expect("xmm")
    }

    fn operand(&mut self, k: OK, msize: usize) -> Option<Op> {
        let imm8 = |g: &mut Self| g.rng.interesting() as u8;
        Some(match k {
            OK::r8_or_mem | OK::r16_or_mem | OK::r32_or_mem | OK::r64_or_mem => {
                let size = match k {
                    OK::r8_or_mem => 1,
                    OK::r16_or_mem => 2,
                    OK::r32_or_mem => 4,
                    _ => 8,
                };
                if self.rng.chance(2) {
                    Op::R(self.reg(size))
                } else {
                    Op::M(self.mem(size, 1)?)
                }
            }
            OK::mem => Op::M(self.mem(msize, if msize == 16 { 16 } else { self.align })?),
            OK::mem_offs => {
                let off = 0x100 + self.rng.below(0x1c00);
                self.targets.push(off);
                let size = if self.bits == 64 { 8 } else { 4 };
                Op::M(MemoryOperand::with_displ(self.data_base() + off, size))
            }
            OK::r8_reg | OK::r8_opcode => Op::R(self.reg(1)),
            OK::r16_reg | OK::r16_opcode | OK::r16_rm | OK::r16_reg_mem => Op::R(self.reg(2)),
            OK::r32_reg | OK::r32_opcode | OK::r32_rm | OK::r32_reg_mem => Op::R(self.reg(4)),
            OK::r64_reg | OK::r64_opcode | OK::r64_rm | OK::r64_reg_mem => Op::R(self.reg(8)),
            OK::al => Op::R(Register::AL),
            OK::cl => Op::R(Register::CL),
            OK::ax => Op::R(Register::AX),
            OK::dx => Op::R(Register::DX),
            OK::eax => Op::R(Register::EAX),
            OK::rax => Op::R(Register::RAX),
            OK::imm8 => Op::U(u32::from(imm8(self))),
            OK::imm8_const_1 => Op::U(1),
            OK::imm8sex16 | OK::imm8sex32 | OK::imm8sex64 => Op::I(i32::from(imm8(self) as i8)),
            OK::imm16 => Op::U(u32::from(self.rng.interesting() as u16)),
            OK::imm32 => Op::U(self.rng.interesting() as u32),
            OK::imm32sex64 => Op::I(self.rng.interesting() as i32),
            OK::imm64 => Op::U64(self.rng.interesting()),
            OK::br16_1 | OK::br32_1 | OK::br64_1 | OK::br16_2 | OK::br32_4 | OK::br64_4 => {
                Op::Br(self.exit_b())
            }
            OK::xmm_reg | OK::xmm_rm => Op::R(self.xmm()),
            OK::st0 => Op::R(Register::ST0),
            OK::sti_opcode => Op::R(nth_reg(Register::ST0, self.rng.below(8))),
            OK::mm_reg | OK::mm_rm => Op::R(nth_reg(Register::MM0, self.rng.below(8))),
            OK::mm_or_mem => {
                if self.rng.chance(2) {
                    Op::R(nth_reg(Register::MM0, self.rng.below(8)))
                } else {
                    Op::M(self.mem(msize, 1)?)
                }
            }
            OK::xmm_or_mem => {
                if self.rng.chance(2) {
                    Op::R(self.xmm())
                } else {
                    let align = if msize == 16 { 16 } else { 1 };
                    Op::M(self.mem(msize, align)?)
                }
            }
            _ => return None,
        })
    }

    /// One random case of `code`, or None if this draw cannot be used (resample).
    pub fn case(
        &mut self,
        code: Code,
        t: &Tweaks,
        hooks: &dyn Fn(&mut Fixup) -> bool,
    ) -> Option<Case> {
        self.reset(t);
        let oc = code.op_code();
        let mnemonic = code.mnemonic();
        let msize = if t.mem_size != 0 {
            t.mem_size
        } else {
            memory_size_of(code)
        };
        self.align = t.mem_align.max(1);
        // Registers that hooks will set must not be used for addressing.
        let mut dummy = Rng::new(0);
        let mut probe = Fixup::probe(mnemonic, &mut dummy);
        hooks(&mut probe);
        let pins = probe.pins;
        for r in pins {
            self.pin(r);
        }
        let mut ops = Vec::new();
        for n in 0..oc.op_count() {
            ops.push(self.operand(oc.op_kind(n), msize)?);
        }
        let mut instr = build(code, &ops)?;
        if oc.can_use_lock_prefix() && matches!(ops.first(), Some(Op::M(_))) && self.rng.chance(2) {
            instr.set_has_lock_prefix(true);
        }
        let mut enc = Encoder::new(self.bits);
        enc.encode(&instr, self.insn_addr()).ok()?;
        let bytes = enc.take_buffer();
        let mut dec = Decoder::with_ip(self.bits, &bytes, self.insn_addr(), DecoderOptions::NONE);
        let instr = dec.decode();
        if instr.is_invalid() || instr.code() != code {
            return None;
        }
        let mut fx = Fixup {
            mnemonic,
            instr,
            regs: self.regs,
            data: std::mem::take(&mut self.data),
            data_base: self.data_base(),
            targets: self.targets.clone(),
            exit_b: self.exit_b(),
            flags_mask: !rflags_from_iced(instr.rflags_undefined()),
            pins: Vec::new(),
            rng: self.rng,
        };
        let ok = hooks(&mut fx);
        let Fixup {
            regs,
            data,
            flags_mask,
            ..
        } = fx;
        self.data = data.clone();
        if !ok {
            return None;
        }
        Some(Case {
            bytes,
            regs,
            data,
            flags_mask,
            instr,
        })
    }
}

/// Memory operand size of a code's memory form (bytes; 16 when unknown).
fn memory_size_of(code: Code) -> usize {
    let s = code.op_code().memory_size().size();
    if s == 0 { 16 } else { s }
}

/// What a per-mnemonic hook may adjust after the instruction is generated.
pub struct Fixup<'r> {
    pub mnemonic: Mnemonic,
    pub instr: Instruction,
    pub regs: RegState,
    pub data: Vec<u8>,
    pub data_base: u64,
    /// Offsets of the memory operands in the data window.
    pub targets: Vec<u64>,
    pub exit_b: u64,
    pub flags_mask: u64,
    /// Filled in the probe pass: registers the hook will set.
    pub pins: Vec<usize>,
    pub rng: &'r mut Rng,
}

impl<'r> Fixup<'r> {
    /// The pass before generation, in which hooks only declare the registers they set.
    fn probe(mnemonic: Mnemonic, rng: &'r mut Rng) -> Fixup<'r> {
        Fixup {
            mnemonic,
            instr: Instruction::default(),
            regs: RegState::default(),
            data: Vec::new(),
            data_base: 0,
            targets: Vec::new(),
            exit_b: 0,
            flags_mask: 0,
            pins: Vec::new(),
            rng,
        }
    }

    /// True in the probe pass (only `pins` matters then).
    pub fn probing(&self) -> bool {
        self.data.is_empty()
    }

    pub fn read_data(&self, off: u64, n: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.data[off as usize..off as usize + n]);
        u64::from_le_bytes(b)
    }

    pub fn write_data(&mut self, off: u64, n: usize, v: u64) {
        self.data[off as usize..off as usize + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// Offset of the stack pointer in the data window.
    pub fn rsp_off(&self) -> u64 {
        self.regs.gpr[4] - self.data_base
    }

    /// Value of operand `n` (register or memory) of size `size`.
    pub fn operand_value(&self, n: u32, size: usize) -> u64 {
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        };
        match self.instr.op_kind(n) {
            iced_x86::OpKind::Register => {
                let r = self.instr.op_register(n);
                let v = self.regs.gpr[gpr_index(r)];
                if is_high_byte(r) {
                    (v >> 8) & 0xff
                } else {
                    v & mask
                }
            }
            _ => self.read_data(self.targets[0], size),
        }
    }
}

fn nth_reg(first: Register, k: u64) -> Register {
    Register::values()
        .nth(first as usize + k as usize)
        .expect("register")
}

pub fn gpr_index(r: Register) -> usize {
    r.full_register() as usize - Register::RAX as usize
}

pub fn is_high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn build(code: Code, ops: &[Op]) -> Option<Instruction> {
    use Op::*;
    if let Some(Br(t)) = ops.iter().find(|o| matches!(o, Br(_))) {
        return Instruction::with_branch(code, *t).ok();
    }
    let r = match ops {
        [] => Ok(Instruction::with(code)),
        [R(a)] => Instruction::with1(code, *a),
        [M(a)] => Instruction::with1(code, *a),
        [I(a)] => Instruction::with1(code, *a),
        [U(a)] => Instruction::with1(code, *a),
        [R(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), M(b)] => Instruction::with2(code, *a, *b),
        [M(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), I(b)] => Instruction::with2(code, *a, *b),
        [R(a), U(b)] => Instruction::with2(code, *a, *b),
        [R(a), U64(b)] => Instruction::with2(code, *a, *b),
        [M(a), I(b)] => Instruction::with2(code, *a, *b),
        [M(a), U(b)] => Instruction::with2(code, *a, *b),
        [U(a), U(b)] => Instruction::with2(code, *a, *b),
        [I(a), I(b)] => Instruction::with2(code, *a, *b),
        [U(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), R(b), U(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), M(b), I(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), M(b), U(c)] => Instruction::with3(code, *a, *b, *c),
        [M(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        [M(a), R(b), U(c)] => Instruction::with3(code, *a, *b, *c),
        [M(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), M(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        _ => return None,
    };
    r.ok()
}
