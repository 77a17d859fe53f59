//! vessel's guest agent, both ends of it.
//!
//! The agent (`vessel-agent`, a static binary built from this crate's [`guest`] module)
//! runs in the guest and listens on vsock port [`protocol::PORT`]. The host reaches it
//! through the VM's hybrid vsock socket (`CONNECT <port>\n`, answered `OK <port>\n`) with
//! [`host::Client`]; one connection carries one request. Every frame on the wire is
//! versioned and size-limited ([`protocol`]), and both ends treat the other as
//! untrusted: a malformed, oversized or endless message ends the connection with an
//! error, never the process.

pub mod guest;
pub mod host;
pub mod install;
pub mod protocol;
