//! A migration stream as `vessel receive` reads it once it has accepted a connection:
//! the greeting, the source's description of the VM (checked: a memory map of whole
//! pages, in order, adding up), then runs of pages (raw, zero or LZ4), the state and
//! the end, written into a folder the VM would be restored from; and pieces of the
//! disks a migration without shared storage copies.
//!
//! Checked: nothing panics; a run of pages outside the announced memory is refused; a
//! stream that is accepted leaves a folder `snapshot::read_state` accepts, with the
//! memory map the greeting announced.
//!
//! Input: mode (u8: bit 0 set, the rest follows a valid greeting and description of a
//! 16 MiB, one-vCPU VM with a 4 MiB disk to copy, so the fuzzer starts at the frames; clear, the rest is the
//! whole stream, as the seeds captured from a real migration are).

use std::sync::OnceLock;

use vmm::migration::receive;
use vmm::migration::wire::{self, Frame, Hello};
use vmm::snapshot::{MemoryRange, SnapshotBackend};

use crate::sandbox;

/// The greeting and description of a small VM.
fn prefix() -> &'static [u8] {
    static PREFIX: OnceLock<Vec<u8>> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let hello = Hello {
            name: "g".into(),
            config: String::new(),
            vessel_version: "0".into(),
            backend: SnapshotBackend::Emu,
            cpus: 1,
            memory_bytes: 16 << 20,
            cpuid: Vec::new(),
            memory: vec![MemoryRange {
                guest: 0,
                len: 16 << 20,
                file_offset: 0,
            }],
            disks: vec![4 << 20],
        };
        let mut v = Vec::new();
        wire::write_greeting(&mut v).expect("to memory");
        wire::send(&mut v, &Frame::Hello(Box::new(hello))).expect("to memory");
        v
    })
}

pub fn migration_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 == 1 {
        [prefix(), rest].concat()
    } else {
        rest.to_vec()
    };
    let mut r = stream.as_slice();
    let Ok(hello) = receive::hello(&mut r) else {
        return;
    };
    // A destination holds the size against its own configuration and admission
    // control before it writes anything; here, against a small bound.
    if hello.memory_bytes > 64 << 20
        || hello.disks.len() > 4
        || hello.disks.iter().any(|s| *s > 64 << 20)
    {
        return;
    }
    let dir = sandbox::files_dir("vessel-fuzz-migrate-").join("in");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("a folder to receive into");
    let disks: Vec<_> = (0..hello.disks.len())
        .map(|k| dir.join(format!("disk{k}")))
        .collect();
    if let Ok(got) = receive::into_folder(&mut r, &hello, &dir, &disks) {
        let s = vmm::snapshot::read_state(&dir).expect("a received folder reads back");
        assert_eq!(s.memory, hello.memory);
        assert_eq!(got.bytes, got.pages * wire::PAGE as u64);
    }
}
