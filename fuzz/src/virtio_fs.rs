//! What the monitor parses from virtiofsd: the virtio-fs device's vhost-user frontend
//! (`VirtioFs`, over the vhost crate's `Frontend`) talking to a thread that plays
//! virtiofsd on the other end of a socket pair. The device is made on the connection
//! (SET_OWNER, GET_FEATURES), activated as the driver's DRIVER_OK does it
//! (SET_FEATURES, SET_MEM_TABLE, and per ready queue its size, rings, base and
//! eventfds) and reset (GET_VRING_BASE per started queue), again and again; the replies
//! come as the input says: right, for another request, without the reply flag, of
//! another version, with a size that is not the body's, cut short, with a descriptor
//! attached, twice, or not at all (the connection closed).
//!
//! Checked: nothing panics or hangs; the device exists exactly when the GET_FEATURES
//! reply was one to take, and offers the common features virtiofsd has; everything the
//! device sends is a well-formed message (version 1, no reply flags, the body its
//! request has, one descriptor per memory region and per eventfd); an activation sends
//! the driver's features (never PROTOCOL_FEATURES), guest RAM as it is mapped, and for
//! each ready queue in order its size, its rings' addresses in this process, its next
//! available index and two eventfds, and fails exactly when a ready queue's ring is
//! not guest RAM or virtiofsd is gone; a reset asks for the started queues' bases in
//! order (stopping early only after one, at an answer it could not take); no
//! descriptor is left behind
//! (the leaks test).
//!
//! Input: the GET_FEATURES reply (see [`Reply`]), then operations: 0 the driver sets
//! DRIVER_OK (see [`activation`]), 1 it resets the device, 2 the next GET_VRING_BASE
//! reply (see [`Reply`]).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use devices::interrupt::NoMsi;
use devices::virtio::fs::{ShareConfig, SharedRegion, VirtioFs};
use devices::virtio::{Activation, VirtioDevice, VirtioInterrupt, features};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::kernel::memfd;
use crate::ops::{Ops, Program};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const VERSION: u32 = 1;
const REPLY: u32 = 4;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const QUEUE_MAX: u16 = 1024;
/// Guest RAM: two adjacent regions and one after a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x4000), (0x1_0000, 0x1000)];

/// How virtiofsd answers a request that wants a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Right,
    /// For another request.
    OtherRequest,
    NoReplyFlag,
    OtherVersion,
    /// The header says 4 bytes follow (8 do).
    SmallSize,
    /// The header says more than a message may hold.
    HugeSize,
    /// Half a header, then the connection closes.
    HalfHeader,
    /// The header alone, then the connection closes.
    HeaderOnly,
    /// An eventfd attached.
    WithDescriptor,
    /// The reply twice.
    Twice,
    /// No reply: the connection closes.
    Close,
    /// 64 bytes of the input's choosing, then the connection closes.
    Garbage,
}

impl Reply {
    fn pick(b: u8) -> Reply {
        use Reply::*;
        [
            Right,
            OtherRequest,
            NoReplyFlag,
            OtherVersion,
            SmallSize,
            HugeSize,
            HalfHeader,
            HeaderOnly,
            WithDescriptor,
            Twice,
            Close,
            Garbage,
            Right,
            Right,
            Right,
            Right,
        ][usize::from(b % 16)]
    }

    /// Whether the vhost crate takes it (on a connection with nothing left over).
    fn taken(self) -> bool {
        matches!(self, Reply::Right | Reply::SmallSize | Reply::Twice)
    }

    /// For seed names.
    fn name(self) -> &'static str {
        use Reply::*;
        match self {
            Right => "right",
            OtherRequest => "for-another-request",
            NoReplyFlag => "no-reply-flag",
            OtherVersion => "another-version",
            SmallSize => "small-size",
            HugeSize => "huge-size",
            HalfHeader => "half-header",
            HeaderOnly => "header-only",
            WithDescriptor => "with-a-descriptor",
            Twice => "twice",
            Close => "none-connection-closed",
            Garbage => "garbage",
        }
    }

    fn closes(self) -> bool {
        matches!(
            self,
            Reply::HalfHeader | Reply::HeaderOnly | Reply::Close | Reply::Garbage
        )
    }
}

/// A message the device sent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Msg {
    code: u32,
    body: Vec<u8>,
    fds: usize,
}

