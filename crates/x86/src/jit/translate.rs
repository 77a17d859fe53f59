//! Guest block -> host code. Guest instructions are decoded again from the block's
//! bytes, checked against an allow-list (integer computation on general registers,
//! immediates and one memory operand, direct branches, the 64-bit stack's push, pop,
//! call and ret; no system, string, locked or fault-raising instruction), and
//! re-encoded by iced-x86 with their registers renamed to host registers and their memory
//! operand replaced by a host pointer: guest bytes are never copied. Host flags are the
//! guest's flags (stashed on the host stack around a probe while an exit may need
//! them); guest registers used by the block live in host registers and every exit
//! writes them back, so any exit has precise state; each memory operand goes through an
//! inline software-TLB probe, and a miss leaves the block with the interpreter to run
//! that instruction.

use iced_x86::code_asm::{
    AsmRegister64, CodeAssembler, CodeLabel, byte_ptr, dword_ptr, get_gpr64, qword_ptr, r15, rsp,
    word_ptr,
};
use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Encoder, FlowControl, Instruction,
    InstructionInfoFactory, MemoryOperand, Mnemonic, OpAccess, OpKind, Register, RflagsBits,
};

use super::ctx::off;
use crate::decode::Insn;
use crate::hostmem::entry_off;
use crate::machine::SEG_NONE;

/// How a block is compiled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    /// A branch back to the block's start stays in host code (until the budget, an
    /// attention request or a code change).
    pub loops: bool,
    /// Log every store's old bytes (check mode undoes them).
    pub log_stores: bool,
    /// Exits to a known address jump straight to that block's translation when the
    /// chain table vouches for it.
    pub chain: bool,
    /// Forward branches within the translation stay in it.
    pub intra: bool,
    /// The fewest instructions worth translating when they are not the whole block.
    pub min_prefix: usize,
    /// The code's size (32: addresses wrap at 4 GiB).
    pub bitness: u32,
}

/// A translated block, assembled for the address it was asked for.
pub(crate) struct Translation {
    pub code: Vec<u8>,
    /// Where other blocks' code jumps in (after the prologue), from the start.
    pub chain_offset: u64,
    /// Guest instructions covered (a prefix of the decoded block).
    pub count: u32,
    /// Per instruction: the RFLAGS bits it writes, and those it leaves undefined (check
    /// mode does not compare a flag whose last writer left it undefined).
    pub flag_effects: Vec<(u64, u64)>,
}

const ALL_FLAGS: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF;

/// What one guest instruction becomes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Computation, possibly with one memory access.
    Op {
        mem: Option<MemAccess>,
    },
    /// A NOP form (multi-byte NOPs name a memory operand they never access).
    Nop,
    /// `lea`: an address computed, nothing accessed.
    Lea,
    /// jcc/jmp to a constant target: ends the translation.
    Branch {
        cc: ConditionCode,
        target: u64,
    },
    /// The 64-bit stack: push and pop of a general register, call to a constant
    /// target, ret (ends the translation; ret leaves for the address it popped).
    Push,
    Pop,
    Call {
        target: u64,
    },
    Ret,
}

impl Kind {
    /// Accesses memory through a TLB probe (and may leave at a miss).
    fn probes(self) -> bool {
        matches!(
            self,
            Kind::Op { mem: Some(_) } | Kind::Push | Kind::Pop | Kind::Call { .. } | Kind::Ret
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct MemAccess {
    size: u32,
    read: bool,
    write: bool,
}

fn allowed_mnemonic(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Mov
            | Lea
            | Movzx
            | Movsx
            | Movsxd
            | Shl
            | Shr
            | Sar
            | Rol
            | Ror
            | Imul
            | Mul
            | Xchg
            | Bswap
            | Bt
            | Bts
            | Btr
            | Btc
            | Cdq
            | Cqo
            | Cdqe
            | Cwde
            | Cbw
            | Cwd
            | Shld
            | Shrd
            | Clc
            | Stc
            | Cmc
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
    )
}

/// The class of `ins`, or `None` when it is not translated. `d` is the interpreter's
/// decoding of it (its segment and address-size recipe).
fn classify(ins: &Instruction, d: &Insn) -> Option<Kind> {
    if ins.has_lock_prefix() || ins.has_rep_prefix() || ins.has_repne_prefix() {
        return None;
    }
    if let Some(k) = stack_kind(ins) {
        return k;
    }
    match ins.flow_control() {
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
            let near = matches!(
                ins.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            );
            let plain = !matches!(
                ins.mnemonic(),
                Mnemonic::Jcxz
                    | Mnemonic::Jecxz
                    | Mnemonic::Jrcxz
                    | Mnemonic::Loop
                    | Mnemonic::Loope
                    | Mnemonic::Loopne
            );
            return (near && plain).then(|| Kind::Branch {
                cc: ins.condition_code(),
                target: ins.near_branch_target(),
            });
        }
        FlowControl::Next => {}
        _ => return None,
    }
    if ins.mnemonic() == Mnemonic::Nop {
        return Some(Kind::Nop);
    }
    if !allowed_mnemonic(ins.mnemonic()) {
        return None;
    }
    let mut mem = None;
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Register => {
                if !ins.op_register(i).is_gpr() {
                    return None;
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            OpKind::Memory => mem = Some(i),
            _ => return None,
        }
    }
    let Some(op) = mem else {
        return Some(Kind::Op { mem: None });
    };
    // 16-bit addressing stays interpreted.
    let base_ok = |r: Register| r == Register::None || r.is_gpr32() || r.is_gpr64();
    let rip_rel = ins.is_ip_rel_memory_operand();
    if d.amask == 0xffff || !(rip_rel || base_ok(ins.memory_base())) || !base_ok(ins.memory_index())
    {
        return None;
    }
    if ins.mnemonic() == Mnemonic::Lea {
        return Some(Kind::Lea);
    }
    // xchg with memory is locked; bt-family with a register bit offset addresses
    // beyond the operand.
    match ins.mnemonic() {
        Mnemonic::Xchg => return None,
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
            if ins.op1_kind() == OpKind::Register =>
        {
            return None;
        }
        _ => {}
    }
    let size = ins.memory_size().size() as u32;
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let access = ins_op_access(ins, op)?;
    Some(Kind::Op {
        mem: Some(MemAccess {
            size,
            read: !matches!(access, OpAccess::Write),
            write: !matches!(access, OpAccess::Read),
        }),
    })
}

/// The stack instructions translated (64-bit code, flat SS): `Some(None)` for other
/// stack forms, which stay interpreted; `None` for everything else.
fn stack_kind(ins: &Instruction) -> Option<Option<Kind>> {
    let gpr64 = |r: Register| r.is_gpr64();
    let k = match (ins.code(), ins.mnemonic()) {
        (Code::Push_r64, _) if gpr64(ins.op0_register()) => Kind::Push,
        (Code::Pop_r64, _) if ins.op0_register() != Register::RSP => Kind::Pop,
        (Code::Call_rel32_64, _) => Kind::Call {
            target: ins.near_branch_target(),
        },
        (Code::Retnq, _) => Kind::Ret,
        (_, Mnemonic::Push | Mnemonic::Pop | Mnemonic::Call | Mnemonic::Ret) => {
            return Some(None);
        }
        _ => return None,
    };
    Some(Some(k))
}

fn ins_op_access(ins: &Instruction, op: u32) -> Option<OpAccess> {
    let mut f = InstructionInfoFactory::new();
    let a = f.info(ins).op_access(op);
    match a {
        OpAccess::Read | OpAccess::Write | OpAccess::ReadWrite | OpAccess::ReadCondWrite => Some(a),
        OpAccess::CondWrite => Some(OpAccess::ReadWrite),
        _ => None,
    }
}

/// Guest register number (0-15) of a GPR of any size.
fn gnum(r: Register) -> u8 {
    let full = r.full_register();
    (full as u32 - Register::RAX as u32) as u8
}

fn high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

const GPR8: [Register; 16] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::SPL,
    Register::BPL,
    Register::SIL,
    Register::DIL,
    Register::R8L,
    Register::R9L,
    Register::R10L,
    Register::R11L,
    Register::R12L,
    Register::R13L,
    Register::R14L,
    Register::R15L,
];
const GPR16: [Register; 16] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BX,
    Register::SP,
    Register::BP,
    Register::SI,
    Register::DI,
    Register::R8W,
    Register::R9W,
    Register::R10W,
    Register::R11W,
    Register::R12W,
    Register::R13W,
    Register::R14W,
    Register::R15W,
];
const GPR32: [Register; 16] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
    Register::R8D,
    Register::R9D,
    Register::R10D,
    Register::R11D,
    Register::R12D,
    Register::R13D,
    Register::R14D,
    Register::R15D,
];
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

