//! The host side of the vsock device: every connection between a guest port and a Unix
//! socket on the host, in the hybrid style of Firecracker and Cloud Hypervisor.
//!
//! - Host to guest: a program connects to the device's socket (`PATH`) and writes
//!   `CONNECT <port>\n`; the guest is asked for a connection to that port and, once it
//!   accepts, the program reads `OK <host port>\n` and the stream is the connection.
//! - Guest to host: a guest connection to host port P is made to `PATH_P`, a Unix socket
//!   the host program listens on.
//!
//! Flow control is virtio-vsock's credit: the guest never has more than [`BUF_ALLOC`]
//! bytes in flight towards the host per connection (a guest that sends more loses the
//! connection), and the host's bytes go to the guest only within the credit the
//! guest's packets announce. Host sockets are watched through one epoll set whose
//! descriptor the device's worker watches; a socket is watched only for what the
//! connection can act on (no busy loop on a socket the guest has no room for).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{self, HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// The receive buffer vessel announces for each connection.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Connections at once; more are refused (RST).
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for the guest's receive buffers; more are dropped.
const MAX_CONTROL: usize = 4096;
/// Host programs connected to `PATH` that have not yet said which port they want.
const MAX_PENDING: usize = 64;
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports for host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = 0;

/// A connection: the host's port and the guest's.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    local: u32,
    peer: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The host asked; the guest has not answered.
    Connecting,
    Established,
}

struct Connection {
    stream: UnixStream,
    token: u64,
    state: State,
    /// The guest's bytes not yet taken by the host socket.
    pending: VecDeque<u8>,
    /// Guest bytes handed to the host socket, and the count the guest was last told.
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    credit_update_queued: bool,
    /// Host bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host socket may have something to read (or its end).
    readable: bool,
    /// Reading the host socket gave its end.
    host_eof: bool,
    hung_up: bool,
    /// The guest will send no more: the host socket's writing side closes once
    /// `pending` is empty.
    guest_done: bool,
    /// The guest closed its socket: the connection ends (with a reset) once `pending`
    /// has reached the host.
    closing: bool,
    /// The epoll interest registered now (empty: not registered).
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Connection {
            stream,
            token,
            state,
            pending: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            credit_update_queued: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            hung_up: false,
            guest_done: false,
            closing: false,
            interest: EventSet::empty(),
        }
    }

    /// How many more bytes the guest has room for.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// What the epoll set should watch on this socket.
    fn wanted(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state == State::Established && !self.readable && !self.host_eof {
            e |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.pending.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }
}

/// A control packet to send when the guest has a receive buffer.
#[derive(Clone, Copy, Debug)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

/// A host program connected to `PATH`, before its `CONNECT` line is complete.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    tokens: HashMap<u64, Key>,
    pending_hosts: HashMap<u64, PendingHost>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Control>,
    /// Connections whose host socket may have bytes for the guest.
    ready: VecDeque<Key>,
    dropped_control: u64,
}

