//! The public entry points: `step` (one instruction, for the KVM fallback), `run`/`run_with`
//! (blocks until a budget or an event, for the software CPU) and `deliver` (exceptions and
//! interrupts through the IDT).

use std::sync::Arc;

use iced_x86::Mnemonic;
use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use crate::cache::CodeCache;
use crate::code::CodeMap;
use crate::decode::Insn;
use crate::exception::{Event, Fault, UnsupportedInstruction};
use crate::hostmem::Tlb;
use crate::jit::{Entered, JitMode};
use crate::machine::{EXIT_RUN, EXIT_UNSUPPORTED, Machine, R, RIP, StopReason};
use crate::platform::{Layout, Platform};
use crate::state::{CpuState, rflags};

/// How the decoded-code cache learns that guest code changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CodeCoherence {
    /// Guest code can change behind the interpreter's back (KVM runs the guest between
    /// calls): every cached block is compared with the bytes in guest memory before use.
    #[default]
    Validate,
    /// Writes to guest code are seen: this interpreter's own stores, other interpreters'
    /// and devices' through a shared [`CodeMap`] (see [`Interpreter::with_code_map`]), and
    /// anything reported with [`Interpreter::invalidate_code_page`].
    Tracked,
}

/// Counters for the dispatcher and the CLI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Instructions completed.
    pub instructions: u64,
    /// Basic blocks decoded into the cache.
    pub blocks_decoded: u64,
    /// Blocks dropped because their code changed.
    pub blocks_invalidated: u64,
    /// Block lookups the jump cache could not answer.
    pub slow_lookups: u64,
    /// Guest page-table walks (software TLB misses).
    pub page_walks: u64,
    /// Whole-TLB flushes (CR3/CR0/CR4/EFER writes, changed context between calls).
    pub tlb_flushes: u64,
    /// Instructions run as translated code (counted in `instructions` too).
    pub translated_instructions: u64,
    /// Blocks translated.
    pub blocks_translated: u64,
    /// Runs ended in a spin loop ([`RunExit::PauseLoop`]).
    pub pause_loops: u64,
}

/// What one `step` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOutcome {
    /// The instruction that was executed.
    pub mnemonic: Mnemonic,
    /// The instruction was `hlt`: the vCPU waits for an interrupt.
    pub halted: bool,
}

/// Why `run` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// The instruction budget is used up.
    Budget,
    /// `hlt` executed (RIP is after it).
    Halt,
    /// [`RunLimits::stop_when_interruptible`] was set and RFLAGS.IF is 1 with no
    /// interrupt shadow: a pending interrupt can be delivered now.
    InterruptWindow,
    /// [`Platform::attention`] returned true between two blocks.
    Attention,
    /// The vCPU spins: many PAUSEs in this run (RIP is after the last). Like a
    /// pause-loop exit in hardware, a chance to let the vCPU it waits for run.
    PauseLoop,
}

/// What one `run` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    pub executed: u64,
    pub exit: RunExit,
}

/// When [`Interpreter::run_with`] returns besides faults and `hlt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Instructions to execute at most.
    pub budget: u64,
    /// Return [`RunExit::InterruptWindow`] as soon as maskable interrupts can be delivered
    /// (IF = 1 and no interrupt shadow), checked before the first block and after every
    /// block; blocks end after anything that changes IF. For a caller holding a pending
    /// interrupt while the guest runs with IF = 0.
    pub stop_when_interruptible: bool,
}

impl RunLimits {
    pub fn budget(budget: u64) -> Self {
        RunLimits {
            budget,
            stop_when_interruptible: false,
        }
    }
}

/// The interpreter for one vCPU: decoded-code cache, software TLB, counters. The CPU
/// state is passed in on every call, so the caller owns it (and can hand it to KVM).
pub struct Interpreter {
    cache: CodeCache,
    tlb: Box<Tlb>,
    coherence: CodeCoherence,
    /// Tracked mode: the VM's shared map, or a private one made at the first call.
    code: Option<Arc<CodeMap>>,
    /// The map's epoch the TLB's fast write entries were made under.
    code_epoch: u64,
    code_flushes: u64,
    /// Kept between calls so that writing code does not allocate.
    smc: Vec<u64>,
    /// Where the last trap (int n, int3, into) that ended a run returned to, and its
    /// length: a fault while delivering it is reported at the instruction itself.
    trap: Option<(u64, u8)>,
    /// What the TLB's contents were valid for when the last call ended: guest RAM's host
    /// layout and CR0, CR3, CR4, EFER. A `Tracked` interpreter keeps its TLB across calls
    /// that find the same (guest code cannot change translations behind it).
    kept: Option<(Layout, [u64; 4])>,
    instructions: u64,
    pause_loops: u64,
}

