//! The migration stream: a greeting, then frames of `kind (u8) | length (u32 LE) |
//! payload`. Everything the other side sends is checked here before it is used: kinds,
//! lengths (each kind has its own limit), page runs against the VM's memory map.
//!
//! ```text
//! source                                   destination
//! "VESSEL-MIGRATE <version>\n"   ------->
//! Hello (JSON)                   ------->
//!                                <-------  Accept | Refuse (one line)
//! Pages ... (rounds of pre-copy) ------->
//! State (a state file's bytes)   ------->
//! Done                           ------->
//!                                <-------  Running | Failed (one line)
//! ```
//! Either side may send `Failed` instead of its next frame, and either may hang up.
//!
//! Post-copy: instead of `Done`, the source sends `Stale` (the runs of pages the
//! destination's copy lacks or has old) and `Postcopy`; the destination starts the VM,
//! says `Running`, and asks for stale pages the guest touches (`Request`) while the
//! source sends the rest (`Pages`) and then `Done`; the destination answers `Done` once
//! it holds every page. Should the link fail meanwhile, a new one starts with the
//! greeting and `Resume`, and the source sends the stale pages again.

use std::io::{Read, Write};

use arch::cpuid::CpuidEntry;
use serde::{Deserialize, Serialize};

use super::MigrationError;
use crate::snapshot::{MemoryRange, SnapshotBackend};

const GREETING: &str = "VESSEL-MIGRATE";
/// Bumped whenever the stream's meaning changes; another version is refused.
pub const VERSION: u32 = 1;
pub const PAGE: usize = 4096;
/// The most pages one `Pages` frame carries.
pub const MAX_RUN: usize = 256;
/// The longest line a `Refuse` or `Failed` carries.
const MAX_REASON: usize = 4096;
const MAX_HELLO: usize = 1 << 20;
/// As for a state file.
const MAX_STATE: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Accept = 2,
    Refuse = 3,
    Pages = 4,
    State = 5,
    Done = 6,
    Running = 7,
    Failed = 8,
    Stale = 9,
    Postcopy = 10,
    Request = 11,
    Disk = 12,
    Resume = 13,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Done,
            7 => Kind::Running,
            8 => Kind::Failed,
            9 => Kind::Stale,
            10 => Kind::Postcopy,
            11 => Kind::Request,
            12 => Kind::Disk,
            13 => Kind::Resume,
            _ => return None,
        })
    }

    fn max_len(self) -> usize {
        match self {
            Kind::Hello => MAX_HELLO,
            Kind::Accept | Kind::Done | Kind::Running | Kind::Postcopy | Kind::Resume => 0,
            Kind::Request => 8,
            Kind::Stale => MAX_STALE_RUNS * STALE_RUN,
            Kind::Disk => DISK_HEADER + MAX_DISK_CHUNK,
            Kind::Refuse | Kind::Failed => MAX_REASON,
            Kind::Pages => PAGES_HEADER + MAX_RUN * PAGE,
            Kind::State => MAX_STATE,
        }
    }
}

/// What the source says about the VM before any page moves: enough for the destination
/// to decide whether it can host it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The VM's name on the source.
    pub name: String,
    /// Its configuration, as the manager keeps it (vm.toml).
    pub config: String,
    pub vessel_version: String,
    pub backend: SnapshotBackend,
    pub cpus: u16,
    pub memory_bytes: u64,
    /// CPUID as the guest sees it: a destination that cannot give these features refuses.
    pub cpuid: Vec<CpuidEntry>,
    /// Guest RAM, region by region, as a memory file would hold it.
    pub memory: Vec<MemoryRange>,
    /// With the disks copied (no shared storage): each disk's size in bytes, in the
    /// configuration's order; their contents follow in `Disk` frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<u64>,
}

/// A piece of a disk being copied.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskChunk {
    pub disk: u32,
    pub offset: u64,
    /// The bytes (all zero for a zero chunk).
    pub data: Vec<u8>,
}

