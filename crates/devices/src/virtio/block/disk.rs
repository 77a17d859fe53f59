//! The host side of a virtio disk: an image (raw or qcow2, see the `disk` crate) and
//! the serial the guest reads.

use std::fs::File;

pub use disk::DiskError;
use disk::{Format, Image, OpenOptions};

use super::config::{BlockConfig, ID_BYTES};
use super::request::SECTOR_SIZE;

pub struct Disk {
    image: Image,
    id: [u8; ID_BYTES],
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
        })
    }

    /// A raw disk over an already open file (tests and benchmarks).
    pub fn from_file(file: File, readonly: bool, id: [u8; ID_BYTES]) -> Result<Self, DiskError> {
        Ok(Disk {
            image: Image::raw(file, readonly)?,
            id,
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
}
