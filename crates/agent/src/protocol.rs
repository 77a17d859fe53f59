//! The agent's wire format.
//!
//! A frame is `len: u32 LE`, then `len` bytes: `version: u8`, `kind: u8`, and the body.
//! `len` is at least 2 and at most [`MAX_FRAME`]. Kind [`KIND_MESSAGE`] carries a JSON
//! [`Message`]; kind [`KIND_DATA`] a stream byte ([`Stream`]) and raw bytes, an empty
//! chunk being the end of that stream. Requests and answers are both [`Message`]s.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The protocol version every frame carries.
pub const VERSION: u8 = 1;
/// The vsock port the agent listens on.
pub const PORT: u32 = 1024;
/// The largest frame (version and kind included).
pub const MAX_FRAME: usize = 1 << 20;
/// The most data bytes either end puts in one frame.
pub const CHUNK: usize = 64 << 10;

pub const KIND_MESSAGE: u8 = 0;
pub const KIND_DATA: u8 = 1;

/// Which byte stream a data frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    /// A file's contents (`vessel cp`), either way.
    File = 3,
}

impl Stream {
    fn from_byte(b: u8) -> Option<Stream> {
        Some(match b {
            0 => Stream::Stdin,
            1 => Stream::Stdout,
            2 => Stream::Stderr,
            3 => Stream::File,
            _ => return None,
        })
    }
}

/// What the guest tells about itself (`vessel info`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestFacts {
    /// `PRETTY_NAME` from /etc/os-release (or /usr/lib/os-release).
    pub os: String,
    /// `uname -r`.
    pub kernel: String,
    pub uptime_seconds: f64,
    /// `interface address/prefix` for every global address.
    pub addresses: Vec<String>,
    pub memory_total_kib: u64,
    pub memory_available_kib: u64,
    /// The guest's clock (CLOCK_REALTIME) when it answered, in Unix nanoseconds.
    pub clock_unix_ns: i64,
}

/// A request (host to guest) or an answer (guest to host).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Message {
    // Requests.
    /// Runs `argv[0]` (searched in PATH) with the rest as arguments; stdin comes as
    /// [`Stream::Stdin`] data, output goes back as stdout/stderr data (both on stdout
    /// with a terminal), then [`Message::Exited`].
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default)]
        rows: u16,
        #[serde(default)]
        cols: u16,
    },
    /// Sends a file: [`Message::FileInfo`], its bytes as [`Stream::File`] data, then the
    /// end of that stream.
    ReadFile {
        path: String,
    },
    /// Receives a file as [`Stream::File`] data up to its end, written to `path` with
    /// `mode`; answered [`Message::Done`].
    WriteFile {
        path: String,
        mode: u32,
    },
    /// Stops the guest cleanly (its init's way); answered [`Message::Done`] first.
    Shutdown {
        #[serde(default)]
        reboot: bool,
    },
    /// Sets the guest's clock; answered [`Message::Done`].
    SetTime {
        unix_ns: i64,
    },
    /// Freezes the guest's disk file systems (FIFREEZE); answered [`Message::Frozen`].
    /// They stay frozen until [`Message::Thaw`] or until this connection ends.
    Freeze,
    Thaw,
    /// Answered [`Message::Facts`].
    GetFacts,

    // Answers.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    FileInfo {
        mode: u32,
        size: u64,
    },
    Frozen {
        filesystems: Vec<String>,
    },
    Facts(GuestFacts),
    Done,
    Error {
        message: String,
    },
}

/// One frame, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Message(Message),
    Data { stream: Stream, bytes: Vec<u8> },
}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes (the limit is {MAX_FRAME})")]
    TooLarge(usize),
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    #[error("protocol version {0} (this end speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("unknown stream {0}")]
    Stream(u8),
    #[error("bad message: {0}")]
    Json(String),
    #[error("a data chunk of {0} bytes (the limit is {CHUNK})")]
    Chunk(usize),
}

/// Decodes a frame's bytes after the length word.
pub fn decode(body: &[u8]) -> Result<Frame, ProtocolError> {
    let [version, kind, rest @ ..] = body else {
        return Err(ProtocolError::TooShort(body.len()));
    };
    if *version != VERSION {
        return Err(ProtocolError::Version(*version));
    }
    match *kind {
        KIND_MESSAGE => serde_json::from_slice(rest)
            .map(Frame::Message)
            .map_err(|e| ProtocolError::Json(e.to_string())),
        KIND_DATA => {
            let [stream, bytes @ ..] = rest else {
                return Err(ProtocolError::TooShort(body.len()));
            };
            let stream = Stream::from_byte(*stream).ok_or(ProtocolError::Stream(*stream))?;
            if bytes.len() > CHUNK {
                return Err(ProtocolError::Chunk(bytes.len()));
            }
            Ok(Frame::Data {
                stream,
                bytes: bytes.to_vec(),
            })
        }
        k => Err(ProtocolError::Kind(k)),
    }
}

