//! `Exec`: runs a command, with pipes or on a pseudo-terminal.
//!
//! The request's thread spawns the child and waits for it; a thread per output (one for
//! a terminal) sends what it reads as data frames; another feeds the host's stdin frames
//! to the child. When the host's end goes away, the child's process group is killed. The
//! answer ends once the child has exited and its outputs are at their end.

use std::ffi::{CStr, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use super::{Connection, GuestError, Receiver, Sender, io_text, log};
use crate::protocol::{self, CHUNK, Frame, Message, ProtocolError, Stream};

pub(crate) struct Request {
    pub(crate) argv: Vec<String>,
    pub(crate) tty: bool,
    pub(crate) rows: u16,
    pub(crate) cols: u16,
}

/// The running child's process group, killed when the host goes away, until the answer is
/// complete.
struct Group {
    pid: libc::pid_t,
    finished: Mutex<bool>,
}

impl Group {
    fn kill(&self) {
        let finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        if !*finished {
            // The group is the child's own (made its leader at spawn) and the child is not
            // yet reaped or its group still has members: the id names no other process.
            // SAFETY: kill(2) of that group, with plain integers.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
    }

    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }
}

/// Where the host's stdin goes: the child's stdin pipe or the terminal's master.
enum Input {
    Pipe(Option<std::process::ChildStdin>),
    Terminal(File),
}

pub(crate) fn exec<C: Connection>(
    request: &Request,
    receiver: Receiver<C>,
    sender: &Sender<C>,
) -> Result<(), GuestError> {
    let Some(program) = request.argv.first() else {
        return Err(GuestError::Failed("exec: empty command".into()));
    };
    let mut command = Command::new(program);
    command.args(&request.argv[1..]);
    let (mut child, outputs, input) = if request.tty {
        spawn_terminal(command, request)?
    } else {
        spawn_pipes(command)?
    };
    let group = Arc::new(Group {
        pid: child.id() as libc::pid_t,
        finished: Mutex::new(false),
    });
    let readers: Vec<_> = outputs
        .into_iter()
        .map(|(stream, source)| forward_output(source, stream, sender.clone(), Arc::clone(&group)))
        .collect();
    let group_for_input = Arc::clone(&group);
    thread::spawn(move || feed_input(receiver, input, &group_for_input));
    let status = wait(&mut child);
    for reader in readers {
        let _ = reader.join();
    }
    group.finish();
    let status = status?;
    sender.end(Stream::Stdout)?;
    sender.end(Stream::Stderr)?;
    sender.message(&Message::Exited {
        code: status.code(),
        signal: status.signal(),
    })
}

type Spawned = (Child, Vec<(Stream, File)>, Input);

fn spawn_failed(program: &str, e: &io::Error) -> GuestError {
    GuestError::Failed(format!("cannot run {program}: {}", io_text(e)))
}

fn spawn_pipes(mut command: Command) -> Result<Spawned, GuestError> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command.spawn().map_err(|e| spawn_failed(&program, &e))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(GuestError::Failed("exec: no output pipes".into()));
    };
    let outputs = vec![
        (Stream::Stdout, File::from(OwnedFd::from(stdout))),
        (Stream::Stderr, File::from(OwnedFd::from(stderr))),
    ];
    let input = Input::Pipe(child.stdin.take());
    Ok((child, outputs, input))
}

fn spawn_terminal(mut command: Command, request: &Request) -> Result<Spawned, GuestError> {
    let (master, slave) = open_pty(request.rows, request.cols)
        .map_err(|e| GuestError::Failed(format!("cannot open a terminal: {}", io_text(&e))))?;
    let clone = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| GuestError::Failed(format!("terminal: {}", io_text(&e))))
    };
    command
        .stdin(Stdio::from(clone(&slave)?))
        .stdout(Stdio::from(clone(&slave)?))
        .stderr(Stdio::from(slave));
    if std::env::var_os("TERM").is_none() {
        command.env("TERM", "xterm");
    }
    // SAFETY: the hook runs in the child between fork and exec and calls only setsid(2)
    // and ioctl(2), which are async-signal-safe; it touches no memory of the parent's.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let program = command.get_program().to_string_lossy().into_owned();
    let child = command.spawn().map_err(|e| spawn_failed(&program, &e));
    // The parent's copies of the slave go with the command: the master reads EIO once
    // the child's side is closed.
    drop(command);
    let child = child?;
    let master = File::from(master);
    let input = Input::Terminal(
        master
            .try_clone()
            .map_err(|e| GuestError::Failed(format!("terminal: {}", io_text(&e))))?,
    );
    Ok((child, vec![(Stream::Stdout, master)], input))
}

