//! The host's end: a client that reaches the agent through a VM's hybrid vsock socket.
//! Every wait is bounded (an agent that does not answer is an error after the timeout,
//! never a hung command), and everything the agent sends is checked by the frame reader.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::protocol::{
    self, Frame, GuestFacts, Message, ProtocolError, Stream, read_frame, write_data, write_end,
    write_message,
};

/// How long a short request (facts, time, shutdown, freeze) waits for its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no vsock socket at {path} ({source}): is the VM running with a vsock device?")]
    Socket { path: PathBuf, source: io::Error },
    #[error("no agent answers in the guest (is vessel-agent running there?)")]
    NoAgent,
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("guest agent: {0}")]
    Protocol(#[from] ProtocolError),
    /// What the agent itself reported.
    #[error("{0}")]
    Guest(String),
    #[error("the guest agent answered {0}")]
    Unexpected(String),
    #[error("{0}")]
    Local(io::Error),
}

impl ClientError {
    fn from_io(e: io::Error, timeout: Duration) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(timeout),
            _ => ClientError::Protocol(ProtocolError::Io(e)),
        }
    }
}

/// How a command in the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// A connection to the agent, made through `socket` (the VM's vsock socket), waiting
/// at most `timeout` for the guest to accept it. A guest that refuses (no agent
/// listening yet: it may be starting) is asked again until the time is up.
pub fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match connect_once(socket, left.max(Duration::from_millis(1))) {
            Err(ClientError::NoAgent) if left > RETRY_PAUSE => std::thread::sleep(RETRY_PAUSE),
            result => return result,
        }
    }
}

/// The pause between two tries of a guest that refused a connection.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

fn connect_once(socket: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Socket {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ClientError::Local)?;
    (&stream)
        .write_all(format!("CONNECT {}\n", protocol::PORT).as_bytes())
        .map_err(|_| ClientError::NoAgent)?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&stream).read(&mut byte) {
            Ok(0) => return Err(ClientError::NoAgent),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(byte[0]),
            Ok(_) => return Err(ClientError::Unexpected("a line too long".into())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match ClientError::from_io(e, timeout) {
                    ClientError::Protocol(_) => ClientError::NoAgent,
                    other => other,
                });
            }
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(ClientError::Unexpected(
            String::from_utf8_lossy(&line).into_owned(),
        ));
    }
    Ok(stream)
}

/// Sends one request and reads its one answer (an agent error becomes
/// [`ClientError::Guest`]).
pub fn request(socket: &Path, m: &Message, timeout: Duration) -> Result<Message, ClientError> {
    let mut stream = connect(socket, timeout)?;
    write_message(&mut stream, m).map_err(|e| ClientError::from_io(e, timeout))?;
    answer(&mut stream, timeout)
}

fn answer(stream: &mut UnixStream, timeout: Duration) -> Result<Message, ClientError> {
    match read_frame(stream).map_err(|e| protocol_error(e, timeout))? {
        Frame::Message(Message::Error { message }) => Err(ClientError::Guest(message)),
        Frame::Message(m) => Ok(m),
        Frame::Data { .. } => Err(ClientError::Unexpected(
            "data where a message was due".into(),
        )),
    }
}

fn protocol_error(e: ProtocolError, timeout: Duration) -> ClientError {
    match e {
        ProtocolError::Io(e) => ClientError::from_io(e, timeout),
        e => ClientError::Protocol(e),
    }
}

