//! Differential tests: each instruction form runs natively on this CPU and in the
//! interpreter from the same random inputs; registers, flags (less the ones the SDM leaves
//! undefined), XMM state and memory must match exactly.

mod cases;
#[path = "../common/mod.rs"]
mod common;
mod families;
mod fpu;
mod host_model;
mod native;
mod sse;
mod strings;
mod x87;

use iced_x86::{Formatter, IntelFormatter};
use x86::{CodeCoherence, CpuState, Fault, Interpreter, SegReg, Segment, StepOutcome};

use cases::{Case, Fixup, Gen, Tweaks};
use common::{PTE_NX, PTE_U, PTE_W, PageTables, Rng, TestPlatform};
use native::{DATA_LEN, INSN_OFF, Native, RegState, Slot};

const CODE_GPA: u64 = 0x10_0000;
/// The two data pages are physically discontiguous on purpose.
const DATA_GPA: [u64; 2] = [0x20_0000, 0x30_0000];

/// The interpreter side: a guest whose page tables map the instruction and the data
/// window at the same linear addresses the native stub uses.
pub struct Guest {
    p: TestPlatform,
    interp: Interpreter,
    /// The translating tier runs every instruction (each case once to fill the TLB,
    /// then again for the result).
    translating: bool,
    pml4: u64,
    base: u64,
    selectors: [u16; 6],
}

fn native_selectors() -> [u16; 6] {
    let (mut es, mut cs, mut ss, mut ds, mut fs, mut gs): (u16, u16, u16, u16, u16, u16);
    // SAFETY: reading segment selectors has no side effects.
    unsafe {
        std::arch::asm!(
            "mov {0:x}, es", "mov {1:x}, cs", "mov {2:x}, ss", "mov {3:x}, ds", "mov {4:x}, fs",
            "mov {5:x}, gs",
            out(reg) es, out(reg) cs, out(reg) ss, out(reg) ds, out(reg) fs, out(reg) gs,
            options(nomem, nostack, preserves_flags),
        );
    }
    [es, cs, ss, ds, fs, gs]
}

impl Guest {
    pub fn new(native: &Native) -> Guest {
        let mut p = TestPlatform::new(4 << 20);
        // The interpreter lays out XSAVE images as the native CPU does.
        p.cpuid = common::CpuidSource::Host;
        let mut pt = PageTables::new(&p, 0x1000);
        let base = native.base;
        pt.map(&p, base + (INSN_OFF & !0xfff), CODE_GPA, PTE_U);
        pt.map(&p, native.data_addr(), DATA_GPA[0], PTE_U | PTE_W | PTE_NX);
        pt.map(
            &p,
            native.data_addr() + 0x1000,
            DATA_GPA[1],
            PTE_U | PTE_W | PTE_NX,
        );
        Guest {
            p,
            // The instruction bytes change from case to case at the same address: exactly
            // the situation validation exists for.
            interp: Interpreter::new(CodeCoherence::Validate),
            translating: false,
            pml4: pt.pml4,
            base,
            selectors: native_selectors(),
        }
    }

    /// The same guest with the translating tier translating every block at its first
    /// run.
    pub fn translating(native: &Native) -> Guest {
        let mut g = Guest::new(native);
        g.interp = Interpreter::new(CodeCoherence::Tracked);
        g.interp.set_jit(x86::JitMode::On, Some(0));
        g.translating = true;
        g
    }

    pub fn run(
        &mut self,
        case: &Case,
        bits: u32,
    ) -> (Result<StepOutcome, Fault>, CpuState, Vec<u8>) {
        if self.translating {
            // A first run fills the TLB (translated code leaves at a miss); the second
            // runs the instruction translated.
            let _ = self.run_once(case, bits);
        }
        self.run_once(case, bits)
    }

