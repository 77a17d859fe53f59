//! The general-purpose integer families and the per-mnemonic input fix-ups they need.

use iced_x86::{Code, Mnemonic as Mn, OpKind};

use crate::cases::{Fixup, Tweaks, gpr_index};
use crate::{Family, no_hooks, no_skip, run_family, run_family_in, run_where_host_has};

const CF: u64 = 1;
const OF: u64 = 1 << 11;

fn op_size(f: &Fixup, n: u32) -> usize {
    match f.instr.op_kind(n) {
        OpKind::Register => f.instr.op_register(n).size(),
        _ => f.instr.memory_size().size(),
    }
}

fn set_low(v: &mut u64, size: usize, x: u64) {
    let mask = if size == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    };
    *v = (*v & !mask) | (x & mask);
}

/// Branch forms with 16-bit operand size would jump below the harness (their target is
/// truncated to 16 bits), and far forms leave the code segment.
fn skip_branch(c: Code) -> bool {
    let oc = c.op_code();
    oc.operand_size() == 16
        || matches!(
            oc.memory_size(),
            iced_x86::MemorySize::SegPtr16
                | iced_x86::MemorySize::SegPtr32
                | iced_x86::MemorySize::SegPtr64
        )
}

fn alu_family() -> Family<'static> {
    Family {
        name: "alu",
        mnemonics: &[
            Mn::Add,
            Mn::Adc,
            Mn::Sub,
            Mn::Sbb,
            Mn::Cmp,
            Mn::And,
            Mn::Or,
            Mn::Xor,
            Mn::Test,
            Mn::Inc,
            Mn::Dec,
            Mn::Neg,
            Mn::Not,
        ],
        per_form: 60,
        seed: 1,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn alu() {
    run_family(&alu_family());
}

#[test]
fn alu_32() {
    let mut f = alu_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

fn xlat_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        if f.mnemonic == Mn::Xlatb {
            f.pins.push(3);
        }
        return true;
    }
    if f.mnemonic == Mn::Xlatb {
        f.regs.gpr[3] = f.data_base + 0x100 + f.rng.below(0x1b00);
    }
    true
}

fn data_movement_family() -> Family<'static> {
    Family {
        name: "data movement",
        mnemonics: &[
            Mn::Mov,
            Mn::Movzx,
            Mn::Movsx,
            Mn::Movsxd,
            Mn::Lea,
            Mn::Xlatb,
            Mn::Lahf,
            Mn::Sahf,
            Mn::Clc,
            Mn::Stc,
            Mn::Cmc,
            Mn::Cld,
            Mn::Std,
            Mn::Cbw,
            Mn::Cwde,
            Mn::Cdqe,
            Mn::Cwd,
            Mn::Cdq,
            Mn::Cqo,
            Mn::Nop,
            Mn::Pause,
            Mn::Lfence,
            Mn::Mfence,
            Mn::Sfence,
            Mn::Bswap,
        ],
        per_form: 50,
        seed: 2,
        tweaks: Tweaks::default(),
        hooks: &xlat_hooks,
        // bswap r16 is undefined.
        skip: &|c| c == Code::Bswap_r16,
    }
}

#[test]
fn data_movement() {
    run_family(&data_movement_family());
}

#[test]
fn data_movement_32() {
    let mut f = data_movement_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

fn conditional_family() -> Family<'static> {
    Family {
        name: "cmovcc/setcc",
        mnemonics: &[
            Mn::Cmovo,
            Mn::Cmovno,
            Mn::Cmovb,
            Mn::Cmovae,
            Mn::Cmove,
            Mn::Cmovne,
            Mn::Cmovbe,
            Mn::Cmova,
            Mn::Cmovs,
            Mn::Cmovns,
            Mn::Cmovp,
            Mn::Cmovnp,
            Mn::Cmovl,
            Mn::Cmovge,
            Mn::Cmovle,
            Mn::Cmovg,
            Mn::Seto,
            Mn::Setno,
            Mn::Setb,
            Mn::Setae,
            Mn::Sete,
            Mn::Setne,
            Mn::Setbe,
            Mn::Seta,
            Mn::Sets,
            Mn::Setns,
            Mn::Setp,
            Mn::Setnp,
            Mn::Setl,
            Mn::Setge,
            Mn::Setle,
            Mn::Setg,
        ],
        per_form: 40,
        seed: 3,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    }
}

#[test]
fn conditional() {
    run_family(&conditional_family());
}