/// `r` (a guest GPR) renamed to host register `h`, same size.
fn rename(r: Register, h: u8) -> Option<Register> {
    let h = usize::from(h);
    if high_byte(r) {
        return (h == usize::from(gnum(r))).then_some(r);
    }
    Some(match r.size() {
        1 => GPR8[h],
        2 => GPR16[h],
        4 => GPR32[h],
        _ => GPR64[h],
    })
}

fn hreg(h: u8) -> AsmRegister64 {
    get_gpr64(GPR64[usize::from(h)]).expect("a 64-bit GPR")
}

/// Host registers translated code may use: all but rsp and r15 (the context).
const CTX: u8 = 15;
const HOSTS: [u8; 14] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

/// Where each guest register lives in the block.
struct Alloc {
    /// Host register of a guest register kept in one for the whole block.
    home: [Option<u8>; 16],
    /// Probe scratch: address, entry, pointer.
    a: u8,
    t: u8,
    u: u8,
    /// Per-instruction temporaries for guest registers without a home.
    temps: Vec<u8>,
    /// Where a block that loops on itself keeps the count of instructions run before
    /// this iteration (the context's `done`, written back at every exit), when every
    /// guest register has a home and a host register is left: the count then makes no
    /// chain through memory from one iteration to the next.
    count: Option<u8>,
}

impl Alloc {
    fn new(uses: &[u32; 16]) -> Self {
        let mut order: Vec<u8> = (0..16).filter(|&g| uses[g as usize] > 0).collect();
        order.sort_by_key(|&g| std::cmp::Reverse(uses[g as usize]));
        let cap = if order.len() <= HOSTS.len() - 3 {
            order.len()
        } else {
            HOSTS.len() - 6
        };
        let kept = &order[..cap];
        let mut home = [None; 16];
        let mut taken = [false; 16];
        taken[4] = true;
        taken[CTX as usize] = true;
        for &g in kept {
            if g != 4 && g != CTX {
                home[g as usize] = Some(g);
                taken[g as usize] = true;
            }
        }
        let mut free = HOSTS.iter().copied().filter(|&h| !taken[h as usize]);
        for &g in kept {
            if g == 4 || g == CTX {
                home[g as usize] = free.next();
            }
        }
        let free: Vec<u8> = free.collect();
        let all_homed = cap == order.len();
        Alloc {
            home,
            a: free[0],
            t: free[1],
            u: free[2],
            temps: free[3..].iter().copied().take(3).collect(),
            count: free.get(3).copied().filter(|_| all_homed),
        }
    }
}

/// The host runs LAHF and SAHF in 64-bit mode (every x86-64-v2 CPU does): exits and
/// entries move the guest's flags through AH with them, as `pushfq`/`popfq` cost tens
/// of cycles. Without them nothing is translated.
fn host_has_lahf() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0)
}

/// One guest instruction, ready to emit.
struct Step {
    ins: Instruction,
    kind: Kind,
    /// The instruction as it runs on the host (registers renamed, memory at `[u]`).
    host: Instruction,
    /// Guest registers loaded into temporaries first: (guest, host).
    loads: Vec<(u8, u8)>,
    /// Guest registers the instruction writes: (guest, host), written through after it.
    stores: Vec<(u8, u8)>,
    /// Memory operand's address recipe: base, index (host registers), scale,
    /// displacement, 32-bit address size.
    ea: Option<Ea>,
    seg: u8,
    flat: bool,
    wrap32: bool,
    flags_read: u32,
    flags_written: u32,
    flags_undefined: u32,
    /// Load the block's guest address into this host register first (RIP-relative lea).
    block_rip_into: Option<u8>,
}

#[derive(Clone, Copy)]
struct Ea {
    base: Option<u8>,
    index: Option<u8>,
    scale: u32,
    disp: i64,
    addr32: bool,
    /// A constant address (no base and index).
    absolute: Option<u64>,
    /// RIP-relative: this far from the block's first instruction (translations run at
    /// any address their code is mapped at).
    rip_rel: Option<i32>,
}