    fn run_once(
        &mut self,
        case: &Case,
        bits: u32,
    ) -> (Result<StepOutcome, Fault>, CpuState, Vec<u8>) {
        let insn = if bits == 64 {
            self.base + INSN_OFF
        } else {
            self.base + native::INSN32_OFF
        };
        self.p.write(CODE_GPA + (insn & 0xfff), &case.bytes);
        if self.translating {
            // The block is the instruction alone: hlt after it is not translated.
            self.p
                .write(CODE_GPA + (insn & 0xfff) + case.bytes.len() as u64, &[0xf4]);
            self.interp.invalidate_code_page(CODE_GPA);
        }
        self.p.write(DATA_GPA[0], &case.data[..0x1000]);
        self.p.write(DATA_GPA[1], &case.data[0x1000..]);
        let mut cpu = CpuState::long_mode(self.pml4, 3);
        for (k, s) in self.selectors.iter().enumerate() {
            cpu.seg[k].selector = *s;
        }
        cpu.seg[SegReg::Fs as usize].base = 0;
        if bits == 32 {
            // Compatibility mode: Linux's 32-bit user code segment, flat data segments.
            cpu.seg = [Segment::flat(native::USER_DS, 0x3, 3, true, false); 6];
            cpu.seg[SegReg::Cs as usize] = Segment::flat(native::USER_CS32, 0xb, 3, true, false);
        }
        cpu.gpr = case.regs.gpr;
        cpu.rflags = case.regs.rflags;
        cpu.rip = insn;
        cpu.xcr0 = native::xcr0();
        let r = &case.regs;
        let f = &mut cpu.fpu;
        f.xmm = r.xmm;
        f.mxcsr = r.mxcsr;
        f.fcw = r.x87.fcw;
        f.fsw = r.x87.fsw;
        f.ftw = r.x87.ftw;
        f.fop = r.x87.fop;
        f.fip = r.x87.fip;
        f.fdp = r.x87.fdp;
        f.st = r.x87.st;
        f.ymm_hi = r.ymm_hi;
        f.opmask = r.opmask;
        f.zmm_hi256 = r.zmm_hi256;
        f.hi16_zmm = r.hi16_zmm;
        let r = if self.translating {
            self.interp
                .run(&mut cpu, &mut self.p, 1)
                .map(|o| StepOutcome {
                    mnemonic: case.instr.mnemonic(),
                    halted: o.exit == x86::RunExit::Halt,
                })
        } else {
            self.interp.step(&mut cpu, &mut self.p)
        };
        let mut data = vec![0u8; DATA_LEN];
        self.p.read(DATA_GPA[0], &mut data[..0x1000]);
        self.p.read(DATA_GPA[1], &mut data[0x1000..]);
        (r, cpu, data)
    }
}

const NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

fn describe(case: &Case) -> String {
    let mut text = String::new();
    IntelFormatter::new().format(&case.instr, &mut text);
    let bytes: Vec<String> = case.bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("`{text}` [{}]", bytes.join(" "))
}