/// A pseudo-terminal's master and slave, both close-on-exec from the start (a command
/// spawned meanwhile by another connection must not hold the slave open), of
/// `rows`x`cols` if given.
fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = OwnedFd::from(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")?,
    );
    // SAFETY: unlockpt(3) on a terminal master this function owns.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let slave = open_slave(&master)?;
    if rows != 0 && cols != 0 {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave))
}

/// The slave of `master`: TIOCGPTPEER, or by its name before Linux 4.13.
fn open_slave(master: &OwnedFd) -> io::Result<OwnedFd> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as an int and returns a new descriptor.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd >= 0 {
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r(3) writes at most `name.len()` bytes into `name`.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r succeeded: `name` holds a NUL-terminated path.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) };
    let path = Path::new(OsStr::from_bytes(name.to_bytes()));
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    Ok(OwnedFd::from(slave))
}

fn wait(child: &mut Child) -> Result<ExitStatus, GuestError> {
    child
        .wait()
        .map_err(|e| GuestError::Failed(format!("waiting for the command: {}", io_text(&e))))
}

/// Sends what `source` gives as `stream` data until its end (EIO on a terminal's master
/// is the end too); kills the group if the host is gone.
fn forward_output<C: Connection>(
    mut source: File,
    stream: Stream,
    sender: Sender<C>,
    group: Arc<Group>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return,
                Err(e) => {
                    log(format!("exec: reading the command's output: {e}"));
                    return;
                }
            };
            if let Err(e) = sender.data(stream, &buf[..n]) {
                log(format!("exec: {e}"));
                group.kill();
                return;
            }
        }
    })
}

/// Feeds the host's stdin frames to the child until the connection ends; kills the group
/// when that happens before the answer is complete.
fn feed_input<C: Connection>(mut receiver: Receiver<C>, mut input: Input, group: &Group) {
    loop {
        match protocol::read_frame(&mut receiver) {
            Ok(Frame::Data {
                stream: Stream::Stdin,
                bytes,
            }) => input.feed(&bytes),
            Ok(_) => {
                log(GuestError::UnexpectedFrame("exec"));
                break;
            }
            Err(ProtocolError::Closed) => break,
            Err(e) => {
                log(format!("exec: {e}"));
                break;
            }
        }
    }
    group.kill();
}