/// How a run of pages is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    /// Every page of the run is zero: no data follows.
    Zero = 1,
    /// The run's bytes LZ4-compressed (a block, without a frame header).
    Lz4 = 2,
}

/// disk (u32) | offset (u64) | length (u32) | encoding (u8)
const DISK_HEADER: usize = 17;
/// The most bytes of a disk one `Disk` frame carries.
pub const MAX_DISK_CHUNK: usize = 1 << 20;

/// A stale run: gpa (u64) | pages (u32).
const STALE_RUN: usize = 12;
/// The most runs one `Stale` frame lists.
pub const MAX_STALE_RUNS: usize = 1 << 16;

/// gpa (u64) | pages (u32) | encoding (u8)
const PAGES_HEADER: usize = 13;

/// A run of consecutive guest pages.
#[derive(Debug, PartialEq, Eq)]
pub struct Pages {
    pub gpa: u64,
    pub count: u32,
    /// `count * PAGE` bytes (all zero for a zero run).
    pub data: Vec<u8>,
}

/// One frame as read.
#[derive(Debug)]
pub enum Frame {
    Hello(Box<Hello>),
    Accept,
    Refuse(String),
    Pages(Pages),
    State(Vec<u8>),
    Done,
    Running,
    Failed(String),
    /// Runs of pages (address, count) the destination must get from the source.
    Stale(Vec<(u64, u32)>),
    Postcopy,
    /// The destination needs the page at this address now.
    Request(u64),
    Disk(DiskChunk),
    /// A new link for a post-copy whose link failed: the source sends the stale pages
    /// again (the destination keeps the ones it has) and serves requests as before.
    Resume,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> MigrationError {
    move |e| MigrationError::Link(format!("{what}: {e}"))
}

pub fn write_greeting(w: &mut impl Write) -> Result<(), MigrationError> {
    w.write_all(format!("{GREETING} {VERSION}\n").as_bytes())
        .map_err(io("sending the greeting"))
}

/// Reads the greeting: the stream must be a vessel migration of this version.
pub fn read_greeting(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        r.read_exact(&mut b).map_err(io("reading the greeting"))?;
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line);
    let version = line
        .strip_prefix(GREETING)
        .map(str::trim)
        .ok_or_else(|| MigrationError::Stream("not a vessel migration stream".into()))?;
    if version != VERSION.to_string() {
        return Err(MigrationError::Stream(format!(
            "stream version {}, this vessel speaks {VERSION}",
            version.chars().take(16).collect::<String>()
        )));
    }
    Ok(())
}

fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<(), MigrationError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(&head).map_err(io("sending"))?;
    for p in parts {
        w.write_all(p).map_err(io("sending"))?;
    }
    Ok(())
}

pub fn send(w: &mut impl Write, frame: &Frame) -> Result<(), MigrationError> {
    match frame {
        Frame::Hello(h) => {
            let body = serde_json::to_vec(h).map_err(|e| MigrationError::Stream(e.to_string()))?;
            write_frame(w, Kind::Hello, &[&body])
        }
        Frame::Accept => write_frame(w, Kind::Accept, &[]),
        Frame::Refuse(why) => write_frame(w, Kind::Refuse, &[clip(why).as_bytes()]),
        Frame::Pages(p) => send_pages(w, p.gpa, p.count, Encoding::Raw, &p.data),
        Frame::State(s) => write_frame(w, Kind::State, &[s]),
        Frame::Done => write_frame(w, Kind::Done, &[]),
        Frame::Running => write_frame(w, Kind::Running, &[]),
        Frame::Failed(why) => write_frame(w, Kind::Failed, &[clip(why).as_bytes()]),
        Frame::Stale(runs) => {
            let mut body = Vec::with_capacity(runs.len() * STALE_RUN);
            for (gpa, count) in runs {
                body.extend_from_slice(&gpa.to_le_bytes());
                body.extend_from_slice(&count.to_le_bytes());
            }
            write_frame(w, Kind::Stale, &[&body])
        }
        Frame::Postcopy => write_frame(w, Kind::Postcopy, &[]),
        Frame::Request(gpa) => write_frame(w, Kind::Request, &[&gpa.to_le_bytes()]),
        Frame::Disk(c) => send_disk_chunk(w, c.disk, c.offset, &c.data),
        Frame::Resume => write_frame(w, Kind::Resume, &[]),
    }
}