#[test]
fn conditional_32() {
    let mut f = conditional_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// Shift/rotate counts decide which flags are defined: OF only for a count of one, CF
/// not for shl/shr counts of at least the operand width; shld/shrd results are undefined
/// for 16-bit counts above 16.
fn shift_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        return true;
    }
    let size = op_size(f, 0);
    let last = f.instr.op_count() - 1;
    let raw = match f.instr.op_kind(last) {
        OpKind::Register => f.regs.gpr[1] & 0xff,
        _ => f.instr.immediate(last) & 0xff,
    };
    let n = raw & if size == 8 { 0x3f } else { 0x1f };
    let bits = 8 * size as u64;
    if n != 1 {
        f.flags_mask &= !OF;
    }
    match f.mnemonic {
        Mn::Shl | Mn::Sal | Mn::Shr if n >= bits => f.flags_mask &= !(CF | OF),
        Mn::Shld | Mn::Shrd if size == 2 && n > 16 => return false,
        _ => {}
    }
    true
}

fn shifts_family() -> Family<'static> {
    Family {
        name: "shifts/rotates",
        mnemonics: &[
            Mn::Shl,
            Mn::Sal,
            Mn::Shr,
            Mn::Sar,
            Mn::Rol,
            Mn::Ror,
            Mn::Rcl,
            Mn::Rcr,
            Mn::Shld,
            Mn::Shrd,
        ],
        per_form: 70,
        seed: 4,
        tweaks: Tweaks::default(),
        hooks: &shift_hooks,
        skip: &no_skip,
    }
}

#[test]
fn shifts() {
    run_family(&shifts_family());
}

#[test]
fn shifts_32() {
    let mut f = shifts_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// div/idiv inputs are chosen so the quotient fits (#DE is covered by unit tests).
fn div_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        if matches!(f.mnemonic, Mn::Div | Mn::Idiv) {
            f.pins.extend([0, 2]);
        }
        return true;
    }
    if !matches!(f.mnemonic, Mn::Div | Mn::Idiv) {
        return true;
    }
    let size = op_size(f, 0);
    if f.instr.op_kind(0) == OpKind::Register && matches!(gpr_index(f.instr.op_register(0)), 0 | 2)
    {
        return false;
    }
    let mut d = f.operand_value(0, size);
    if d == 0 {
        d = 1;
        match f.instr.op_kind(0) {
            OpKind::Register => {
                let r = f.instr.op_register(0);
                let k = gpr_index(r);
                if crate::cases::is_high_byte(r) {
                    f.regs.gpr[k] = (f.regs.gpr[k] & !0xff00) | 0x100;
                } else {
                    set_low(&mut f.regs.gpr[k], size, 1);
                }
            }
            _ => {
                let t = f.targets[0];
                f.write_data(t, size, 1);
            }
        }
    }
    let bits = 8 * size as u32;
    let (hi, lo) = if f.mnemonic == Mn::Div {
        (f.rng.next() % d, f.rng.next())
    } else {
        // Signed: pick a quotient and remainder in range and build the dividend.
        let sd = ((d << (64 - bits)) as i64 >> (64 - bits)) as i128;
        let half = 1i128 << (bits - 1);
        let q = (f.rng.next() as i128).rem_euclid(2 * half) - half;
        let q = if f.rng.chance(2) {
            q >> (f.rng.below(bits as u64))
        } else {
            q
        };
        let r = (f.rng.next() as i128).rem_euclid(sd.abs());
        let n = q * sd + if q * sd < 0 { -r } else { r };
        let n = n as u128;
        ((n >> bits) as u64, n as u64)
    };
    if size == 1 {
        let ax = ((hi & 0xff) << 8) | (lo & 0xff);
        set_low(&mut f.regs.gpr[0], 2, ax);
    } else {
        set_low(&mut f.regs.gpr[0], size, lo);
        set_low(&mut f.regs.gpr[2], size, hi);
    }
    true
}

fn mul_div_family() -> Family<'static> {
    Family {
        name: "mul/div",
        mnemonics: &[Mn::Mul, Mn::Imul, Mn::Div, Mn::Idiv],
        per_form: 120,
        seed: 5,
        tweaks: Tweaks::default(),
        hooks: &div_hooks,
        skip: &no_skip,
    }
}

#[test]
fn mul_div() {
    run_family(&mul_div_family());
}

