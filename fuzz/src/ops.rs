//! Fuzz input read as a sequence of operations: fixed-width little-endian fields that
//! read zero once the input runs out, so every prefix of an input is a valid program
//! and a mutation never makes the rest unreadable.

/// The most operations one input runs: a long input must not make a run slow.
pub const MAX_OPS: usize = 512;

pub struct Ops<'a> {
    data: &'a [u8],
    done: usize,
}

impl<'a> Ops<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Ops { data, done: 0 }
    }

    /// Whether another operation is due: input left and the budget not spent.
    pub fn next_op(&mut self) -> bool {
        self.done += 1;
        !self.data.is_empty() && self.done <= MAX_OPS
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A value of `len` bytes (1, 2, 4 or 8), as a bus access carries it.
    pub fn value(&mut self, len: usize) -> u64 {
        match len {
            1 => u64::from(self.u8()),
            2 => u64::from(self.u16()),
            4 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }
}

/// An access width from two bits: mostly what drivers use.
pub fn access_len(bits: u8) -> usize {
    [1, 2, 4, 8][usize::from(bits & 3)]
}

/// Appends an operation's fields to a seed, in the order [`Ops`] reads them.
#[derive(Default)]
pub struct Program(pub Vec<u8>);

impl Program {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// The low `len` bytes of `v`.
    pub fn value(&mut self, len: usize, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes()[..len]);
        self
    }
}