/// Sends a run of `count` pages at `gpa`, its bytes already encoded as `encoding` says.
pub fn send_pages(
    w: &mut impl Write,
    gpa: u64,
    count: u32,
    encoding: Encoding,
    data: &[u8],
) -> Result<(), MigrationError> {
    let mut head = [0u8; PAGES_HEADER];
    head[..8].copy_from_slice(&gpa.to_le_bytes());
    head[8..12].copy_from_slice(&count.to_le_bytes());
    head[12] = encoding as u8;
    write_frame(w, Kind::Pages, &[&head, data])
}

/// Sends `data` as disk `disk`'s bytes at `offset` (a chunk of zeros carries none).
pub fn send_disk_chunk(
    w: &mut impl Write,
    disk: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), MigrationError> {
    let zero = data.iter().all(|b| *b == 0);
    let mut head = [0u8; DISK_HEADER];
    head[..4].copy_from_slice(&disk.to_le_bytes());
    head[4..12].copy_from_slice(&offset.to_le_bytes());
    head[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
    head[16] = if zero { 1 } else { 0 };
    write_frame(w, Kind::Disk, &[&head, if zero { &[] } else { data }])
}

fn decode_disk(body: &[u8]) -> Result<DiskChunk, MigrationError> {
    let bad = |why: String| MigrationError::Stream(format!("a disk chunk: {why}"));
    if body.len() < DISK_HEADER {
        return Err(bad("its header is cut short".into()));
    }
    let disk = u32::from_le_bytes(body[..4].try_into().unwrap_or_default());
    let offset = u64::from_le_bytes(body[4..12].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(body[12..16].try_into().unwrap_or_default()) as usize;
    if len == 0 || len > MAX_DISK_CHUNK {
        return Err(bad(format!("{len} bytes")));
    }
    let data = &body[DISK_HEADER..];
    let data = match body[16] {
        0 if data.len() == len => data.to_vec(),
        1 if data.is_empty() => vec![0; len],
        0 | 1 => return Err(bad(format!("{} bytes for {len}", data.len()))),
        e => return Err(bad(format!("unknown encoding {e}"))),
    };
    Ok(DiskChunk { disk, offset, data })
}

/// A reason cut to what a frame may carry (on a character boundary), on one line.
fn clip(why: &str) -> String {
    let mut s: String = why.replace('\n', " ");
    while s.len() > MAX_REASON {
        s.pop();
    }
    s
}

/// Reads the next frame, checking its kind, its length and its contents' shape.
pub fn read(r: &mut impl Read) -> Result<Frame, MigrationError> {
    let bad = |why: String| MigrationError::Stream(why);
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(io("receiving"))?;
    let kind =
        Kind::from_u8(head[0]).ok_or_else(|| bad(format!("unknown frame kind {}", head[0])))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > kind.max_len() {
        return Err(bad(format!(
            "a {kind:?} frame of {len} bytes (at most {})",
            kind.max_len()
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(io("receiving"))?;
    // A reason from the peer, as one line of printable text.
    let text = |b: Vec<u8>| {
        String::from_utf8_lossy(&b)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    };
    Ok(match kind {
        Kind::Hello => Frame::Hello(Box::new(
            serde_json::from_slice(&body).map_err(|e| bad(format!("the greeting's body: {e}")))?,
        )),
        Kind::Accept => Frame::Accept,
        Kind::Refuse => Frame::Refuse(text(body)),
        Kind::Pages => Frame::Pages(decode_pages(&body)?),
        Kind::State => Frame::State(body),
        Kind::Done => Frame::Done,
        Kind::Running => Frame::Running,
        Kind::Failed => Frame::Failed(text(body)),
        Kind::Postcopy => Frame::Postcopy,
        Kind::Disk => Frame::Disk(decode_disk(&body)?),
        Kind::Resume => Frame::Resume,
        Kind::Request => Frame::Request(u64::from_le_bytes(
            body.try_into()
                .map_err(|_| bad("a request of the wrong size".into()))?,
        )),
        Kind::Stale => {
            if !body.len().is_multiple_of(STALE_RUN) {
                return Err(bad(format!("a stale list of {} bytes", body.len())));
            }
            Frame::Stale(
                body.chunks_exact(STALE_RUN)
                    .map(|c| {
                        let (a, n) = c.split_at(8);
                        (
                            u64::from_le_bytes(a.try_into().unwrap_or_default()),
                            u32::from_le_bytes(n.try_into().unwrap_or_default()),
                        )
                    })
                    .collect(),
            )
        }
    })
}

fn decode_pages(body: &[u8]) -> Result<Pages, MigrationError> {
    let bad = |why: &str| MigrationError::Stream(format!("a run of pages: {why}"));
    if body.len() < PAGES_HEADER {
        return Err(bad("its header is cut short"));
    }
    let gpa = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
    let count = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
    if count == 0 || count as usize > MAX_RUN {
        return Err(bad(&format!("{count} pages (1 to {MAX_RUN})")));
    }
    if gpa % PAGE as u64 != 0 {
        return Err(bad(&format!("address {gpa:#x} is not page aligned")));
    }
    let len = count as usize * PAGE;
    let data = &body[PAGES_HEADER..];
    let data = match body[12] {
        0 if data.len() == len => data.to_vec(),
        0 => return Err(bad(&format!("{} bytes for {count} pages", data.len()))),
        1 if data.is_empty() => vec![0u8; len],
        1 => return Err(bad("a zero run carries data")),
        2 => {
            let mut out = vec![0u8; len];
            match lz4_flex::block::decompress_into(data, &mut out) {
                Ok(n) if n == len => out,
                Ok(n) => return Err(bad(&format!("{n} bytes decompressed for {count} pages"))),
                Err(e) => return Err(bad(&format!("LZ4: {e}"))),
            }
        }
        e => return Err(bad(&format!("unknown encoding {e}"))),
    };
    Ok(Pages { gpa, count, data })
}

/// Where a run of pages lies in the memory file, if the whole run is RAM of one region.
pub fn file_offset(map: &[MemoryRange], gpa: u64, count: u32) -> Option<u64> {
    let len = u64::from(count) * PAGE as u64;
    map.iter().find_map(|r| {
        let off = gpa.checked_sub(r.guest)?;
        (off.checked_add(len)? <= r.len).then(|| r.file_offset + off)
    })
}

/// Checks the memory map a greeting announces: regions of whole pages, laid one after
/// the other in the file, adding up to the VM's memory, none overlapping.
pub fn check_map(h: &Hello) -> Result<(), MigrationError> {
    let bad = |why: String| MigrationError::Stream(format!("the memory map: {why}"));
    let mut offset = 0u64;
    let mut last_end = 0u64;
    for r in &h.memory {
        if r.len == 0 || r.len % PAGE as u64 != 0 || r.guest % PAGE as u64 != 0 {
            return Err(bad(format!(
                "a region of {} bytes at {:#x}",
                r.len, r.guest
            )));
        }
        if r.file_offset != offset || r.guest < last_end {
            return Err(bad("regions out of order".into()));
        }
        offset = offset
            .checked_add(r.len)
            .ok_or_else(|| bad("too large".into()))?;
        last_end = r
            .guest
            .checked_add(r.len)
            .ok_or_else(|| bad("beyond 2^64".into()))?;
    }
    if offset != h.memory_bytes {
        return Err(bad(format!(
            "covers {offset} bytes of a {}-byte VM",
            h.memory_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: &Frame) -> Frame {
        let mut buf = Vec::new();
        send(&mut buf, f).unwrap();
        read(&mut buf.as_slice()).unwrap()
    }

    #[test]
    fn frames_come_back_as_they_went() {
        let data: Vec<u8> = (0..2 * PAGE).map(|i| (i * 7) as u8).collect();
        let p = Frame::Pages(Pages {
            gpa: 0x5000,
            count: 2,
            data: data.clone(),
        });
        match round_trip(&p) {
            Frame::Pages(back) => assert_eq!(back.data, data),
            other => panic!("{other:?}"),
        }
        assert!(matches!(round_trip(&Frame::Done), Frame::Done));
        match round_trip(&Frame::Failed("a\nb".into())) {
            Frame::Failed(s) => assert_eq!(s, "a b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compressed_and_zero_runs_decode_to_pages() {
        let mut page = vec![0u8; PAGE];
        page[100] = 9;
        let packed = lz4_flex::block::compress(&page);
        let mut buf = Vec::new();
        send_pages(&mut buf, 0x1000, 1, Encoding::Lz4, &packed).unwrap();
        send_pages(&mut buf, 0x2000, 3, Encoding::Zero, &[]).unwrap();
        let mut r = buf.as_slice();
        match read(&mut r).unwrap() {
            Frame::Pages(p) => assert_eq!(p.data, page),
            other => panic!("{other:?}"),
        }
        match read(&mut r).unwrap() {
            Frame::Pages(p) => assert_eq!(p.data, vec![0u8; 3 * PAGE]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_frames_are_refused_with_a_reason() {
        let cases: Vec<Vec<u8>> = vec![
            vec![99, 0, 0, 0, 0],
            vec![Kind::Done as u8, 1, 0, 0, 0, 0],
            vec![Kind::State as u8, 0xff, 0xff, 0xff, 0xff],
            {
                let mut b = vec![Kind::Pages as u8, 13, 0, 0, 0];
                b.extend_from_slice(&0x1001u64.to_le_bytes());
                b.extend_from_slice(&1u32.to_le_bytes());
                b.push(1);
                b
            },
            {
                let mut b = vec![Kind::Pages as u8, 13, 0, 0, 0];
                b.extend_from_slice(&0u64.to_le_bytes());
                b.extend_from_slice(&100_000u32.to_le_bytes());
                b.push(1);
                b
            },
            vec![Kind::Hello as u8, 2, 0, 0, 0, b'{', b'x'],
        ];
        for c in cases {
            let e = read(&mut c.as_slice()).expect_err("refused");
            assert!(matches!(e, MigrationError::Stream(_)), "{e}");
        }
        let e = read_greeting(&mut &b"GET / HTTP/1.1\r\n"[..]).unwrap_err();
        assert!(e.to_string().contains("not a vessel migration"), "{e}");
        let e = read_greeting(&mut &b"VESSEL-MIGRATE 7\n"[..]).unwrap_err();
        assert!(e.to_string().contains("version 7"), "{e}");
    }

    #[test]
    fn runs_must_lie_in_one_region() {
        let map = [
            MemoryRange {
                guest: 0,
                len: 0x10000,
                file_offset: 0,
            },
            MemoryRange {
                guest: 0x1_0000_0000,
                len: 0x2000,
                file_offset: 0x10000,
            },
        ];
        assert_eq!(file_offset(&map, 0xf000, 1), Some(0xf000));
        assert_eq!(file_offset(&map, 0xf000, 2), None);
        assert_eq!(file_offset(&map, 0x1_0000_1000, 1), Some(0x11000));
        assert_eq!(file_offset(&map, !0xfff, 1), None);
    }
}
