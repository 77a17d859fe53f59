//! The MMU: accessed/dirty bits, write protection, SMAP/SMEP, large pages, reserved bits,
//! the other paging modes, MMIO, and locked operations shared with other threads.

use iced_x86::code_asm::*;
use x86::{CodeCoherence, CpuState, Exception, Interpreter};

use crate::common::{PTE_A, PTE_D, PTE_P, PTE_PS, PTE_U, PTE_W, PageTables, TestPlatform};
use crate::{CODE, DATA, USER, Vm};

fn pf(address: u64, error_code: u32) -> Exception {
    Exception::PageFault {
        address,
        error_code,
    }
}

#[test]
fn accessed_and_dirty_bits() {
    let mut vm = Vm::long(0);
    vm.code(|a| {
        a.mov(rax, qword_ptr(DATA))?;
        a.mov(qword_ptr(DATA + 0x1008), rax)
    });
    let leaf0 = vm.pt.leaf(&vm.p, DATA);
    let leaf1 = vm.pt.leaf(&vm.p, DATA + 0x1000);
    assert_eq!(vm.p.read_u64(leaf0) & (PTE_A | PTE_D), 0);
    vm.step().expect("read");
    assert_eq!(
        vm.p.read_u64(leaf0) & (PTE_A | PTE_D),
        PTE_A,
        "a read sets A only"
    );
    // Every level on the way is accessed too.
    let pml4e = vm.p.read_u64(vm.pt.pml4 + ((DATA >> 39) & 511) * 8);
    assert_ne!(pml4e & PTE_A, 0);
    vm.step().expect("write");
    assert_eq!(vm.p.read_u64(leaf1) & (PTE_A | PTE_D), PTE_A | PTE_D);
}

#[test]
fn write_protect_for_the_kernel() {
    let mut vm = Vm::long(0);
    vm.code(|a| a.mov(dword_ptr(CODE + 0x800), eax));
    assert_eq!(vm.exception(), pf(CODE + 0x800, 0b011));
    // CR0.WP clear: the kernel may write read-only pages.
    vm.cpu.cr0 &= !x86::ctl::CR0_WP;
    vm.cpu.gpr[0] = 0xfeed;
    vm.step().expect("write with WP clear");
    let mut b = [0u8; 4];
    vm.p.read(CODE + 0x800, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xfeed);
}

#[test]
fn smap_and_smep() {
    let mut vm = Vm::long(0);
    vm.cpu.cr4 |= x86::ctl::CR4_SMAP | x86::ctl::CR4_SMEP;
    vm.code(|a| {
        a.mov(rax, qword_ptr(USER))?;
        a.stac()?;
        a.mov(rax, qword_ptr(USER))?;
        a.jmp(USER)
    });
    vm.p.write_u64(USER, 99);
    assert_eq!(
        vm.exception(),
        pf(USER, 0b001),
        "SMAP: kernel read of a user page"
    );
    vm.cpu.rip += crate::insn_len(&vm, CODE);
    vm.step().expect("stac");
    vm.step().expect("read with AC set");
    assert_eq!(vm.cpu.gpr[0], 99);
    vm.step().expect("jmp");
    assert_eq!(
        vm.exception(),
        pf(USER, 0b10001),
        "SMEP: kernel fetch from a user page"
    );
}

#[test]
fn large_pages() {
    let p = TestPlatform::new(8 << 20);
    let pt = PageTables::new(&p, 0x1000);
    // PML4[0] -> PDPT at 0x2000; PDPT[1] = 1 GiB page at 0; PDPT[0] -> PD at 0x3000 with a
    // 2 MiB page mapping 0x20_0000..0x40_0000 to 0x60_0000.
    p.write_u64(pt.pml4, 0x2000 | PTE_P | PTE_W | PTE_U);
    p.write(0x2000, &[0u8; 4096]);
    p.write(0x3000, &[0u8; 4096]);
    p.write_u64(0x2000, 0x3000 | PTE_P | PTE_W | PTE_U);
    p.write_u64(0x2008, PTE_P | PTE_W | PTE_PS);
    p.write_u64(0x3000 + 8, 0x60_0000 | PTE_P | PTE_W | PTE_PS);
    // Code at 0x4000_1000 (the 1 GiB page maps it to physical 0x1000... use 0x5000).
    let mut p = p;
    let mut a = CodeAssembler::new(64).expect("asm");
    a.mov(rax, qword_ptr(0x20_1238u64)).expect("mov");
    a.mov(rbx, qword_ptr(0x4000_0000u64 + 0x60_1238))
        .expect("mov");
    let code = a.assemble(0x4000_5000).expect("assemble");
    p.write(0x5000, &code);
    p.write_u64(0x60_1238, 0xabcd);
    let mut cpu = CpuState::long_mode(pt.pml4, 0);
    cpu.rip = 0x4000_5000;
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    it.step(&mut cpu, &mut p).expect("2 MiB page");
    assert_eq!(cpu.gpr[0], 0xabcd);
    it.step(&mut cpu, &mut p).expect("1 GiB page");
    assert_eq!(cpu.gpr[3], 0xabcd);
    // The 2 MiB leaf got A set, not D.
    assert_eq!(p.read_u64(0x3008) & (PTE_A | PTE_D), PTE_A);
}

