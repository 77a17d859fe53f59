//! What a guest agent sends the host, the agent being the guest's and so possibly
//! hostile: vessel's frame parser, and the host's client functions reading it.
//!
//! Byte 0 picks the client function (and bit 3: the agent's answer to `CONNECT` is the
//! input's first line, when it has one, instead of `OK 1`); the rest is what the agent
//! sends. It goes through:
//!
//! - the parser: [`protocol::decode`] on it whole, and [`protocol::read_frame`] frame
//!   after frame; whatever decodes must encode to a frame that decodes to the same.
//! - a client function against an agent on a real socket: a thread accepts the
//!   client's connection at a Unix socket, checks its `CONNECT 1024` line, answers, sends
//!   the bytes and ends its side. The client must return, and what it returns must be
//!   what the same frames mean (as the parser reads them).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent::host::{self, ClientError, Command, ExitStatus, Stdio};
use agent::protocol::{self, Frame, GuestFacts, MAX_FRAME, Message, ProtocolError, Stream};

use crate::sandbox;

const TIMEOUT: Duration = Duration::from_secs(1);
/// Frames read from one input at most (each at least 6 bytes: the input bounds it).
const MAX_FRAMES: usize = 4096;

static RUNS: AtomicU64 = AtomicU64::new(0);

pub fn agent_protocol(data: &[u8]) {
    let _ = agent_protocol_outcome(data);
}

/// The harness, with what the client function returned (for the corpus test: the seeds
/// must be answers the client takes).
pub fn agent_protocol_outcome(data: &[u8]) -> Result<(), String> {
    let Some((&mode, rest)) = data.split_first() else {
        return Err("empty".into());
    };
    if let Ok(f) = protocol::decode(rest) {
        round_trip(&f);
    }
    for f in &frames(rest) {
        round_trip(f);
    }
    client(mode, rest).map_err(|e| e.to_string())
}

/// What decodes encodes to a frame that decodes (whole or read from a stream) to the
/// same thing.
fn round_trip(f: &Frame) {
    let bytes = match f {
        Frame::Message(m) => protocol::encode_message(m),
        Frame::Data { stream, bytes } => protocol::encode_data(*stream, bytes),
    };
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("a length word")) as usize;
    assert_eq!(len, bytes.len() - 4, "a frame's length word");
    // Only a message decoded from a frame near the limit could grow past it.
    if len > MAX_FRAME {
        return;
    }
    let again = protocol::read_frame(&mut &bytes[..]).expect("an encoded frame reads back");
    assert!(same(&again, f), "{f:?} came back as {again:?}");
    let again = protocol::decode(&bytes[4..]).expect("an encoded frame decodes");
    assert!(same(&again, f), "{f:?} came back as {again:?}");
}

/// Equal, but for the one float of the protocol (a guest's uptime): serde_json as vessel
/// builds it (without its `float_roundtrip` feature) parses a number to within an ULP or
/// two of the text rather than always to the nearest, so a value that went through
/// encoding may come back that far off (2 ULPs at most over millions of random numbers).
fn same(a: &Frame, b: &Frame) -> bool {
    match (a, b) {
        (Frame::Message(Message::Facts(x)), Frame::Message(Message::Facts(y))) => {
            let y_as_x = GuestFacts {
                uptime_seconds: x.uptime_seconds,
                ..y.clone()
            };
            *x == y_as_x && ulps(x.uptime_seconds, y.uptime_seconds) <= 4
        }
        _ => a == b,
    }
}

/// How many representable doubles apart two finite numbers are.
fn ulps(a: f64, b: f64) -> u64 {
    // The bits as a line from the most negative to the most positive number.
    let line = |x: f64| {
        let bits = x.to_bits() as i64;
        if bits < 0 { i64::MIN - bits } else { bits }
    };
    (i128::from(line(a)) - i128::from(line(b))).unsigned_abs() as u64
}

/// The frames a stream of `bytes` carries, up to its end or its first bad frame.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut r = bytes;
    let mut out = Vec::new();
    for _ in 0..MAX_FRAMES {
        match protocol::read_frame(&mut r) {
            Ok(f) => out.push(f),
            Err(ProtocolError::Closed) => {
                assert!(r.is_empty(), "the end of a stream with bytes left");
                break;
            }
            Err(_) => break,
        }
    }
    out
}

