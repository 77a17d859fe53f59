//! The snapshot folder on disk, written crash-consistently: everything goes into a
//! temporary folder beside the destination, each file is synced, then one rename makes
//! it appear. A capture that fails half way leaves nothing behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{FORMAT, MemoryRange, SnapshotError, VmSnapshot};

pub const STATE: &str = "state";
pub const MEMORY: &str = "memory";
const MAGIC: &str = "VESSEL-STATE";
const PAGE: usize = 4096;
/// The largest state file read (the state of 255 vCPUs and their devices is far less).
const MAX_STATE: u64 = 64 << 20;

/// The state file's bytes: magic and format, a CRC-32 of the body, the JSON body.
pub fn encode_state(s: &VmSnapshot) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec(s).map_err(|e| SnapshotError::Capture(e.to_string()))?;
    let mut out = format!("{MAGIC} {FORMAT}\ncrc32 {:08x}\n", crc32fast::hash(&body)).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses a state file's bytes, checking magic, format and checksum first.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
    let not_state = || SnapshotError::NotState { path: path.into() };
    let mut lines = bytes.splitn(3, |b| *b == b'\n');
    let head = std::str::from_utf8(lines.next().ok_or_else(not_state)?).map_err(|_| not_state())?;
    let found = head.strip_prefix(MAGIC).ok_or_else(not_state)?.trim();
    if found != FORMAT.to_string() {
        return Err(SnapshotError::Format {
            path: path.into(),
            found: found.chars().take(32).collect(),
        });
    }
    let crc = std::str::from_utf8(lines.next().ok_or_else(not_state)?)
        .ok()
        .and_then(|l| l.strip_prefix("crc32 "))
        .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
        .ok_or_else(not_state)?;
    let body = lines.next().unwrap_or_default();
    if crc32fast::hash(body) != crc {
        return Err(SnapshotError::Checksum { path: path.into() });
    }
    let s: VmSnapshot = serde_json::from_slice(body).map_err(|e| SnapshotError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })?;
    validate(path, &s)?;
    Ok(s)
}

/// What the state promises about itself, checked before anything is built from it.
fn validate(path: &Path, s: &VmSnapshot) -> Result<(), SnapshotError> {
    let bad = |reason: String| SnapshotError::Invalid {
        path: path.into(),
        reason,
    };
    if s.format != FORMAT {
        return Err(bad(format!(
            "format {} inside a format {FORMAT} file",
            s.format
        )));
    }
    if s.cpus == 0 || usize::from(s.cpus) != s.vcpus.len() {
        return Err(bad(format!(
            "{} vCPUs with {} vCPU states",
            s.cpus,
            s.vcpus.len()
        )));
    }
    for (k, v) in s.vcpus.iter().enumerate() {
        if usize::from(v.index) != k {
            return Err(bad(format!("vCPU state {k} says it is vCPU {}", v.index)));
        }
    }
    let mut expect = 0u64;
    let mut total = 0u64;
    for r in &s.memory {
        if r.file_offset != expect || r.len == 0 || r.len % PAGE as u64 != 0 {
            return Err(bad(
                "the memory map is not contiguous in the memory file".into()
            ));
        }
        expect = expect
            .checked_add(r.len)
            .ok_or_else(|| bad("memory map overflows".into()))?;
        total = total.saturating_add(r.len);
    }
    if total != s.memory_bytes {
        return Err(bad(format!(
            "the memory map covers {total} bytes of a {}-byte VM",
            s.memory_bytes
        )));
    }
    Ok(())
}

/// Reads and checks `dir`'s state file, and that its memory file is whole.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE);
    let f = File::open(&path).map_err(SnapshotError::io(&path))?;
    let len = f.metadata().map_err(SnapshotError::io(&path))?.len();
    if len > MAX_STATE {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!("{len} bytes is too large for a state file"),
        });
    }
    let bytes = std::fs::read(&path).map_err(SnapshotError::io(&path))?;
    let s = decode_state(&path, &bytes)?;
    let mem = dir.join(MEMORY);
    let found = std::fs::metadata(&mem)
        .map_err(SnapshotError::io(&mem))?
        .len();
    if found != s.memory_bytes {
        return Err(SnapshotError::MemorySize {
            path: mem,
            found,
            want: s.memory_bytes,
        });
    }
    Ok(s)
}

/// Copies guest memory into `path`, region after region, leaving pages of zeros as
/// holes; returns the map.
fn write_memory<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
) -> Result<Vec<MemoryRange>, SnapshotError> {
    let f = File::create(path).map_err(SnapshotError::io(path))?;
    let mut map = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Capture(e.to_string()))?;
        // SAFETY: the region maps `len` bytes at `host` for as long as `mem` lives; the
        // vCPUs are parked and the device workers stopped, so nothing writes it now.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
        for (k, page) in bytes.chunks(PAGE).enumerate() {
            if page.iter().any(|b| *b != 0) {
                f.write_all_at(page, offset + (k * PAGE) as u64)
                    .map_err(SnapshotError::io(path))?;
            }
        }
        map.push(MemoryRange {
            guest: region.start_addr().0,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    f.set_len(offset).map_err(SnapshotError::io(path))?;
    f.sync_all().map_err(SnapshotError::io(path))?;
    Ok(map)
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io(dir))
}

/// What else goes into a snapshot folder while the VM is still paused (its config, its
/// disks as they are at that instant): called with the folder being written.
pub type Fill<'a> = &'a dyn Fn(&Path) -> Result<(), String>;

/// Writes `state` (without its memory map, which this fills in) and `mem` as the
/// snapshot folder `dest`, and whatever `fill` adds; `dest` must not exist. Nothing is
/// left behind on failure.
pub fn write_snapshot<M: GuestMemoryBackend>(
    dest: &Path,
    mut state: VmSnapshot,
    mem: &M,
    fill: Fill,
) -> Result<VmSnapshot, SnapshotError> {
    if dest.exists() {
        return Err(SnapshotError::Capture(format!(
            "{} exists already",
            dest.display()
        )));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(SnapshotError::io(parent))?;
    let tmp: PathBuf = parent.join(format!(
        ".{}.tmp-{}",
        dest.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(SnapshotError::io(&tmp))?;
        state.memory = write_memory(mem, &tmp.join(MEMORY))?;
        fill(&tmp).map_err(SnapshotError::Capture)?;
        let bytes = encode_state(&state)?;
        let p = tmp.join(STATE);
        let mut f = File::create(&p).map_err(SnapshotError::io(&p))?;
        f.write_all(&bytes).map_err(SnapshotError::io(&p))?;
        f.sync_all().map_err(SnapshotError::io(&p))?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, dest).map_err(SnapshotError::io(dest))?;
        sync_dir(parent)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(state)
}