#[test]
fn reserved_bits() {
    let mut vm = Vm::long(0);
    vm.cpu.efer &= !x86::ctl::EFER_NXE;
    // With NXE clear, bit 63 is reserved: the NX data pages now fault with RSVD.
    vm.code(|a| a.mov(rax, qword_ptr(DATA)));
    assert_eq!(vm.exception(), pf(DATA, 0b1001));
}

#[test]
fn legacy_32bit_and_pae_paging() {
    // 32-bit paging: CR3 -> PD (4 MiB page for 0..4M identity, PSE), PD[1] -> PT.
    let mut p = TestPlatform::new(16 << 20);
    p.write(0x1000, &[0u8; 4096]);
    p.write(0x2000, &[0u8; 4096]);
    let pd = 0x1000u64;
    p.write(pd, &(PTE_P | PTE_W | PTE_PS).to_le_bytes()[..4]);
    p.write(pd + 4, &((0x2000 | PTE_P | PTE_W) as u32).to_le_bytes());
    // Linear 0x40_3000 -> physical 0x80_5000.
    p.write(
        0x2000 + 3 * 4,
        &((0x80_5000 | PTE_P | PTE_W) as u32).to_le_bytes(),
    );
    p.write(0x80_5010, &0x5566_7788u32.to_le_bytes());
    let mut cpu = CpuState::protected_mode32(0);
    cpu.cr0 |= x86::ctl::CR0_PG;
    cpu.cr4 |= x86::ctl::CR4_PSE;
    cpu.cr3 = pd;
    let mut a = CodeAssembler::new(32).expect("asm");
    a.mov(eax, dword_ptr(0x40_3010u32)).expect("mov");
    p.write(0x8000, &a.assemble(0x8000).expect("assemble"));
    cpu.rip = 0x8000;
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    it.step(&mut cpu, &mut p).expect("32-bit paging");
    assert_eq!(cpu.gpr[0], 0x5566_7788);
    let pde = u32::from_le_bytes(read4(&p, pd + 4));
    assert_ne!(u64::from(pde) & PTE_A, 0, "A set in a 4-byte entry");

    // PAE: PDPT at 0x3000 (32-byte aligned) -> PD at 0x4000 -> 2 MiB page.
    let mut p = TestPlatform::new(16 << 20);
    for t in [0x3000u64, 0x4000] {
        p.write(t, &[0u8; 4096]);
    }
    p.write_u64(0x3000, 0x4000 | PTE_P);
    p.write_u64(0x4000, PTE_P | PTE_W | PTE_PS); // 0..2M identity
    p.write_u64(0x4008, 0xa0_0000 | PTE_P | PTE_W | PTE_PS); // 2M..4M -> 10M
    p.write(0xa0_0020, &0x99u32.to_le_bytes());
    let mut cpu = CpuState::protected_mode32(0);
    cpu.cr0 |= x86::ctl::CR0_PG;
    cpu.cr4 |= x86::ctl::CR4_PAE;
    cpu.cr3 = 0x3000;
    let mut a = CodeAssembler::new(32).expect("asm");
    a.mov(ecx, dword_ptr(0x20_0020u32)).expect("mov");
    p.write(0x8000, &a.assemble(0x8000).expect("assemble"));
    cpu.rip = 0x8000;
    let mut it = Interpreter::new(CodeCoherence::Tracked);
    it.step(&mut cpu, &mut p).expect("PAE paging");
    assert_eq!(cpu.gpr[1], 0x99);
}

fn read4(p: &TestPlatform, gpa: u64) -> [u8; 4] {
    let mut b = [0u8; 4];
    p.read(gpa, &mut b);
    b
}

