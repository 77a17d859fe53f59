//! The public entry points: `step` (one instruction, for the KVM fallback) and `run`
//! (blocks until a budget or an event, for the software CPU).

use std::collections::HashSet;

use iced_x86::Mnemonic;

use crate::cache::{CodeCache, FastHash};
use crate::exception::{Fault, UnsupportedInstruction};
use crate::hostmem::Tlb;
use crate::machine::{EXIT_RUN, EXIT_UNSUPPORTED, Machine, RIP, StopReason};
use crate::platform::Platform;
use crate::state::CpuState;

/// How the decoded-code cache learns that guest code changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CodeCoherence {
    /// Guest code can change behind the interpreter's back (KVM runs the guest between
    /// calls): every cached block is compared with the bytes in guest memory before use.
    #[default]
    Validate,
    /// Every write to guest code goes through this interpreter (its own stores invalidate
    /// what they hit) or is reported with [`Interpreter::invalidate_code_page`].
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
}

/// What one `run` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    pub executed: u64,
    pub exit: RunExit,
}

/// The interpreter for one vCPU: decoded-code cache, software TLB, counters. The CPU
/// state is passed in on every call, so the caller owns it (and can hand it to KVM).
pub struct Interpreter {
    cache: CodeCache,
    tlb: Box<Tlb>,
    code_pages: HashSet<u64, FastHash>,
    smc: Vec<u64>,
    coherence: CodeCoherence,
    instructions: u64,
}

impl Default for Interpreter {
    fn default() -> Self {
        Self::new(CodeCoherence::default())
    }
}

impl Interpreter {
    pub fn new(coherence: CodeCoherence) -> Self {
        Interpreter {
            cache: CodeCache::default(),
            tlb: Box::default(),
            code_pages: HashSet::default(),
            smc: Vec::with_capacity(8),
            coherence,
            instructions: 0,
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            instructions: self.instructions,
            blocks_decoded: self.cache.decoded,
            blocks_invalidated: self.cache.invalidated,
        }
    }

    /// Drops decoded code from the guest-physical page containing `gpa` (someone other
    /// than this interpreter wrote it: a device, another vCPU, the VMM).
    pub fn invalidate_code_page(&mut self, gpa: u64) {
        self.cache
            .invalidate_page(gpa & !0xfff, &mut self.code_pages);
    }

    /// Drops all decoded code.
    pub fn invalidate_all_code(&mut self) {
        self.cache.clear(&mut self.code_pages);
    }

    /// Executes the one instruction at RIP. On `Ok` the instruction completed; on
    /// `Err(Fault::Exception)` the state is as [`crate::Exception`] describes, for the
    /// caller to deliver; on `Err(Fault::Unsupported)` nothing changed.
    pub fn step<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
    ) -> Result<StepOutcome, Fault> {
        let (out, mnemonic) = self.execute(cpu, platform, 1)?;
        Ok(StepOutcome {
            mnemonic,
            halted: out.exit == RunExit::Halt,
        })
    }

    /// Executes up to `budget` instructions, block by block, stopping early at `hlt`.
    /// Exceptions end the run with the state as for `step`.
    pub fn run<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        budget: u64,
    ) -> Result<RunOutcome, Fault> {
        self.execute(cpu, platform, budget).map(|(o, _)| o)
    }

    fn execute<P: Platform>(
        &mut self,
        cpu: &mut CpuState,
        platform: &mut P,
        budget: u64,
    ) -> Result<(RunOutcome, Mnemonic), Fault> {
        // Host pointers cached by an earlier call may be stale (see hostmem).
        self.tlb.flush();
        let smc = std::mem::take(&mut self.smc);
        let mut m = Machine::new(cpu, &mut self.tlb, platform, &mut self.code_pages, smc);
        let validate = self.coherence == CodeCoherence::Validate;
        let mut done = 0;
        let r = run_loop(&mut m, &mut self.cache, budget, validate, &mut done);
        m.sync();
        self.smc = std::mem::take(&mut m.smc);
        drop(m);
        self.tlb.flush();
        self.instructions += done;
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

fn run_loop(
    m: &mut Machine,
    cache: &mut CodeCache,
    budget: u64,
    validate: bool,
    done: &mut u64,
) -> Result<(RunExit, Mnemonic), Fault> {
    let mut last = Mnemonic::INVALID;
    while *done < budget {
        let found = cache.find(m, validate)?;
        let insns = cache.block_insns(found.block);
        let n = insns.len().min((budget - *done) as usize);
        let ip_mask = match m.mode.bitness() {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        };
        let mut pc = m.rip();
        let mut result = Ok(());
        for ins in &insns[..n] {
            let next = pc.wrapping_add(u64::from(ins.len)) & ip_mask;
            m.regs[RIP as usize] = next;
            if let Err(e) = (ins.handler)(m, ins) {
                if e.is_trap() {
                    // A trap completes its instruction.
                    *done += 1;
                } else {
                    m.regs[RIP as usize] = pc;
                }
                last = ins.mnemonic;
                result = Err(Fault::Exception(e));
                break;
            }
            if m.exit != 0 {
                if m.exit & EXIT_UNSUPPORTED != 0 {
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
                    break;
                }
                *done += 1;
                last = ins.mnemonic;
                break;
            }
            *done += 1;
            last = ins.mnemonic;
            pc = next;
        }
        cache.drop_transient(&found);
        while let Some(page) = m.smc.pop() {
            cache.invalidate_page(page, m.code_pages);
        }
        result?;
        if m.exit != 0 {
            let exit = std::mem::take(&mut m.exit);
            if exit & EXIT_RUN != 0 {
                return Ok((
                    match m.stop.take() {
                        Some(StopReason::Halt) | None => RunExit::Halt,
                    },
                    last,
                ));
            }
        }
    }
    Ok((RunExit::Budget, last))
}