/// Translates the longest translatable prefix of the block (`insns`, decoded by the
/// interpreter from `bytes` at `rip`) into host code for address `at`. `None` when not
/// even its first instruction can be translated.
pub(crate) fn translate(
    insns: &[Insn],
    bytes: &[u8],
    rip: u64,
    bitness: u32,
    at: u64,
    opt: Options,
) -> Option<Translation> {
    if bitness == 16 || !host_has_lahf() {
        return None;
    }
    // Pass 1: decode and classify.
    let mut dec = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut found: Vec<(Instruction, Kind)> = Vec::new();
    let mut uses = [0u32; 16];
    for d in insns {
        let ins = dec.decode();
        if ins.is_invalid() || ins.mnemonic() != d.mnemonic || !d.known {
            break;
        }
        let Some(kind) = classify(&ins, d) else {
            break;
        };
        // Exits hold their guest address as an offset from the block's (32-bit).
        let far = |t: u64| i32::try_from(t.wrapping_sub(rip) as i64).is_err();
        if far(ins.next_ip()) || matches!(kind, Kind::Branch { target, .. } if far(target)) {
            break;
        }
        if !matches!(kind, Kind::Nop | Kind::Branch { .. }) {
            for u in info.info(&ins).used_registers() {
                if u.register().is_gpr() {
                    uses[gnum(u.register()) as usize] += 1;
                }
            }
        }
        found.push((ins, kind));
        if matches!(
            kind,
            Kind::Branch {
                cc: ConditionCode::None,
                ..
            } | Kind::Call { .. }
                | Kind::Ret
        ) {
            break;
        }
    }
    let alloc = Alloc::new(&uses);
    // Pass 2: rename and check that each instruction encodes; cut at the first that
    // does not.
    let mut steps = Vec::new();
    for (k, (ins, kind)) in found.iter().enumerate() {
        match prepare(ins, *kind, &insns[k], &alloc, &mut info, rip) {
            Some(s) => steps.push(s),
            None => break,
        }
    }
    // Entering and leaving translated code costs about what interpreting a few
    // instructions does: a short prefix of a longer block is not worth it, unless a
    // branch in it goes on in other translated code.
    let branches = steps.iter().any(|s| matches!(s.kind, Kind::Branch { .. }));
    if steps.is_empty() || steps.len() < opt.min_prefix && steps.len() < insns.len() && !branches {
        return None;
    }
    let flags = FlagPlan::new(&steps);
    let (code, chain_offset) = emit(&steps, &alloc, &flags, rip, at, opt).ok()?;
    Some(Translation {
        code,
        chain_offset,
        count: steps.len() as u32,
        flag_effects: steps
            .iter()
            .map(|s| (rflags_bits(s.flags_written), rflags_bits(s.flags_undefined)))
            .collect(),
    })
}

fn prepare(
    ins: &Instruction,
    kind: Kind,
    d: &Insn,
    alloc: &Alloc,
    info: &mut InstructionInfoFactory,
    start: u64,
) -> Option<Step> {
    let mut step = Step {
        ins: *ins,
        kind,
        host: *ins,
        loads: Vec::new(),
        stores: Vec::new(),
        ea: None,
        seg: d.seg,
        flat: d.flat,
        wrap32: d.wrap32,
        flags_read: ins.rflags_read() & ALL_FLAGS,
        flags_written: ins.rflags_modified() & ALL_FLAGS,
        flags_undefined: ins.rflags_undefined() & ALL_FLAGS,
        block_rip_into: None,
    };
    if may_keep_flags(ins) {
        // A count of zero (CL, or an immediate masked to zero) leaves every flag as it
        // was: the instruction then passes on the flags before it.
        step.flags_read = ALL_FLAGS;
    }
    if matches!(kind, Kind::Nop | Kind::Branch { .. }) {
        return Some(step);
    }
    if matches!(kind, Kind::Push | Kind::Pop | Kind::Call { .. } | Kind::Ret) {
        // RSP and the register pushed or popped must be at home.
        alloc.home[4]?;
        if matches!(kind, Kind::Push | Kind::Pop) {
            alloc.home[gnum(ins.op0_register()) as usize]?;
        }
        return Some(step);
    }
    // Where each guest register this instruction names goes.
    let mut host_of = [None; 16];
    let mut temps = alloc.temps.iter().copied();
    let mut place = |g: u8, step: &mut Step| -> Option<u8> {
        if let Some(h) = host_of[g as usize] {
            return Some(h);
        }
        let h = match alloc.home[g as usize] {
            Some(h) => h,
            None => {
                let t = temps.next()?;
                step.loads.push((g, t));
                t
            }
        };
        host_of[g as usize] = Some(h);
        Some(h)
    };
    let mut explicit = [false; 16];
    // Register operands.
    for i in 0..ins.op_count() {
        if ins.op_kind(i) == OpKind::Register {
            let r = ins.op_register(i);
            let g = gnum(r);
            explicit[g as usize] = true;
            let h = place(g, &mut step)?;
            // Fixed operands (a CL count, AH..BH) must be in their own host register.
            if (r == Register::CL || high_byte(r)) && h != g {
                return None;
            }
            step.host.set_op_register(i, rename(r, h)?);
        }
    }
    // The memory operand.
    let has_mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
    if has_mem {
        let addr32 = d.amask == 0xffff_ffff;
        let mut ea = Ea {
            base: None,
            index: None,
            scale: ins.memory_index_scale(),
            disp: if addr32 {
                i64::from(ins.memory_displacement32() as i32)
            } else {
                ins.memory_displacement64() as i64
            },
            addr32,
            absolute: None,
            rip_rel: None,
        };
        let (b, x) = (ins.memory_base(), ins.memory_index());
        if ins.is_ip_rel_memory_operand() {
            let off = ins.memory_displacement64().wrapping_sub(start) as i64;
            ea.rip_rel = Some(i32::try_from(off).ok()?);
        } else if b == Register::None && x == Register::None {
            let v = ins.memory_displacement64();
            ea.absolute = Some(if addr32 { v & 0xffff_ffff } else { v });
        } else {
            if b != Register::None {
                let g = gnum(b);
                explicit[g as usize] = true;
                ea.base = Some(place(g, &mut step)?);
            }
            if x != Register::None {
                let g = gnum(x);
                explicit[g as usize] = true;
                ea.index = Some(place(g, &mut step)?);
            }
        }
        step.ea = Some(ea);
        if kind == Kind::Lea {
            if let Some(off) = ea.rip_rel {
                // dst = the block's address (loaded first) + the offset.
                let dst = step.host.op0_register();
                let h = dst.full_register();
                let mem = MemoryOperand::with_base_displ(h, i64::from(off));
                step.host = match dst.size() {
                    8 => Instruction::with2(Code::Lea_r64_m, dst, mem).ok()?,
                    4 => Instruction::with2(Code::Lea_r32_m, dst, mem).ok()?,
                    _ => return None,
                };
                step.block_rip_into = Some(gnum(h));
            } else if let Some(v) = ea.absolute {
                // lea dst, [constant] is a mov of the constant.
                let dst = step.host.op0_register();
                step.host = match dst.size() {
                    8 => Instruction::with2(Code::Mov_r64_imm64, dst, v).ok()?,
                    4 => Instruction::with2(Code::Mov_r32_imm32, dst, v as u32).ok()?,
                    _ => return None,
                };
            } else {
                let mem = MemoryOperand::new(
                    ea.base.map_or(Register::None, |h| sized_addr(h, addr32)),
                    ea.index.map_or(Register::None, |h| sized_addr(h, addr32)),
                    ea.scale,
                    ea.disp,
                    displ_size(&ea),
                    false,
                    Register::None,
                );
                let dst = step.host.op0_register();
                let code = step.host.code();
                step.host = Instruction::with2(code, dst, mem).ok()?;
            }
        } else {
            step.host.set_memory_base(GPR64[usize::from(alloc.u)]);
            step.host.set_memory_index(Register::None);
            step.host.set_memory_index_scale(1);
            step.host.set_memory_displacement64(0);
            step.host.set_memory_displ_size(0);
            step.host.set_segment_prefix(Register::None);
        }
    }
    // 32-bit code's one-byte inc/dec forms do not exist in 64-bit code.
    let code = match step.host.code() {
        Code::Inc_r16 => Some(Code::Inc_rm16),
        Code::Inc_r32 => Some(Code::Inc_rm32),
        Code::Dec_r16 => Some(Code::Dec_rm16),
        Code::Dec_r32 => Some(Code::Dec_rm32),
        _ => None,
    };
    if let Some(c) = code {
        step.host.set_code(c);
    }
    // Implicit registers (cdq's EDX, mul's RAX/RDX) must be at home in themselves, and
    // every register written goes back to the context.
    for u in info.info(ins).used_registers() {
        let r = u.register();
        if !r.is_gpr() {
            if r.is_segment_register() {
                continue;
            }
            return None;
        }
        let g = gnum(r);
        let h = if explicit[g as usize] {
            host_of[g as usize]?
        } else if alloc.home[g as usize] == Some(g) {
            g
        } else {
            return None;
        };
        let writes = matches!(
            u.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        );
        if writes && !step.stores.iter().any(|&(sg, _)| sg == g) {
            step.stores.push((g, h));
        }
    }
    // The renamed instruction must encode in 64-bit code (REX and AH..BH cannot mix,
    // and a few 32-bit-only forms have no 64-bit encoding).
    let mut enc = Encoder::new(64);
    enc.encode(&step.host, 0x1000).ok()?;
    Some(step)
}

