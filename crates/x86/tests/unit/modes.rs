//! 32-bit protected mode, compatibility mode and 16-bit real mode: operand and address
//! sizes, stack widths, wrap-around, segment bases. Values worked out by hand.

use iced_x86::code_asm::*;
use x86::{CodeCoherence, CpuMode, CpuState, Interpreter, SegReg, Segment};

use crate::common::{PTE_W, PageTables, TestPlatform};

struct Machine {
    p: TestPlatform,
    cpu: CpuState,
    it: Interpreter,
}

impl Machine {
    fn new(cpu: CpuState, p: TestPlatform) -> Self {
        Machine {
            p,
            cpu,
            it: Interpreter::new(CodeCoherence::Tracked),
        }
    }

    fn load(
        &mut self,
        bitness: u32,
        at: u64,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) {
        let mut a = CodeAssembler::new(bitness).expect("asm");
        f(&mut a).expect("assemble");
        let code = a.assemble(at).expect("assemble");
        self.p.write(at, &code);
    }

    fn steps(&mut self, n: usize) {
        for k in 0..n {
            self.it
                .step(&mut self.cpu, &mut self.p)
                .unwrap_or_else(|e| panic!("step {k}: {e}"));
        }
    }
}

#[test]
fn protected_mode_32_bit() {
    let mut cpu = CpuState::protected_mode32(0);
    assert_eq!(cpu.mode(), CpuMode::Protected32);
    cpu.rip = 0x8000;
    cpu.gpr[4] = 0x9000;
    cpu.gpr[0] = 0xffff_ffff_8000_0001;
    cpu.gpr[1] = 0x7fff_ffff;
    let mut m = Machine::new(cpu, TestPlatform::new(1 << 20));
    m.load(32, 0x8000, |a| {
        a.push(eax)?; // esp 0x8ffc, 4 bytes
        a.add(eax, ecx)?; // 0x8000_0001 + 0x7fff_ffff = 0 (carry)
        a.pop(ebx)?; // ebx = 0x8000_0001
        a.mov(ax, 0x1234)?; // 16-bit operand: low word only
        a.lea(edx, dword_ptr(ebx + ebx * 2 + 5))?; // 3 * 0x8000_0001 + 5 wraps to 0x8000_0008
        a.call(0x8100u64)
    });
    m.load(32, 0x8100, |a| a.ret());
    m.steps(2);
    assert_eq!(m.cpu.gpr[4], 0x8ffc);
    let mut b = [0u8; 4];
    m.p.read(0x8ffc, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0001, "push writes 4 bytes");
    assert_eq!(m.cpu.gpr[0] & 0xffff_ffff, 0);
    assert_ne!(m.cpu.rflags & x86::rflags::CF, 0);
    m.steps(3);
    assert_eq!(m.cpu.gpr[3] & 0xffff_ffff, 0x8000_0001);
    assert_eq!(m.cpu.gpr[4], 0x9000);
    assert_eq!(m.cpu.gpr[0] & 0xffff_ffff, 0x1234);
    assert_eq!(m.cpu.gpr[2] & 0xffff_ffff, 0x8000_0008);
    let ret = m.cpu.rip + 5;
    m.steps(1);
    assert_eq!(m.cpu.rip, 0x8100);
    assert_eq!(m.cpu.gpr[4], 0x8ffc);
    m.p.read(0x8ffc, &mut b);
    assert_eq!(
        u64::from(u32::from_le_bytes(b)),
        ret,
        "call pushes a 4-byte return address"
    );
    m.steps(1);
    assert_eq!(m.cpu.rip, ret);
}

#[test]
fn addresses_wrap_at_4gib_outside_long_mode() {
    let mut cpu = CpuState::protected_mode32(0);
    cpu.rip = 0x8000;
    cpu.gpr[3] = 0xffff_fff0;
    cpu.gpr[1] = 0x20;
    let mut m = Machine::new(cpu, TestPlatform::new(1 << 20));
    m.p.write(0x10, &0xcafe_f00du32.to_le_bytes());
    m.load(32, 0x8000, |a| a.mov(eax, dword_ptr(ebx + ecx)));
    m.steps(1);
    assert_eq!(m.cpu.gpr[0], 0xcafe_f00d);
}