/// Compares the two executions; returns a description of every difference.
fn compare(
    case: &Case,
    native: &Native,
    bits: u32,
    nat: &(RegState, Vec<u8>),
    int: &(Result<StepOutcome, Fault>, CpuState, Vec<u8>),
) -> Result<(), String> {
    let (nregs, ndata) = nat;
    let (res, cpu, idata) = int;
    let mut diffs = Vec::new();
    if let Err(f) = res {
        diffs.push(format!("interpreter: {f}"));
    } else {
        let (exit_b, insn) = if bits == 64 {
            (native.exit_b(), native.insn_addr())
        } else {
            (native.exit_b32(), native.insn32_addr())
        };
        let want_rip = if nregs.path == 1 {
            exit_b
        } else {
            insn + case.bytes.len() as u64
        };
        // In compatibility mode only EAX..EDI exist, and only their low halves.
        let (ngpr, gmask) = if bits == 64 {
            (16, u64::MAX)
        } else {
            (8, 0xffff_ffff)
        };
        if cpu.rip != want_rip {
            diffs.push(format!("rip: native {want_rip:#x} interp {:#x}", cpu.rip));
        }
        if !host_model::gprs_match(case, nregs, &cpu.gpr, gmask) {
            for (k, name) in NAMES.iter().enumerate().take(ngpr) {
                if (nregs.gpr[k] ^ cpu.gpr[k]) & gmask != 0 {
                    diffs.push(format!(
                        "{name}: native {:#x} interp {:#x} (input {:#x})",
                        nregs.gpr[k], cpu.gpr[k], case.regs.gpr[k]
                    ));
                }
            }
        }
        let m = case.flags_mask;
        if (nregs.rflags ^ cpu.rflags) & m != 0 {
            diffs.push(format!(
                "rflags: native {:#x} interp {:#x} (input {:#x}, compared {:#x})",
                nregs.rflags,
                cpu.rflags,
                case.regs.rflags,
                m & 0x3fffff
            ));
        }
        for k in 0..16 {
            if nregs.xmm[k] != cpu.fpu.xmm[k] {
                diffs.push(format!(
                    "xmm{k}: native {:#034x} interp {:#034x} (input {:#034x})",
                    nregs.xmm[k], cpu.fpu.xmm[k], case.regs.xmm[k]
                ));
            }
        }
        let f = &cpu.fpu;
        let x = &nregs.x87;
        let interp_x87 = native::X87 {
            fcw: f.fcw,
            fsw: f.fsw,
            ftw: f.ftw,
            fop: f.fop,
            fip: f.fip,
            fdp: f.fdp,
            st: f.st,
        };
        if !host_model::x87_matches(case, bits, x, &interp_x87) {
            diffs.push(format!(
                "x87: native {x:x?}\n     interp {interp_x87:x?}\n     input  {:x?}",
                case.regs.x87
            ));
        }
        if nregs.ymm_hi != f.ymm_hi
            || nregs.opmask != f.opmask
            || nregs.zmm_hi256 != f.zmm_hi256
            || nregs.hi16_zmm != f.hi16_zmm
        {
            diffs.push("AVX/AVX-512 state differs".to_string());
        }
        if nregs.mxcsr != cpu.fpu.mxcsr {
            diffs.push(format!(
                "mxcsr: native {:#x} interp {:#x} (input {:#x})",
                nregs.mxcsr, cpu.fpu.mxcsr, case.regs.mxcsr
            ));
        }
        let mut ndata = ndata.clone();
        let selectors = if bits == 64 {
            let s = native_selectors();
            (s[1], s[3])
        } else {
            (native::USER_CS32, native::USER_DS)
        };
        for (off, sel) in host_model::env_selector_fields(case, bits, native.data_addr(), selectors)
        {
            if off + 2 <= DATA_LEN && ndata[off..off + 2] == sel.to_le_bytes() {
                ndata[off..off + 2].copy_from_slice(&idata[off..off + 2]);
            }
        }
        if let Some(off) = (0..DATA_LEN).find(|&o| ndata[o] != idata[o]) {
            let end = (off + 16).min(DATA_LEN);
            diffs.push(format!(
                "memory at data+{off:#x}: native {:02x?} interp {:02x?} (input {:02x?})",
                &ndata[off..end],
                &idata[off..end],
                &case.data[off..end]
            ));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let regs: Vec<String> = (0..16)
        .map(|k| format!("{}={:#x}", NAMES[k], case.regs.gpr[k]))
        .collect();
    Err(format!(
        "{}\n  inputs: {} rflags={:#x} mxcsr={:#x}\n  {}",
        describe(case),
        regs.join(" "),
        case.regs.rflags,
        case.regs.mxcsr,
        diffs.join("\n  ")
    ))
}

/// A family of instructions for the differential suite.
pub struct Family<'a> {
    pub name: &'a str,
    pub mnemonics: &'a [iced_x86::Mnemonic],
    /// Cases per instruction form (iced Code).
    pub per_form: usize,
    pub seed: u64,
    pub tweaks: Tweaks,
    pub hooks: &'a dyn Fn(&mut Fixup) -> bool,
    /// Forms to leave out (e.g. far branches, which cannot run in the harness).
    pub skip: &'a dyn Fn(iced_x86::Code) -> bool,
}

pub fn no_hooks(_f: &mut Fixup) -> bool {
    true
}

pub fn no_skip(_c: iced_x86::Code) -> bool {
    false
}

/// Runs a family in 64-bit mode; returns the number of cases executed. Panics with every
/// mismatch.
pub fn run_family(f: &Family) -> usize {
    run_family_in(f, 64)
}

/// Runs a family in 64-bit and in compatibility mode where this host's CPU has the
/// `feature` it needs (`has`: `is_x86_feature_detected!` wants a literal), else says
/// it skipped.
pub fn run_where_host_has(has: bool, feature: &str, f: &Family) {
    if !has {
        eprintln!("skipped: this host's CPU has no {feature}");
        return;
    }
    run_family(f);
    run_family_in(f, 32);
}

/// Runs a family in 64-bit mode or (bits = 32) in compatibility mode.
pub fn run_family_in(f: &Family, bits: u32) -> usize {
    let codes: Vec<_> = cases::forms(f.mnemonics, bits)
        .into_iter()
        .filter(|c| cases::generatable(*c) && !(f.skip)(*c))
        .collect();
    assert!(!codes.is_empty(), "{}: no instruction forms", f.name);
    let forms: Vec<(String, Box<FormGen>)> = codes
        .iter()
        .map(|&code| {
            let g: Box<FormGen> = Box::new(move |rng: &mut Rng, native: &Native| {
                let mut g = if bits == 64 {
                    Gen::new(rng, native)
                } else {
                    Gen::new32(rng, native)
                };
                g.case(code, &f.tweaks, f.hooks)
            });
            (format!("{code:?}"), g)
        })
        .collect();
    let name = if bits == 64 {
        f.name.to_string()
    } else {
        format!("{} (32-bit)", f.name)
    };
    check_in(&name, &forms, f.per_form, f.seed, bits)
}

/// Produces one case of a form (None: this draw is unusable, draw again).
pub type FormGen<'a> = dyn Fn(&mut Rng, &Native) -> Option<Case> + 'a;

/// Runs `per_form` cases of every form natively and in the interpreter and compares.
pub fn check(name: &str, forms: &[(String, Box<FormGen>)], per_form: usize, seed: u64) -> usize {
    check_in(name, forms, per_form, seed, 64)
}

pub fn check_in(
    name: &str,
    forms: &[(String, Box<FormGen>)],
    per_form: usize,
    seed: u64,
    bits: u32,
) -> usize {
    let slot = Slot::claim();
    let native = &slot.native;
    let mut guest = Guest::new(native);
    let mut translating = Guest::translating(native);
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let mut starved = Vec::new();
    let mut total = 0;
    for (form, make) in forms {
        let mut done = 0;
        let mut attempts = 0;
        while done < per_form && attempts < per_form * 30 {
            attempts += 1;
            let Some(case) = make(&mut rng, native) else {
                continue;
            };
            let nat = if bits == 64 {
                native.run(&case.bytes, &case.regs, &case.data)
            } else {
                native.run32(&case.bytes, &case.regs, &case.data)
            };
            let int = guest.run(&case, bits);
            if let Err(e) = compare(&case, native, bits, &nat, &int) {
                failures.push(e);
            }
            let jit = translating.run(&case, bits);
            if let Err(e) = compare(&case, native, bits, &nat, &jit) {
                failures.push(format!("[translated] {e}"));
            }
            done += 1;
            if failures.len() >= 12 {
                break;
            }
        }
        if done == 0 {
            starved.push(form.clone());
        }
        total += done;
        if failures.len() >= 12 {
            break;
        }
    }
    eprintln!(
        "{}: {} cases over {} forms, {} run translated",
        name,
        total,
        forms.len(),
        translating.interp.stats().translated_instructions
    );
    assert!(
        failures.is_empty(),
        "{}: {} mismatches (first ones):\n{}",
        name,
        failures.len(),
        failures.join("\n")
    );
    assert!(
        starved.is_empty(),
        "{}: no case could be generated for {:?}",
        name,
        starved
    );
    total
}
