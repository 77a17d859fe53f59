//! Runs one instruction on the real CPU: a stub at a fixed low address loads every GPR,
//! RFLAGS, XMM0-15 and MXCSR from a state block, jumps to the instruction, and stores
//! them all back. The instruction's memory operands point into a data window at a fixed
//! address that the interpreter's guest maps at the same linear address.

use std::sync::Mutex;

use iced_x86::code_asm::*;

/// Layout of one slot (each test thread takes a slot so tests can run in parallel).
pub const SLOT_SIZE: u64 = 0x20_0000;
pub const SLOTS: usize = 4;
pub const FIRST_SLOT: u64 = 0x6000_0000;
pub const INSN_OFF: u64 = 0x800;
/// Close enough to the instruction for rel8 branches to reach exit B.
pub const EXIT_A_OFF: u64 = 0x820;
pub const EXIT_B_OFF: u64 = 0x840;
pub const STATE_OFF: u64 = 0x4000;
/// The 32-bit (compatibility mode) variant: a 64-bit entry that far-returns to 32-bit code
/// through Linux's user code segment 0x23, the instruction slot and its exits, and the
/// way back through 0x33.
pub const ENTRY32_OFF: u64 = 0x200;
pub const TO32_OFF: u64 = 0x300;
pub const INSN32_OFF: u64 = 0xa00;
pub const EXIT_A32_OFF: u64 = 0xa20;
pub const EXIT_B32_OFF: u64 = 0xa40;
pub const SAVE32_OFF: u64 = 0xa60;
pub const BACK64_OFF: u64 = 0xc00;
/// A small stack below 4 GiB for the 32-bit stub's own pushes.
const STUB_STACK_OFF: u64 = 0x4f00;
pub const USER_CS32: u16 = 0x23;
pub const USER_DS: u16 = 0x2b;
const USER_CS64: u16 = 0x33;
pub const DATA_OFF: u64 = 0x10000;
pub const DATA_LEN: usize = 0x2000;

/// Register state handed to and from the stub.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegState {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub host_rsp: u64,
    /// 0: the instruction fell through; 1: it branched to the exit-B label.
    pub path: u64,
    pub mxcsr: u32,
    pub host_mxcsr: u32,
    pub xmm: [u128; 16],
    /// The rest of the XSAVE-managed state, moved with xrstor/xsave (not read by the stub
    /// directly).
    pub x87: X87,
    pub ymm_hi: [u128; 16],
    pub opmask: [u64; 8],
    pub zmm_hi256: [[u128; 2]; 16],
    pub hi16_zmm: [[u128; 4]; 16],
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X87 {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub st: [u128; 8],
}

/// XSAVE areas in the slot: input (loaded by xrstor) and output (written by xsave).
pub const XIN_OFF: u64 = 0x5000;
pub const XOUT_OFF: u64 = 0x6000;
pub const XAREA: usize = 0x1000;

/// Host XCR0.
pub fn xcr0() -> u64 {
    static XCR0: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *XCR0.get_or_init(|| {
        let (lo, hi): (u32, u32);
        // SAFETY: xgetbv with ECX = 0 only reads XCR0 (OSXSAVE is on in every Linux we
        // run on).
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack))
        };
        (u64::from(hi) << 32) | u64::from(lo)
    })
}

/// Components the harness moves (see `host_model`).
pub fn rfbm() -> u64 {
    crate::host_model::xsave_components()
}