#[test]
fn mmio_accesses_reach_the_platform() {
    let mut vm = Vm::long(0);
    // Map a page of the guest-physical space beyond RAM (16 MiB) at 0x80_0000.
    vm.pt.map(&vm.p, 0x80_0000, 0xfee0_0000, PTE_W);
    vm.code(|a| {
        a.mov(eax, dword_ptr(0x80_00f0u64))?;
        a.mov(word_ptr(0x80_0b00u64), 0x1234)?;
        a.lock().add(dword_ptr(0x80_0010u64), 1)
    });
    vm.p.mmio_value = 0x11;
    vm.step().expect("mmio read");
    assert_eq!(vm.cpu.gpr[0], 0x1111_1111);
    assert_eq!(vm.p.mmio_reads, vec![(0xfee0_00f0, 4)]);
    vm.step().expect("mmio write");
    assert_eq!(vm.p.mmio_writes, vec![(0xfee0_0b00, vec![0x34, 0x12])]);
    vm.step().expect("locked mmio rmw");
    assert_eq!(vm.p.mmio_reads.last(), Some(&(0xfee0_0010, 4)));
    assert_eq!(
        vm.p.mmio_writes.last(),
        Some(&(0xfee0_0010, vec![0x12, 0x11, 0x11, 0x11]))
    );
}

#[test]
fn locked_increments_are_atomic_across_threads() {
    // Four threads, each its own interpreter and CPU state over one guest RAM, run a
    // loop of `lock inc qword [DATA]` (and lock xadd / xchg-based increments) while the
    // host also increments the same counter with a host atomic.
    const ITER: u64 = 20_000;
    let vm = Vm::long(0);
    let mem = vm.p.mem.clone();
    let mut code = CodeAssembler::new(64).expect("asm");
    let mut top = code.create_label();
    (|| -> Result<(), IcedError> {
        code.set_label(&mut top)?;
        code.lock().inc(qword_ptr(DATA))?;
        code.mov(eax, 1)?;
        code.lock().xadd(qword_ptr(DATA), rax)?;
        code.dec(rcx)?;
        code.jnz(top)?;
        code.hlt()
    })()
    .expect("assemble");
    let bytes = code.assemble(CODE).expect("assemble");
    vm.p.write(CODE, &bytes);
    vm.p.write_u64(DATA, 0);
    let base_cpu = vm.cpu.clone();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let mut p = TestPlatform::with_memory(mem.clone());
            let mut cpu = base_cpu.clone();
            cpu.gpr[1] = ITER;
            std::thread::spawn(move || {
                let mut it = Interpreter::new(CodeCoherence::Tracked);
                loop {
                    let out = it.run(&mut cpu, &mut p, 1_000_000).expect("run");
                    if out.exit == x86::RunExit::Halt {
                        break;
                    }
                }
            })
        })
        .collect();
    // The host side: atomic adds on the same guest word.
    use vm_memory::{GuestMemory, VolatileMemory};
    let slice = mem
        .get_slices(
            vm_memory::GuestAddress(DATA),
            8,
            vm_memory::Permissions::ReadWrite,
        )
        .expect("slice")
        .next()
        .expect("slice")
        .expect("slice");
    let counter = slice
        .get_atomic_ref::<std::sync::atomic::AtomicU64>(0)
        .expect("atomic");
    for _ in 0..ITER {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(vm.p.read_u64(DATA), 4 * 2 * ITER + ITER);
}

/// The TLB keeps translations across calls (a changed PTE is not seen) until invlpg or a
/// CR3 write, as hardware does; invlpg of one page leaves the others cached.
#[test]
fn tlb_survives_calls_until_invlpg() {
    let mut vm = Vm::long(0);
    let lin = 0x90_0000u64;
    let (x, y) = (0x80_0000u64, 0x81_0000u64);
    vm.p.write_u64(x, 0x1111);
    vm.p.write_u64(y, 0x2222);
    vm.pt.map(&vm.p, lin, x, PTE_W);
    vm.pt.map(&vm.p, lin + 0x1000, x, PTE_W);
    vm.code(|a| {
        a.mov(rax, qword_ptr(lin))?;
        a.mov(rbx, qword_ptr(lin + 0x1000))?;
        a.hlt()?;
        a.invlpg(byte_ptr(lin))?;
        a.mov(rax, qword_ptr(lin))?;
        a.mov(rbx, qword_ptr(lin + 0x1000))?;
        a.hlt()
    });
    vm.run(10).expect("first");
    assert_eq!((vm.cpu.gpr[0], vm.cpu.gpr[3]), (0x1111, 0x1111));
    // Remap both pages behind the TLB's back.
    let leaf = vm.pt.leaf(&vm.p, lin);
    vm.p.write_u64(leaf, y | PTE_P | PTE_W);
    vm.p.write_u64(leaf + 8, y | PTE_P | PTE_W);
    vm.run(10).expect("second");
    assert_eq!(vm.cpu.gpr[0], 0x2222, "invlpg dropped this page");
    assert_eq!(vm.cpu.gpr[3], 0x1111, "the other page is still cached");
    // A CR3 write drops everything.
    vm.code_at(CODE + 0x100, |a| {
        a.mov(rcx, cr3)?;
        a.mov(cr3, rcx)?;
        a.mov(rbx, qword_ptr(lin + 0x1000))?;
        a.hlt()
    });
    vm.cpu.rip = CODE + 0x100;
    vm.run(10).expect("third");
    assert_eq!(vm.cpu.gpr[3], 0x2222);
}

