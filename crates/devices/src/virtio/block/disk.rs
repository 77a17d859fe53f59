//! The host side of a virtio disk: an image (raw or qcow2, see the `disk` crate) and
//! the serial the guest reads.

use std::collections::BTreeSet;
use std::fs::File;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub use disk::DiskError;
use disk::{Format, Image, OpenOptions};

use super::config::{BlockConfig, ID_BYTES};
use super::request::SECTOR_SIZE;

pub struct Disk {
    image: Image,
    id: [u8; ID_BYTES],
    /// Which chunks the guest wrote while a migration copies the disk.
    log: WriteLog,
}

/// The size of the pieces a disk is copied and its writes logged in.
pub const CHUNK: u64 = 1 << 20;

#[derive(Default)]
struct WriteLog {
    on: AtomicBool,
    chunks: Mutex<BTreeSet<u64>>,
}

impl Disk {
    /// Opens the image `config` names and its backing chain, locking each file
    /// (shared when read-only) so two VMs do not write one image.
    pub fn open(config: &BlockConfig) -> Result<Self, DiskError> {
        let image = Image::open(
            &config.path,
            OpenOptions {
                format: config.format,
                readonly: config.readonly,
            },
        )?;
        Ok(Disk {
            image,
            id: config.id_bytes(),
            log: WriteLog::default(),
        })
    }

    /// A raw disk over an already open file (tests and benchmarks).
    pub fn from_file(file: File, readonly: bool, id: [u8; ID_BYTES]) -> Result<Self, DiskError> {
        Ok(Disk {
            image: Image::raw(file, readonly)?,
            id,
            log: WriteLog::default(),
        })
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn format(&self) -> Format {
        self.image.format()
    }

    pub fn sectors(&self) -> u64 {
        self.image.size() / SECTOR_SIZE
    }

    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The guest changed `len` bytes at `offset` (called once the change is made).
    pub fn note_write(&self, offset: u64, len: u64) {
        if len == 0 || !self.log.on.load(Ordering::Acquire) {
            return;
        }
        let mut chunks = crate::bus::lock(&self.log.chunks);
        for c in offset / CHUNK..=(offset + len - 1) / CHUNK {
            chunks.insert(c);
        }
    }

    /// Starts (or stops) logging the chunks the guest writes, with none logged.
    pub fn set_write_log(&self, on: bool) {
        crate::bus::lock(&self.log.chunks).clear();
        self.log.on.store(on, Ordering::Release);
    }

    /// The chunks written since the last call (their indexes, in order).
    pub fn take_written(&self) -> Vec<u64> {
        std::mem::take(&mut *crate::bus::lock(&self.log.chunks))
            .into_iter()
            .collect()
    }
}
