//! The destination's side: pages into a memory file, then the state, making a snapshot
//! folder that the VM is restored from (its memory mapped from the file: nothing is
//! copied a second time). Every run of pages is checked against the memory map the
//! greeting announced; anything else is refused with one line.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::MigrationError;
use super::wire::{self, Frame, Hello, PAGE};
use crate::snapshot::file::{MEMORY, STATE, decode_state, encode_state};

/// What arrived.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub pages: u64,
    pub bytes: u64,
    /// The source switched to post-copy: the folder's `stale` file lists the pages the
    /// VM must still get from it, over the same link.
    pub postcopy: bool,
}

/// In a folder received for post-copy: the runs of stale pages (address and count, 12
/// bytes each, little endian).
pub const STALE: &str = "stale";

/// Reads the greeting and the source's description of the VM.
pub fn hello(r: &mut impl Read) -> Result<Hello, MigrationError> {
    wire::read_greeting(r)?;
    match wire::read(r)? {
        Frame::Hello(h) => {
            wire::check_map(&h)?;
            Ok(*h)
        }
        Frame::Failed(why) => Err(MigrationError::Source(why)),
        _ => Err(MigrationError::Stream(
            "the stream does not start with a greeting".into(),
        )),
    }
}

pub fn accept(w: &mut impl Write) -> Result<(), MigrationError> {
    wire::send(w, &Frame::Accept)?;
    w.flush().map_err(|e| MigrationError::Link(e.to_string()))
}

pub fn refuse(w: &mut impl Write, why: &str) {
    let _ = wire::send(w, &Frame::Refuse(why.to_string()));
    let _ = w.flush();
}

/// Tells the source how it ended here: the VM runs, or why it does not.
pub fn finish(w: &mut impl Write, outcome: Result<(), &str>) -> Result<(), MigrationError> {
    let frame = match outcome {
        Ok(()) => Frame::Running,
        Err(why) => Frame::Failed(why.to_string()),
    };
    wire::send(w, &frame)?;
    w.flush().map_err(|e| MigrationError::Link(e.to_string()))
}

/// Receives the pages and the state into the folder `dir` (which must exist and be
/// empty), as a snapshot of the VM `hello` described; the disks it copies (if it does)
/// into the files `disks`, made anew.
pub fn into_folder(
    r: &mut impl Read,
    hello: &Hello,
    dir: &Path,
    disks: &[std::path::PathBuf],
) -> Result<Received, MigrationError> {
    let io =
        |what: &'static str| move |e: std::io::Error| MigrationError::Local(format!("{what}: {e}"));
    let memory = File::create(dir.join(MEMORY)).map_err(io("the memory file"))?;
    memory
        .set_len(hello.memory_bytes)
        .map_err(io("the memory file"))?;
    if disks.len() != hello.disks.len() {
        return Err(MigrationError::Local(format!(
            "{} disks to receive into, the source copies {}",
            disks.len(),
            hello.disks.len()
        )));
    }
    let disk_files = disks
        .iter()
        .zip(&hello.disks)
        .map(|(path, &size)| {
            let f = File::create(path).map_err(io("a disk"))?;
            f.set_len(size).map_err(io("a disk"))?;
            Ok((f, size))
        })
        .collect::<Result<Vec<_>, MigrationError>>()?;
    let mut got = Received::default();
    let mut state = None;
    let mut stale = Vec::new();
    loop {
        match wire::read(r)? {
            Frame::Pages(p) => {
                let off = wire::file_offset(&hello.memory, p.gpa, p.count).ok_or_else(|| {
                    MigrationError::Stream(format!(
                        "{} pages at {:#x} are not the VM's memory",
                        p.count, p.gpa
                    ))
                })?;
                memory
                    .write_all_at(&p.data, off)
                    .map_err(io("the memory file"))?;
                got.pages += u64::from(p.count);
                got.bytes += (p.count as usize * PAGE) as u64;
            }
            Frame::State(bytes) => {
                let s = decode_state(Path::new("the migration stream"), &bytes)
                    .map_err(|e| MigrationError::Stream(e.to_string()))?;
                if s.memory != hello.memory || s.cpus != hello.cpus {
                    return Err(MigrationError::Stream(
                        "the state does not describe the VM the greeting announced".into(),
                    ));
                }
                state = Some(s);
            }
            Frame::Done => break,
            Frame::Disk(c) => {
                let fits = disk_files.get(c.disk as usize).filter(|(_, size)| {
                    c.offset
                        .checked_add(c.data.len() as u64)
                        .is_some_and(|end| end <= *size)
                });
                let Some((f, _)) = fits else {
                    return Err(MigrationError::Stream(format!(
                        "{} bytes at {} of disk {}: not a disk being copied",
                        c.data.len(),
                        c.offset,
                        c.disk
                    )));
                };
                f.write_all_at(&c.data, c.offset).map_err(io("a disk"))?;
            }
            Frame::Stale(runs) => {
                // At most as many stale pages as the VM has (runs may not repeat
                // without end).
                let pages = runs.iter().map(|(_, n)| u64::from(*n)).sum::<u64>();
                if (stale.len() / 12) as u64 + runs.len() as u64 > hello.memory_bytes / PAGE as u64
                    || pages > hello.memory_bytes / PAGE as u64
                {
                    return Err(MigrationError::Stream(
                        "more stale pages than the VM has".into(),
                    ));
                }
                for (gpa, count) in runs {
                    if count == 0 || wire::file_offset(&hello.memory, gpa, count).is_none() {
                        return Err(MigrationError::Stream(format!(
                            "{count} stale pages at {gpa:#x} are not the VM's memory"
                        )));
                    }
                    stale.extend_from_slice(&gpa.to_le_bytes());
                    stale.extend_from_slice(&count.to_le_bytes());
                }
            }
            Frame::Postcopy => {
                got.postcopy = true;
                std::fs::write(dir.join(STALE), &stale).map_err(io("the stale list"))?;
                break;
            }
            Frame::Failed(why) => return Err(MigrationError::Source(why)),
            _ => {
                return Err(MigrationError::Stream(
                    "a frame out of turn during the transfer".into(),
                ));
            }
        }
    }
    let state =
        state.ok_or_else(|| MigrationError::Stream("the stream ended without a state".into()))?;
    // Not synced: the VM maps the file from the page cache at once, and the folder
    // goes as soon as it has (a crash before that loses a VM that never ran here).
    let bytes = encode_state(&state).map_err(|e| MigrationError::Local(e.to_string()))?;
    std::fs::write(dir.join(STATE), bytes).map_err(io("the state file"))?;
    Ok(got)
}
