//! The guest's end: `vessel-agent`, the server inside the VM.
//!
//! [`main`] listens on vsock port [`protocol::PORT`] and serves every connection on a
//! thread of its own with [`serve_connection`]: one connection carries one request (the
//! first frame), its data, and the answer, then it is closed. Nothing the host sends can
//! stop the process: a bad frame or a failed request is answered with
//! [`Message::Error`] where the connection still allows, logged as one line on stderr, and
//! ends that connection only.
//!
//! [`serve_connection`] works on any [`Connection`] (a [`VsockStream`] in the guest, a
//! `UnixStream` in the tests), so everything but the listening socket runs on the host
//! too.

mod exec;
mod facts;
mod files;
mod freeze;
mod power;
mod vsock;

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use crate::protocol::{self, Frame, Message, ProtocolError, Stream};

pub use facts::{gather_facts, parse_meminfo, parse_os_release};
pub use freeze::{THAW_AFTER, freezable_mounts};
pub use power::{HaltPlan, HaltStep, halt_plan};
pub use vsock::{VsockListener, VsockStream, main};

/// A byte stream to the host that can be shared between threads.
pub trait Connection: Read + Write + Send + Sized + 'static {
    /// Another handle to the same stream (reads and writes go to the same socket).
    fn try_clone(&self) -> io::Result<Self>;
    /// Makes a read wait at most `timeout` (then it fails with `WouldBlock`/`TimedOut`).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Ends the stream both ways, waking any thread blocked reading it.
    fn shutdown(&self) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
}