/// A shift or rotate whose count may be zero at run time.
fn may_keep_flags(ins: &Instruction) -> bool {
    use Mnemonic::*;
    if !matches!(
        ins.mnemonic(),
        Shl | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
    ) {
        return false;
    }
    let last = ins.op_count() - 1;
    match ins.op_kind(last) {
        OpKind::Register => true,
        OpKind::Immediate8 => {
            let mask = if ins.op0_register().size() == 8 || ins.memory_size().size() == 8 {
                63
            } else {
                31
            };
            ins.immediate8() & mask == 0
        }
        _ => true,
    }
}

/// iced's displacement size for an address of `ea`'s size.
fn displ_size(ea: &Ea) -> u32 {
    match (ea.disp, ea.addr32) {
        (0, _) => 0,
        (_, true) => 4,
        (_, false) => 8,
    }
}

fn sized_addr(h: u8, addr32: bool) -> Register {
    if addr32 {
        GPR32[usize::from(h)]
    } else {
        GPR64[usize::from(h)]
    }
}

/// What the block does with the guest's flags.
struct FlagPlan {
    /// Restore the guest's flags into the host's at entry.
    flags_in: bool,
    /// Per exit point k (before instruction k, and k == len at the end): the host's
    /// flags hold the guest's and are written back.
    save: Vec<bool>,
    /// A loop writes the guest's flags back at its back edge: an exit in the next
    /// iteration before the first flag writer would otherwise leave stale ones.
    save_at_back_edge: bool,
}

impl FlagPlan {
    fn new(steps: &[Step]) -> Self {
        // The guest's flags come in when something reads one before the block writes
        // it, or when an exit (a probe's miss, a taken branch) may hand on flags only
        // partly written.
        let probes = |s: &Step| s.kind.probes();
        let exits = |s: &Step| probes(s) || matches!(s.kind, Kind::Branch { .. });
        let mut covered = 0u32;
        let mut flags_in = false;
        for s in steps {
            if s.flags_read & !covered != 0 || exits(s) && covered != 0 && covered != ALL_FLAGS {
                flags_in = true;
            }
            covered |= s.flags_written;
        }
        if covered != 0 && covered != ALL_FLAGS {
            flags_in = true;
        }
        let mut save = vec![flags_in; steps.len() + 1];
        let mut written = false;
        for (k, s) in steps.iter().enumerate() {
            save[k] = flags_in || written;
            written |= s.flags_written != 0;
        }
        save[steps.len()] = flags_in || written;
        let first_writer = steps.iter().position(|s| s.flags_written != 0);
        let save_at_back_edge =
            !flags_in && first_writer.is_some_and(|w| steps[..=w].iter().any(|s| s.kind.probes()));
        FlagPlan {
            flags_in,
            save,
            save_at_back_edge,
        }
    }
}

/// iced's flag bits -> RFLAGS bits.
fn rflags_bits(f: u32) -> u64 {
    use crate::state::rflags;
    let mut r = 0;
    for (i, b) in [
        (RflagsBits::OF, rflags::OF),
        (RflagsBits::SF, rflags::SF),
        (RflagsBits::ZF, rflags::ZF),
        (RflagsBits::AF, rflags::AF),
        (RflagsBits::CF, rflags::CF),
        (RflagsBits::PF, rflags::PF),
    ] {
        if f & i != 0 {
            r |= b;
        }
    }
    r
}

/// An exit: leave with `exit_at` instructions of this iteration done and the guest at
/// `rip`.
struct Exit {
    label: CodeLabel,
    at: u64,
    rip: u64,
    flags: FlagsAt,
    /// The guest leaves the block (a branch taken, a loop stopped).
    left: bool,
    /// `rip` is a block start another translation may be found for.
    chain: bool,
    /// The guest address is not a constant: the code before the exit stored it (ret).
    dynamic: bool,
}

type Asm = Result<(), iced_x86::IcedError>;

/// Where an exit finds the guest's flags to write back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagsAt {
    /// Nowhere: the block has not touched them (the context's are current).
    Context,
    /// In the host's flags.
    Host,
    /// On the host stack, stashed for a probe.
    Stash,
}