impl Default for Interpreter {
    fn default() -> Self {
        Self::new(CodeCoherence::default())
    }
}

impl Interpreter {
    /// An interpreter with its own code tracking (`Tracked`: a private [`CodeMap`] over the
    /// platform's RAM, made at the first call) or none (`Validate`).
    pub fn new(coherence: CodeCoherence) -> Self {
        Interpreter {
            cache: CodeCache::default(),
            tlb: Box::default(),
            coherence,
            code: None,
            code_epoch: 0,
            code_flushes: 0,
            smc: Vec::with_capacity(8),
            trap: None,
            kept: None,
            instructions: 0,
            pause_loops: 0,
        }
    }

    /// A `Tracked` interpreter sharing `code` with the VM's other interpreters (one per
    /// vCPU thread) and its devices (guest RAM from [`crate::guest_memory`]): writes by any
    /// of them invalidate what the others decoded.
    pub fn with_code_map(code: Arc<CodeMap>) -> Self {
        let mut i = Self::new(CodeCoherence::Tracked);
        i.code = Some(code);
        i
    }

    /// Refuses, from now on, the instructions the guest's CPUID does not offer: they
    /// come back as [`Fault::Unsupported`], for the caller to raise #UD as hardware does
    /// (the software CPU). Off by default: KVM's fallback runs what KVM's guest ran.
    pub fn enforce_cpuid(&mut self) {
        self.cache.enforce_cpuid = true;
        self.invalidate_all_code();
    }

    /// Turns the translating tier on, off or to check mode (off by default). `threshold`:
    /// how many times a block runs interpreted before it is translated (`None`: the
    /// default; 0 translates every block the first time it runs). Only `Tracked`
    /// interpreters translate.
    pub fn set_jit(&mut self, mode: JitMode, threshold: Option<u32>) {
        self.cache.jit.mode = if self.coherence == CodeCoherence::Tracked {
            mode
        } else {
            JitMode::Off
        };
        if let Some(t) = threshold {
            self.cache.jit.threshold = t.min(1 << 30);
        }
        self.invalidate_all_code();
    }

    pub fn stats(&self) -> Stats {
        Stats {
            instructions: self.instructions,
            blocks_decoded: self.cache.decoded,
            blocks_invalidated: self.cache.invalidated,
            slow_lookups: self.cache.slow_lookups,
            page_walks: self.tlb.walks,
            tlb_flushes: self.tlb.flushes,
            translated_instructions: self.cache.jit.instructions,
            blocks_translated: self.cache.jit.translated,
            pause_loops: self.pause_loops,
        }
    }

    /// Drops decoded code from the guest-physical page containing `gpa` (someone other
    /// than this interpreter wrote it: a device, another vCPU, the VMM). With a shared
    /// [`CodeMap`], the other interpreters drop theirs too.
    pub fn invalidate_code_page(&mut self, gpa: u64) {
        if let Some(map) = &self.code {
            map.wrote(gpa, 1);
        }
        self.cache.invalidate_page(gpa & !0xfff);
    }