/// What virtiofsd saw: the messages, whether it closed the connection after the last
/// of them, or the device hung up on a ring's stop after a reply that was not right.
struct Seen {
    msgs: Vec<Msg>,
    closed: bool,
    hung_up_after_bad_reply: bool,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Receives `buf.len()` bytes with the descriptors that come with them (closed here).
fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut space = [0u64; 64];
    // SAFETY: a zeroed msghdr is a valid empty one; the fields set point at `iov` and
    // `space`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&space);
    // SAFETY: recvmsg on a socket this thread holds, into the buffers above.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = 0;
    // SAFETY: the control buffer was filled by recvmsg; the CMSG macros walk it within
    // `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    drop(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    fds += 1;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fds))
}

/// Sends `bytes` with one descriptor attached.
fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: RawFd) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut space = [0u64; 4];
    // SAFETY: a zeroed msghdr is a valid empty one; the fields set point at `iov` and
    // `space`, which outlive the call, and the control message written fits `space`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fd);
        let _ = libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
    }
}

/// The body each request of the device has, and the descriptors it carries.
fn check_msg(m: &Msg) {
    let (len, fds) = match m.code {
        SET_OWNER | GET_FEATURES => (0, 0),
        SET_FEATURES | SET_VRING_NUM | SET_VRING_BASE | GET_VRING_BASE => (8, 0),
        SET_VRING_ADDR => (40, 0),
        SET_VRING_KICK | SET_VRING_CALL => (8, 1),
        SET_MEM_TABLE => {
            let n = u32_at(&m.body, 0) as usize;
            (8 + 32 * n, n)
        }
        c => panic!("virtio-fs: the device sent request {c}"),
    };
    assert_eq!(
        m.body.len(),
        len,
        "virtio-fs: request {} of {} bytes",
        m.code,
        m.body.len()
    );
    assert_eq!(
        m.fds, fds,
        "virtio-fs: request {} with {} descriptors",
        m.code, m.fds
    );
}

/// The thread playing virtiofsd: reads the device's messages, answers those that want
/// an answer as `replies` says (then right ones), until the device hangs up or a reply
/// closes the connection.
fn virtiofsd(s: UnixStream, mut replies: VecDeque<(Reply, u64)>) -> Seen {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    let mut seen = Seen {
        msgs: Vec::new(),
        closed: false,
        hung_up_after_bad_reply: false,
    };
    // Whether a reply was not the right one (what it left unread may spoil a later
    // exchange).
    let mut bad_reply = false;
    loop {
        let mut hdr = [0u8; 12];
        // (The harness dropping the device at the end looks the same: it excuses
        // nothing, as nothing is due after the last reset.)
        let hung_up = |mut seen: Seen| {
            seen.hung_up_after_bad_reply =
                bad_reply && seen.msgs.last().is_some_and(|m| m.code == GET_VRING_BASE);
            seen
        };
        let (n, fds) = match recv_with_fds(&s, &mut hdr) {
            Ok(r) => r,
            // The device hung up with an answer of ours unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return hung_up(seen),
            Err(e) => panic!("virtio-fs: the device neither spoke nor hung up: {e}"),
        };
        if n == 0 {
            return hung_up(seen);
        }
        if n < hdr.len() {
            (&s).read_exact(&mut hdr[n..])
                .expect("the rest of a header");
        }
        let (code, flags, size) = (u32_at(&hdr, 0), u32_at(&hdr, 4), u32_at(&hdr, 8));
        assert_eq!(
            flags, VERSION,
            "virtio-fs: request {code} with flags {flags:#x}"
        );
        assert!(size <= 0x1000, "virtio-fs: request {code} of {size} bytes");
        let mut body = vec![0u8; size as usize];
        (&s).read_exact(&mut body).expect("a request's body");
        let m = Msg { code, body, fds };
        check_msg(&m);
        seen.msgs.push(m.clone());
        let value = match code {
            GET_FEATURES => None,
            GET_VRING_BASE => Some(u32_at(&m.body, 0)),
            _ => continue,
        };
        let (how, v) = replies.pop_front().unwrap_or((Reply::Right, 0));
        bad_reply |= how != Reply::Right;
        let mut body = match value {
            None => v.to_le_bytes().to_vec(),
            Some(index) => [index.to_le_bytes(), (v as u32).to_le_bytes()].concat(),
        };
        let header = |code: u32, flags: u32, size: u32| {
            [code.to_le_bytes(), flags.to_le_bytes(), size.to_le_bytes()].concat()
        };
        let right = header(code, VERSION | REPLY, body.len() as u32);
        let mut out = match how {
            Reply::Right | Reply::WithDescriptor | Reply::Twice => right.clone(),
            Reply::OtherRequest => header(code ^ 1, VERSION | REPLY, body.len() as u32),
            Reply::NoReplyFlag => header(code, VERSION, body.len() as u32),
            Reply::OtherVersion => header(code, 2 | REPLY, body.len() as u32),
            Reply::SmallSize => header(code, VERSION | REPLY, 4),
            Reply::HugeSize => header(code, VERSION | REPLY, 0x10_0000),
            Reply::HalfHeader => right[..6].to_vec(),
            Reply::HeaderOnly => right.clone(),
            Reply::Close => Vec::new(),
            Reply::Garbage => v.to_le_bytes().repeat(8),
        };
        if !matches!(
            how,
            Reply::HalfHeader | Reply::HeaderOnly | Reply::Close | Reply::Garbage
        ) {
            out.append(&mut body);
        }
        if how == Reply::Twice {
            out.extend_from_within(..);
        }
        if how == Reply::WithDescriptor {
            let e = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
            send_with_fd(&s, &out, e.as_raw_fd());
        } else {
            let _ = (&s).write_all(&out);
        }
        if how.closes() {
            seen.closed = true;
            return seen;
        }
    }
}

