//! Virtual disks: raw and qcow2 images (backing chains of any depth, thin
//! provisioning, zero and compressed clusters, discard) opened for virtio-blk with
//! their formats never guessed from what a guest could write; and the image tools
//! (`vessel disk create|info|convert|snapshot`).

pub mod chain;
mod convert;
mod create;
mod error;
pub mod format;
mod image;
mod info;
pub mod iov;
pub mod qcow2;
mod raw;
mod snapshot;
mod sparse;

pub use convert::{ConvertOptions, convert};
pub use create::{Backing, CreateOptions, DEFAULT_CLUSTER_SIZE, backing_name, create};
pub use error::DiskError;
pub use format::{Detected, Foreign, Format};
pub use image::{Image, OpenOptions, SECTOR_SIZE};
pub use info::{Layer, Qcow2Info, chain as info};
pub use snapshot::{copy_image, set_backing_name, snapshot};
pub use sparse::copy as sparse_copy;