    /// Up to `len` instruction bytes at CS:RIP, read through the guest's page tables
    /// (fewer if the code is not mapped): for reporting where a vCPU stopped.
    pub fn peek_code<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        len: usize,
    ) -> Vec<u8> {
        self.with_machine(cpu, platform, |m, _| {
            let mut buf = vec![0u8; len.min(4096)];
            let lin = m.code_linear(m.rip());
            let n = m.fetch(lin, &mut buf).unwrap_or(0);
            buf.truncate(n);
            buf
        })
    }

    /// Drops all decoded code and cached translations (for a caller that replaced the
    /// CPU state or guest memory wholesale).
    pub fn invalidate_all_code(&mut self) {
        self.cache.clear();
        self.kept = None;
        self.tlb.flush();
    }

    /// Executes the one instruction at RIP. On `Ok` the instruction completed; on
    /// `Err(Fault::Exception)` the state is as [`crate::Exception`] describes, for the
    /// caller to deliver; on `Err(Fault::Unsupported)` nothing changed.
    pub fn step<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
    ) -> Result<StepOutcome, Fault> {
        let (out, mnemonic) = self.execute(cpu, platform, RunLimits::budget(1))?;
        Ok(StepOutcome {
            mnemonic,
            halted: out.exit == RunExit::Halt,
        })
    }

    /// Executes up to `budget` instructions, block by block, stopping early at `hlt` or
    /// when the platform asks for attention. Exceptions end the run with the state as for
    /// `step`.
    pub fn run<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        budget: u64,
    ) -> Result<RunOutcome, Fault> {
        self.run_with(cpu, platform, RunLimits::budget(budget))
    }

    /// [`Interpreter::run`] with the stop conditions of `limits`.
    pub fn run_with<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        limits: RunLimits,
    ) -> Result<RunOutcome, Fault> {
        self.execute(cpu, platform, limits).map(|(o, _)| o)
    }

    /// Delivers an exception or interrupt: through the IDT in protected and long mode
    /// (gate checks, privilege change with the TSS stacks, IST, error codes, CR2 for #PF)
    /// or the IVT in real mode. RIP must be where the event returns to (the faulting
    /// instruction for faults, the next one for traps and interrupts: as `run` leaves it).
    /// A fault while delivering is combined with the event as the processor does (#DF, or
    /// [`Fault::TripleFault`], the only error). Clears the interrupt shadow.
    pub fn deliver<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        event: Event,
    ) -> Result<(), Fault> {
        let trap = self.trap.take();
        self.with_machine(cpu, platform, |m, _| {
            let len = match trap {
                Some((rip, len)) if rip == m.rip() => len,
                _ => 0,
            };
            m.deliver(event, len)
        })
    }

    /// Runs `f` against a machine over `cpu` and `platform`, then writes the working state
    /// back.
    fn with_machine<P: Platform, T>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        f: impl FnOnce(&mut Machine, &mut CodeCache) -> T,
    ) -> T {
        if self.coherence == CodeCoherence::Tracked && self.code.is_none() {
            self.code = private_code_map(platform.memory()).map(Arc::new);
        }
        // Host pointers cached by an earlier call are valid only if guest RAM is mapped as
        // it was (see hostmem), and translations only under the same control registers.
        // KVM changes page tables behind a `Validate` interpreter's back.
        let layout = Layout::of(platform.memory());
        let ctx = [cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer];
        let keep = self.coherence == CodeCoherence::Tracked
            && self.kept.is_some_and(|(l, c)| l.same(&layout) && c == ctx);
        if !keep {
            self.tlb.flush();
        }
        let mut m = Machine::new(cpu, &mut self.tlb, platform, self.code.as_deref());
        m.layout = layout;
        m.code_epoch = self.code_epoch;
        m.code_flushes = self.code_flushes;
        // Before anything writes through the kept TLB (an event's frame, say): a new
        // dirty-log round empties it.
        m.check_code_epoch();
        m.smc = std::mem::take(&mut self.smc);
        let r = f(&mut m, &mut self.cache);
        m.sync();
        self.code_epoch = m.code_epoch;
        self.code_flushes = m.code_flushes;
        self.smc = std::mem::take(&mut m.smc);
        self.smc.clear();
        let layout = m.layout;
        drop(m);
        self.kept = Some((layout, [cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer]));
        r
    }

    fn execute<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        limits: RunLimits,
    ) -> Result<(RunOutcome, Mnemonic), Fault> {
        let mut done = 0;
        let mut trap = None;
        let r = self.with_machine(cpu, platform, |m, cache| {
            run_loop(m, cache, limits, &mut done, &mut trap, limits.budget == 1)
        });
        self.trap = trap;
        self.instructions += done;
        if matches!(r, Ok((RunExit::PauseLoop, _))) {
            self.pause_loops += 1;
        }
        r.map(|(exit, mn)| {
            (
                RunOutcome {
                    executed: done,
                    exit,
                },
                mn,
            )
        })
    }
}

/// A code map over the platform's RAM regions, for an interpreter that owns its tracking.
fn private_code_map<M: GuestMemory>(mem: &M) -> Option<CodeMap> {
    let phys = mem.physical_memory()?;
    let ranges: Vec<_> = phys
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    Some(CodeMap::new(&ranges))
}

/// The hot loop: for each instruction set RIP to the next one and run its handler, until
/// one fails or asks to stop. Returns how many ran to completion, the RIP of the one that
/// stopped (if any) and its result.
#[inline(never)]
fn run_block(m: &mut Machine, insns: &[Insn], ip_mask: u64) -> (usize, u64, R) {
    let mut pc = m.rip();
    let mut it = insns.iter();
    while let Some(ins) = it.next() {
        let next = pc.wrapping_add(u64::from(ins.len)) & ip_mask;
        m.regs[RIP as usize] = next;
        let r = (ins.handler)(m, ins);
        if r.is_err() || m.exit != 0 {
            return (insns.len() - it.len() - 1, pc, r);
        }
        pc = next;
    }
    (insns.len(), pc, Ok(()))
}

/// `run_block` for the translating tier's check mode.
pub(crate) fn run_block_for_check(
    m: &mut Machine,
    insns: &[Insn],
    ip_mask: u64,
) -> (usize, u64, R) {
    run_block(m, insns, ip_mask)
}

/// Instructions between two questions to [`Platform::attention`].
const ATTENTION_STRIDE: u64 = 256;

