//! virtio-blk requests: a 16-byte header (type, reserved, sector) in the
//! device-readable part of a chain, data, and a status byte as the chain's last
//! device-writable byte. The driver may split any of these over buffers as it likes.

use thiserror::Error;
use vm_memory::{Address, GuestAddress};

use crate::virtio::guest_io::GuestAccess;

use crate::virtio::chain::{Chain, Cursor, Segment};

pub const SECTOR_SIZE: u64 = 512;
pub const HEADER_LEN: u64 = 16;
/// A discard / write-zeroes range: sector (u64), sectors (u32), flags (u32).
pub const RANGE_LEN: u64 = 16;
pub const RANGE_FLAG_UNMAP: u32 = 1;

/// Request types (virtio 1.x, 5.2.6).
pub mod types {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

/// A request that cannot be completed: there is nowhere to put its status.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request (head {0}) has no device-writable status byte")]
    NoStatus(u16),
    #[error("request (head {head}) header is {len} bytes, not 16")]
    ShortHeader { head: u16, len: u64 },
}

/// One parsed request. `data` is reused between requests.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    pub status: GuestAddress,
    /// The data buffers: device-writable for reads and GET_ID, device-readable (after
    /// the header) for writes, discard and write-zeroes.
    pub data: Vec<Segment>,
    pub data_len: u64,
    /// Whether the buffers run the way this type needs: nothing but the header
    /// device-readable for reads and GET_ID, nothing but the status device-writable
    /// for writes, discard and write-zeroes. A request that gets this wrong fails with
    /// IOERR (the chain itself is fine, so the device does not need a reset).
    pub directions_ok: bool,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            kind: RequestKind::Flush,
            sector: 0,
            status: GuestAddress(0),
            data: Vec::new(),
            data_len: 0,
            directions_ok: true,
        }
    }
}

impl Request {
    /// Parses the request in `chain` (already walked and checked) into `self`.
    pub fn parse<A: GuestAccess + ?Sized>(
        &mut self,
        chain: &Chain,
        mem: &A,
    ) -> Result<(), RequestError> {
        let head = chain.head;
        let last = chain.writable.last().ok_or(RequestError::NoStatus(head))?;
        self.status = last.addr.unchecked_add(u64::from(last.len) - 1);
        let mut header = [0u8; HEADER_LEN as usize];
        let mut readable = Cursor::new(&chain.readable);
        if !readable.read(mem, &mut header) {
            return Err(RequestError::ShortHeader {
                head,
                len: chain.readable_len().min(HEADER_LEN),
            });
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        self.sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        self.kind = match ty {
            types::IN => RequestKind::Read,
            types::OUT => RequestKind::Write,
            types::FLUSH => RequestKind::Flush,
            types::GET_ID => RequestKind::GetId,
            types::DISCARD => RequestKind::Discard,
            types::WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        };
        self.data.clear();
        self.directions_ok = match self.kind {
            RequestKind::Read | RequestKind::GetId => chain.readable_len() == HEADER_LEN,
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => {
                chain.writable_len() == 1
            }
            RequestKind::Flush | RequestKind::Unsupported(_) => true,
        };
        self.data_len = match self.kind {
            RequestKind::Read | RequestKind::GetId => {
                let all = chain.writable_len() - 1;
                Cursor::new(&chain.writable).take(all, &mut self.data)
            }
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => {
                let rest = readable.remaining();
                readable.take(rest, &mut self.data)
            }
            RequestKind::Flush | RequestKind::Unsupported(_) => 0,
        };
        Ok(())
    }
}

/// One discard or write-zeroes range, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
    pub flags: u32,
}

/// Reads the ranges of a discard / write-zeroes request. `Err` is the status to
/// complete the request with: UNSUPP for a payload that is not whole ranges or has
/// more than `max` of them.
pub fn parse_ranges<A: GuestAccess + ?Sized>(
    mem: &A,
    data: &[Segment],
    data_len: u64,
    max: u32,
    out: &mut Vec<Range>,
) -> Result<(), u8> {
    out.clear();
    if data_len == 0 || !data_len.is_multiple_of(RANGE_LEN) || data_len / RANGE_LEN > u64::from(max)
    {
        return Err(status::UNSUPP);
    }
    let mut cursor = Cursor::new(data);
    for _ in 0..data_len / RANGE_LEN {
        let mut b = [0u8; RANGE_LEN as usize];
        if !cursor.read(mem, &mut b) {
            return Err(status::IOERR);
        }
        out.push(Range {
            sector: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
            sectors: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            flags: u32::from_le_bytes(b[12..16].try_into().unwrap_or_default()),
        });
    }
    Ok(())
}

/// Byte range of `sectors` sectors from `sector`, if it lies within a disk of
/// `disk_size` bytes.
pub fn byte_range(sector: u64, len: u64, disk_size: u64) -> Option<u64> {
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let end = start.checked_add(len)?;
    (end <= disk_size).then_some(start)
}