impl Muxer {
    /// Listens on `path` (a stale socket file there is replaced).
    pub fn new(guest_cid: u64, path: &Path) -> io::Result<Muxer> {
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending_hosts: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            dropped_control: 0,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The descriptor that becomes readable when a host socket has news.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Forgets every connection (the driver reset the device, or a restored guest's
    /// connections are gone): host sockets are closed.
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.clear();
        self.control.clear();
        self.ready.clear();
    }

    /// Handles what the host sockets have to say (without blocking).
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER_TOKEN => self.accept_hosts(),
                    token => self.host_event(token, ev.event_set()),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn take_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn accept_hosts(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", self.path.display());
                    return;
                }
            };
            if self.pending_hosts.len() >= MAX_PENDING || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.take_token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
                )
                .is_ok()
            {
                self.pending_hosts.insert(
                    token,
                    PendingHost {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    fn host_event(&mut self, token: u64, events: EventSet) {
        if self.pending_hosts.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            c.hung_up = true;
        }
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
            && !c.readable
            && c.state == State::Established
        {
            c.readable = true;
            self.ready.push_back(key);
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush(key);
        }
        self.rearm(key);
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time (nothing after it is taken:
    /// that is the connection's data).
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending_hosts.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The end, an error or a line too long.
                _ => break None,
            }
        };
        let Some(p) = self.pending_hosts.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = port else {
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: {MAX_CONNECTIONS} connections open; refusing another");
            return;
        }
        let key = Key {
            local: self.free_local_port(port),
            peer: port,
        };
        let token = self.take_token();
        self.tokens.insert(token, key);
        self.conns
            .insert(key, Connection::new(p.stream, token, State::Connecting));
        self.queue_control(key, op::REQUEST, 0);
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let local = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&Key { local, peer }) {
                return local;
            }
        }
    }

    /// One packet from the guest, already checked ([`Header::check_from_guest`]).
    pub fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
            if c.readable && c.peer_credit() > 0 && !self.ready.contains(&key) {
                self.ready.push_back(key);
            }
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (h.op, state) {
            (op::REQUEST, None) => self.connect_to_host(key, h),
            (op::RESPONSE, Some(State::Connecting)) => self.established(key),
            (op::RST, Some(_)) => self.close(key),
            (op::RST, None) => {}
            (op::SHUTDOWN, Some(_)) => self.guest_shutdown(key, h.flags),
            (op::RW, Some(State::Established)) => self.guest_data(key, payload),
            (op::CREDIT_UPDATE, Some(_)) => {}
            (op::CREDIT_REQUEST, Some(_)) => self.queue_credit_update(key),
            // A packet for a connection that does not exist or is not in that state.
            _ => {
                self.close(key);
                self.queue_control(key, op::RST, 0);
            }
        }
    }

    fn connect_to_host(&mut self, key: Key, request: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_control(key, op::RST, 0);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.path.display(), key.local));
        // Never waits: a listener whose queue is full refuses, as one not there does.
        let Ok(stream) = connect_nonblocking(&path) else {
            self.queue_control(key, op::RST, 0);
            return;
        };
        let token = self.take_token();
        self.tokens.insert(token, key);
        let mut c = Connection::new(stream, token, State::Established);
        // The request announces the guest's receive buffer, as every packet does: a
        // host program that speaks first may use it before the guest sends anything.
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        self.conns.insert(key, c);
        self.queue_control(key, op::RESPONSE, 0);
        self.rearm(key);
    }

    fn established(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.state = State::Established;
        let line = format!("OK {}\n", key.local);
        if (&c.stream).write_all(line.as_bytes()).is_err() {
            self.reset_connection(key);
            return;
        }
        self.rearm(key);
    }

    fn guest_data(&mut self, key: Key, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.guest_done || c.pending.len() + payload.len() > BUF_ALLOC as usize {
            // Past its credit (or after saying it was done): the guest breaks its own
            // connection.
            tracing::debug!("vsock: guest port {} sent past its credit", key.peer);
            self.reset_connection(key);
            return;
        }
        c.pending.extend(payload);
        self.flush(key);
        self.rearm(key);
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if flags & SHUTDOWN_SEND != 0 {
            c.guest_done = true;
        }
        // Both: the guest closed its socket. What it sent still goes to the host, then
        // the connection ends with the reset the guest waits for.
        c.closing = flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND;
        self.flush(key);
        self.rearm(key);
    }

    /// Writes what the guest sent to the host socket, as much as it takes.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.pending.is_empty() {
            let (front, _) = c.pending.as_slices();
            match (&c.stream).write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset_connection(key);
                    return;
                }
            }
        }
        if c.pending.is_empty() && c.closing {
            self.reset_connection(key);
            return;
        }
        if c.pending.is_empty() && c.guest_done {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if (c.fwd_cnt - c.fwd_cnt_told).0 >= BUF_ALLOC / 2 {
            self.queue_credit_update(key);
        }
    }

    fn queue_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.credit_update_queued
        {
            c.credit_update_queued = true;
            self.queue_control(key, op::CREDIT_UPDATE, 0);
        }
    }

    /// Ends a connection: the host socket closes, the guest gets a reset.
    fn reset_connection(&mut self, key: Key) {
        self.close(key);
        self.queue_control(key, op::RST, 0);
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if !c.interest.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    fn queue_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL {
            self.dropped_control += 1;
            if self.dropped_control.is_power_of_two() {
                tracing::warn!(
                    "vsock: the guest takes no packets; {} control packets dropped",
                    self.dropped_control
                );
            }
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    /// Watches the connection's socket for what it can act on now.
    fn rearm(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let wanted = c.wanted();
        if wanted == c.interest {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let result = if wanted.is_empty() {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else {
            let op = if c.interest.is_empty() {
                ControlOperation::Add
            } else {
                ControlOperation::Modify
            };
            self.epoll.ctl(op, fd, EpollEvent::new(wanted, c.token))
        };
        match result {
            Ok(()) => c.interest = wanted,
            Err(e) => {
                tracing::warn!("vsock: cannot watch a host socket: {e}");
                self.reset_connection(key);
            }
        }
    }

    /// Whether a packet for the guest may be ready.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// The next packet for the guest, its payload (at most `max_payload` bytes) in
    /// `buf`. None when nothing is ready.
    pub fn next_rx(&mut self, max_payload: usize, buf: &mut Vec<u8>) -> Option<Header> {
        buf.clear();
        if let Some(ctl) = self.control.pop_front() {
            return Some(self.header(ctl.key, ctl.op, ctl.flags, 0));
        }
        let max_payload = max_payload.min(packet::MAX_PAYLOAD as usize);
        if max_payload == 0 {
            // No room for data (a buffer for the header alone): reading into nothing
            // would return 0, which is how the host program's end looks.
            return None;
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if !c.readable || c.state != State::Established {
                continue;
            }
            let credit = c.peer_credit() as usize;
            if credit == 0 {
                // Back on the list when the guest announces room.
                continue;
            }
            buf.resize(credit.min(max_payload), 0);
            match (&c.stream).read(buf) {
                Ok(0) => {
                    c.readable = false;
                    c.host_eof = true;
                    buf.clear();
                    let flags = if c.hung_up || hung_up(&c.stream) {
                        SHUTDOWN_SEND | SHUTDOWN_RCV
                    } else {
                        SHUTDOWN_SEND
                    };
                    self.rearm(key);
                    return Some(self.header(key, op::SHUTDOWN, flags, 0));
                }
                Ok(n) => {
                    buf.truncate(n);
                    c.rx_cnt += n as u32;
                    self.ready.push_back(key);
                    return Some(self.header(key, op::RW, 0, n as u32));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    c.readable = false;
                    buf.clear();
                    self.rearm(key);
                }
                Err(_) => {
                    buf.clear();
                    self.close(key);
                    return Some(self.header(key, op::RST, 0, 0));
                }
            }
        }
        None
    }

    /// A header from the host's side of `key`, with the connection's current credit.
    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_told = c.fwd_cnt;
                if op == op::CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
                c.fwd_cnt.0
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A non-blocking connection to the Unix socket at `path`; an error (EAGAIN) rather than
/// a wait when its listener's queue is full.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a new socket; its descriptor is owned by the UnixStream below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us, owned by nobody else.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a sockaddr_un that lives across the call, `len` within it.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Whether both directions of a socket are closed (the host program went away, as
/// opposed to only ending what it sends).
fn hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call; no waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// The port of a `CONNECT <port>` line.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("CONNECT ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