/// One queue as the driver set it up.
#[derive(Clone, Copy, Debug)]
struct QueueSetup {
    ready: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
}

const DESC: [u64; 8] = [
    0x0,
    0x2000,
    0x4000,
    0x3f00,
    0x1_0000,
    0x9000,
    0x1_0f00,
    1 << 40,
];
const AVAIL: [u64; 8] = [
    0x1000,
    0x3000,
    0x7ffe,
    0x1_0800,
    0x8000,
    0x4002,
    0x0,
    u64::MAX - 1,
];
const USED: [u64; 4] = [0x1800, 0x3800, 0x1_0c00, 0x7ffc];

/// Operation 0's fields: the driver's features (u64, less what the device does not
/// offer), then per queue: size (u8: 2^(b % 11), bit 7 not ready), rings (u8: bits 0-2
/// the descriptor table, 3-5 the available ring, 6-7 the used ring, from tables: in
/// RAM, across a region's end, in the hole, far away), next available index (u16).
fn activation(ops: &mut Ops) -> (u64, [QueueSetup; 2]) {
    let features = ops.u64();
    let q = |ops: &mut Ops| {
        let size = ops.u8();
        let rings = ops.u8();
        QueueSetup {
            ready: size & 0x80 == 0,
            size: 1 << ((size & 0x7f) % 11),
            desc: DESC[usize::from(rings & 7)],
            avail: AVAIL[usize::from(rings >> 3 & 7)],
            used: USED[usize::from(rings >> 6)],
            next_avail: ops.u16(),
        }
    };
    (features, [q(ops), q(ops)])
}

enum Op {
    Activate(u64, [QueueSetup; 2]),
    Reset,
}

/// Where guest range [addr, addr + len) is in this process, if all of it lies in one
/// region.
fn host(regions: &[SharedRegion], addr: u64, len: u64) -> Option<u64> {
    regions.iter().find_map(|r| {
        let end = addr.checked_add(len)?;
        (addr >= r.guest_addr && end <= r.guest_addr + r.size)
            .then(|| r.host_addr + addr - r.guest_addr)
    })
}

/// What one queue's setup sends.
fn queue_msgs(i: usize, q: &QueueSetup, regions: &[SharedRegion]) -> Option<Vec<Msg>> {
    let n = u64::from(q.size);
    let desc = host(regions, q.desc, 16 * n)?;
    let used = host(regions, q.used, 6 + 8 * n)?;
    let avail = host(regions, q.avail, 6 + 2 * n)?;
    let state = |code, v: u32| Msg {
        code,
        body: [(i as u32).to_le_bytes(), v.to_le_bytes()].concat(),
        fds: 0,
    };
    let mut addr = (i as u32).to_le_bytes().to_vec();
    addr.extend(0u32.to_le_bytes());
    for a in [desc, used, avail, 0] {
        addr.extend(a.to_le_bytes());
    }
    let fd = |code| Msg {
        code,
        body: (i as u64).to_le_bytes().to_vec(),
        fds: 1,
    };
    Some(vec![
        state(SET_VRING_NUM, u32::from(q.size)),
        Msg {
            code: SET_VRING_ADDR,
            body: addr,
            fds: 0,
        },
        state(SET_VRING_BASE, u32::from(q.next_avail)),
        fd(SET_VRING_CALL),
        fd(SET_VRING_KICK),
    ])
}

/// What a run did, for the seeds' test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    pub made: bool,
    pub activated: usize,
    pub refused: usize,
    pub messages: usize,
}

pub fn virtio_fs(data: &[u8]) {
    virtio_fs_stats(data);
}