/// Standard-format offset of XSAVE component `c`.
pub fn comp_offset(c: u32) -> usize {
    crate::host_model::component(c).0
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

fn u128_at(b: &[u8], off: usize) -> u128 {
    u128::from_le_bytes(b[off..off + 16].try_into().expect("16 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl RegState {
    /// The XSAVE image (standard format, every harness component present) of this state.
    pub fn xsave_image(&self) -> Vec<u8> {
        let mut b = vec![0u8; XAREA];
        let x = &self.x87;
        put(&mut b, 0, &x.fcw.to_le_bytes());
        put(&mut b, 2, &x.fsw.to_le_bytes());
        b[4] = x.ftw;
        put(&mut b, 6, &x.fop.to_le_bytes());
        put(&mut b, 8, &x.fip.to_le_bytes());
        put(&mut b, 16, &x.fdp.to_le_bytes());
        put(&mut b, 24, &self.mxcsr.to_le_bytes());
        for k in 0..8 {
            put(&mut b, 32 + 16 * k, &x.st[k].to_le_bytes()[..10]);
        }
        for k in 0..16 {
            put(&mut b, 160 + 16 * k, &self.xmm[k].to_le_bytes());
        }
        let rfbm = rfbm();
        put(&mut b, 512, &rfbm.to_le_bytes());
        if rfbm & 4 != 0 {
            let o = comp_offset(2);
            for k in 0..16 {
                put(&mut b, o + 16 * k, &self.ymm_hi[k].to_le_bytes());
            }
        }
        if rfbm & 0xe0 == 0xe0 {
            let o = comp_offset(5);
            for k in 0..8 {
                put(&mut b, o + 8 * k, &self.opmask[k].to_le_bytes());
            }
            let o = comp_offset(6);
            for k in 0..16 {
                for j in 0..2 {
                    put(
                        &mut b,
                        o + 32 * k + 16 * j,
                        &self.zmm_hi256[k][j].to_le_bytes(),
                    );
                }
            }
            let o = comp_offset(7);
            for k in 0..16 {
                for j in 0..4 {
                    put(
                        &mut b,
                        o + 64 * k + 16 * j,
                        &self.hi16_zmm[k][j].to_le_bytes(),
                    );
                }
            }
        }
        b
    }

    /// Reads the state back from a standard-format XSAVE image (absent components are in
    /// their initial configuration).
    pub fn load_xsave_image(&mut self, b: &[u8]) {
        let bv = u64_at(b, 512);
        self.mxcsr = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
        if bv & 1 != 0 {
            let x = &mut self.x87;
            x.fcw = u16::from_le_bytes([b[0], b[1]]);
            x.fsw = u16::from_le_bytes([b[2], b[3]]);
            x.ftw = b[4];
            x.fop = u16::from_le_bytes([b[6], b[7]]);
            x.fip = u64_at(b, 8);
            x.fdp = u64_at(b, 16);
            for k in 0..8 {
                x.st[k] = u128_at(b, 32 + 16 * k) & ((1u128 << 80) - 1);
            }
        } else {
            self.x87 = X87 {
                fcw: 0x37f,
                ..X87::default()
            };
        }
        for k in 0..16 {
            self.xmm[k] = if bv & 2 != 0 {
                u128_at(b, 160 + 16 * k)
            } else {
                0
            };
        }
        let o = comp_offset(2);
        for k in 0..16 {
            self.ymm_hi[k] = if bv & 4 != 0 {
                u128_at(b, o + 16 * k)
            } else {
                0
            };
        }
        if rfbm() & 0xe0 == 0xe0 {
            for k in 0..8 {
                self.opmask[k] = if bv & 0x20 != 0 {
                    u64_at(b, comp_offset(5) + 8 * k)
                } else {
                    0
                };
            }
            for k in 0..16 {
                for j in 0..2 {
                    self.zmm_hi256[k][j] = if bv & 0x40 != 0 {
                        u128_at(b, comp_offset(6) + 32 * k + 16 * j)
                    } else {
                        0
                    };
                }
                for j in 0..4 {
                    self.hi16_zmm[k][j] = if bv & 0x80 != 0 {
                        u128_at(b, comp_offset(7) + 64 * k + 16 * j)
                    } else {
                        0
                    };
                }
            }
        }
    }
}

const O_GPR: u64 = 0;
const O_RFLAGS: u64 = 0x80;
const O_HOST_RSP: u64 = 0x88;
const O_PATH: u64 = 0x90;
const O_HOST_MXCSR: u64 = 0x9c;

pub struct Native {
    pub base: u64,
}

static SLOT_LOCKS: [Mutex<bool>; SLOTS] = [const { Mutex::new(false) }; SLOTS];

/// A claimed slot; dropping it releases the slot.
pub struct Slot {
    pub native: Native,
    _guard: std::sync::MutexGuard<'static, bool>,
}

impl Slot {
    /// Claims a free slot, mapping and assembling it on first use.
    pub fn claim() -> Slot {
        loop {
            for (k, lock) in SLOT_LOCKS.iter().enumerate() {
                let g = match lock.try_lock() {
                    Ok(g) => Some(g),
                    // A test that failed while holding the slot left it consistent.
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                if let Some(mut g) = g {
                    let base = FIRST_SLOT + k as u64 * SLOT_SIZE;
                    if !*g {
                        map_slot(base);
                        *g = true;
                    }
                    let native = Native { base };
                    native.assemble_stub();
                    return Slot { native, _guard: g };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

fn map_slot(base: u64) {
    // SAFETY: a fresh anonymous mapping at an address nothing else in this process uses
    // (MAP_FIXED_NOREPLACE fails instead of replacing an existing mapping).
    let p = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            0x20000,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(
        p as u64, base,
        "could not map the native test slot at {base:#x}"
    );
}

impl Native {
    pub fn insn_addr(&self) -> u64 {
        self.base + INSN_OFF
    }
    pub fn exit_b(&self) -> u64 {
        self.base + EXIT_B_OFF
    }
    pub fn insn32_addr(&self) -> u64 {
        self.base + INSN32_OFF
    }
    pub fn exit_b32(&self) -> u64 {
        self.base + EXIT_B32_OFF
    }
    pub fn data_addr(&self) -> u64 {
        self.base + DATA_OFF
    }
    fn state_addr(&self) -> u64 {
        self.base + STATE_OFF
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        assert!(addr >= self.base && addr + bytes.len() as u64 <= self.base + 0x20000);
        // SAFETY: inside this slot's mapping (checked above), which only this thread uses
        // while it holds the slot.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) }
    }

    fn get(&self, addr: u64, out: &mut [u8]) {
        assert!(addr >= self.base && addr + out.len() as u64 <= self.base + 0x20000);
        // SAFETY: as in `put`.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) }
    }

    fn assemble_stub(&self) {
        let s = self.state_addr();
        let mut a = CodeAssembler::new(64).expect("assembler");
        let regs = [
            rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
        ];
        // Prologue: save callee-saved registers, load the test state.
        (|| -> Result<(), IcedError> {
            for r in [rbx, rbp, r12, r13, r14, r15] {
                a.push(r)?;
            }
            a.mov(qword_ptr(s + O_HOST_RSP), rsp)?;
            a.stmxcsr(dword_ptr(s + O_HOST_MXCSR))?;
            // x87, SSE and AVX state all come from the XSAVE image.
            a.mov(eax, rfbm() as u32)?;
            a.xor(edx, edx)?;
            a.xrstor64(ptr(self.base + XIN_OFF))?;
            a.push(qword_ptr(s + O_RFLAGS))?;
            a.popfq()?;
            for (k, r) in regs.iter().enumerate() {
                if k != 4 {
                    a.mov(*r, qword_ptr(s + O_GPR + 8 * k as u64))?;
                }
            }
            a.mov(rsp, qword_ptr(s + O_GPR + 32))?;
            a.jmp(self.insn_addr())?;
            Ok(())
        })()
        .expect("prologue");
        let pro = a.assemble(self.base).expect("assemble prologue");
        assert!(pro.len() < INSN_OFF as usize);
        self.put(self.base, &pro);

        self.assemble_stub32();

        // Exit A (fall-through) and exit B (branch target) record the path, then both
        // jump to the common sequence that stores the state and returns to Rust.
        let a_bytes = {
            let mut e = CodeAssembler::new(64).expect("assembler");
            e.mov(qword_ptr(s + O_PATH), 0).expect("mov");
            e.jmp(self.base + EXIT_B_OFF + 0x20).expect("jmp");
            e.assemble(self.base + EXIT_A_OFF).expect("exit a")
        };
        assert!(a_bytes.len() <= (EXIT_B_OFF - EXIT_A_OFF) as usize);
        self.put(self.base + EXIT_A_OFF, &a_bytes);
        let b_bytes = {
            let mut e = CodeAssembler::new(64).expect("assembler");
            e.mov(qword_ptr(s + O_PATH), 1).expect("mov");
            e.jmp(self.base + EXIT_B_OFF + 0x20).expect("jmp");
            e.assemble(self.base + EXIT_B_OFF).expect("exit b")
        };
        assert!(b_bytes.len() <= 0x20);
        self.put(self.base + EXIT_B_OFF, &b_bytes);
        let save_bytes = {
            let mut e = CodeAssembler::new(64).expect("assembler");
            (|| -> Result<(), IcedError> {
                for (k, r) in regs.iter().enumerate() {
                    e.mov(qword_ptr(s + O_GPR + 8 * k as u64), *r)?;
                }
                e.mov(rsp, qword_ptr(s + O_HOST_RSP))?;
                e.pushfq()?;
                e.pop(rax)?;
                e.mov(qword_ptr(s + O_RFLAGS), rax)?;
                e.mov(eax, rfbm() as u32)?;
                e.xor(edx, edx)?;
                e.xsave64(ptr(self.base + XOUT_OFF))?;
                // Leave the FPU as Rust code expects it.
                e.fninit()?;
                e.ldmxcsr(dword_ptr(s + O_HOST_MXCSR))?;
                e.vzeroupper()?;
                e.cld()?;
                for r in [r15, r14, r13, r12, rbp, rbx] {
                    e.pop(r)?;
                }
                e.ret()?;
                Ok(())
            })()
            .expect("save");
            e.assemble(self.base + EXIT_B_OFF + 0x20).expect("save")
        };
        self.put(self.base + EXIT_B_OFF + 0x20, &save_bytes);
    }

    /// The compatibility-mode stub: same state handling, the instruction runs as 32-bit
    /// code with DS/ES/SS = 0x2b (flat).
    fn assemble_stub32(&self) {
        let s = self.state_addr();
        let regs32 = [eax, ecx, edx, ebx, esp, ebp, esi, edi];
        let asm = |bits: u32, at: u64, f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
            let mut a = CodeAssembler::new(bits).expect("assembler");
            f(&mut a).expect("assemble stub");
            let b = a.assemble(at).expect("assemble stub");
            self.put(at, &b);
            b.len()
        };
        let entry = |a: &mut CodeAssembler| -> Result<(), IcedError> {
            for r in [rbx, rbp, r12, r13, r14, r15] {
                a.push(r)?;
            }
            a.mov(qword_ptr(s + O_HOST_RSP), rsp)?;
            a.stmxcsr(dword_ptr(s + O_HOST_MXCSR))?;
            a.mov(eax, rfbm() as u32)?;
            a.xor(edx, edx)?;
            a.xrstor64(ptr(self.base + XIN_OFF))?;
            a.push(i32::from(USER_CS32))?;
            a.mov(rax, self.base + TO32_OFF)?;
            a.push(rax)?;
            // retfq (REX.W: pop an 8-byte RIP and CS).
            a.db(&[0x48, 0xcb])
        };
        assert!(asm(64, self.base + ENTRY32_OFF, &entry) < (TO32_OFF - ENTRY32_OFF) as usize);
        let to32 = |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.mov(eax, u32::from(USER_DS))?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(esp, (self.base + STUB_STACK_OFF) as u32)?;
            a.push(dword_ptr(s + O_RFLAGS))?;
            a.popfd()?;
            for (k, r) in regs32.iter().enumerate() {
                if k != 4 {
                    a.mov(*r, dword_ptr(s + O_GPR + 8 * k as u64))?;
                }
            }
            a.mov(esp, dword_ptr(s + O_GPR + 32))?;
            a.jmp(self.base + INSN32_OFF)
        };
        assert!(asm(32, self.base + TO32_OFF, &to32) < (INSN32_OFF - TO32_OFF) as usize);
        for (off, path) in [(EXIT_A32_OFF, 0u32), (EXIT_B32_OFF, 1)] {
            let exit = |a: &mut CodeAssembler| -> Result<(), IcedError> {
                a.mov(dword_ptr(s + O_PATH), path)?;
                a.jmp(self.base + SAVE32_OFF)
            };
            assert!(asm(32, self.base + off, &exit) <= 0x20);
        }
        let save = |a: &mut CodeAssembler| -> Result<(), IcedError> {
            for (k, r) in regs32.iter().enumerate() {
                a.mov(dword_ptr(s + O_GPR + 8 * k as u64), *r)?;
            }
            a.mov(esp, (self.base + STUB_STACK_OFF) as u32)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.mov(dword_ptr(s + O_RFLAGS), eax)?;
            a.cld()?;
            a.push(u32::from(USER_CS64))?;
            a.push((self.base + BACK64_OFF) as u32)?;
            a.retf()
        };
        assert!(asm(32, self.base + SAVE32_OFF, &save) < (BACK64_OFF - SAVE32_OFF) as usize);
        let back = |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.mov(rsp, qword_ptr(s + O_HOST_RSP))?;
            // 64-bit Linux runs with null DS/ES.
            a.xor(eax, eax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(eax, rfbm() as u32)?;
            a.xor(edx, edx)?;
            a.xsave64(ptr(self.base + XOUT_OFF))?;
            a.fninit()?;
            a.ldmxcsr(dword_ptr(s + O_HOST_MXCSR))?;
            a.vzeroupper()?;
            for r in [r15, r14, r13, r12, rbp, rbx] {
                a.pop(r)?;
            }
            a.ret()
        };
        assert!(asm(64, self.base + BACK64_OFF, &back) < 0x100);
    }

    /// Runs the 32-bit `insn` in compatibility mode (GPR inputs and outputs: low halves).
    pub fn run32(&self, insn: &[u8], regs: &RegState, data: &[u8]) -> (RegState, Vec<u8>) {
        self.run_at(
            insn,
            regs,
            data,
            self.insn32_addr(),
            self.base + EXIT_A32_OFF,
            self.base + ENTRY32_OFF,
        )
    }

    /// Runs `insn` (placed at `insn_addr`) with the given registers and data window.
    pub fn run(&self, insn: &[u8], regs: &RegState, data: &[u8]) -> (RegState, Vec<u8>) {
        self.run_at(
            insn,
            regs,
            data,
            self.insn_addr(),
            self.base + EXIT_A_OFF,
            self.base,
        )
    }

    fn run_at(
        &self,
        insn: &[u8],
        regs: &RegState,
        data: &[u8],
        at: u64,
        exit_a: u64,
        entry: u64,
    ) -> (RegState, Vec<u8>) {
        assert_eq!(data.len(), DATA_LEN);
        let mut code = insn.to_vec();
        // jmp rel32 to exit A.
        let after = at + insn.len() as u64 + 5;
        let rel = exit_a.wrapping_sub(after) as u32;
        code.push(0xe9);
        code.extend_from_slice(&rel.to_le_bytes());
        self.put(at, &code);
        self.put(self.data_addr(), data);
        let st = self.state_addr() as *mut RegState;
        // SAFETY: the state block is inside this slot's mapping, aligned, and owned by
        // this thread while it holds the slot.
        unsafe { st.write(*regs) };
        self.put(self.base + XIN_OFF, &regs.xsave_image());
        // The stub saves and restores every callee-saved register, the stack pointer and
        // MXCSR, clears DF, and returns; the instruction under test was generated to touch
        // only the data window and the registers (no faults, no privileged operations).
        // SAFETY: the slot's code is that stub, assembled above.
        unsafe {
            let f: extern "sysv64" fn() = std::mem::transmute(entry as usize);
            f();
        }
        // SAFETY: as for the write above.
        let mut out = unsafe { st.read() };
        let mut x = vec![0u8; XAREA];
        self.get(self.base + XOUT_OFF, &mut x);
        out.load_xsave_image(&x);
        let mut d = vec![0u8; DATA_LEN];
        self.get(self.data_addr(), &mut d);
        (out, d)
    }
}