impl FlagsAt {
    /// From whether the host's flags hold the guest's, and whether they are stashed.
    fn new(live: bool, stashed: bool) -> Self {
        match (live, stashed) {
            (_, true) => FlagsAt::Stash,
            (true, false) => FlagsAt::Host,
            (false, false) => FlagsAt::Context,
        }
    }
}

/// The guest's flags put aside on the host stack around a probe (which clobbers the
/// host's), left there while nothing needs them in the host's flags: a probe's miss or
/// another exit takes them from the stack, and `popfq` (slow) is paid only when an
/// instruction reads them or writes some of them.
#[derive(Default)]
struct Stash {
    on: bool,
}

impl Stash {
    /// Before a probe: `live`, the host's flags hold the guest's.
    fn put(&mut self, a: &mut CodeAssembler, live: bool) -> Asm {
        if live && !self.on {
            a.pushfq()?;
            self.on = true;
        }
        Ok(())
    }

    /// The guest's flags back in the host's.
    fn restore(&mut self, a: &mut CodeAssembler) -> Asm {
        if self.on {
            a.popfq()?;
            self.on = false;
        }
        Ok(())
    }

    /// Before `s` runs: its flags back in the host's when it reads them or writes only
    /// some; thrown away when it writes all six; else left on the stack.
    fn before(&mut self, a: &mut CodeAssembler, s: &Step) -> Asm {
        if !self.on {
            return Ok(());
        }
        if s.flags_read != 0 || s.flags_written != 0 && s.flags_written != ALL_FLAGS {
            self.restore(a)
        } else if s.flags_written == ALL_FLAGS {
            self.on = false;
            a.lea(rsp, qword_ptr(rsp + 8))
        } else {
            Ok(())
        }
    }
}

fn emit(
    steps: &[Step],
    alloc: &Alloc,
    flags: &FlagPlan,
    start: u64,
    at: u64,
    opt: Options,
) -> Result<(Vec<u8>, u64), iced_x86::IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut exits: Vec<Exit> = Vec::new();
    let mut branches: Vec<(CodeLabel, u64, u64)> = Vec::new();
    let mut epilogue = a.create_label();
    let (ha, ht, hu) = (hreg(alloc.a), hreg(alloc.t), hreg(alloc.u));
    // Prologue: the callee-saved registers, the context, the guest's registers.
    for r in [3u8, 5, 12, 13, 14, 15] {
        a.push(hreg(r))?;
    }
    a.mov(r15, get_gpr64(Register::RDI).expect("rdi"))?;
    // Chained blocks come in here, with the frame made and r15 set.
    let mut chain_in = a.create_label();
    a.set_label(&mut chain_in)?;
    a.nop()?;
    if flags.flags_in {
        flags_from_context(&mut a)?;
    }
    for (g, h) in alloc.home.iter().enumerate() {
        if let Some(h) = h {
            a.mov(hreg(*h), qword_ptr(r15 + off::reg(g as u8)))?;
        }
    }
    let loops = opt.loops
        && steps
            .iter()
            .any(|s| matches!(s.kind, Kind::Branch { target, .. } if target == start));
    let count = alloc.count.filter(|_| loops).map(hreg);
    if let Some(c) = count {
        a.mov(c, qword_ptr(r15 + off::DONE))?;
    }
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    let n = steps.len() as u64;
    let mut ended = false;
    // Forward branches to an instruction of this translation jump straight to it.
    let mut targets: Vec<Option<CodeLabel>> = vec![None; steps.len()];
    if opt.intra {
        for s in steps {
            if let Kind::Branch { target, .. } = s.kind
                && let Some(t) = steps.iter().position(|o| o.ins.ip() == target)
                && t > 0
            {
                targets[t] = Some(a.create_label());
            }
        }
    }
    let mut stash = Stash::default();
    for (k, s) in steps.iter().enumerate() {
        if let Some(l) = &mut targets[k] {
            // Branches come in with the flags in the host's.
            stash.restore(&mut a)?;
            a.set_label(l)?;
            if s.kind == Kind::Nop {
                a.nop()?;
            }
        }
        match s.kind {
            Kind::Nop => {}
            Kind::Branch { cc, target } => {
                // Taken paths go out of line; a conditional branch falls through to
                // the rest of the block (the interpreter's blocks go on past them).
                let taken = a.create_label();
                stash.restore(&mut a)?;
                if cc == ConditionCode::None {
                    a.jmp(taken)?;
                    ended = true;
                } else {
                    jcc(&mut a, cc, taken)?;
                }
                branches.push((taken, k as u64 + 1, target));
            }
            Kind::Push | Kind::Pop | Kind::Call { .. } | Kind::Ret => {
                let hs = hreg(alloc.home[4].expect("rsp at home"));
                stash.put(&mut a, flags.save[k])?;
                let write = matches!(s.kind, Kind::Push | Kind::Call { .. });
                if write {
                    a.lea(ha, qword_ptr(hs - 8))?;
                } else {
                    a.mov(ha, hs)?;
                }
                let m = MemAccess {
                    size: 8,
                    read: !write,
                    write,
                };
                let slow = probe_or_leave(&mut a, &mut exits, m, [ha, ht, hu], k, s, stash.on)?;
                if opt.log_stores && write {
                    log_store(&mut a, 8, ha, ht, hu)?;
                }
                let home = |r: Register| hreg(alloc.home[gnum(r) as usize].expect("at home"));
                match s.kind {
                    Kind::Push => a.mov(qword_ptr(hu), home(s.ins.op0_register()))?,
                    Kind::Pop => a.mov(home(s.ins.op0_register()), qword_ptr(hu))?,
                    Kind::Call { .. } => {
                        // The return address: where this block runs plus the offset.
                        let back = s.ins.next_ip().wrapping_sub(start) as i32;
                        a.mov(ht, qword_ptr(r15 + off::BLOCK_RIP))?;
                        a.lea(ht, qword_ptr(ht + back))?;
                        a.mov(qword_ptr(hu), ht)?;
                    }
                    _ => {
                        // ret: a non-canonical target raises #GP at the ret (the
                        // interpreter's, from the exit).
                        a.mov(ha, qword_ptr(hu))?;
                        a.mov(ht, ha)?;
                        a.shl(ht, 16)?;
                        a.sar(ht, 16)?;
                        a.cmp(ht, ha)?;
                        a.jne(slow)?;
                    }
                }
                stash.before(&mut a, s)?;
                if write {
                    a.lea(hs, qword_ptr(hs - 8))?;
                } else {
                    a.lea(hs, qword_ptr(hs + 8))?;
                }
                let save = flags.save[k + 1];
                match s.kind {
                    Kind::Call { target } => {
                        exit_to(
                            &mut a,
                            &mut exits,
                            (k as u64 + 1, target),
                            (save, stash.on),
                            true,
                            opt.chain,
                        )?;
                        ended = true;
                    }
                    Kind::Ret => {
                        a.mov(qword_ptr(r15 + off::RIP), ha)?;
                        let l = a.create_label();
                        a.jmp(l)?;
                        exits.push(Exit {
                            label: l,
                            at: k as u64 + 1,
                            rip: 0,
                            flags: FlagsAt::new(save, stash.on),
                            left: true,
                            chain: opt.chain,
                            dynamic: true,
                        });
                        ended = true;
                    }
                    _ => {}
                }
            }
            Kind::Op { .. } | Kind::Lea => {
                for &(g, h) in &s.loads {
                    a.mov(hreg(h), qword_ptr(r15 + off::reg(g)))?;
                }
                if let Kind::Op { mem: Some(m) } = s.kind {
                    // The guest's flags, when the host's hold them, survive the probe:
                    // on the stack for a miss (the exit hands them over), and back in
                    // the host's flags if something reads them later.
                    stash.put(&mut a, flags.save[k])?;
                    address(&mut a, s, ha, ht)?;
                    probe_or_leave(&mut a, &mut exits, m, [ha, ht, hu], k, s, stash.on)?;
                    if opt.log_stores && m.write {
                        log_store(&mut a, m.size, ha, ht, hu)?;
                    }
                }
                stash.before(&mut a, s)?;
                if let Some(h) = s.block_rip_into {
                    a.mov(hreg(h), qword_ptr(r15 + off::BLOCK_RIP))?;
                }
                a.add_instruction(s.host)?;
                // Registers at home stay in their host register (every exit writes
                // them back); the others go back now.
                for &(g, h) in &s.stores {
                    if alloc.home[g as usize] != Some(h) {
                        a.mov(qword_ptr(r15 + off::reg(g)), hreg(h))?;
                    }
                }
            }
        }
    }
    if !ended {
        let last = steps.last().expect("a step").ins.next_ip();
        exit_to(
            &mut a,
            &mut exits,
            (n, last),
            (flags.save[steps.len()], stash.on),
            false,
            opt.chain,
        )?;
    }
    // Taken branches: round again for a branch to the block's start, else leave.
    for (mut label, at, target) in branches {
        a.set_label(&mut label)?;
        let save = flags.save[at as usize];
        let inside = steps.iter().position(|o| o.ins.ip() == target);
        if let Some(t) = inside
            && let Some(l) = targets[t]
            && t as u64 >= at
        {
            // The instructions jumped over did not run: take them off the count
            // (exits count from the block's start). mov and lea keep the flags.
            let back = (t as u64 - at) as i32;
            if let Some(c) = count {
                a.lea(c, qword_ptr(c - back))?;
            } else {
                let ht = hreg(alloc.t);
                a.mov(ht, qword_ptr(r15 + off::DONE))?;
                a.lea(ht, qword_ptr(ht - back))?;
                a.mov(qword_ptr(r15 + off::DONE), ht)?;
            }
            a.jmp(l)?;
        } else if opt.loops && target == start {
            back_edge(&mut a, alloc, count, at, n, top, &mut exits, start, flags)?;
        } else {
            exit_to(
                &mut a,
                &mut exits,
                (at, target),
                (save, false),
                true,
                opt.chain,
            )?;
        }
    }
    // The exits, out of line.
    for e in &mut exits {
        a.set_label(&mut e.label)?;
        if let Some(c) = count {
            a.mov(qword_ptr(r15 + off::DONE), c)?;
        }
        exit_body(&mut a, e, alloc, start, opt.bitness == 32, epilogue)?;
    }
    a.set_label(&mut epilogue)?;
    for r in [15u8, 14, 13, 12, 5, 3] {
        a.pop(hreg(r))?;
    }
    a.ret()?;
    let r = a.assemble_options(
        at,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let chain_at = r.label_ip(&chain_in)? - at;
    Ok((r.inner.code_buffer, chain_at))
}