/// Reads one frame; [`ProtocolError::Closed`] at a clean end of the stream.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    if len < 2 {
        return Err(ProtocolError::TooShort(len));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Encodes a message frame.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let json = serde_json::to_vec(m).expect("messages serialize");
    frame(KIND_MESSAGE, None, &json)
}

/// Encodes a data frame (`bytes` at most [`CHUNK`]; empty is the end of the stream).
pub fn encode_data(stream: Stream, bytes: &[u8]) -> Vec<u8> {
    debug_assert!(bytes.len() <= CHUNK);
    frame(KIND_DATA, Some(stream as u8), bytes)
}

fn frame(kind: u8, stream: Option<u8>, body: &[u8]) -> Vec<u8> {
    let len = 2 + usize::from(stream.is_some()) + body.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[VERSION, kind]);
    out.extend(stream);
    out.extend_from_slice(body);
    out
}

pub fn write_message(w: &mut impl Write, m: &Message) -> io::Result<()> {
    w.write_all(&encode_message(m))
}

/// Writes `bytes` as data frames of at most [`CHUNK`] (nothing for an empty slice: use
/// [`write_end`] to end the stream).
pub fn write_data(w: &mut impl Write, stream: Stream, bytes: &[u8]) -> io::Result<()> {
    for chunk in bytes.chunks(CHUNK) {
        w.write_all(&encode_data(stream, chunk))?;
    }
    Ok(())
}

pub fn write_end(w: &mut impl Write, stream: Stream) -> io::Result<()> {
    w.write_all(&encode_data(stream, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(bytes: &[u8]) -> Result<Frame, ProtocolError> {
        read_frame(&mut &bytes[..])
    }

    #[test]
    fn messages_and_data_round_trip() {
        let m = Message::Exec {
            argv: vec!["uname".into(), "-r".into()],
            tty: false,
            rows: 0,
            cols: 0,
        };
        assert_eq!(
            roundtrip(&encode_message(&m)).unwrap(),
            Frame::Message(m.clone())
        );
        let d = encode_data(Stream::Stderr, b"oops");
        assert_eq!(
            roundtrip(&d).unwrap(),
            Frame::Data {
                stream: Stream::Stderr,
                bytes: b"oops".to_vec()
            }
        );
        let facts = Message::Facts(GuestFacts {
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            ..Default::default()
        });
        assert_eq!(
            roundtrip(&encode_message(&facts)).unwrap(),
            Frame::Message(facts)
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(roundtrip(&[]), Err(ProtocolError::Closed)));
        assert!(matches!(roundtrip(&[1, 0]), Err(ProtocolError::Io(_))));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(roundtrip(&huge), Err(ProtocolError::TooLarge(_))));
        assert!(matches!(
            roundtrip(&[1, 0, 0, 0, VERSION]),
            Err(ProtocolError::TooShort(1))
        ));
        assert!(matches!(
            roundtrip(&[2, 0, 0, 0, 9, 0]),
            Err(ProtocolError::Version(9))
        ));
        assert!(matches!(
            roundtrip(&[2, 0, 0, 0, VERSION, 7]),
            Err(ProtocolError::Kind(7))
        ));
        assert!(matches!(
            roundtrip(&[3, 0, 0, 0, VERSION, KIND_DATA, 9]),
            Err(ProtocolError::Stream(9))
        ));
        let mut junk = vec![6, 0, 0, 0, VERSION, KIND_MESSAGE];
        junk.extend_from_slice(b"{\"o");
        junk.push(b'}');
        assert!(matches!(roundtrip(&junk), Err(ProtocolError::Json(_))));
        let mut big = vec![0u8; 4];
        big.extend_from_slice(&[VERSION, KIND_DATA, 1]);
        big.extend(std::iter::repeat_n(0, CHUNK + 1));
        let n = (big.len() - 4) as u32;
        big[..4].copy_from_slice(&n.to_le_bytes());
        assert!(matches!(roundtrip(&big), Err(ProtocolError::Chunk(_))));
    }
}