/// Why a connection ended early.
#[derive(Debug, Error)]
pub enum GuestError {
    /// What the host sent could not be read (or the connection broke).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Writing to the host failed: the connection is gone.
    #[error("writing to the host: {0}")]
    Send(io::Error),
    /// The first frame is not a request this end serves.
    #[error("unexpected request")]
    UnexpectedRequest,
    /// A frame that does not belong in the request being served.
    #[error("unexpected frame during {0}")]
    UnexpectedFrame(&'static str),
    /// The request failed; the text is what the host is told.
    #[error("{0}")]
    Failed(String),
}

impl GuestError {
    /// A failure of `what` (a path, usually) because of `e`: "no such file: /x".
    pub(crate) fn io(what: &str, e: &io::Error) -> GuestError {
        GuestError::Failed(match e.kind() {
            io::ErrorKind::NotFound => format!("no such file: {what}"),
            _ => format!("{what}: {}", io_text(e)),
        })
    }
}

/// `e` without the " (os error N)" tail.
pub(crate) fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Writes one line to stderr (the guest's log).
pub(crate) fn log(what: impl std::fmt::Display) {
    let line = what.to_string().replace('\n', " ");
    eprintln!("vessel-agent: {line}");
}

/// The writing half of a connection, shared by the threads that answer: every frame is
/// written whole under the lock.
pub(crate) struct Sender<C>(Arc<Mutex<C>>);

impl<C> Clone for Sender<C> {
    fn clone(&self) -> Self {
        Sender(Arc::clone(&self.0))
    }
}

impl<C: Connection> Sender<C> {
    fn lock(&self) -> MutexGuard<'_, C> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn message(&self, m: &Message) -> Result<(), GuestError> {
        protocol::write_message(&mut *self.lock(), m).map_err(GuestError::Send)
    }

    /// Sends `bytes` (any length) as data frames of `stream`.
    pub(crate) fn data(&self, stream: Stream, bytes: &[u8]) -> Result<(), GuestError> {
        for chunk in bytes.chunks(protocol::CHUNK) {
            protocol::write_data(&mut *self.lock(), stream, chunk).map_err(GuestError::Send)?;
        }
        Ok(())
    }

    pub(crate) fn end(&self, stream: Stream) -> Result<(), GuestError> {
        protocol::write_end(&mut *self.lock(), stream).map_err(GuestError::Send)
    }

    fn shutdown(&self) {
        // The host may be gone already; there is nothing left to tell it either way.
        let _ = self.lock().shutdown();
    }
}

/// The reading half of a connection.
pub(crate) type Receiver<C> = BufReader<C>;

/// Serves the one request `conn` carries, answers it, and closes `conn`.
///
/// A connection closed before its first frame is not an error. Every other failure is
/// answered with [`Message::Error`] while the connection allows it and returned.
pub fn serve_connection<C: Connection>(conn: C) -> Result<(), GuestError> {
    let receiver = BufReader::with_capacity(protocol::CHUNK + 64, conn.try_clone()?);
    let sender = Sender(Arc::new(Mutex::new(conn)));
    let result = serve(receiver, &sender);
    if let Err(e) = &result
        && !matches!(e, GuestError::Send(_))
    {
        let message = e.to_string().replace('\n', " ");
        let _ = sender.message(&Message::Error { message });
    }
    sender.shutdown();
    result
}

fn serve<C: Connection>(mut receiver: Receiver<C>, sender: &Sender<C>) -> Result<(), GuestError> {
    let request = match protocol::read_frame(&mut receiver) {
        Ok(Frame::Message(m)) => m,
        Ok(Frame::Data { .. }) => return Err(GuestError::UnexpectedRequest),
        // A connection without a request (a probe) is no error.
        Err(ProtocolError::Closed) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    match request {
        Message::Exec {
            argv,
            tty,
            rows,
            cols,
        } => exec::exec(
            &exec::Request {
                argv,
                tty,
                rows,
                cols,
            },
            receiver,
            sender,
        ),
        Message::ReadFile { path } => files::read_file(&path, sender),
        Message::WriteFile { path, mode } => files::write_file(&path, mode, receiver, sender),
        Message::Shutdown { reboot } => power::shutdown(reboot, receiver, sender),
        Message::SetTime { unix_ns } => power::set_time(unix_ns, sender),
        Message::Freeze => freeze::freeze(receiver, sender),
        Message::GetFacts => sender.message(&Message::Facts(gather_facts())),
        _ => Err(GuestError::UnexpectedRequest),
    }
}

impl From<io::Error> for GuestError {
    /// An I/O error of the connection itself.
    fn from(e: io::Error) -> Self {
        GuestError::Protocol(ProtocolError::Io(e))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A host end for the tests: the server runs on a thread, over a socket pair.

    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::thread::{self, JoinHandle};

    use super::{GuestError, serve_connection};
    use crate::protocol::{self, Frame, Message, ProtocolError};

    pub(crate) struct Host {
        pub(crate) conn: UnixStream,
        pub(crate) server: JoinHandle<Result<(), GuestError>>,
    }

    /// Starts a server and sends it `request`.
    pub(crate) fn start(request: &Message) -> Host {
        let (mut conn, guest) = UnixStream::pair().expect("socketpair");
        let server = thread::spawn(move || serve_connection(guest));
        protocol::write_message(&mut conn, request).expect("send the request");
        Host { conn, server }
    }

    /// Every frame up to the end of the connection.
    pub(crate) fn frames(conn: &mut UnixStream) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            match protocol::read_frame(conn) {
                Ok(frame) => out.push(frame),
                Err(ProtocolError::Closed) => return out,
                Err(e) => panic!("reading the answer: {e}"),
            }
        }
    }

    /// Sends `request` and returns every frame of the answer and the server's result.
    pub(crate) fn round_trip(request: &Message) -> (Vec<Frame>, Result<(), GuestError>) {
        let mut host = start(request);
        let frames = frames(&mut host.conn);
        (
            frames,
            host.server.join().expect("the server does not panic"),
        )
    }

    /// Sends raw bytes as the first frame.
    pub(crate) fn raw(bytes: &[u8]) -> (Vec<Frame>, Result<(), GuestError>) {
        let (mut conn, guest) = UnixStream::pair().expect("socketpair");
        let server = thread::spawn(move || serve_connection(guest));
        conn.write_all(bytes).expect("send");
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let frames = frames(&mut conn);
        (frames, server.join().expect("the server does not panic"))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{raw, round_trip};
    use crate::protocol::{self, Frame, Message, Stream};

    fn is_error(frames: &[Frame]) -> bool {
        matches!(frames, [Frame::Message(Message::Error { .. })])
    }

    #[test]
    fn garbage_first_frames_are_answered_not_panicked_on() {
        let mut junk = vec![9, 0, 0, 0, protocol::VERSION, protocol::KIND_MESSAGE];
        junk.extend_from_slice(b"{\"op\":1}");
        for bytes in [
            &junk[..],
            &[0xff, 0xff, 0xff, 0xff][..],
            &[2, 0, 0, 0, 7, 0][..],
            &[1, 0][..],
            b"GET / HTTP/1.0\r\n\r\n",
        ] {
            let (frames, result) = raw(bytes);
            assert!(result.is_err(), "{bytes:?}");
            assert!(frames.is_empty() || is_error(&frames), "{frames:?}");
        }
    }

    #[test]
    fn an_empty_connection_is_not_an_error() {
        let (frames, result) = raw(&[]);
        assert!(frames.is_empty());
        assert!(result.is_ok());
    }

    #[test]
    fn answers_and_data_are_not_requests() {
        for m in [
            Message::Thaw,
            Message::Done,
            Message::Exited {
                code: Some(0),
                signal: None,
            },
        ] {
            let (frames, result) = round_trip(&m);
            assert!(
                matches!(&frames[..], [Frame::Message(Message::Error { message })] if message == "unexpected request"),
                "{frames:?}"
            );
            assert!(result.is_err());
        }
        let (frames, _) = raw(&protocol::encode_data(Stream::Stdin, b"hi"));
        assert!(is_error(&frames), "{frames:?}");
    }
}
