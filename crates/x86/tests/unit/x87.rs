//! The x87 last-instruction pointers follow vessel's CPU model on every host: FIP names
//! the last non-control instruction; FOP and FDP change only when an instruction raises
//! an unmasked exception (CPUID.(7,0):EBX[6]); control instructions leave all three
//! alone; fnstenv stores FCS and FDS as zero (EBX[13]).

use iced_x86::code_asm::*;

use crate::{CODE, DATA, Vm, insn_len};

#[test]
fn pointers_change_only_as_the_model_says() {
    let mut vm = Vm::long(0);
    // Zero-divide unmasked (bit 2 clear), the divisor 0.0f at DATA + 8.
    vm.p.write(DATA, &0x037bu16.to_le_bytes());
    vm.p.write(DATA + 8, &0f32.to_le_bytes());
    vm.code(|a| {
        a.fldcw(word_ptr(DATA))?;
        a.fld1()?;
        a.fdiv(dword_ptr(DATA + 8))?;
        a.fnclex()?;
        a.fnop()?;
        a.fnstenv(ptr(DATA + 0x100))
    });
    let (fop0, fdp0) = (0x155, 0xdead_beef);
    vm.cpu.fpu.fop = fop0;
    vm.cpu.fpu.fdp = fdp0;
    let mut at = CODE;
    let mut next = |vm: &mut Vm| {
        let here = at;
        at += insn_len(vm, at);
        vm.step().expect("step");
        here
    };
    let fldcw = next(&mut vm);
    let f = &vm.cpu.fpu;
    assert_eq!(
        (f.fip, f.fop, f.fdp),
        (0, fop0, fdp0),
        "fldcw is a control instruction"
    );
    let fld1 = next(&mut vm);
    assert_ne!(fld1, fldcw);
    let f = &vm.cpu.fpu;
    assert_eq!((f.fip, f.fop, f.fdp), (fld1, fop0, fdp0), "fld1: FIP only");
    let fdiv = next(&mut vm);
    let f = &vm.cpu.fpu;
    assert_ne!(f.fsw & 0x84, 0, "zero divide raised and pending");
    // fdiv m32fp is d8 /6; this form's ModRM is 0x34 (SIB, disp32 follows).
    let mut bytes = [0u8; 2];
    vm.p.read(fdiv, &mut bytes);
    let fop = (u16::from(bytes[0] & 7) << 8) | u16::from(bytes[1]);
    assert_eq!(
        (f.fip, f.fop, f.fdp),
        (fdiv, fop, DATA + 8),
        "an unmasked exception records FOP and FDP"
    );
    next(&mut vm); // fnclex: control
    assert_eq!(vm.cpu.fpu.fip, fdiv);
    assert_eq!(vm.cpu.fpu.fsw & 0x80, 0);
    let fnop = next(&mut vm);
    let f = &vm.cpu.fpu;
    assert_eq!(
        (f.fip, f.fop, f.fdp),
        (fnop, fop, DATA + 8),
        "fnop: FIP only"
    );
    next(&mut vm); // fnstenv: the 28-byte protected-mode image.
    let mut env = [0u8; 28];
    vm.p.read(DATA + 0x100, &mut env);
    let word = |o: usize| u16::from_le_bytes([env[o], env[o + 1]]);
    let dword = |o: usize| u32::from_le_bytes(env[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from(dword(12)), fnop & 0xffff_ffff, "FIP");
    assert_eq!(word(16), 0, "FCS");
    assert_eq!(word(18) & 0x7ff, fop, "FOP");
    assert_eq!(u64::from(dword(20)), DATA + 8, "FDP");
    assert_eq!(word(24), 0, "FDS");
}