#[test]
fn mul_div_32() {
    let mut f = mul_div_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// bt* on memory with a register offset address relative to the operand: keep the offset
/// small so the access stays in the data window.
fn bt_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        return true;
    }
    if matches!(f.mnemonic, Mn::Bt | Mn::Bts | Mn::Btr | Mn::Btc)
        && f.instr.op_kind(0) == OpKind::Memory
        && f.instr.op_kind(1) == OpKind::Register
    {
        let r = f.instr.op_register(1);
        let k = gpr_index(r);
        let base = f.instr.memory_base();
        let index = f.instr.memory_index();
        let uses = |x: iced_x86::Register| x != iced_x86::Register::None && gpr_index(x) == k;
        if uses(base) || uses(index) || k == 4 {
            return false;
        }
        let off = f.rng.below(512) as i64 - 256;
        set_low(&mut f.regs.gpr[k], r.size(), off as u64);
    }
    true
}

fn bits_family() -> Family<'static> {
    Family {
        name: "bit ops",
        mnemonics: &[
            Mn::Bt,
            Mn::Bts,
            Mn::Btr,
            Mn::Btc,
            Mn::Bsf,
            Mn::Bsr,
            Mn::Popcnt,
            Mn::Lzcnt,
            Mn::Tzcnt,
        ],
        per_form: 80,
        seed: 6,
        tweaks: Tweaks::default(),
        hooks: &bt_hooks,
        skip: &no_skip,
    }
}

#[test]
fn bits() {
    run_family(&bits_family());
}

#[test]
fn bits_32() {
    let mut f = bits_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// movbe, where this host has it (vessel's CPU model offers it everywhere).
#[test]
fn byte_order_moves() {
    let f = Family {
        name: "movbe",
        mnemonics: &[Mn::Movbe],
        per_form: 80,
        seed: 21,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    };
    run_where_host_has(std::arch::is_x86_feature_detected!("movbe"), "movbe", &f);
}

/// crc32, where this host has SSE4.2.
#[test]
fn crc32() {
    let f = Family {
        name: "crc32",
        mnemonics: &[Mn::Crc32],
        per_form: 80,
        seed: 22,
        tweaks: Tweaks::default(),
        hooks: &no_hooks,
        skip: &no_skip,
    };
    run_where_host_has(std::arch::is_x86_feature_detected!("sse4.2"), "SSE4.2", &f);
}

/// Half the compare-exchanges should succeed: make the accumulator equal to the
/// destination.
fn cmpxchg_hooks(f: &mut Fixup) -> bool {
    let wide = matches!(f.mnemonic, Mn::Cmpxchg8b | Mn::Cmpxchg16b);
    if f.probing() {
        if f.mnemonic == Mn::Cmpxchg || wide {
            f.pins.extend([0, 2]);
        }
        return true;
    }
    if !f.rng.chance(2) {
        return true;
    }
    match f.mnemonic {
        Mn::Cmpxchg => {
            let size = op_size(f, 0);
            let v = f.operand_value(0, size);
            set_low(&mut f.regs.gpr[0], size, v);
        }
        Mn::Cmpxchg8b => {
            let v = f.read_data(f.targets[0], 8);
            set_low(&mut f.regs.gpr[0], 4, v);
            set_low(&mut f.regs.gpr[2], 4, v >> 32);
        }
        Mn::Cmpxchg16b => {
            f.regs.gpr[0] = f.read_data(f.targets[0], 8);
            f.regs.gpr[2] = f.read_data(f.targets[0] + 8, 8);
        }
        _ => {}
    }
    true
}

fn exchange_family() -> Family<'static> {
    Family {
        name: "xchg/cmpxchg/xadd",
        mnemonics: &[
            Mn::Xchg,
            Mn::Cmpxchg,
            Mn::Xadd,
            Mn::Cmpxchg8b,
            Mn::Cmpxchg16b,
        ],
        per_form: 120,
        seed: 7,
        tweaks: Tweaks::default(),
        hooks: &cmpxchg_hooks,
        // The 486's original cmpxchg opcodes (0F A6/A7) decode as something else today.
        skip: &|c| {
            matches!(
                c,
                Code::Cmpxchg486_rm8_r8 | Code::Cmpxchg486_rm16_r16 | Code::Cmpxchg486_rm32_r32
            )
        },
    }
}

#[test]
fn exchange() {
    run_family(&exchange_family());
}

