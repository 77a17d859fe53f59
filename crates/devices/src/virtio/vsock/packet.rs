//! virtio-vsock packet headers (virtio 1.2, 5.10.6): the 44-byte little-endian header
//! every packet starts with, and the checks a packet from the driver must pass.

use thiserror::Error;

pub const HEADER_LEN: usize = 44;
/// The most payload one packet carries, either way (the Linux driver's own limit).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// The only socket type vessel offers.
pub const TYPE_STREAM: u16 = 1;

pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more, send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The event the device sends when its connections are gone (after a restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than its header")]
    Short(u64),
    #[error("payload length {len} but {available} bytes follow the header")]
    Truncated { len: u32, available: u64 },
    #[error("payload of {0} bytes (the limit is {MAX_PAYLOAD})")]
    TooLong(u32),
    #[error("source CID {0} is not the guest's")]
    Source(u64),
    #[error("destination CID {0} is not the host")]
    Destination(u64),
    #[error("socket type {0} (only stream is offered)")]
    Type(u16),
    #[error("unknown operation {0}")]
    Op(u16),
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the driver sent (its chain held `readable` bytes in all) as the
    /// guest `guest_cid` talking to the host.
    pub fn check_from_guest(&self, readable: u64, guest_cid: u64) -> Result<(), PacketError> {
        let Some(available) = readable.checked_sub(HEADER_LEN as u64) else {
            return Err(PacketError::Short(readable));
        };
        if self.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        if u64::from(self.len) > available {
            return Err(PacketError::Truncated {
                len: self.len,
                available,
            });
        }
        if self.src_cid != guest_cid {
            return Err(PacketError::Source(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::Destination(self.dst_cid));
        }
        if self.kind != TYPE_STREAM {
            return Err(PacketError::Type(self.kind));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&self.op) {
            return Err(PacketError::Op(self.op));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 1 << 18,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn headers_round_trip_in_the_spec_layout() {
        let h = rw(12);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &12u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::parse(&b), h);
    }

    #[test]
    fn the_guest_cannot_lie_about_lengths_or_addresses() {
        assert_eq!(rw(12).check_from_guest(56, 3), Ok(()));
        assert_eq!(rw(0).check_from_guest(43, 3), Err(PacketError::Short(43)));
        assert_eq!(
            rw(13).check_from_guest(56, 3),
            Err(PacketError::Truncated {
                len: 13,
                available: 12
            })
        );
        assert_eq!(
            rw(MAX_PAYLOAD + 1).check_from_guest(u64::MAX, 3),
            Err(PacketError::TooLong(MAX_PAYLOAD + 1))
        );
        assert_eq!(rw(0).check_from_guest(44, 4), Err(PacketError::Source(3)));
        let mut h = rw(0);
        h.dst_cid = 7;
        assert_eq!(h.check_from_guest(44, 3), Err(PacketError::Destination(7)));
        h = rw(0);
        h.kind = 2;
        assert_eq!(h.check_from_guest(44, 3), Err(PacketError::Type(2)));
        h = rw(0);
        h.op = 0;
        assert_eq!(h.check_from_guest(44, 3), Err(PacketError::Op(0)));
    }
}
