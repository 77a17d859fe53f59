//! Compressed guest pages, by page index: lz4 blocks, each at most half a page (a page
//! that compresses worse stays uncompressed).

use std::collections::HashMap;

use crate::compress::PAGE;

/// The largest compressed size kept: below it a page is worth storing compressed.
pub const WORTH: usize = PAGE / 2;

#[derive(Default)]
pub struct Store {
    pages: HashMap<u64, Box<[u8]>>,
    bytes: usize,
}

impl Store {
    /// `data` (one page) compressed, if it compresses to at most [`WORTH`] bytes.
    pub fn compress(data: &[u8], scratch: &mut Vec<u8>) -> Option<Box<[u8]>> {
        scratch.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
        let n = lz4_flex::block::compress_into(data, scratch).ok()?;
        (n <= WORTH).then(|| scratch[..n].into())
    }

    pub fn insert(&mut self, page: u64, compressed: Box<[u8]>) {
        self.bytes += compressed.len();
        if let Some(old) = self.pages.insert(page, compressed) {
            self.bytes -= old.len();
        }
    }

    /// Takes page `page` out, decompressed into `out` (one page); false when it is not
    /// here (or its block is damaged, which cannot happen to a block written here).
    pub fn take(&mut self, page: u64, out: &mut [u8]) -> bool {
        let Some(c) = self.pages.remove(&page) else {
            return false;
        };
        self.bytes -= c.len();
        matches!(lz4_flex::block::decompress_into(&c, out), Ok(n) if n == out.len())
    }

    /// Drops the pages in `[first, first + count)` (the guest gave them up).
    pub fn forget(&mut self, first: u64, count: u64) {
        if count as usize > self.pages.len() {
            self.pages.retain(|&p, c| {
                let gone = p >= first && p < first + count;
                if gone {
                    self.bytes -= c.len();
                }
                !gone
            });
        } else {
            for p in first..first + count {
                if let Some(c) = self.pages.remove(&p) {
                    self.bytes -= c.len();
                }
            }
        }
    }

    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_back_bit_identical_and_poor_ones_are_refused() {
        let mut scratch = Vec::new();
        let mut s = Store::default();
        let page: Vec<u8> = (0..PAGE).map(|i| (i % 7) as u8).collect();
        let c = Store::compress(&page, &mut scratch).unwrap();
        s.insert(3, c);
        assert_eq!(s.pages(), 1);
        let mut out = vec![0u8; PAGE];
        assert!(s.take(3, &mut out));
        assert_eq!(out, page);
        assert!(!s.take(3, &mut out));
        assert_eq!(s.bytes(), 0);
        let mut x = 0x9e37_79b9u32;
        let noise: Vec<u8> = (0..PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(Store::compress(&noise, &mut scratch).is_none());
        s.insert(10, Store::compress(&page, &mut scratch).unwrap());
        s.insert(11, Store::compress(&page, &mut scratch).unwrap());
        s.forget(10, 1);
        assert_eq!(s.pages(), 1);
        s.forget(0, 100);
        assert_eq!((s.pages(), s.bytes()), (0, 0));
    }
}