#[test]
fn segment_bases_apply_in_protected_mode() {
    let mut cpu = CpuState::protected_mode32(0);
    cpu.rip = 0x8000;
    cpu.seg[SegReg::Ds as usize].base = 0x2_0000;
    cpu.seg[SegReg::Es as usize].base = 0x3_0000;
    cpu.gpr[6] = 0x10;
    cpu.gpr[7] = 0x20;
    cpu.gpr[1] = 2;
    let mut m = Machine::new(cpu, TestPlatform::new(1 << 20));
    m.p.write(0x2_0010, &[1, 2, 3, 4, 5, 6, 7, 8]);
    m.load(32, 0x8000, |a| {
        a.mov(eax, dword_ptr(0x14))?; // DS:0x14
        a.rep().movsw()
    });
    m.steps(2);
    assert_eq!(m.cpu.gpr[0], 0x0807_0605);
    let mut b = [0u8; 4];
    m.p.read(0x3_0020, &mut b);
    assert_eq!(b, [1, 2, 3, 4], "ES:EDI gets DS:ESI");
    assert_eq!((m.cpu.gpr[6], m.cpu.gpr[7], m.cpu.gpr[1]), (0x14, 0x24, 0));
}

#[test]
fn compatibility_mode() {
    let p = TestPlatform::new(4 << 20);
    let mut pt = PageTables::new(&p, 0x1000);
    pt.identity(&p, 0x10_0000, 0x10_0000, PTE_W);
    let mut cpu = CpuState::long_mode(pt.pml4, 0);
    cpu.seg[SegReg::Cs as usize] = Segment::flat(0x08, 0xb, 0, true, false);
    assert_eq!(cpu.mode(), CpuMode::Compat32);
    cpu.rip = 0x10_0000;
    cpu.gpr[4] = 0x18_0000;
    cpu.gpr[0] = 0xdead_beef_0000_0005;
    let mut m = Machine::new(cpu, p);
    m.load(32, 0x10_0000, |a| {
        a.push(eax)?;
        a.inc(eax)?; // 0x48 would be REX in 64-bit mode; here it is inc eax
        a.pop(ecx)
    });
    m.steps(3);
    assert_eq!(m.cpu.gpr[4], 0x18_0000);
    assert_eq!(m.cpu.gpr[0], 6, "32-bit result zero-extends");
    assert_eq!(m.cpu.gpr[1], 5);
}

#[test]
fn real_mode_16_bit() {
    let mut cpu = CpuState::default();
    assert_eq!(cpu.mode(), CpuMode::Real);
    for s in cpu.seg.iter_mut() {
        *s = Segment::real_mode(0);
    }
    cpu.rip = 0x7c00;
    cpu.gpr[4] = 0x8000;
    let mut m = Machine::new(cpu, TestPlatform::new(2 << 20));
    m.p.write(0x1_0024, &[0x34, 0x12]);
    m.p.write(0x1_0010, &[0x78, 0x56]);
    m.load(16, 0x7c00, |a| {
        a.mov(ax, 0x1000)?;
        a.mov(ds, ax)?; // DS base 0x10000
        a.mov(bx, 0x20)?;
        a.mov(si, 4)?;
        a.mov(cx, word_ptr(bx + si))?; // 0x10024
        a.push(cx)?; // SS:SP = 0:0x7ffe
        a.mov(bx, 0xfff0)?;
        a.mov(si, 0x20)?;
        a.mov(dx, word_ptr(bx + si))?; // offset wraps to 0x10: linear 0x10010
        a.mov(eax, 0x1234_5678)?; // operand-size prefix in 16-bit code
        Ok(())
    });
    m.steps(5);
    assert_eq!(m.cpu.seg[SegReg::Ds as usize].base, 0x1_0000);
    assert_eq!(m.cpu.gpr[1] & 0xffff, 0x1234);
    m.steps(1);
    assert_eq!(m.cpu.gpr[4], 0x7ffe);
    let mut b = [0u8; 2];
    m.p.read(0x7ffe, &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x1234);
    m.steps(3);
    assert_eq!(m.cpu.gpr[2] & 0xffff, 0x5678);
    m.steps(1);
    assert_eq!(m.cpu.gpr[0] & 0xffff_ffff, 0x1234_5678);
}

