//! Live migration: the VM moves to another vessel while its guest runs. The source
//! sends pages while dirty logging records what the guest writes meanwhile (pre-copy),
//! then stops the guest for the last pages and the state; the destination receives them
//! into a snapshot folder and restores the VM from it, on either CPU backend. The
//! stream is in [`wire`]; the transports (TCP, Unix sockets) are the caller's.

pub mod dirty;
pub mod postcopy;
pub mod receive;
mod resident;
pub mod send;
mod serve;
pub mod wire;

use thiserror::Error;

pub use send::{SendOptions, SendReport};

#[derive(Debug, Error)]
pub enum MigrationError {
    /// The link failed (a broken connection, a timeout).
    #[error("the link failed: {0}")]
    Link(String),
    /// The other side sent something that is not a valid stream.
    #[error("malformed migration stream: {0}")]
    Stream(String),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination failed: {0}")]
    Destination(String),
    #[error("the source gave up: {0}")]
    Source(String),
    #[error("cancelled")]
    Cancelled,
    /// Something on this side: the VM (a device that cannot move, a failed pause).
    #[error("{0}")]
    Vm(String),
    #[error("{0}")]
    Local(String),
    /// Everything was sent and no answer came: the destination may be running the VM.
    /// The guest stays stopped here.
    #[error(
        "the destination did not confirm ({0}); it may be running the VM: the guest stays paused here"
    )]
    Uncertain(String),
}