/// The TLB probe for instruction `k`'s access `m` (address in the first register,
/// the others scratch; the pointer ends in the third), leaving the block at it on a
/// miss with the guest's flags on the stack when `stashed`. Returns the miss's label.
fn probe_or_leave(
    a: &mut CodeAssembler,
    exits: &mut Vec<Exit>,
    m: MemAccess,
    [ha, ht, hu]: [AsmRegister64; 3],
    k: usize,
    s: &Step,
    stashed: bool,
) -> Result<CodeLabel, iced_x86::IcedError> {
    let slow = a.create_label();
    probe(a, m, ha, ht, hu, slow)?;
    exits.push(Exit {
        label: slow,
        at: k as u64,
        rip: s.ins.ip(),
        flags: FlagsAt::new(false, stashed),
        left: false,
        chain: false,
        dynamic: false,
    });
    Ok(slow)
}

/// Leaves the block from here (in line: the exit's body follows) with `at`
/// instructions done and the guest at `rip`; the guest's flags saved (from the host's,
/// or from the stash when `stashed`).
fn exit_to(
    a: &mut CodeAssembler,
    exits: &mut Vec<Exit>,
    (at, rip): (u64, u64),
    (save_flags, stashed): (bool, bool),
    left: bool,
    chain: bool,
) -> Asm {
    let l = a.create_label();
    a.jmp(l)?;
    exits.push(Exit {
        label: l,
        at,
        rip,
        flags: FlagsAt::new(save_flags, stashed),
        left,
        chain,
        dynamic: false,
    });
    Ok(())
}

fn exit_body(
    a: &mut CodeAssembler,
    e: &Exit,
    alloc: &Alloc,
    start: u64,
    wrap32: bool,
    end: CodeLabel,
) -> Asm {
    let rax = hreg(0);
    for (g, h) in alloc.home.iter().enumerate() {
        if let Some(h) = h {
            a.mov(qword_ptr(r15 + off::reg(g as u8)), hreg(*h))?;
        }
    }
    if e.flags != FlagsAt::Context {
        if e.flags == FlagsAt::Stash {
            a.pop(rax)?;
            a.and(rax, crate::state::rflags::ARITH as i32)?;
        } else {
            flags_to_rax(a)?;
        }
        a.mov(qword_ptr(r15 + off::FLAGS), rax)?;
        a.mov(qword_ptr(r15 + off::FLAGS_OUT), 1)?;
    }
    a.mov(qword_ptr(r15 + off::EXIT_AT), e.at as i32)?;
    a.mov(qword_ptr(r15 + off::LEFT), i32::from(e.left))?;
    if e.dynamic {
        a.mov(rax, qword_ptr(r15 + off::RIP))?;
    } else {
        // RIP: the block's address (where it runs) plus this exit's offset.
        a.mov(rax, qword_ptr(r15 + off::BLOCK_RIP))?;
        a.lea(rax, qword_ptr(rax + e.rip.wrapping_sub(start) as i32))?;
        if wrap32 {
            a.mov(get_gpr32(Register::EAX), get_gpr32(Register::EAX))?;
        }
        a.mov(qword_ptr(r15 + off::RIP), rax)?;
    }
    if e.chain {
        chain(a, e.at, end)?;
    }
    a.jmp(end)
}

