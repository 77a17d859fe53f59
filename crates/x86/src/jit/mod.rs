//! The translating tier: blocks the interpreter runs often are compiled to host code
//! (`translate`), kept per vCPU in a W^X buffer (`exec_mem`), and entered from the run
//! loop in place of interpreting them. The interpreter stays the reference: it runs
//! cold code, every instruction the tier does not translate, and every instruction
//! whose memory access misses the inline TLB probe (translated code leaves with precise
//! state, and the run loop carries on interpreting the same block from there). In check
//! mode every translated run is repeated by the interpreter on the state it started
//! from, and the first difference stops the VM.

mod ctx;
mod exec_mem;
mod translate;

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use ctx::{CHAIN_BITS, ChainEntry, JitCtx, LOG_CAPACITY, LoggedStore, chain_slot};
use exec_mem::CodeBuffer;

use crate::cache::{CodeCache, Found};
use crate::decode::Insn;
use crate::flags::Flags;
use crate::machine::{Machine, RIP};
use crate::state::rflags;

/// Whether the translating tier runs (`VESSEL_JIT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JitMode {
    /// Interpret everything.
    #[default]
    Off,
    /// Translate blocks that run often.
    On,
    /// Translate, and repeat every translated run in the interpreter: the first
    /// difference ends the run with [`crate::Fault::TranslationDiffers`].
    Check,
}

impl std::str::FromStr for JitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "0" => Ok(JitMode::Off),
            "on" | "1" => Ok(JitMode::On),
            "check" => Ok(JitMode::Check),
            _ => Err(format!(
                "unknown translating-tier mode {s:?}: use off, on or check"
            )),
        }
    }
}

/// Where translated code and the interpreter disagreed (check mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The translated block's first instruction.
    pub block: u64,
    /// Instructions of the block run when they were compared.
    pub executed: u32,
    pub what: MismatchKind,
    /// The translated code's value and the interpreter's.
    pub translated: u64,
    pub interpreted: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MismatchKind {
    Register(u8),
    Rip,
    Flags,
    /// Memory at this host address.
    Memory(u64),
    /// The interpreter raised an exception (or stopped) where translated code went on.
    InterpreterStopped,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.what {
            MismatchKind::Register(r) => format!("register {r}"),
            MismatchKind::Rip => "RIP".into(),
            MismatchKind::Flags => "flags".into(),
            MismatchKind::Memory(p) => format!("memory at host {p:#x}"),
            MismatchKind::InterpreterStopped => "the interpreter stopped".into(),
        };
        write!(
            f,
            "translated block at {:#x} differs from the interpreter after {} instructions: \
             {what}: {:#x} translated, {:#x} interpreted",
            self.block, self.executed, self.translated, self.interpreted
        )
    }
}

/// Blocks entered this many times are translated (`On`). Translating costs tens of
/// microseconds a block: a Debian boot (mostly code that runs a few hundred times)
/// reached its login prompt in 42.7 s at 16, 35.6 s at 64, 31.0 s at 1000, 28.4 s at
/// 5000 and 29.5 s at 20000 (31.6 s interpreted), the kit's md5sum workload in 5.4 s
/// at 64 and 4.4 s at 5000 (7.2 s interpreted).
const HOT: u32 = 4096;
/// `Insn::jit` of a block's first instruction: below `COMPILED`, how many times it was
/// entered; `COMPILED | i`, translation `i`; `NEVER`, not translatable.
const COMPILED: u32 = 1 << 31;
const NEVER: u32 = u32::MAX;
/// The fewest instructions worth translating when they are not a whole block:
/// entering and leaving translated code costs about what interpreting a few does.
const MIN_PREFIX: usize = 4;
/// Host code per vCPU before everything is dropped and translated again.
const BUFFER_BYTES: usize = 64 << 20;

/// Check mode repeats runs with the stores undone: other vCPUs must not run meanwhile.
static CHECK_LOCK: Mutex<()> = Mutex::new(());

/// A flag that is never raised, for platforms without an attention flag.
static NO_ATTENTION: AtomicBool = AtomicBool::new(false);

struct Block {
    entry: u64,
    /// Where chained blocks jump in.
    chain_entry: u64,
    count: u32,
    /// Per instruction: flags written, flags left undefined (check mode).
    flag_effects: Vec<(u64, u64)>,
}

