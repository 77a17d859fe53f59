//! Which pages of private anonymous memory the kernel ever gave this process: the
//! others read as zeros, so the first round of a migration need not read them.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::wire::PAGE;

/// /proc/self/pagemap: one 64-bit entry per page; bit 63 present, bit 62 swapped.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// The guest-physical pages of `mem` that are present or swapped out, in order; None
/// when pagemap cannot be read (the caller then reads every page).
pub(crate) fn touched_pages<M: GuestMemoryBackend>(mem: &M) -> Option<Vec<u64>> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let mut out = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    for region in mem.iter() {
        let host = region.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
        let pages = region.len() / PAGE as u64;
        let mut k = 0u64;
        while k < pages {
            let n = (pages - k).min(4096);
            let buf = &mut entries[..n as usize * 8];
            pagemap
                .read_exact_at(buf, (host / PAGE as u64 + k) * 8)
                .ok()?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if e & (PRESENT | SWAPPED) != 0 {
                    out.push(region.start_addr().0 + (k + i as u64) * PAGE as u64);
                }
            }
            k += n;
        }
    }
    Some(out)
}