#[test]
fn exchange_32() {
    let mut f = exchange_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

fn stack_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        if matches!(f.mnemonic, Mn::Enter | Mn::Leave) {
            f.pins.push(5);
        }
        return true;
    }
    let rsp = f.rsp_off();
    match f.mnemonic {
        Mn::Enter | Mn::Leave => {
            f.regs.gpr[5] = f.data_base + 0x800 + (f.rng.below(0x1000) & !7);
            // 16-bit enter with nesting copies frame pointers in an order this AMD part
            // does not document (it differs from the SDM pseudo-code when the copies
            // overlap the new frame); only levels 0 and 1 are compared.
            if f.instr.code() == iced_x86::Code::Enterw_imm16_imm8
                && f.instr.immediate8_2nd() & 31 > 1
            {
                return false;
            }
        }
        Mn::Popf | Mn::Popfd | Mn::Popfq => {
            // Only flags user mode may change and the harness survives (no TF, no AC).
            let v = 0x202 | (f.rng.next() & (0x8d5 | 1 << 10 | 1 << 14 | 1 << 21));
            let n = if f.mnemonic == Mn::Popf { 2 } else { 8 };
            f.write_data(rsp, n, v);
        }
        _ => {}
    }
    true
}

fn stack_family() -> Family<'static> {
    Family {
        name: "stack",
        mnemonics: &[
            Mn::Push,
            Mn::Pop,
            Mn::Pushf,
            Mn::Pushfd,
            Mn::Pushfq,
            Mn::Popf,
            Mn::Popfd,
            Mn::Popfq,
            Mn::Enter,
            Mn::Leave,
        ],
        per_form: 100,
        seed: 8,
        tweaks: Tweaks::default(),
        hooks: &stack_hooks,
        skip: &no_skip,
    }
}

#[test]
fn stack() {
    run_family(&stack_family());
}

#[test]
fn stack_32() {
    let mut f = stack_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// Branch targets must be exit B of the harness.
fn branch_hooks(f: &mut Fixup) -> bool {
    if f.probing() {
        return true;
    }
    let target = f.exit_b;
    match f.mnemonic {
        Mn::Ret => {
            let rsp = f.rsp_off();
            f.write_data(rsp, 8, target);
        }
        Mn::Jmp | Mn::Call => match f.instr.op_kind(0) {
            OpKind::Register => {
                let k = gpr_index(f.instr.op_register(0));
                if k == 4 {
                    return false;
                }
                f.regs.gpr[k] = target;
            }
            OpKind::Memory => {
                let t = f.targets[0];
                f.write_data(t, 8, target);
            }
            _ => {}
        },
        _ => {}
    }
    true
}

fn control_family() -> Family<'static> {
    Family {
        name: "control transfer",
        mnemonics: &[
            Mn::Jmp,
            Mn::Call,
            Mn::Ret,
            Mn::Jo,
            Mn::Jno,
            Mn::Jb,
            Mn::Jae,
            Mn::Je,
            Mn::Jne,
            Mn::Jbe,
            Mn::Ja,
            Mn::Js,
            Mn::Jns,
            Mn::Jp,
            Mn::Jnp,
            Mn::Jl,
            Mn::Jge,
            Mn::Jle,
            Mn::Jg,
            Mn::Loop,
            Mn::Loope,
            Mn::Loopne,
            Mn::Jrcxz,
            Mn::Jecxz,
            Mn::Jcxz,
        ],
        per_form: 60,
        seed: 9,
        tweaks: Tweaks::default(),
        hooks: &branch_hooks,
        skip: &skip_branch,
    }
}

#[test]
fn control() {
    run_family(&control_family());
}

#[test]
fn control_32() {
    let mut f = control_family();
    f.per_form = (f.per_form / 2).max(20);
    run_family_in(&f, 32);
}

/// aam with a zero base raises #DE (covered by a unit test).
fn bcd_hooks(f: &mut Fixup) -> bool {
    f.probing() || f.mnemonic != Mn::Aam || f.instr.immediate8() != 0
}

#[test]
fn legacy_32() {
    run_family_in(
        &Family {
            name: "pusha/popa/BCD",
            mnemonics: &[
                Mn::Pusha,
                Mn::Pushad,
                Mn::Popa,
                Mn::Popad,
                Mn::Daa,
                Mn::Das,
                Mn::Aaa,
                Mn::Aas,
                Mn::Aam,
                Mn::Aad,
            ],
            per_form: 150,
            seed: 40,
            tweaks: Tweaks::default(),
            hooks: &bcd_hooks,
            skip: &no_skip,
        },
        32,
    );
}
