//! The host side of VM networking, for the monitor and the CLI:
//! - user-mode NAT without root through passt ([`passt`]), supervised;
//! - named networks between VMs without root: vessel's switch ([`switch`]), a process
//!   per network with MAC learning, bounded queues and a DHCP server ([`dhcp`]);
//! - bridged networking for root ([`bridge`]).

pub mod bridge;
pub mod dhcp;
mod error;
pub mod passt;
pub mod switch;
pub mod uplink;

pub use error::NetError;