impl Input {
    /// Writes `bytes` to the child; an empty chunk closes a pipe (a terminal stays open:
    /// its end is the child's exit).
    fn feed(&mut self, bytes: &[u8]) {
        let result = match self {
            Input::Pipe(pipe) if bytes.is_empty() => {
                *pipe = None;
                Ok(())
            }
            Input::Pipe(Some(pipe)) => pipe.write_all(bytes),
            Input::Pipe(None) => Ok(()),
            Input::Terminal(_) if bytes.is_empty() => Ok(()),
            Input::Terminal(master) => master.write_all(bytes),
        };
        if let Err(e) = result {
            // The child closed its stdin (EPIPE) or the terminal is gone (EIO): what is
            // left of the input has nowhere to go.
            if !matches!(e.raw_os_error(), Some(libc::EPIPE | libc::EIO)) {
                log(format!("exec: writing the command's input: {e}"));
            }
            if let Input::Pipe(pipe) = self {
                *pipe = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use crate::guest::testing::{frames, round_trip, start};
    use crate::protocol::{self, Frame, Message, Stream};

    fn exec(argv: &[&str], tty: bool) -> Message {
        Message::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            tty,
            rows: 24,
            cols: 80,
        }
    }

    /// Stdout bytes, stderr bytes, the ends seen, and the final message.
    fn collect(frames: Vec<Frame>) -> (Vec<u8>, Vec<u8>, usize, Option<Message>) {
        let (mut out, mut err, mut ends, mut last) = (Vec::new(), Vec::new(), 0, None);
        for frame in frames {
            match frame {
                Frame::Data { bytes, .. } if bytes.is_empty() => ends += 1,
                Frame::Data {
                    stream: Stream::Stdout,
                    bytes,
                } => out.extend(bytes),
                Frame::Data {
                    stream: Stream::Stderr,
                    bytes,
                } => err.extend(bytes),
                Frame::Data { stream, .. } => panic!("data on {stream:?}"),
                Frame::Message(m) => {
                    assert!(last.is_none(), "a second message: {m:?}");
                    last = Some(m);
                }
            }
        }
        (out, err, ends, last)
    }

    #[test]
    fn exec_sends_both_outputs_and_the_exit_code() {
        let request = exec(&["sh", "-c", "echo out; echo err >&2; exit 7"], false);
        let mut host = start(&request);
        protocol::write_end(&mut host.conn, Stream::Stdin).unwrap();
        let (out, err, ends, last) = collect(frames(&mut host.conn));
        assert!(host.server.join().unwrap().is_ok());
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(ends, 2);
        assert_eq!(
            last,
            Some(Message::Exited {
                code: Some(7),
                signal: None
            })
        );
    }

    #[test]
    fn exec_echoes_a_mebibyte_of_stdin() {
        let input: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut host = start(&exec(&["cat"], false));
        let mut writer = host.conn.try_clone().unwrap();
        let sent = input.clone();
        let feeder = thread::spawn(move || {
            for chunk in sent.chunks(10_000) {
                protocol::write_data(&mut writer, Stream::Stdin, chunk).unwrap();
            }
            protocol::write_end(&mut writer, Stream::Stdin).unwrap();
        });
        let (out, err, ends, last) = collect(frames(&mut host.conn));
        feeder.join().unwrap();
        assert!(host.server.join().unwrap().is_ok());
        assert!(out == input, "{} bytes back of {}", out.len(), input.len());
        assert!(err.is_empty());
        assert_eq!(ends, 2);
        assert_eq!(
            last,
            Some(Message::Exited {
                code: Some(0),
                signal: None
            })
        );
    }

    #[test]
    fn exec_on_a_terminal() {
        let (frames, result) = round_trip(&exec(
            &[
                "sh",
                "-c",
                "tty; stty size; [ -n \"$TERM\" ] && echo term; exit 3",
            ],
            true,
        ));
        assert!(result.is_ok());
        let (out, err, _, last) = collect(frames);
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("/dev/pts/"), "{out:?}");
        assert!(out.contains("24 80"), "{out:?}");
        assert!(out.contains("term"), "{out:?}");
        assert!(err.is_empty());
        assert_eq!(
            last,
            Some(Message::Exited {
                code: Some(3),
                signal: None
            })
        );
    }

    #[test]
    fn exec_reports_signals_and_missing_programs() {
        let mut host = start(&exec(&["sh", "-c", "kill -TERM $$"], false));
        let (_, _, _, last) = collect(frames(&mut host.conn));
        assert_eq!(
            last,
            Some(Message::Exited {
                code: None,
                signal: Some(libc::SIGTERM)
            })
        );
        let (frames, result) = round_trip(&exec(&["/no/such/program"], false));
        assert!(result.is_err());
        assert!(
            matches!(&frames[..], [Frame::Message(Message::Error { message })] if message.contains("/no/such/program")),
            "{frames:?}"
        );
        let (frames, _) = round_trip(&exec(&[], false));
        assert!(matches!(
            &frames[..],
            [Frame::Message(Message::Error { .. })]
        ));
    }

    #[test]
    fn the_host_going_away_kills_the_command() {
        let host = start(&exec(&["sleep", "1000"], false));
        thread::sleep(std::time::Duration::from_millis(200));
        drop(host.conn);
        // The server only returns once the child is gone.
        assert!(host.server.join().unwrap().is_err());
    }
}