/// The client function byte 0 picks against an agent sending `bytes`.
fn client(mode: u8, bytes: &[u8]) -> Outcome {
    sandbox::ignore_sigpipe();
    let (answer, bytes) = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) if mode & 8 != 0 => bytes.split_at(i + 1),
        _ => (&b"OK 1\n"[..], bytes),
    };
    let path = sandbox::dir().join(format!("a{}", RUNS.fetch_add(1, Ordering::Relaxed)));
    let listener = UnixListener::bind(&path).expect("the agent's socket");
    let agent = {
        let (answer, bytes) = (answer.to_vec(), bytes.to_vec());
        std::thread::spawn(move || play_agent(&listener, &answer, &bytes))
    };
    let handshake_ok = answer.starts_with(b"OK ") && answer.len() <= 33;
    let frames = frames(bytes);
    let threads = threads();
    let outcome = call(mode % 8, &path, &frames, handshake_ok);
    let connect_line = agent.join().expect("the agent thread");
    wait_for_threads(&threads);
    let _ = std::fs::remove_file(&path);
    assert_eq!(connect_line, b"CONNECT 1024\n");
    match outcome {
        Err(ClientError::Timeout(_) | ClientError::NoAgent | ClientError::Socket { .. }) => {
            panic!("{outcome:?} from an agent that answered and hung up")
        }
        Err(ClientError::Unexpected(_)) if !handshake_ok => {}
        _ => assert!(handshake_ok, "{outcome:?} after the answer {answer:?}"),
    }
    outcome
}

