//! The guest's memory statistics as the balloon's stats queue carries them: a list of
//! (tag: le16, value: le64) entries, 10 bytes each.

use serde::{Deserialize, Serialize};

/// The statistics the Linux driver reports (bytes, or counts for the event tags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemoryStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free: Option<u64>,
    pub total: Option<u64>,
    pub available: Option<u64>,
    pub caches: Option<u64>,
}

/// The size of one entry.
pub const ENTRY: usize = 10;
/// The most entries read from one buffer (the spec defines 10 tags; a driver may repeat
/// or add, never this many).
pub const MAX_ENTRIES: usize = 64;

impl GuestMemoryStats {
    /// Reads the entries in `bytes` (a trailing partial entry is ignored; unknown tags
    /// too).
    pub fn parse(bytes: &[u8]) -> GuestMemoryStats {
        let mut s = GuestMemoryStats::default();
        for e in bytes.chunks_exact(ENTRY).take(MAX_ENTRIES) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let value = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
            let slot = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free,
                5 => &mut s.total,
                6 => &mut s.available,
                7 => &mut s.caches,
                _ => continue,
            };
            *slot = Some(value);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_read_by_tag_and_junk_is_ignored() {
        let mut b = Vec::new();
        for (tag, v) in [
            (5u16, 512u64 << 20),
            (4, 100 << 20),
            (99, 7),
            (6, 300 << 20),
        ] {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&[1, 2, 3]);
        let s = GuestMemoryStats::parse(&b);
        assert_eq!(s.total, Some(512 << 20));
        assert_eq!(s.free, Some(100 << 20));
        assert_eq!(s.available, Some(300 << 20));
        assert_eq!(s.swap_in, None);
    }
}
