//! rep movs/stos in bulk: long runs across pages, both directions, overlap, the restart
//! that lets the run loop see interrupts, MMIO destinations, and code overwritten by them.

use iced_x86::code_asm::*;
use x86::RunExit;

use crate::common::{PTE_NX, PTE_W};
use crate::{CODE, Vm};

const BIG: u64 = 0x80_0000;
const BIG_LEN: u64 = 0x20_0000;

fn vm_with_big_buffer() -> Vm {
    let mut vm = Vm::long(0);
    let pt = &mut vm.pt;
    pt.identity(&vm.p, BIG, BIG_LEN, PTE_W | PTE_NX);
    vm
}

fn run_to_halt(vm: &mut Vm) -> u64 {
    let mut executed = 0;
    for _ in 0..1000 {
        let out = vm.run(1_000_000).expect("run");
        executed += out.executed;
        if out.exit == RunExit::Halt {
            return executed;
        }
    }
    panic!("no hlt");
}

#[test]
fn two_mib_memset_restarts_between_slices() {
    let mut vm = vm_with_big_buffer();
    vm.code(|a| {
        a.mov(rdi, BIG)?;
        a.mov(rcx, BIG_LEN / 8)?;
        a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
        a.rep().stosq()?;
        a.hlt()
    });
    let executed = run_to_halt(&mut vm);
    assert_eq!(vm.cpu.gpr[1], 0);
    assert_eq!(vm.cpu.gpr[7], BIG + BIG_LEN);
    for off in (0..BIG_LEN).step_by(0x1ff8) {
        assert_eq!(
            vm.p.read_u64(BIG + off),
            0x0123_4567_89ab_cdef,
            "at {off:#x}"
        );
    }
    // 2 MiB in 64 KiB slices: the rep instruction ran (restarted) 32 times.
    assert_eq!(executed, 3 + 32 + 1);
}

#[test]
fn backward_overlapping_copy_across_pages() {
    let mut vm = vm_with_big_buffer();
    let src = BIG + 0xff0;
    let pattern: Vec<u8> = (0..0x40u8).collect();
    vm.p.write(src, &pattern);
    // memmove(src + 3, src, 0x40) done backwards, as memmove does for overlap.
    vm.code(|a| {
        a.std()?;
        a.mov(rsi, src + 0x3f)?;
        a.mov(rdi, src + 0x3f + 3)?;
        a.mov(ecx, 0x40)?;
        a.rep().movsb()?;
        a.cld()?;
        a.hlt()
    });
    run_to_halt(&mut vm);
    let mut out = vec![0u8; 0x43];
    vm.p.read(src, &mut out);
    assert_eq!(&out[3..], &pattern[..]);
    assert_eq!(&out[..3], &pattern[..3], "untouched below the copy");
    assert_eq!(vm.cpu.gpr[6], src - 1);
    assert_eq!(vm.cpu.gpr[7], src + 2);

    // Forward with the destination just above the source replicates the first bytes.
    let mut vm = vm_with_big_buffer();
    vm.p.write(BIG, &[1, 2, 3, 4]);
    vm.code(|a| {
        a.mov(rsi, BIG)?;
        a.mov(rdi, BIG + 2)?;
        a.mov(ecx, 0x2000)?;
        a.rep().movsb()?;
        a.hlt()
    });
    run_to_halt(&mut vm);
    let mut out = vec![0u8; 0x2002];
    vm.p.read(BIG, &mut out);
    for (k, b) in out.iter().enumerate() {
        assert_eq!(*b, [1, 2][k % 2], "byte {k}");
    }
}

#[test]
fn rep_movs_to_mmio_goes_element_by_element() {
    let mut vm = Vm::long(0);
    let mmio = 0x4000_0000u64;
    vm.pt.map(&vm.p, mmio, mmio, PTE_W | PTE_NX);
    vm.code(|a| {
        a.mov(rsi, crate::DATA)?;
        a.mov(rdi, mmio)?;
        a.mov(ecx, 5)?;
        a.rep().movsd()?;
        a.hlt()
    });
    run_to_halt(&mut vm);
    let writes: Vec<(u64, usize)> =
        vm.p.mmio_writes
            .iter()
            .map(|(a, d)| (*a, d.len()))
            .collect();
    assert_eq!(
        writes,
        (0..5).map(|k| (mmio + 4 * k, 4)).collect::<Vec<_>>()
    );
}

#[test]
fn rep_movs_overwriting_code_invalidates_it() {
    let mut vm = Vm::long(0);
    vm.pt.identity(&vm.p, CODE, 0x1000, PTE_W);
    let target = CODE + 0x200;
    vm.code_at(target, |a| {
        a.mov(eax, 1)?;
        a.ret()
    });
    // The replacement, staged in DATA.
    let mut a = CodeAssembler::new(64).expect("asm");
    a.mov(eax, 2).expect("asm");
    a.ret().expect("asm");
    let new = a.assemble(target).expect("asm");
    vm.p.write(crate::DATA, &new);
    vm.code(|a| {
        a.call(target)?;
        a.mov(ebx, eax)?;
        a.mov(rsi, crate::DATA)?;
        a.mov(rdi, target)?;
        a.mov(ecx, new.len() as u32)?;
        a.rep().movsb()?;
        a.call(target)?;
        a.hlt()
    });
    run_to_halt(&mut vm);
    assert_eq!(vm.cpu.gpr[3], 1);
    assert_eq!(vm.cpu.gpr[0], 2, "the rewritten function ran");
}