/// The process's threads.
fn threads() -> Vec<u64> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (a second at most) until the threads started since `before` are gone: `exec`
/// leaves its stdin thread unjoined (a terminal's stdin may never end); with an empty
/// stdin it has sent the end of stdin, and so is ending, by the time the agent sees the
/// client hang up. Ended, it holds no memory the leak checker after the run would
/// report, and no run leaves a thread behind.
fn wait_for_threads(before: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while threads().iter().any(|t| !before.contains(t)) && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// The agent: takes the client's connection, reads its `CONNECT` line, answers, sends
/// `bytes`, ends its side and waits for the client to hang up (bounded, in case it
/// never does).
fn play_agent(listener: &UnixListener, answer: &[u8], bytes: &[u8]) -> Vec<u8> {
    let (mut s, _) = listener.accept().expect("the client's connection");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 && !line.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    let _ = s.write_all(answer);
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    line
}

/// Outcome of a client call, checked against what `frames` mean.
type Outcome = Result<(), ClientError>;

/// `strict`: the agent answered `OK`, so the frames are what the client reads.
fn call(which: u8, socket: &Path, frames: &[Frame], strict: bool) -> Outcome {
    let frames = if strict { frames } else { &[] };
    let mut f = frames.iter();
    match which {
        0 => {
            let got = host::facts(socket, TIMEOUT);
            let want: Option<&GuestFacts> = match f.next() {
                Some(Frame::Message(Message::Facts(facts))) => Some(facts),
                _ => None,
            };
            check(got.as_ref(), want);
            got.map(drop)
        }
        1 => {
            let mut out = Vec::new();
            let got = host::read_file(socket, "/x", &mut out, TIMEOUT);
            let want = match f.next() {
                Some(Frame::Message(Message::FileInfo { mode, .. })) => {
                    let mut data = Vec::new();
                    let mut end = None;
                    for fr in f {
                        match fr {
                            Frame::Data {
                                stream: Stream::File,
                                bytes,
                            } if bytes.is_empty() => {
                                end = Some(*mode);
                                break;
                            }
                            Frame::Data {
                                stream: Stream::File,
                                bytes,
                            } => data.extend_from_slice(bytes),
                            _ => break,
                        }
                    }
                    end.map(|m| (m, data))
                }
                _ => None,
            };
            if let Ok(mode) = &got {
                assert_eq!(Some((*mode, out)), want, "read_file");
            } else {
                check_err(got.as_ref().err(), want.is_some(), frames);
            }
            got.map(drop)
        }
        2 => {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let cmd = Command {
                argv: vec!["true".into()],
                tty: None,
            };
            let io = Stdio {
                stdin: Box::new(io::empty()),
                stdout: &mut stdout,
                stderr: &mut stderr,
            };
            let got = host::exec(socket, &cmd, io, TIMEOUT);
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut want = None;
            for fr in f {
                match fr {
                    Frame::Data {
                        stream: Stream::Stdout,
                        bytes,
                    } => out.extend_from_slice(bytes),
                    Frame::Data {
                        stream: Stream::Stderr,
                        bytes,
                    } => err.extend_from_slice(bytes),
                    Frame::Data { .. } => {}
                    Frame::Message(Message::Exited { code, signal }) => {
                        want = Some(ExitStatus {
                            code: *code,
                            signal: *signal,
                        });
                        break;
                    }
                    Frame::Message(_) => break,
                }
            }
            if let Ok(status) = &got {
                assert_eq!(Some(*status), want, "exec");
                assert_eq!((stdout, stderr), (out, err), "exec's output");
            } else {
                check_err(got.as_ref().err(), want.is_some(), frames);
            }
            got.map(drop)
        }
        3 => match host::freeze(socket, TIMEOUT) {
            Ok(frozen) => {
                let fs = frozen.filesystems.clone();
                assert!(
                    matches!(f.next(), Some(Frame::Message(Message::Frozen { filesystems })) if *filesystems == fs)
                );
                let thawed = frozen.thaw();
                let done = matches!(f.next(), Some(Frame::Message(Message::Done)));
                assert_eq!(thawed.is_ok(), done, "thaw: {thawed:?}");
                thawed
            }
            Err(e) => {
                let frozen = matches!(f.next(), Some(Frame::Message(Message::Frozen { .. })));
                check_err(Some(&e), frozen, frames);
                Err(e)
            }
        },
        4 => {
            let got = host::write_file(socket, "/x", 0o644, &mut io::empty(), TIMEOUT);
            done(got, f.next(), frames)
        }
        5 => done(host::shutdown(socket, false, TIMEOUT), f.next(), frames),
        6 => done(host::sync_time(socket, TIMEOUT), f.next(), frames),
        _ => {
            let got = host::request(socket, &Message::GetFacts, TIMEOUT);
            let want = match f.next() {
                Some(Frame::Message(m)) if !matches!(m, Message::Error { .. }) => Some(m),
                _ => None,
            };
            check(got.as_ref(), want);
            got.map(drop)
        }
    }
}

fn done(got: Outcome, first: Option<&Frame>, frames: &[Frame]) -> Outcome {
    let want = matches!(first, Some(Frame::Message(Message::Done)));
    match &got {
        Ok(()) => assert!(want, "Done without a Done frame"),
        Err(e) => check_err(Some(e), want, frames),
    }
    got
}

/// A one-answer call: Ok with exactly the answer the first frame carries, or an error
/// when it carries none.
fn check<T: PartialEq + std::fmt::Debug>(got: Result<&T, &ClientError>, want: Option<&T>) {
    match (got, want) {
        (Ok(g), Some(w)) => assert_eq!(g, w),
        (Ok(g), None) => panic!("{g:?} from frames that do not say so"),
        (Err(e), Some(w)) => panic!("{e:?} where the agent answered {w:?}"),
        (Err(_), None) => {}
    }
}

/// An error where the frames held a complete answer must be the agent's own error
/// (not possible before that answer) — anything else means a good answer was lost.
fn check_err(e: Option<&ClientError>, answered: bool, frames: &[Frame]) {
    if answered {
        panic!("{e:?} where the agent answered properly: {frames:?}");
    }
}

/// Seeds: real answers of the agent (as `vessel-agent` encodes them) to each client call.
pub fn agent_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use protocol::{encode_data, encode_message};
    let seed = |mode: u8, frames: &[Vec<u8>]| {
        let mut v = vec![mode];
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    };
    let exited = encode_message(&Message::Exited {
        code: Some(0),
        signal: None,
    });
    let facts = encode_message(&Message::Facts(GuestFacts {
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-28-amd64".into(),
        uptime_seconds: 12.5,
        addresses: vec!["eth0 10.0.2.15/24".into()],
        memory_total_kib: 2_014_244,
        memory_available_kib: 1_771_032,
        clock_unix_ns: 1_747_000_000_123_456_789,
    }));
    let done = encode_message(&Message::Done);
    vec![
        ("facts", seed(0, &[facts])),
        (
            "read-file",
            seed(
                1,
                &[
                    encode_message(&Message::FileInfo {
                        mode: 0o100644,
                        size: 12,
                    }),
                    encode_data(Stream::File, b"hello world\n"),
                    encode_data(Stream::File, b""),
                ],
            ),
        ),
        (
            "exec",
            seed(
                2,
                &[
                    encode_data(Stream::Stdout, b"6.1.0-28-amd64\n"),
                    encode_data(Stream::Stderr, b"uname: warning\n"),
                    exited,
                ],
            ),
        ),
        (
            "exec-signal",
            seed(
                2,
                &[
                    encode_data(Stream::Stdout, b"partial"),
                    encode_message(&Message::Exited {
                        code: None,
                        signal: Some(9),
                    }),
                ],
            ),
        ),
        (
            "freeze",
            seed(
                3,
                &[
                    encode_message(&Message::Frozen {
                        filesystems: vec!["/".into(), "/boot".into()],
                    }),
                    done.clone(),
                ],
            ),
        ),
        ("write-file", seed(4, std::slice::from_ref(&done))),
        (
            "error",
            seed(
                5,
                &[encode_message(&Message::Error {
                    message: "permission denied".into(),
                })],
            ),
        ),
        (
            "exec-request",
            seed(
                7,
                &[encode_message(&Message::Exec {
                    argv: vec!["uname".into(), "-r".into()],
                    tty: true,
                    rows: 24,
                    cols: 80,
                })],
            ),
        ),
        (
            "handshake",
            seed(8 | 6, &[b"OK 1073741824\n".to_vec(), done]),
        ),
    ]
}
