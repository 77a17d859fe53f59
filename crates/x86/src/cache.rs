//! The decoded-code cache: basic blocks of pre-decoded instructions keyed by
//! guest-physical address, a jump cache keyed by linear RIP in front of it, and the
//! bookkeeping that invalidates blocks when their code page is written.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use crate::decode::{Cx, Insn, decode, ends_block};
use crate::exception::Exception;
use crate::hostmem::{PAGE, PAGE_MASK};
use crate::machine::Machine;
use crate::mmu::Access;

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
const JUMP_BITS: u32 = 12;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub start: u32,
    pub count: u32,
    bytes_start: u32,
    bytes_len: u32,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    key: u64,
    pub valid: bool,
}

#[derive(Clone, Copy, Default)]
struct Jump {
    lin: u64,
    /// TLB generation << 2 | mode: the linear->physical mapping this entry relied on.
    tag: u64,
    block: u32,
}

pub(crate) struct CodeCache {
    pub insns: Vec<Insn>,
    bytes: Vec<u8>,
    pub blocks: Vec<Block>,
    map: HashMap<u64, u32, FastHash>,
    page_blocks: HashMap<u64, Vec<u32>, FastHash>,
    jump: Box<[Jump]>,
    pub decoded: u64,
    pub invalidated: u64,
}

impl Default for CodeCache {
    fn default() -> Self {
        CodeCache {
            insns: Vec::new(),
            bytes: Vec::new(),
            blocks: Vec::new(),
            map: HashMap::default(),
            page_blocks: HashMap::default(),
            jump: vec![Jump::default(); 1 << JUMP_BITS].into_boxed_slice(),
            decoded: 0,
            invalidated: 0,
        }
    }
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

/// A block found or made for the current RIP.
pub(crate) struct Found {
    pub block: u32,
    /// Decoded for this execution only (not cacheable: code in MMIO, or an instruction
    /// that crosses a page); dropped with [`CodeCache::drop_transient`].
    pub transient: bool,
}

impl CodeCache {
    /// Drops everything (the code-page set belongs to the interpreter and is cleared too).
    pub(crate) fn clear(&mut self, code_pages: &mut HashSet<u64, FastHash>) {
        self.insns.clear();
        self.bytes.clear();
        self.blocks.clear();
        self.map.clear();
        self.page_blocks.clear();
        self.jump.fill(Jump::default());
        code_pages.clear();
    }

    /// Invalidates every block decoded from the guest-physical page.
    pub(crate) fn invalidate_page(
        &mut self,
        gpa_page: u64,
        code_pages: &mut HashSet<u64, FastHash>,
    ) {
        code_pages.remove(&gpa_page);
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

    pub(crate) fn block_insns(&self, b: u32) -> &[Insn] {
        let blk = &self.blocks[b as usize];
        &self.insns[blk.start as usize..(blk.start + blk.count) as usize]
    }

    /// Whether the bytes a block was decoded from are still in guest memory.
    fn still_matches(&self, m: &mut Machine, b: u32) -> bool {
        let blk = self.blocks[b as usize];
        let Some(h) = m.bus.ram_page(blk.gpa & PAGE_MASK, false) else {
            return false;
        };
        let mut cur = [0u8; MAX_BLOCK_BYTES];
        let want =
            &self.bytes[blk.bytes_start as usize..(blk.bytes_start + blk.bytes_len) as usize];
        let cur = &mut cur[..want.len()];
        h.read_bytes((blk.gpa & 0xfff) as usize, cur);
        cur == want
    }

    /// The block starting at the current RIP, decoding it if needed. `validate` compares a
    /// cached block's bytes with guest memory first (for callers whose guest code can
    /// change without the interpreter seeing the write).
    pub(crate) fn find(&mut self, m: &mut Machine, validate: bool) -> Result<Found, Exception> {
        let rip = m.rip();
        let cx = m.cx();
        let lin = m.code_linear(rip);
        let tag = (m.tlb.generation() << 2) | mode_code(cx.bitness);
        let slot = jump_slot(lin);
        let j = self.jump[slot];
        if j.lin == lin
            && j.tag == tag
            && self.blocks.get(j.block as usize).is_some_and(|b| b.valid)
        {
            if !validate || self.still_matches(m, j.block) {
                return Ok(Found {
                    block: j.block,
                    transient: false,
                });
            }
            let gpa = self.blocks[j.block as usize].gpa;
            self.invalidate_page(gpa & PAGE_MASK, m.code_pages);
        }
        let t = m.translate(lin, Access::Exec)?;
        let key = (t.gpa << 2) | mode_code(cx.bitness);
        if let Some(&b) = self.map.get(&key) {
            if !validate || self.still_matches(m, b) {
                self.jump[slot] = Jump { lin, tag, block: b };
                return Ok(Found {
                    block: b,
                    transient: false,
                });
            }
            self.invalidate_page(t.gpa & PAGE_MASK, m.code_pages);
        }
        if self.insns.len() >= MAX_CACHED_INSNS {
            self.clear(m.code_pages);
        }
        let found = self.decode_block(m, lin, rip, t.gpa, t.host.is_some(), &cx)?;
        if !found.transient {
            let b = found.block;
            self.map.insert(key, b);
            self.page_blocks
                .entry(t.gpa & PAGE_MASK)
                .or_default()
                .push(b);
            if m.code_pages.insert(t.gpa & PAGE_MASK) {
                m.tlb.protect_gpa(t.gpa & PAGE_MASK);
            }
            // The decode may have flushed the TLB (MMIO fetch): tag with the generation now.
            let tag = (m.tlb.generation() << 2) | mode_code(cx.bitness);
            self.jump[slot] = Jump { lin, tag, block: b };
        }
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
    ) -> Result<Found, Exception> {
        let off = (lin & 0xfff) as usize;
        let want = (PAGE - off).min(MAX_BLOCK_BYTES);
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
            let d = decode(&ins, cx);
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
            valid: !transient,
        });
        let b = self.blocks.len() as u32 - 1;
        if !transient {
            self.decoded += 1;
            self.blocks[b as usize].key = (gpa << 2) | mode_code(cx.bitness);
        }
        Ok(Found {
            block: b,
            transient,
        })
    }

    fn decode_crossing(
        &mut self,
        m: &mut Machine,
        lin: u64,
        rip: u64,
        cx: &Cx,
    ) -> Result<(), Exception> {
        let mut buf = [0u8; 15];
        let n = m.fetch(lin, &mut buf)?;
        let mut dec = Decoder::with_ip(cx.bitness, &buf[..n], rip, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        dec.decode_out(&mut ins);
        if ins.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes && n < 15 {
            // The rest of the instruction is on a page that cannot be fetched.
            m.translate((lin & PAGE_MASK).wrapping_add(PAGE as u64), Access::Exec)?;
        }
        self.insns.push(decode(&ins, cx));
        self.bytes.extend_from_slice(&buf[..ins.len().max(1)]);
        Ok(())
    }
}