pub(crate) struct Jit {
    pub mode: JitMode,
    /// Entries before a block is translated.
    pub threshold: u32,
    buf: Option<CodeBuffer>,
    blocks: Vec<Block>,
    /// Blocks translated code may jump to directly (see `ChainEntry`).
    chain: Box<[ChainEntry]>,
    log: Vec<LoggedStore>,
    /// Instructions run as translated code, and blocks translated.
    pub instructions: u64,
    pub translated: u64,
}

impl Default for Jit {
    fn default() -> Self {
        Jit {
            mode: JitMode::Off,
            threshold: HOT,
            buf: None,
            blocks: Vec::new(),
            chain: Box::new([]),
            log: Vec::new(),
            instructions: 0,
            translated: 0,
        }
    }
}

/// What [`enter`] did.
pub(crate) enum Entered {
    /// Ran translated code.
    Ran(Ran),
    /// Nothing: interpret the block.
    Interpret,
    /// The code buffer was full: every translation and decoded block is gone, `found`
    /// with them (look the block up again).
    Flushed,
}

/// What a translated run did.
pub(crate) struct Ran {
    /// Guest instructions completed.
    pub executed: u64,
    /// Index in the block where interpretation continues (RIP is there).
    pub resume: usize,
}

/// Taken around each block in check mode.
pub(crate) fn check_guard(cache: &CodeCache) -> Option<std::sync::MutexGuard<'static, ()>> {
    (cache.jit.mode == JitMode::Check).then(|| CHECK_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Jit {
    /// Drops every translation (the decoded blocks they came from are gone).
    pub(crate) fn clear(&mut self) {
        self.blocks.clear();
        self.chain.fill(ChainEntry::default());
        if let Some(b) = &mut self.buf {
            b.reset();
        }
    }
}

/// Runs the block `found` translated if it is hot (translating it the first time),
/// with at most `remaining` instructions.
pub(crate) fn enter(
    m: &mut Machine,
    cache: &mut CodeCache,
    found: &Found,
    remaining: u64,
) -> Result<Entered, Mismatch> {
    let start = found.start as usize;
    let state = cache.insns[start].jit;
    let rip = m.rip();
    let index = if state == NEVER {
        return Ok(Entered::Interpret);
    } else if state & COMPILED != 0 {
        (state & !COMPILED) as usize
    } else if state < cache.jit.threshold {
        cache.insns[start].jit = state + 1;
        return Ok(Entered::Interpret);
    } else {
        match compile(m, cache, found) {
            Compiled::Block(i) => i,
            Compiled::Untranslatable => {
                cache.insns[start].jit = NEVER;
                return Ok(Entered::Interpret);
            }
            Compiled::Flushed => return Ok(Entered::Flushed),
        }
    };
    let block = &cache.jit.blocks[index];
    if u64::from(block.count) > remaining {
        return Ok(Entered::Interpret);
    }
    let check = cache.jit.mode == JitMode::Check;
    // The run loop just proved this block current for RIP: chained code may come here.
    let chainable = !check && m.code_linear(rip) == rip;
    if chainable && let Some(page) = m.tlb.exec_page(m.tlb_set, rip) {
        let (chain_entry, count) = (block.chain_entry, block.count);
        let jit = &mut cache.jit;
        if jit.chain.is_empty() {
            jit.chain = vec![ChainEntry::default(); 1 << CHAIN_BITS].into_boxed_slice();
        }
        jit.chain[chain_slot(rip)] = ChainEntry {
            lin: rip,
            gpa_mode: page | m.mode_tag,
            writes: found.writes,
            entry: chain_entry,
            count: u64::from(count),
        };
    }
    let jit = &mut cache.jit;
    let block = &jit.blocks[index];
    let entry = (m.regs, m.flags);
    let mut ctx = context(m, chainable, &jit.chain, &mut jit.log, remaining, check);
    // SAFETY: `entry` is the start of code `translate` produced for this block, in a
    // buffer that is executable and not writable; it follows the System V calling
    // convention (callee-saved registers restored) and touches only the context, the
    // TLB entries and guest RAM through host pointers the TLB holds, which are valid in
    // this call (see `hostmem`). Translated code raises no exception.
    let run: extern "sysv64" fn(*mut JitCtx) = unsafe { std::mem::transmute(block.entry) };
    run(&mut ctx);
    let executed = ctx.done.wrapping_add(ctx.exit_at);
    let resume = if ctx.left != 0 || ctx.chained != 0 {
        found.count as usize
    } else {
        ctx.exit_at as usize
    };
    m.regs[..16].copy_from_slice(&ctx.regs);
    m.regs[RIP as usize] = ctx.rip;
    if ctx.flags_out != 0 {
        m.flags = Flags::from_bits(ctx.flags);
    }
    if check {
        let log_len = ctx.log_len as usize;
        let insns = &cache.insns[start..start + found.count as usize];
        let effects = block.flag_effects.clone();
        let block_rip = entry.0[RIP as usize];
        verify(
            m,
            insns,
            entry,
            &cache.jit.log[..log_len],
            executed as usize,
            block_rip,
            &effects,
        )?;
    }
    cache.jit.instructions += executed;
    Ok(Entered::Ran(Ran { executed, resume }))
}

fn context(
    m: &Machine,
    chainable: bool,
    chain: &[ChainEntry],
    log: &mut Vec<LoggedStore>,
    remaining: u64,
    check: bool,
) -> JitCtx {
    let (tlb, epoch, wepoch) = m.tlb.for_jit(m.tlb_set);
    let code = m.code.expect("translation needs a code map");
    let attention = m.bus.attention_flag();
    // Without a flag to watch, loops come back often enough for `attention()` to be
    // polled as the interpreter does.
    let limit = if attention.is_some() {
        remaining
    } else {
        remaining.min(256)
    };
    if check {
        log.clear();
        log.resize(LOG_CAPACITY, LoggedStore::default());
    }
    let mut regs = [0; 16];
    regs.copy_from_slice(&m.regs[..16]);
    JitCtx {
        regs,
        // Any block chained to may take the flags in.
        flags: m.flags.bits() & rflags::ARITH,
        rip: m.regs[RIP as usize],
        block_rip: m.regs[RIP as usize],
        done: 0,
        limit,
        exit_at: 0,
        flags_out: 0,
        left: 0,
        tlb,
        epoch,
        wepoch,
        seg_base: m.seg_base,
        attention: attention.unwrap_or(&NO_ATTENTION),
        code_writes: code.writes_counter(),
        code_writes_seen: code.writes(),
        code_epoch: code.epoch_counter(),
        code_epoch_seen: m.code_epoch,
        chain: if chain.is_empty() {
            std::ptr::null()
        } else {
            chain.as_ptr()
        },
        // Chaining needs CS based at zero (RIP is the linear address).
        mode_tag: if chainable && !chain.is_empty() {
            m.mode_tag
        } else {
            u64::MAX
        },
        chained: 0,
        log: log.as_mut_ptr(),
        log_len: 0,
    }
}

enum Compiled {
    /// Its index in the table.
    Block(usize),
    Untranslatable,
    /// The buffer was full: everything was dropped.
    Flushed,
}

/// Translates the block.
fn compile(m: &mut Machine, cache: &mut CodeCache, found: &Found) -> Compiled {
    let start = found.start as usize;
    let insns: Vec<Insn> = cache.insns[start..start + found.count as usize].to_vec();
    let len: usize = insns.iter().map(|i| usize::from(i.len)).sum();
    let mut bytes = vec![0u8; len];
    let lin = m.code_linear(m.rip());
    if m.code.is_none() || m.fetch(lin, &mut bytes).ok() != Some(len) {
        return Compiled::Untranslatable;
    }
    let jit = &mut cache.jit;
    if jit.buf.is_none() {
        jit.buf = CodeBuffer::new(BUFFER_BYTES);
    }
    let opt = translate::Options {
        loops: jit.mode != JitMode::Check,
        log_stores: jit.mode == JitMode::Check,
        chain: jit.mode != JitMode::Check,
        intra: true,
        // Translating every block (tests) means every block, however short.
        min_prefix: if jit.threshold == 0 { 1 } else { MIN_PREFIX },
        bitness: m.cx().bitness,
    };
    let bitness = opt.bitness;
    let Some(buf) = jit.buf.as_mut() else {
        return Compiled::Untranslatable;
    };
    let Some(t) = translate::translate(&insns, &bytes, m.rip(), bitness, buf.next_addr(), opt)
    else {
        return Compiled::Untranslatable;
    };
    let Some(entry) = buf.append(&t.code) else {
        // Full: start again (every translation goes with the decoded code).
        cache.clear();
        return Compiled::Flushed;
    };
    jit.blocks.push(Block {
        entry,
        chain_entry: entry + t.chain_offset,
        count: t.count,
        flag_effects: t.flag_effects,
    });
    jit.translated += 1;
    let index = jit.blocks.len() - 1;
    cache.insns[start].jit = COMPILED | index as u32;
    Compiled::Block(index)
}

/// Check mode: undo the translated run's stores, run the same instructions in the
/// interpreter from the state the translated code started from, and compare.
fn verify(
    m: &mut Machine,
    insns: &[Insn],
    entry: ([u64; 32], Flags),
    log: &[LoggedStore],
    executed: usize,
    block: u64,
    effects: &[(u64, u64)],
) -> Result<(), Mismatch> {
    let jit_regs = m.regs;
    let jit_flags = m.flags.bits() & rflags::ARITH;
    // What translated code left in memory, then the memory as it was.
    let jit_mem: Vec<u64> = log.iter().map(|s| read_host(s.ptr, s.size)).collect();
    for s in log.iter().rev() {
        write_host(s.ptr, s.size, s.old);
    }
    m.regs = entry.0;
    m.flags = entry.1;
    // One instruction at a time, following RIP through the block (translated code
    // jumps forward within it).
    let ip_mask = m.ip_mask;
    let mut starts = Vec::with_capacity(insns.len());
    let mut at = block;
    for i in insns {
        starts.push(at);
        at = at.wrapping_add(u64::from(i.len)) & ip_mask;
    }
    let mut k = 0;
    let mut stopped = false;
    // Flags whose last writer on the path run left them undefined.
    let mut undefined = 0;
    while k < executed {
        let Some(i) = starts.iter().position(|&a| a == m.regs[RIP as usize]) else {
            stopped = true;
            break;
        };
        if let Some(&(written, undef)) = effects.get(i) {
            undefined = (undefined & !written) | undef;
        }
        let (_, _, r) = crate::interp::run_block_for_check(m, &insns[i..i + 1], ip_mask);
        // A taken jcc ends the interpreter's block: here it just moves RIP.
        if r.is_err() || m.exit & !crate::machine::EXIT_BLOCK != 0 {
            stopped = true;
            break;
        }
        m.exit = 0;
        k += 1;
    }
    let differ = |what, translated, interpreted| Mismatch {
        block,
        executed: executed as u32,
        what,
        translated,
        interpreted,
    };
    if stopped {
        return Err(differ(
            MismatchKind::InterpreterStopped,
            executed as u64,
            k as u64,
        ));
    }
    for (g, (&t, &i)) in jit_regs.iter().zip(&m.regs).take(16).enumerate() {
        if t != i {
            return Err(differ(MismatchKind::Register(g as u8), t, i));
        }
    }
    if jit_regs[RIP as usize] != m.regs[RIP as usize] {
        return Err(differ(
            MismatchKind::Rip,
            jit_regs[RIP as usize],
            m.regs[RIP as usize],
        ));
    }
    let mask = rflags::ARITH & !undefined;
    let interp_flags = m.flags.bits() & rflags::ARITH;
    if jit_flags & mask != interp_flags & mask {
        return Err(differ(MismatchKind::Flags, jit_flags, interp_flags));
    }
    // Memory: the last value translated code stored at each address.
    for (i, s) in log.iter().enumerate() {
        if log[i + 1..].iter().any(|o| o.ptr == s.ptr) {
            continue;
        }
        let now = read_host(s.ptr, s.size);
        if now != jit_mem[i] {
            return Err(differ(MismatchKind::Memory(s.ptr), jit_mem[i], now));
        }
    }
    Ok(())
}

fn read_host(ptr: u64, size: u64) -> u64 {
    // SAFETY: `ptr` is a host pointer translated code stored through in this call: a
    // TLB entry's page of guest RAM (valid while the layout is unchanged, see
    // `hostmem`), with `size` bytes inside the page. Unaligned reads are allowed.
    unsafe {
        match size {
            1 => u64::from(std::ptr::read_volatile(ptr as *const u8)),
            2 => u64::from(std::ptr::read_unaligned(ptr as *const u16)),
            4 => u64::from(std::ptr::read_unaligned(ptr as *const u32)),
            _ => std::ptr::read_unaligned(ptr as *const u64),
        }
    }
}

fn write_host(ptr: u64, size: u64, v: u64) {
    // SAFETY: as for `read_host`; the page was writable through the TLB (the store
    // being undone went there).
    unsafe {
        match size {
            1 => std::ptr::write_volatile(ptr as *mut u8, v as u8),
            2 => std::ptr::write_unaligned(ptr as *mut u16, v as u16),
            4 => std::ptr::write_unaligned(ptr as *mut u32, v as u32),
            _ => std::ptr::write_unaligned(ptr as *mut u64, v),
        }
    }
}