fn expect_done(m: Message) -> Result<(), ClientError> {
    match m {
        Message::Done => Ok(()),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// What the guest says about itself.
pub fn facts(socket: &Path, timeout: Duration) -> Result<GuestFacts, ClientError> {
    match request(socket, &Message::GetFacts, timeout)? {
        Message::Facts(f) => Ok(f),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// Sets the guest's clock to the host's.
pub fn sync_time(socket: &Path, timeout: Duration) -> Result<(), ClientError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    expect_done(request(
        socket,
        &Message::SetTime { unix_ns: now },
        timeout,
    )?)
}

/// Asks the guest to stop cleanly.
pub fn shutdown(socket: &Path, reboot: bool, timeout: Duration) -> Result<(), ClientError> {
    expect_done(request(socket, &Message::Shutdown { reboot }, timeout)?)
}

/// The guest's file systems, frozen until [`Frozen::thaw`] (or until this is dropped:
/// the agent thaws them when the connection ends).
pub struct Frozen {
    stream: UnixStream,
    pub filesystems: Vec<String>,
}

pub fn freeze(socket: &Path, timeout: Duration) -> Result<Frozen, ClientError> {
    let mut stream = connect(socket, timeout)?;
    write_message(&mut stream, &Message::Freeze).map_err(|e| ClientError::from_io(e, timeout))?;
    match answer(&mut stream, timeout)? {
        Message::Frozen { filesystems } => Ok(Frozen {
            stream,
            filesystems,
        }),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

impl Frozen {
    pub fn thaw(mut self) -> Result<(), ClientError> {
        write_message(&mut self.stream, &Message::Thaw)
            .map_err(|e| ClientError::from_io(e, ANSWER_TIMEOUT))?;
        expect_done(answer(&mut self.stream, ANSWER_TIMEOUT)?)
    }
}

/// Where a command's standard streams go on the host.
pub struct Stdio<'a> {
    /// Read to its end on a thread of its own and sent as the command's stdin.
    pub stdin: Box<dyn Read + Send>,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// A command for [`exec`].
pub struct Command {
    pub argv: Vec<String>,
    /// On a terminal in the guest (output all on stdout), of this size.
    pub tty: Option<(u16, u16)>,
}

/// Runs a command in the guest and streams its input and output; returns how it ended.
pub fn exec(
    socket: &Path,
    cmd: &Command,
    io: Stdio<'_>,
    timeout: Duration,
) -> Result<ExitStatus, ClientError> {
    let mut stream = connect(socket, timeout)?;
    let (rows, cols) = cmd.tty.unwrap_or((0, 0));
    let request = Message::Exec {
        argv: cmd.argv.clone(),
        tty: cmd.tty.is_some(),
        rows,
        cols,
    };
    write_message(&mut stream, &request).map_err(|e| ClientError::from_io(e, timeout))?;
    // The command may run for as long as it likes.
    stream.set_read_timeout(None).map_err(ClientError::Local)?;
    let writer = stream.try_clone().map_err(ClientError::Local)?;
    let mut stdin = io.stdin;
    // Not joined: a terminal's stdin may never end; the thread ends with the process or
    // at its next read once the connection is gone.
    std::thread::spawn(move || pump_stdin(&mut stdin, writer));
    loop {
        match read_frame(&mut stream).map_err(|e| protocol_error(e, timeout))? {
            Frame::Data {
                stream: Stream::Stdout,
                bytes,
            } => io.stdout.write_all(&bytes).map_err(ClientError::Local)?,
            Frame::Data {
                stream: Stream::Stderr,
                bytes,
            } => io.stderr.write_all(&bytes).map_err(ClientError::Local)?,
            Frame::Data { .. } => {}
            Frame::Message(Message::Exited { code, signal }) => {
                io.stdout.flush().map_err(ClientError::Local)?;
                return Ok(ExitStatus { code, signal });
            }
            Frame::Message(Message::Error { message }) => return Err(ClientError::Guest(message)),
            Frame::Message(other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

fn pump_stdin(stdin: &mut dyn Read, mut to: UnixStream) {
    let mut buf = vec![0u8; protocol::CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if write_data(&mut to, Stream::Stdin, &buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = write_end(&mut to, Stream::Stdin);
}

/// Copies a guest file into `out`; returns its mode.
pub fn read_file(
    socket: &Path,
    path: &str,
    out: &mut dyn Write,
    timeout: Duration,
) -> Result<u32, ClientError> {
    let mut stream = connect(socket, timeout)?;
    let request = Message::ReadFile { path: path.into() };
    write_message(&mut stream, &request).map_err(|e| ClientError::from_io(e, timeout))?;
    let mode = match answer(&mut stream, timeout)? {
        Message::FileInfo { mode, .. } => mode,
        other => return Err(ClientError::Unexpected(format!("{other:?}"))),
    };
    loop {
        match read_frame(&mut stream).map_err(|e| protocol_error(e, timeout))? {
            Frame::Data {
                stream: Stream::File,
                bytes,
            } if bytes.is_empty() => return Ok(mode),
            Frame::Data {
                stream: Stream::File,
                bytes,
            } => out.write_all(&bytes).map_err(ClientError::Local)?,
            Frame::Message(Message::Error { message }) => return Err(ClientError::Guest(message)),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Writes `input` to a guest file with `mode` (replacing it whole, or not at all).
pub fn write_file(
    socket: &Path,
    path: &str,
    mode: u32,
    input: &mut dyn Read,
    timeout: Duration,
) -> Result<(), ClientError> {
    let mut stream = connect(socket, timeout)?;
    let request = Message::WriteFile {
        path: path.into(),
        mode,
    };
    write_message(&mut stream, &request).map_err(|e| ClientError::from_io(e, timeout))?;
    let mut buf = vec![0u8; protocol::CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ClientError::Local(e)),
        };
        if n == 0 {
            break;
        }
        if let Err(e) = write_data(&mut stream, Stream::File, &buf[..n]) {
            // The agent may have said why it stopped taking the file.
            return Err(answer(&mut stream, timeout)
                .err()
                .unwrap_or_else(|| ClientError::from_io(e, timeout)));
        }
    }
    write_end(&mut stream, Stream::File).map_err(|e| ClientError::from_io(e, timeout))?;
    expect_done(answer(&mut stream, timeout)?)
}
