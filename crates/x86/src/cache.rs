//! The decoded-code cache: basic blocks of pre-decoded instructions keyed by
//! guest-physical address, a jump cache keyed by linear RIP in front of it, and the
//! bookkeeping that invalidates blocks when their code page is written.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use crate::decode::{Cx, Insn, decode, ends_block, unsupported};
use crate::hostmem::{PAGE, PAGE_MASK};
use crate::machine::{Machine, R};
use crate::mmu::Access;
use crate::offered::OfferedSet;

/// A multiply-rotate hasher for integer keys (SipHash is needlessly slow here and the keys
/// are not attacker-chosen in a way that matters: a guest can only slow itself down).
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(26) ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type FastHash = BuildHasherDefault<FastHasher>;

/// Longest block, in instructions. Blocks also end at control flow, at anything that can
/// change decoding, and at the end of the page.
const MAX_BLOCK_INSNS: usize = 64;
/// Bytes fetched to decode one block.
const MAX_BLOCK_BYTES: usize = 1024;
/// When the arena holds this many instructions the whole cache is dropped (simplest
/// policy that bounds memory; code working sets are far smaller).
const MAX_CACHED_INSNS: usize = 1 << 20;
/// 64Ki jump-cache entries (2 MiB): the kernel's hot code while it moves network
/// traffic (syscalls, softirqs, TCP, qdisc, virtio, interrupts) spans far more than 4Ki
/// block starts; at 4Ki a TCP send missed the jump cache once every 36 instructions.
const JUMP_BITS: u32 = 16;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub start: u32,
    pub count: u32,
    bytes_start: u32,
    bytes_len: u32,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    key: u64,
    /// The page's index in the code map (NO_INDEX: untracked, validated by its bytes).
    code_idx: u32,
    /// The page's code-map state the block was decoded under.
    code_state: u32,
    pub valid: bool,
}

const NO_INDEX: u32 = u32::MAX;

/// A jump-cache entry: linear RIP -> the block's instructions, with what proves it
/// current: the guest-physical page it was decoded from (the TLB must still translate
/// the linear page there, for fetching, in the current privilege context), the mode, and
/// the code map's write count when the block was last found current (no code anywhere
/// changed since). 32 bytes.
#[derive(Clone, Copy)]
struct Jump {
    lin: u64,
    /// Guest-physical page | mode tag.
    gpa_mode: u64,
    start: u32,
    count: u32,
    writes: u64,
}

impl Default for Jump {
    fn default() -> Self {
        Jump {
            lin: u64::MAX,
            gpa_mode: u64::MAX,
            start: 0,
            count: 0,
            writes: u64::MAX,
        }
    }
}

#[derive(Default)]
pub(crate) struct CodeCache {
    pub insns: Vec<Insn>,
    bytes: Vec<u8>,
    pub blocks: Vec<Block>,
    map: HashMap<u64, u32, FastHash>,
    page_blocks: HashMap<u64, Vec<u32>, FastHash>,
    /// Made on first use: a KVM vCPU that keeps an interpreter for the rare
    /// instruction KVM cannot emulate need not carry 2 MiB of it.
    jump: Box<[Jump]>,
    pub decoded: u64,
    pub invalidated: u64,
    pub slow_lookups: u64,
    /// Whether instructions the guest's CPUID does not offer are refused at decode
    /// (the software CPU: as on hardware, they raise #UD), and what it offers (asked at
    /// the first decode).
    pub enforce_cpuid: bool,
    offered: Option<OfferedSet>,
    /// The translating tier: translations of this cache's blocks.
    pub jit: crate::jit::Jit,
}

fn mode_code(bitness: u32) -> u64 {
    match bitness {
        16 => 0,
        32 => 1,
        _ => 2,
    }
}

fn jump_slot(lin: u64) -> usize {
    ((lin ^ (lin >> JUMP_BITS)) & ((1 << JUMP_BITS) - 1)) as usize
}

/// A block found or made for the current RIP: its instructions in the arena.
pub(crate) struct Found {
    pub start: u32,
    pub count: u32,
    /// Decoded for this execution only (not cacheable: code in MMIO, or an instruction
    /// that crosses a page); dropped with [`CodeCache::drop_transient`].
    pub transient: bool,
    /// The code map's write count the block was found current at.
    pub writes: u64,
}

impl CodeCache {
    /// Drops everything.
    pub(crate) fn clear(&mut self) {
        self.insns.clear();
        self.bytes.clear();
        self.blocks.clear();
        self.map.clear();
        self.page_blocks.clear();
        self.jump.fill(Jump::default());
        self.jit.clear();
    }

