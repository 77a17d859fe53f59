//! Mutations of corpus inputs for the stable runs (the corpus tests and the smoke
//! runner): no coverage feedback, so a mix of small edits (bit flips, interesting
//! values, small numbers for the fields that pick operations) and structural ones
//! (inserting, deleting and duplicating ranges, splicing two inputs, truncating).

/// xorshift64*: fixed seeds, reproducible failures.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The largest input a mutation makes.
pub const MAX_LEN: usize = 1 << 20;
const INTERESTING: [u8; 8] = [0, 1, 2, 0x7f, 0x80, 0xfe, 0xff, 0x10];

/// A mutation of `seeds[pick]` (another seed may be spliced in).
pub fn mutate(r: &mut Rng, seeds: &[Vec<u8>], pick: usize) -> Vec<u8> {
    let mut v = seeds
        .get(pick % seeds.len().max(1))
        .cloned()
        .unwrap_or_default();
    for _ in 0..1 + r.below(8) {
        if v.is_empty() {
            v.push(r.next_u64() as u8);
            continue;
        }
        let at = r.below(v.len());
        match r.below(10) {
            0 | 1 => v[at] ^= 1 << r.below(8),
            2 => v[at] = INTERESTING[r.below(INTERESTING.len())],
            3 => v[at] = r.below(16) as u8,
            4 => v[at] = r.next_u64() as u8,
            5 => {
                let n = 1 + r.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
                v.splice(at..at, bytes);
            }
            6 => {
                let n = 1 + r.below(v.len() - at).min(64);
                v.drain(at..at + n);
            }
            7 => {
                let n = 1 + r.below(v.len() - at).min(256);
                let copy = v[at..at + n].to_vec();
                let to = r.below(v.len() + 1);
                v.splice(to..to, copy);
            }
            8 => {
                if let Some(other) = seeds.get(r.below(seeds.len())) {
                    let from = r.below(other.len() + 1);
                    v.truncate(at);
                    v.extend_from_slice(&other[from..]);
                }
            }
            _ => {
                let word = (r.next_u64() as u16).to_le_bytes();
                let n = word.len().min(v.len() - at);
                v[at..at + n].copy_from_slice(&word[..n]);
            }
        }
    }
    if r.below(16) == 0 {
        v.truncate(r.below(v.len() + 1));
    }
    v.truncate(MAX_LEN);
    v
}