pub fn virtio_fs_stats(data: &[u8]) -> FsStats {
    crate::sandbox::ignore_sigpipe();
    let mut stats = FsStats::default();
    let mut ops = Ops::new(data);
    let mut replies = VecDeque::new();
    let first = (Reply::pick(ops.u8()), ops.u64());
    replies.push_back(first);
    let mut program = Vec::new();
    while ops.next_op() {
        match ops.u8() % 3 {
            0 => {
                let (f, q) = activation(&mut ops);
                program.push(Op::Activate(f, q));
            }
            1 => program.push(Op::Reset),
            _ => replies.push_back((Reply::pick(ops.u8()), ops.u64())),
        }
    }
    // Guest RAM, and a memfd standing for the file virtiofsd would map.
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l))
        .collect();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let file = memfd(&[0u8; 0x9000]);
    let mut offset = 0;
    let regions: Vec<SharedRegion> = mem
        .iter()
        .map(|r| {
            let s = SharedRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                host_addr: r
                    .get_host_address(MemoryRegionAddress(0))
                    .expect("a mapped region") as u64,
                fd: file.file.as_raw_fd(),
                offset,
            };
            offset += r.len();
            s
        })
        .collect();
    let (ours, theirs) = UnixStream::pair().expect("a socket pair");
    let plan = replies.clone();
    let fake = std::thread::spawn(move || virtiofsd(theirs, plan));
    let share = ShareConfig {
        dir: "/nonexistent".into(),
        tag: "fuzz".into(),
        readonly: false,
    };
    // What each operation must send, in order, and whether it may be cut short (a
    // reset, a failed activation, a device not made).
    let mut expected: Vec<(Vec<Msg>, bool)> = Vec::new();
    let device = VirtioFs::connected(&share, ours, regions.clone(), None);
    let owner = Msg {
        code: SET_OWNER,
        body: Vec::new(),
        fds: 0,
    };
    let get = Msg {
        code: GET_FEATURES,
        body: Vec::new(),
        fds: 0,
    };
    expected.push((vec![owner, get], !first.0.taken()));
    assert_eq!(
        device.is_ok(),
        first.0.taken(),
        "virtio-fs: the device on a {first:?} reply"
    );
    stats.made = device.is_ok();
    if let Ok(mut fs) = device {
        let offered = <VirtioFs as VirtioDevice<GuestMemoryMmap>>::features(&fs);
        assert_eq!(
            offered,
            features::COMMON & first.1,
            "virtio-fs: the features offered"
        );
        let mut config = [0u8; 40];
        <VirtioFs as VirtioDevice<GuestMemoryMmap>>::read_config(&fs, 0, &mut config);
        assert_eq!(&config[..5], b"fuzz\0");
        assert_eq!(u32_at(&config, 36), 1);
        let mut active: Option<Vec<usize>> = None;
        // The VM ends with a reset of an active device.
        program.push(Op::Reset);
        for op in program {
            match op {
                Op::Activate(wanted, setups) if active.is_none() => {
                    let accepted = wanted & offered;
                    let mut want = vec![Msg {
                        code: SET_FEATURES,
                        body: (accepted & !PROTOCOL_FEATURES).to_le_bytes().to_vec(),
                        fds: 0,
                    }];
                    let mut table = (regions.len() as u64).to_le_bytes().to_vec();
                    for r in &regions {
                        for v in [r.guest_addr, r.size, r.host_addr, r.offset] {
                            table.extend(v.to_le_bytes());
                        }
                    }
                    want.push(Msg {
                        code: SET_MEM_TABLE,
                        body: table,
                        fds: regions.len(),
                    });
                    let mut started = Vec::new();
                    let mut rings_ok = true;
                    for (i, q) in setups.iter().enumerate().filter(|(_, q)| q.ready) {
                        match queue_msgs(i, q, &regions) {
                            Some(m) => {
                                want.extend(m);
                                started.push(i);
                            }
                            None => {
                                rings_ok = false;
                                break;
                            }
                        }
                    }
                    let queues = setups.map(|s| {
                        let mut q = Queue::new(QUEUE_MAX).expect("a queue");
                        q.try_set_size(s.size).expect("a power of two");
                        q.try_set_desc_table_address(GuestAddress(s.desc))
                            .expect("aligned");
                        q.try_set_avail_ring_address(GuestAddress(s.avail))
                            .expect("aligned");
                        q.try_set_used_ring_address(GuestAddress(s.used))
                            .expect("aligned");
                        q.set_next_avail(s.next_avail);
                        q.set_ready(s.ready);
                        q
                    });
                    let interrupt =
                        Arc::new(VirtioInterrupt::new("fuzz-fs", 2, Arc::new(NoMsi), None));
                    let a = Activation {
                        mem: mem.clone(),
                        features: accepted,
                        queues: Vec::from(queues),
                        queue_events: (0..2)
                            .map(|_| EventFd::new(EFD_NONBLOCK).expect("an eventfd"))
                            .collect(),
                        interrupt,
                    };
                    let r = VirtioDevice::activate(&mut fs, a);
                    expected.push((want, r.is_err()));
                    if r.is_ok() {
                        assert!(rings_ok, "virtio-fs: a ring outside guest RAM was taken");
                        stats.activated += 1;
                    } else {
                        stats.refused += 1;
                    }
                    // (The transport resets a device whose activation failed too.)
                    active = Some(started);
                }
                Op::Reset if active.is_some() => {
                    let started = active.take().expect("an active device");
                    <VirtioFs as VirtioDevice<GuestMemoryMmap>>::reset(&mut fs);
                    let want = started
                        .iter()
                        .map(|&i| Msg {
                            code: GET_VRING_BASE,
                            body: [(i as u32).to_le_bytes(), 0u32.to_le_bytes()].concat(),
                            fds: 0,
                        })
                        .collect();
                    expected.push((want, true));
                }
                _ => {}
            }
        }
        drop(fs);
    }
    let seen = match fake.join() {
        Ok(s) => s,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    // The device's watchdog thread ends on its own once the device is gone.
    assert!(
        crate::sandbox::wait_threads("virtio-fs-watch", 0),
        "virtio-fs: the watchdog thread outlives its device"
    );
    check_seen(&seen, &expected);
    stats.messages = seen.msgs.len();
    stats
}