#[test]
fn real_mode_ip_wraps_at_64k() {
    let mut cpu = CpuState::default();
    for s in cpu.seg.iter_mut() {
        *s = Segment::real_mode(0x1000);
    }
    cpu.rip = 0xfffe;
    let mut m = Machine::new(cpu, TestPlatform::new(2 << 20));
    // Two one-byte instructions at the end of the segment: inc ax; then IP wraps to 0.
    m.p.write(0x1_fffe, &[0x40, 0x40]);
    m.steps(2);
    assert_eq!(m.cpu.rip, 0);
    assert_eq!(m.cpu.gpr[0] & 0xffff, 2);
}

fn prot32(code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Machine {
    let mut cpu = CpuState::protected_mode32(0);
    cpu.rip = 0x8000;
    cpu.gpr[4] = 0x9000;
    let mut m = Machine::new(cpu, TestPlatform::new(1 << 20));
    m.load(32, 0x8000, code);
    m
}

#[test]
fn pushad_popad() {
    let mut m = prot32(|a| {
        a.pushad()?;
        a.popad()
    });
    for k in 0..8 {
        if k != 4 {
            m.cpu.gpr[k] = 0x1000 + k as u64;
        }
    }
    m.steps(1);
    assert_eq!(m.cpu.gpr[4], 0x9000 - 32);
    let mut b = [0u8; 32];
    m.p.read(0x9000 - 32, &mut b);
    let words: Vec<u32> = b
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // From the lowest address: EDI ESI EBP ESP(original) EBX EDX ECX EAX.
    assert_eq!(
        words,
        [
            0x1007, 0x1006, 0x1005, 0x9000, 0x1003, 0x1002, 0x1001, 0x1000
        ]
    );
    for k in 0..8 {
        if k != 4 {
            m.cpu.gpr[k] = 0;
        }
    }
    m.steps(1);
    assert_eq!(m.cpu.gpr[4], 0x9000);
    assert_eq!(m.cpu.gpr[7], 0x1007);
    assert_eq!(m.cpu.gpr[0], 0x1000);
}

#[test]
fn bcd_adjustments() {
    // The SDM's examples: 79h + 35h, DAA -> 14h, CF = 1.
    let mut m = prot32(|a| {
        a.add(al, bl)?;
        a.daa()?;
        a.sub(cl, dl)?;
        a.xchg(al, cl)?;
        a.das()?;
        a.aam(10)?;
        a.aad(10)
    });
    m.cpu.gpr[0] = 0x79;
    m.cpu.gpr[3] = 0x35;
    m.cpu.gpr[1] = 0x35;
    m.cpu.gpr[2] = 0x47;
    m.steps(2);
    assert_eq!(m.cpu.gpr[0] & 0xff, 0x14);
    assert_ne!(m.cpu.rflags & x86::rflags::CF, 0);
    // 35h - 47h = EEh with CF, DAS -> 88h, CF = 1.
    m.steps(3);
    assert_eq!(m.cpu.gpr[0] & 0xff, 0x88);
    assert_ne!(m.cpu.rflags & x86::rflags::CF, 0);
    // AAM 10: AL = 88h = 136 -> AH = 13, AL = 6; AAD 10 -> AL = 136, AH = 0.
    m.steps(1);
    assert_eq!(m.cpu.gpr[0] & 0xffff, 0x0d06);
    m.steps(1);
    assert_eq!(m.cpu.gpr[0] & 0xffff, 0x0088);
}

#[test]
fn aaa_after_unpacked_add() {
    // '9' + '8' unpacked: AL = 09h + 08h = 11h with AF set; AAA -> AX = 0107h, CF = AF = 1.
    let mut m = prot32(|a| {
        a.add(al, 8)?;
        a.aaa()
    });
    m.cpu.gpr[0] = 0x0009;
    m.steps(2);
    assert_eq!(m.cpu.gpr[0] & 0xffff, 0x0107);
    assert_ne!(m.cpu.rflags & x86::rflags::CF, 0);
}

#[test]
fn into_and_bound() {
    let mut m = prot32(|a| {
        a.into()?;
        a.bound(eax, qword_ptr(0x100))
    });
    m.cpu.rflags |= x86::rflags::OF;
    assert_eq!(
        m.it.step(&mut m.cpu, &mut m.p),
        Err(x86::Fault::Exception(x86::Exception::Overflow))
    );
    assert_eq!(m.cpu.rip, 0x8001, "into is a trap");
    m.p.write(0x100, &[0xfb, 0xff, 0xff, 0xff, 10, 0, 0, 0]); // bounds -5..10
    m.cpu.gpr[0] = 0xffff_fffb;
    m.steps(1);
    m.cpu.rip = 0x8001;
    m.cpu.gpr[0] = 11;
    assert_eq!(
        m.it.step(&mut m.cpu, &mut m.p),
        Err(x86::Fault::Exception(x86::Exception::BoundRange))
    );
}

#[test]
fn string_port_io() {
    let mut m = prot32(|a| {
        a.rep().insb()?;
        a.outsw()
    });
    m.cpu.gpr[2] = 0x60;
    m.cpu.gpr[1] = 3;
    m.cpu.gpr[7] = 0x200;
    m.cpu.gpr[6] = 0x200;
    m.steps(1);
    let mut b = [0u8; 3];
    m.p.read(0x200, &mut b);
    assert_eq!(b, [0x60, 0x60, 0x60], "one byte per in from port 60h");
    assert_eq!((m.cpu.gpr[1], m.cpu.gpr[7]), (0, 0x203));
    m.steps(1);
    assert_eq!(m.p.io_out, vec![(0x60, vec![0x60, 0x60])]);
    assert_eq!(m.cpu.gpr[6], 0x202);
}

#[test]
fn far_pointer_load_in_real_mode() {
    let mut cpu = CpuState::default();
    for s in cpu.seg.iter_mut() {
        *s = Segment::real_mode(0);
    }
    cpu.rip = 0x7c00;
    let mut m = Machine::new(cpu, TestPlatform::new(2 << 20));
    m.p.write(0x500, &[0x34, 0x12, 0x00, 0x20]); // 2000:1234
    m.load(16, 0x7c00, |a| a.lss(sp, dword_ptr(0x500)));
    m.steps(1);
    assert_eq!(m.cpu.gpr[4] & 0xffff, 0x1234);
    assert_eq!(m.cpu.seg[SegReg::Ss as usize].selector, 0x2000);
    assert_eq!(m.cpu.seg[SegReg::Ss as usize].base, 0x2_0000);
}

#[test]
fn segment_loads_read_the_gdt() {
    let mut m = prot32(|a| {
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(4))?;
        a.mov(cx, 0x18)?;
        a.mov(es, cx)?;
        Ok(())
    });
    // GDT: null, -, data (base 0x12000, 4 GiB, RW, not yet accessed), not-present data,
    // execute-only code.
    let gdt: [u64; 5] = [
        0,
        0,
        0x00cf_9201_2000_ffff,
        0x00cf_1201_2000_ffff,
        0x00cf_9800_0000_ffff,
    ];
    for (k, d) in gdt.iter().enumerate() {
        m.p.write_u64(0x1000 + 8 * k as u64, *d);
    }
    m.cpu.gdtr = x86::DescriptorTable {
        base: 0x1000,
        limit: 39,
    };
    m.p.write(0x1_2004, &0xabcd_ef01u32.to_le_bytes());
    m.steps(2);
    let dseg = m.cpu.seg[SegReg::Ds as usize];
    assert_eq!(
        (dseg.selector, dseg.base, dseg.limit),
        (0x10, 0x1_2000, 0xffff_ffff)
    );
    assert!(dseg.db() && dseg.present());
    assert_eq!(
        m.p.read_u64(0x1010) >> 40 & 0xff,
        0x93,
        "accessed bit set in the GDT"
    );
    m.steps(2);
    assert_eq!(m.cpu.gpr[0], 0xabcd_ef01);
    assert_eq!(
        m.it.step(&mut m.cpu, &mut m.p),
        Err(x86::Fault::Exception(x86::Exception::SegmentNotPresent(
            0x18
        )))
    );
    // An execute-only code segment cannot be loaded into a data segment register.
    m.cpu.gpr[1] = 0x20;
    assert_eq!(
        m.it.step(&mut m.cpu, &mut m.p),
        Err(x86::Fault::Exception(x86::Exception::GeneralProtection(
            0x20
        )))
    );
    // Beyond the GDT limit.
    m.cpu.gpr[1] = 0x28;
    assert_eq!(
        m.it.step(&mut m.cpu, &mut m.p),
        Err(x86::Fault::Exception(x86::Exception::GeneralProtection(
            0x28
        )))
    );
}