    /// Invalidates every block decoded from the guest-physical page.
    pub(crate) fn invalidate_page(&mut self, gpa_page: u64) {
        if let Some(list) = self.page_blocks.remove(&gpa_page) {
            for b in list {
                let blk = &mut self.blocks[b as usize];
                if blk.valid {
                    blk.valid = false;
                    self.invalidated += 1;
                    if self.map.get(&blk.key) == Some(&b) {
                        self.map.remove(&blk.key);
                    }
                }
            }
        }
    }

    pub(crate) fn drop_transient(&mut self, f: &Found) {
        if f.transient {
            let blk = self.blocks.pop().expect("transient block is last");
            self.insns.truncate(blk.start as usize);
            self.bytes.truncate(blk.bytes_start as usize);
        }
    }

    #[inline(always)]
    pub(crate) fn block_insns(&self, f: &Found) -> &[Insn] {
        &self.insns[f.start as usize..(f.start + f.count) as usize]
    }

    fn found(&self, b: u32, writes: u64) -> Found {
        let blk = &self.blocks[b as usize];
        Found {
            start: blk.start,
            count: blk.count,
            transient: !blk.valid,
            writes,
        }
    }

    /// Points the jump cache's entry for `lin` at block `b`, found current when the code
    /// map's write count was `writes` (tracked blocks only).
    fn remember(&mut self, lin: u64, mode: u64, b: u32, writes: u64) {
        let blk = &self.blocks[b as usize];
        if blk.code_idx != NO_INDEX {
            if self.jump.is_empty() {
                self.jump = vec![Jump::default(); 1 << JUMP_BITS].into_boxed_slice();
            }
            self.jump[jump_slot(lin)] = Jump {
                lin,
                gpa_mode: (blk.gpa & PAGE_MASK) | mode,
                start: blk.start,
                count: blk.count,
                writes,
            };
        }
    }

    /// Whether the bytes a block was decoded from are still in guest memory.
    fn still_matches(&self, m: &mut Machine, b: u32) -> bool {
        let blk = self.blocks[b as usize];
        let Some(h) = m.ram_page(blk.gpa & PAGE_MASK, false) else {
            return false;
        };
        let mut cur = [0u8; MAX_BLOCK_BYTES];
        let want =
            &self.bytes[blk.bytes_start as usize..(blk.bytes_start + blk.bytes_len) as usize];
        let cur = &mut cur[..want.len()];
        h.read_bytes((blk.gpa & 0xfff) as usize, cur);
        cur == want
    }

    /// Whether a cached block still describes guest memory: its page's code-map state is
    /// unchanged, or (untracked pages, `Validate` mode) its bytes are.
    #[inline(always)]
    fn fresh(&self, m: &mut Machine, b: u32) -> bool {
        let blk = &self.blocks[b as usize];
        match m.code {
            Some(map) if blk.code_idx != NO_INDEX => {
                map.state(blk.code_idx as usize) == blk.code_state
            }
            _ => self.still_matches(m, b),
        }
    }

    /// The block starting at the current RIP, decoding it if needed. The common case (the
    /// jump cache knows RIP, the block is current) is small enough to inline into the run
    /// loop; everything else is `find_slow`.
    #[inline(always)]
    pub(crate) fn find(&mut self, m: &mut Machine) -> R<Found> {
        let lin = m.code_linear(m.rip());
        if let Some(j) = self.jump.get(jump_slot(lin))
            && j.lin == lin
            && m.tlb.exec_page(m.tlb_set, lin).map(|g| g | m.mode_tag) == Some(j.gpa_mode)
            && let Some(map) = m.code
            && map.writes() == j.writes
        {
            return Ok(Found {
                start: j.start,
                count: j.count,
                transient: false,
                writes: j.writes,
            });
        }
        self.find_slow(m)
    }

    #[inline(never)]
    fn find_slow(&mut self, m: &mut Machine) -> R<Found> {
        self.slow_lookups += 1;
        let rip = m.rip();
        let cx = m.cx();
        let lin = m.code_linear(rip);
        let mode = mode_code(cx.bitness);
        // Read before the freshness checks: a write after them shows as a new count.
        let writes = m.code.map_or(0, |c| c.writes());
        let t = m.translate(lin, Access::Exec)?;
        let key = (t.gpa << 2) | mode_code(cx.bitness);
        if let Some(&b) = self.map.get(&key) {
            if self.fresh(m, b) {
                self.remember(lin, mode, b, writes);
                return Ok(self.found(b, writes));
            }
            self.invalidate_page(t.gpa & PAGE_MASK);
        }
        if self.insns.len() >= MAX_CACHED_INSNS {
            self.clear();
        }
        let b = self.decode_block(m, lin, rip, t.gpa, t.host.is_some(), &cx)?;
        let found = self.found(b, writes);
        if !found.transient {
            self.map.insert(key, b);
            self.page_blocks
                .entry(t.gpa & PAGE_MASK)
                .or_default()
                .push(b);
            self.remember(lin, mode, b, writes);
        }
        // A page that just became code must lose its fast write entries before the block
        // runs (it may store into itself).
        m.check_code_epoch();
        Ok(found)
    }