/// invlpg of any address in a large page forgets every 4 KiB piece the TLB holds of it.
#[test]
fn invlpg_in_a_large_page() {
    let mut vm = Vm::long(0);
    // A 2 MiB page at linear 0x4000_0000 (PML4[0] -> PDPT[1] -> PD[0]).
    let pd = 0xe0_0000u64;
    vm.p.write(pd, &[0u8; 4096]);
    let pdpt = vm.p.read_u64(vm.pt.pml4) & 0x000f_ffff_ffff_f000;
    vm.p.write_u64(pdpt + 8, pd | PTE_P | PTE_W);
    vm.p.write_u64(pd, 0x20_0000 | PTE_P | PTE_W | PTE_PS);
    vm.p.write_u64(0x20_0000 + 0x1000, 0xaaaa);
    vm.p.write_u64(0x40_0000 + 0x1000, 0xbbbb);
    vm.code(|a| {
        a.mov(rax, qword_ptr(0x4000_1000u64))?;
        a.hlt()?;
        a.invlpg(byte_ptr(0x4010_0000u64))?;
        a.mov(rax, qword_ptr(0x4000_1000u64))?;
        a.hlt()
    });
    vm.run(10).expect("first");
    assert_eq!(vm.cpu.gpr[0], 0xaaaa);
    vm.p.write_u64(pd, 0x40_0000 | PTE_P | PTE_W | PTE_PS);
    vm.run(10).expect("second");
    assert_eq!(vm.cpu.gpr[0], 0xbbbb);
}

/// With CR4.PGE, a CR3 write keeps global translations (G set) and drops the others.
#[test]
fn global_pages_survive_cr3_writes() {
    let mut vm = Vm::long(0);
    let (g, ng) = (0x90_0000u64, 0x91_0000u64);
    let (x, y) = (0x80_0000u64, 0x81_0000u64);
    vm.p.write_u64(x, 0x1111);
    vm.p.write_u64(y, 0x2222);
    vm.pt.map(&vm.p, g, x, PTE_W | (1 << 8));
    vm.pt.map(&vm.p, ng, x, PTE_W);
    vm.code(|a| {
        a.mov(rax, qword_ptr(g))?;
        a.mov(rbx, qword_ptr(ng))?;
        a.hlt()?;
        a.mov(rcx, cr3)?;
        a.mov(cr3, rcx)?;
        a.mov(rax, qword_ptr(g))?;
        a.mov(rbx, qword_ptr(ng))?;
        a.hlt()
    });
    vm.run(10).expect("first");
    assert_eq!((vm.cpu.gpr[0], vm.cpu.gpr[3]), (0x1111, 0x1111));
    let (lg, lng) = (vm.pt.leaf(&vm.p, g), vm.pt.leaf(&vm.p, ng));
    vm.p.write_u64(lg, y | PTE_P | PTE_W | (1 << 8));
    vm.p.write_u64(lng, y | PTE_P | PTE_W);
    vm.run(10).expect("second");
    assert_eq!(vm.cpu.gpr[0], 0x1111, "global: still the old translation");
    assert_eq!(vm.cpu.gpr[3], 0x2222, "not global: walked again");
}

/// A block the kernel ran is not reachable from user mode through the code cache: the
/// fetch is checked against the user's view of the page.
#[test]
fn user_mode_cannot_reuse_kernel_blocks() {
    let mut vm = Vm::long(0);
    // Kernel code at CODE (supervisor only), user code in the USER page.
    vm.code(|a| {
        a.mov(eax, 7)?;
        a.hlt()
    });
    vm.run(10).expect("kernel");
    assert_eq!(vm.cpu.gpr[0], 7);
    vm.code_at(USER, |a| a.jmp(CODE));
    vm.cpu.seg[x86::SegReg::Cs as usize] = x86::Segment::flat(0x33, 0xb, 3, false, true);
    vm.cpu.seg[x86::SegReg::Ss as usize] = x86::Segment::flat(0x2b, 0x3, 3, true, false);
    vm.cpu.rip = USER;
    vm.cpu.gpr[0] = 0;
    vm.run(1).expect("jmp");
    assert_eq!(
        vm.exception(),
        pf(CODE, 0x15),
        "user fetch from a kernel page"
    );
    assert_eq!(vm.cpu.gpr[0], 0);
}