/// The messages virtiofsd got are those the operations send, in order: each
/// operation's in full, or, for one that may be cut short (a reset, a failed
/// activation), a beginning of them: a reset stops after an answer it could not take,
/// and nothing goes once either side has closed the connection.
fn check_seen(seen: &Seen, expected: &[(Vec<Msg>, bool)]) {
    let mut at = 0;
    for (want, may_be_cut) in expected {
        let got = &seen.msgs[at..];
        let k = want.iter().zip(got).take_while(|(w, g)| w == g).count();
        if k < want.len() {
            let gone = (seen.closed || seen.hung_up_after_bad_reply) && at + k == seen.msgs.len();
            let reset = want.iter().all(|m| m.code == GET_VRING_BASE);
            assert!(
                *may_be_cut && (gone || reset && k >= 1),
                "virtio-fs: the device sent {:?} where {:?} was due (message {})",
                got.get(k),
                want[k],
                at + k
            );
        }
        at += k;
    }
    assert_eq!(
        at,
        seen.msgs.len(),
        "virtio-fs: messages no operation sends"
    );
}

/// Seeds: the Linux driver's probe (DRIVER_OK with both queues), a reset, again; and
/// each kind of bad reply to GET_FEATURES and GET_VRING_BASE.
pub fn virtio_fs_seeds() -> Vec<(String, Vec<u8>)> {
    let features = features::COMMON | PROTOCOL_FEATURES | 1 << 33;
    let activate = |p: &mut Program, ready1: bool| {
        p.u8(0).u64(u64::MAX);
        p.u8(7).u8(1 << 3).u16(0);
        p.u8(if ready1 { 7 } else { 0x87 })
            .u8(1 | 1 << 3 | 1 << 6)
            .u16(5);
    };
    let mut out = Vec::new();
    let mut linux = Program::default();
    linux.u8(0).u64(features);
    activate(&mut linux, true);
    linux.u8(1);
    activate(&mut linux, false);
    linux.u8(1);
    out.push(("linux-probe-and-reset".to_string(), linux.0));
    for bad in 1..12u8 {
        let mut p = Program::default();
        p.u8(bad).u64(features);
        activate(&mut p, true);
        p.u8(1);
        out.push((format!("features-reply-{}", Reply::pick(bad).name()), p.0));
        let mut p = Program::default();
        p.u8(0).u64(features).u8(2).u8(bad).u64(7);
        activate(&mut p, true);
        p.u8(1);
        activate(&mut p, true);
        p.u8(1);
        out.push((format!("vring-base-reply-{}", Reply::pick(bad).name()), p.0));
    }
    let mut p = Program::default();
    p.u8(0).u64(features);
    p.u8(0).u64(u64::MAX);
    p.u8(7).u8(5).u16(0); // a descriptor table in the hole
    p.u8(7).u8(0).u16(0);
    p.u8(1);
    out.push(("ring-outside-ram".to_string(), p.0));
    out
}