/// rax = the host's arithmetic flags in RFLAGS's layout (rcx clobbered): SF, ZF, AF, PF
/// and CF through LAHF, OF through SETO.
fn flags_to_rax(a: &mut CodeAssembler) -> Asm {
    use iced_x86::code_asm::{ah, al, eax, ecx};
    a.lahf()?;
    a.seto(al)?;
    a.movzx(ecx, al)?;
    a.shl(ecx, 11)?;
    a.movzx(eax, ah)?;
    a.and(eax, 0xd5)?;
    a.or(eax, ecx)
}

/// The host's arithmetic flags = the context's (rax and rcx clobbered): OF by an
/// addition that overflows exactly when it is set, then the others through SAHF.
fn flags_from_context(a: &mut CodeAssembler) -> Asm {
    use iced_x86::code_asm::{ah, al, cl, eax, ecx};
    a.mov(eax, dword_ptr(r15 + off::FLAGS))?;
    a.mov(ecx, eax)?;
    a.shr(ecx, 11)?;
    a.mov(ah, al)?;
    a.mov(al, cl)?;
    a.add(al, 0x7f)?;
    a.sahf()
}

/// Goes on in the translation of the block at RIP (in rax) if the chain table has one
/// that is still what the interpreter's jump cache would find there (same guest page
/// through the TLB, same mode, no code written since), the budget holds it, and nobody
/// wants the vCPU.
fn chain(a: &mut CodeAssembler, at: u64, end: CodeLabel) -> Asm {
    use crate::jit::ctx::CHAIN_BITS;
    let (rax, rcx, rdx, rsi) = (hreg(0), hreg(1), hreg(2), hreg(6));
    a.mov(rcx, rax)?;
    a.shr(rcx, 12)?;
    a.xor(rcx, rax)?;
    a.and(rcx, (1i32 << CHAIN_BITS) - 1)?;
    a.shl(rcx, 6)?;
    a.add(rcx, qword_ptr(r15 + off::CHAIN))?;
    a.cmp(rax, qword_ptr(rcx + off::CHAIN_LIN))?;
    a.jne(end)?;
    tlb_entry(a, rax, rdx)?;
    a.mov(rsi, rax)?;
    a.and(rsi, -4096)?;
    a.or(rsi, qword_ptr(r15 + off::EPOCH))?;
    a.cmp(rsi, qword_ptr(rdx + entry_off::EXEC_TAG))?;
    a.jne(end)?;
    a.mov(rsi, qword_ptr(rdx + entry_off::GPA))?;
    a.or(rsi, qword_ptr(r15 + off::MODE_TAG))?;
    a.cmp(rsi, qword_ptr(rcx + off::CHAIN_GPA_MODE))?;
    a.jne(end)?;
    a.mov(rsi, qword_ptr(r15 + off::CODE_WRITES))?;
    a.mov(rsi, qword_ptr(rsi))?;
    a.cmp(rsi, qword_ptr(rcx + off::CHAIN_WRITES))?;
    a.jne(end)?;
    a.mov(rsi, qword_ptr(r15 + off::CODE_EPOCH))?;
    a.mov(rsi, qword_ptr(rsi))?;
    a.cmp(rsi, qword_ptr(r15 + off::CODE_EPOCH_SEEN))?;
    a.jne(end)?;
    a.mov(rsi, qword_ptr(r15 + off::DONE))?;
    a.add(rsi, at as i32)?;
    a.add(rsi, qword_ptr(rcx + off::CHAIN_COUNT))?;
    a.cmp(rsi, qword_ptr(r15 + off::LIMIT))?;
    a.ja(end)?;
    a.mov(rsi, qword_ptr(r15 + off::ATTENTION))?;
    a.cmp(byte_ptr(rsi), 0)?;
    a.jne(end)?;
    a.add(qword_ptr(r15 + off::DONE), at as i32)?;
    a.mov(qword_ptr(r15 + off::CHAINED), 1)?;
    a.mov(qword_ptr(r15 + off::BLOCK_RIP), rax)?;
    a.jmp(qword_ptr(rcx + off::CHAIN_ENTRY))
}

/// The branch back to the block's start: count the iteration, and go round again if
/// another fits the budget and nobody wants the vCPU or changed code.
#[allow(clippy::too_many_arguments)]
fn back_edge(
    a: &mut CodeAssembler,
    alloc: &Alloc,
    count: Option<AsmRegister64>,
    at: u64,
    n: u64,
    top: CodeLabel,
    exits: &mut Vec<Exit>,
    start: u64,
    plan: &FlagPlan,
) -> Asm {
    let flags_in = plan.flags_in;
    let (ht, hu) = (hreg(alloc.t), hreg(alloc.u));
    if flags_in {
        a.pushfq()?;
    } else if plan.save_at_back_edge {
        a.pushfq()?;
        a.pop(ht)?;
        a.and(ht, crate::state::rflags::ARITH as i32)?;
        a.mov(qword_ptr(r15 + off::FLAGS), ht)?;
        a.mov(qword_ptr(r15 + off::FLAGS_OUT), 1)?;
    }
    let stop = a.create_label();
    // This iteration ran `at` instructions; the next may run all `n`.
    let done = match count {
        Some(c) => c,
        None => {
            a.mov(ht, qword_ptr(r15 + off::DONE))?;
            ht
        }
    };
    a.add(done, at as i32)?;
    if count.is_none() {
        a.mov(qword_ptr(r15 + off::DONE), ht)?;
    }
    a.lea(hu, qword_ptr(done + n as i32))?;
    a.cmp(hu, qword_ptr(r15 + off::LIMIT))?;
    a.ja(stop)?;
    a.mov(ht, qword_ptr(r15 + off::ATTENTION))?;
    a.cmp(byte_ptr(ht), 0)?;
    a.jne(stop)?;
    a.mov(ht, qword_ptr(r15 + off::CODE_WRITES))?;
    a.mov(ht, qword_ptr(ht))?;
    a.cmp(ht, qword_ptr(r15 + off::CODE_WRITES_SEEN))?;
    a.jne(stop)?;
    a.mov(ht, qword_ptr(r15 + off::CODE_EPOCH))?;
    a.mov(ht, qword_ptr(ht))?;
    a.cmp(ht, qword_ptr(r15 + off::CODE_EPOCH_SEEN))?;
    a.jne(stop)?;
    if flags_in {
        a.popfq()?;
    }
    a.jmp(top)?;
    exits.push(Exit {
        label: stop,
        at: 0,
        rip: start,
        flags: FlagsAt::new(plan.save[plan.save.len() - 1], flags_in),
        left: true,
        chain: false,
        dynamic: false,
    });
    Ok(())
}

fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> Asm {
    match cc {
        ConditionCode::o => a.jo(l),
        ConditionCode::no => a.jno(l),
        ConditionCode::b => a.jb(l),
        ConditionCode::ae => a.jae(l),
        ConditionCode::e => a.je(l),
        ConditionCode::ne => a.jne(l),
        ConditionCode::be => a.jbe(l),
        ConditionCode::a => a.ja(l),
        ConditionCode::s => a.js(l),
        ConditionCode::ns => a.jns(l),
        ConditionCode::p => a.jp(l),
        ConditionCode::np => a.jnp(l),
        ConditionCode::l => a.jl(l),
        ConditionCode::ge => a.jge(l),
        ConditionCode::le => a.jle(l),
        ConditionCode::g => a.jg(l),
        ConditionCode::None => a.jmp(l),
    }
}

/// The memory operand's linear address into `ha` (flags clobbered; `ht` scratch).
fn address(a: &mut CodeAssembler, s: &Step, ha: AsmRegister64, ht: AsmRegister64) -> Asm {
    let ea = s.ea.expect("a memory operand");
    if let Some(off) = ea.rip_rel {
        a.mov(ha, qword_ptr(r15 + off::BLOCK_RIP))?;
        a.lea(ha, qword_ptr(ha + off))?;
        if ea.addr32 {
            let d32 = GPR32[gnum(ha.into()) as usize];
            a.add_instruction(Instruction::with2(Code::Mov_r32_rm32, d32, d32)?)?;
        }
    } else if let Some(v) = ea.absolute {
        a.mov(ha, v)?;
    } else {
        let mem = MemoryOperand::new(
            ea.base.map_or(Register::None, |h| sized_addr(h, ea.addr32)),
            ea.index
                .map_or(Register::None, |h| sized_addr(h, ea.addr32)),
            ea.scale,
            ea.disp,
            displ_size(&ea),
            false,
            Register::None,
        );
        let (code, dst) = if ea.addr32 {
            (Code::Lea_r32_m, GPR32[gnum(ha.into()) as usize])
        } else {
            (Code::Lea_r64_m, Register::from(ha))
        };
        a.add_instruction(Instruction::with2(code, dst, mem)?)?;
    }
    if !s.flat && s.seg != SEG_NONE {
        a.add(ha, qword_ptr(r15 + off::seg_base(s.seg)))?;
    }
    if s.wrap32 {
        let d32 = GPR32[gnum(ha.into()) as usize];
        a.add_instruction(Instruction::with2(Code::Mov_r32_rm32, d32, d32)?)?;
    }
    let _ = ht;
    Ok(())
}

/// `entry` = the software-TLB entry for the linear address in `lin` (the current
/// privilege context's set): the page number's low bits, scaled to the entry's size,
/// in one shift and one mask.
fn tlb_entry(a: &mut CodeAssembler, lin: AsmRegister64, entry: AsmRegister64) -> Asm {
    const INDEX_MASK: i32 = ((crate::hostmem::TLB_SIZE - 1) << entry_off::SHIFT) as i32;
    a.mov(entry, lin)?;
    a.shr(entry, 12 - entry_off::SHIFT)?;
    a.and(entry, INDEX_MASK)?;
    a.add(entry, qword_ptr(r15 + off::TLB))
}

/// The software-TLB probe for `m` at the linear address in `ha`: on a hit `hu` holds
/// the host pointer; on a miss (or an access crossing the page) jump to `slow`. The tag
/// is compared for the access's last byte: one crossing into the next page never
/// matches the entry of its first byte (consecutive pages have different entries), so
/// the in-page check costs nothing.
fn probe(
    a: &mut CodeAssembler,
    m: MemAccess,
    ha: AsmRegister64,
    ht: AsmRegister64,
    hu: AsmRegister64,
    slow: CodeLabel,
) -> Asm {
    tlb_entry(a, ha, ht)?;
    a.lea(hu, qword_ptr(ha + (m.size as i32 - 1)))?;
    a.and(hu, -4096)?;
    if m.read {
        a.or(hu, qword_ptr(r15 + off::EPOCH))?;
        a.cmp(hu, qword_ptr(ht + entry_off::READ_TAG))?;
        a.jne(slow)?;
    }
    if m.write {
        if m.read {
            a.and(hu, -4096)?;
        }
        a.or(hu, qword_ptr(r15 + off::WEPOCH))?;
        a.cmp(hu, qword_ptr(ht + entry_off::WRITE_TAG))?;
        a.jne(slow)?;
    }
    a.mov(hu, ha)?;
    a.and(hu, 0xfff)?;
    a.add(hu, qword_ptr(ht + entry_off::HOST))
}

/// Check mode: append (pointer, old bytes, size) of the store about to be made at `hu`.
fn log_store(
    a: &mut CodeAssembler,
    size: u32,
    ha: AsmRegister64,
    ht: AsmRegister64,
    hu: AsmRegister64,
) -> Asm {
    a.mov(ht, qword_ptr(r15 + off::LOG_LEN))?;
    a.lea(ha, qword_ptr(ht + 1))?;
    a.mov(qword_ptr(r15 + off::LOG_LEN), ha)?;
    a.imul_3(ht, ht, 24)?;
    a.add(ht, qword_ptr(r15 + off::LOG))?;
    a.mov(qword_ptr(ht), hu)?;
    a.mov(qword_ptr(ht + 16), size as i32)?;
    let a32 = get_gpr32(GPR32[gnum(ha.into()) as usize]);
    match size {
        1 => a.movzx(a32, byte_ptr(hu))?,
        2 => a.movzx(a32, word_ptr(hu))?,
        4 => a.mov(a32, dword_ptr(hu))?,
        _ => a.mov(ha, qword_ptr(hu))?,
    }
    a.mov(qword_ptr(ht + 8), ha)
}

fn get_gpr32(r: Register) -> iced_x86::code_asm::AsmRegister32 {
    iced_x86::code_asm::get_gpr32(r).expect("a 32-bit GPR")
}