fn run_loop(
    m: &mut Machine,
    cache: &mut CodeCache,
    limits: RunLimits,
    done: &mut u64,
    trap: &mut Option<(u64, u8)>,
    want_mnemonic: bool,
) -> Result<(RunExit, Mnemonic), Fault> {
    let mut last = Mnemonic::INVALID;
    let budget = limits.budget;
    // The platform's attention is asked after the first block and then every
    // ATTENTION_STRIDE instructions (a few microseconds): one compare per block.
    let mut check_at = 1.min(budget);
    loop {
        if limits.stop_when_interruptible && m.interruptible() {
            return Ok((RunExit::InterruptWindow, last));
        }
        if *done >= check_at {
            if *done >= budget {
                return Ok((RunExit::Budget, last));
            }
            if *done > 0 && m.bus.attention() {
                return Ok((RunExit::Attention, last));
            }
            check_at = (*done + ATTENTION_STRIDE).min(budget);
        }
        m.check_code_epoch();
        let found = match cache.find(m) {
            Ok(f) => f,
            Err(e) => return Err(Fault::Exception(e.get())),
        };
        let _serial = crate::jit::check_guard(cache);
        // Hot blocks run translated; the interpreter carries on from where translated
        // code stopped (a TLB miss, an instruction it does not translate).
        let mut first = 0;
        if cache.jit.mode != JitMode::Off && !found.transient && !m.cpu.interrupt_shadow {
            match crate::jit::enter(m, cache, &found, budget - *done) {
                Ok(Entered::Ran(ran)) => {
                    first = ran.resume;
                    *done += ran.executed;
                    if want_mnemonic && ran.executed > 0 {
                        // A one-instruction budget ran the block's first instruction.
                        last = cache.insns[found.start as usize].mnemonic;
                    }
                }
                Ok(Entered::Interpret) => {}
                Ok(Entered::Flushed) => continue,
                Err(mismatch) => return Err(Fault::TranslationDiffers(mismatch)),
            }
        }
        let insns = &cache.block_insns(&found)[first..];
        let mut n = insns.len().min((budget - *done) as usize);
        if m.cpu.interrupt_shadow {
            // The shadow covers this block's first instruction only (the instructions that
            // set it end their block, and set it again).
            m.cpu.interrupt_shadow = false;
            if limits.stop_when_interruptible {
                // Look again right after that instruction.
                n = n.min(1);
            }
        }
        let ip_mask = m.ip_mask;
        // The hot loop: set RIP to the next instruction, run the handler, and leave only
        // when it fails or asks to (everything else is sorted out below).
        let (k, pc, stop) = run_block(m, &insns[..n], ip_mask);
        let mut result = Ok(());
        let completed = if k == n {
            n
        } else {
            match stop {
                Err(e) => {
                    result = Err(Fault::Exception(e.get()));
                    if e.is_trap() {
                        // A trap completes its instruction.
                        *trap = Some((m.rip(), insns[k].len));
                        k + 1
                    } else {
                        m.regs[RIP as usize] = pc;
                        k
                    }
                }
                Ok(()) if m.exit & EXIT_UNSUPPORTED != 0 => {
                    let ins = &insns[k];
                    m.regs[RIP as usize] = pc;
                    let mut u = UnsupportedInstruction {
                        rip: pc,
                        bytes: [0; 15],
                        len: ins.len,
                        mnemonic: ins.mnemonic,
                    };
                    let lin = m.code_linear(pc);
                    let len = usize::from(ins.len).min(15);
                    // Best effort: the bytes were fetchable a moment ago.
                    let _ = m.fetch(lin, &mut u.bytes[..len]);
                    result = Err(Fault::Unsupported(u));
                    m.exit = 0;
                    k
                }
                Ok(()) => k + 1,
            }
        };
        if want_mnemonic && completed > 0 {
            last = insns[completed - 1].mnemonic;
        }
        *done += completed as u64;
        cache.drop_transient(&found);
        if !m.smc.is_empty() {
            for page in m.smc.drain(..) {
                cache.invalidate_page(page);
            }
        }
        result?;
        if m.exit != 0 {
            let exit = std::mem::take(&mut m.exit);
            if exit & EXIT_RUN != 0 {
                return Ok((
                    match m.stop.take() {
                        Some(StopReason::Halt) | None => RunExit::Halt,
                        Some(StopReason::PauseLoop) => RunExit::PauseLoop,
                    },
                    last,
                ));
            }
        }
    }
}

impl Machine<'_> {
    /// Maskable interrupts can be delivered now.
    #[inline(always)]
    pub(crate) fn interruptible(&self) -> bool {
        self.cpu.rflags & rflags::IF != 0 && !self.cpu.interrupt_shadow
    }
}