    fn decode_block(
        &mut self,
        m: &mut Machine,
        lin: u64,
        rip: u64,
        gpa: u64,
        ram: bool,
        cx: &Cx,
    ) -> R<u32> {
        let off = (lin & 0xfff) as usize;
        let want = (PAGE - off).min(MAX_BLOCK_BYTES);
        // Mark the page as code before reading it (see `code`).
        let (code_idx, code_state) = match m.code.and_then(|c| Some((c, c.index(gpa)?))) {
            Some((c, i)) if ram => (i as u32, c.mark_code(i)),
            _ => (NO_INDEX, 0),
        };
        let mut buf = [0u8; MAX_BLOCK_BYTES];
        let n = m.fetch(lin, &mut buf[..want])?;
        let start = self.insns.len() as u32;
        let bytes_start = self.bytes.len() as u32;
        let mut dec = Decoder::with_ip(cx.bitness, &buf[..n], rip, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        let mut used = 0;
        let mut transient = !ram;
        loop {
            dec.decode_out(&mut ins);
            if ins.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes {
                if used == 0 {
                    // The first instruction crosses into the next page: decode it alone
                    // from bytes fetched across the boundary, and do not cache it.
                    self.decode_crossing(m, lin, rip, cx)?;
                    transient = true;
                    used = self.bytes.len() - bytes_start as usize;
                }
                break;
            }
            let d = self.gated(m, &ins, cx, &buf[used..used + ins.len()]);
            self.insns.push(d);
            used += ins.len();
            let stop = ends_block(&ins)
                || !d.known
                || self.insns.len() - start as usize >= MAX_BLOCK_INSNS
                || used >= n;
            if stop {
                break;
            }
        }
        if self.bytes.len() == bytes_start as usize {
            self.bytes.extend_from_slice(&buf[..used]);
        }
        let count = self.insns.len() as u32 - start;
        self.blocks.push(Block {
            start,
            count,
            bytes_start,
            bytes_len: used as u32,
            gpa,
            key: 0,
            code_idx,
            code_state,
            valid: !transient,
        });
        let b = self.blocks.len() as u32 - 1;
        if !transient {
            self.decoded += 1;
            self.blocks[b as usize].key = (gpa << 2) | mode_code(cx.bitness);
        }
        Ok(b)
    }

    fn decode_crossing(&mut self, m: &mut Machine, lin: u64, rip: u64, cx: &Cx) -> R {
        let mut buf = [0u8; 15];
        let n = m.fetch(lin, &mut buf)?;
        let mut dec = Decoder::with_ip(cx.bitness, &buf[..n], rip, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        dec.decode_out(&mut ins);
        if ins.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes && n < 15 {
            // The rest of the instruction is on a page that cannot be fetched.
            m.translate((lin & PAGE_MASK).wrapping_add(PAGE as u64), Access::Exec)?;
        }
        let d = self.gated(m, &ins, cx, &buf[..ins.len().min(n)]);
        self.insns.push(d);
        self.bytes.extend_from_slice(&buf[..ins.len().max(1)]);
        Ok(())
    }

    /// `ins` decoded; when the CPUID is enforced and does not offer what it needs, an
    /// instruction the interpreter reports as one it cannot run (and ends the block at),
    /// or, for tzcnt and lzcnt, the bsf and bsr their encodings are on a CPU without
    /// them.
    fn gated(&mut self, m: &mut Machine, ins: &Instruction, cx: &Cx, bytes: &[u8]) -> Insn {
        let mut d = decode(ins, cx, bytes);
        if !self.enforce_cpuid {
            return d;
        }
        let offered = self
            .offered
            .get_or_insert_with(|| OfferedSet::new(|l, s| m.platform(|p| p.cpuid(l, s))));
        if !offered.allows(ins) {
            if let Some(older) = crate::offered::without_prefix_meaning(ins) {
                return decode(&older, cx, bytes);
            }
            d.handler = unsupported;
            d.known = false;
        }
        d
    }
}
