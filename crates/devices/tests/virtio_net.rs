//! virtio-net through the PCI transport: header handling and mergeable buffers over a
//! socketpair-backed fake backend, and the real thing over a TAP interface (root).

mod common;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use devices::pci::BarAllocator;
use devices::virtio::net::{HEADER_LEN, NetBackend, Tap, VirtioNet, feature_bits};
use devices::virtio::{VirtioPciDevice, features, status};
use vm_memory::{Bytes, GuestAddress};

const MSI_BASE: u32 = 0x80;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// One end of a SOCK_SEQPACKET pair: frames keep their boundaries, like a TAP.
struct SocketBackend {
    fd: OwnedFd,
    offloads: Mutex<Vec<u64>>,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-element array we pass.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send_fd(fd: RawFd, b: &[u8]) -> io::Result<usize> {
    // SAFETY: send reads `b.len()` bytes from `b`.
    let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn recv_fd(fd: RawFd, b: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl NetBackend for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        recv_fd(self.fd.as_raw_fd(), buf)
    }
    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        send_fd(self.fd.as_raw_fd(), frame)
    }
    fn set_offloads(&self, f: u64) -> io::Result<()> {
        self.offloads.lock().unwrap().push(f);
        Ok(())
    }
}

struct Net {
    mem: Mem,
    msi: Arc<RecordingMsi>,
    drv: PciDriver,
    rx: DriverQueue,
    tx: DriverQueue,
    features: u64,
}

fn bring_up(backend: Arc<dyn NetBackend>, wanted: u64) -> Net {
    let mem = memory(16 << 20);
    let msi = Arc::new(RecordingMsi::default());
    let dev = VirtioPciDevice::new(
        Box::new(VirtioNet::new(backend, MAC, Default::default())),
        mem.clone(),
        &mut BarAllocator::mmio32(),
        msi.clone(),
        None,
    )
    .unwrap();
    let drv = PciDriver::new(Arc::new(Mutex::new(dev)));
    let rx = DriverQueue::new(&mem, 0x1_0000, 256);
    let tx = DriverQueue::new(&mem, 0x2_0000, 256);
    let features = drv.bring_up(wanted, &[&rx, &tx], MSI_BASE);
    assert_eq!(drv.status() & status::DEVICE_NEEDS_RESET, 0);
    Net {
        mem,
        msi,
        drv,
        rx,
        tx,
        features,
    }
}

fn fake(wanted: u64) -> (Net, OwnedFd, Arc<SocketBackend>) {
    let (a, b) = seqpacket_pair();
    let backend = Arc::new(SocketBackend {
        fd: a,
        offloads: Mutex::new(Vec::new()),
    });
    (bring_up(backend.clone(), wanted), b, backend)
}

fn frame(len: usize, seed: u64) -> Vec<u8> {
    let mut f = vec![0u8; len];
    Rng::new(seed).fill(&mut f);
    f[..HEADER_LEN].fill(0);
    f
}

fn recv_timeout(fd: RawFd, buf: &mut [u8]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match recv_fd(fd, buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no frame");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn config_and_offloads() {
    let (n, _peer, backend) = fake(u64::MAX);
    assert_eq!(n.drv.cfg_read(0, 4), 0x1041_1af4);
    let mac: Vec<u8> = (0..6).map(|i| n.drv.device_config(i, 1) as u8).collect();
    assert_eq!(mac, MAC);
    assert_eq!(n.drv.device_config(6, 2), 1, "link up");
    for f in [
        feature_bits::MAC,
        feature_bits::MRG_RXBUF,
        feature_bits::CSUM,
        feature_bits::GUEST_TSO4,
        features::VERSION_1,
    ] {
        assert_ne!(n.features & f, 0, "{f:#x}");
    }
    assert_eq!(backend.offloads.lock().unwrap().last(), Some(&n.features));
    n.drv.set_status(0);
    assert_eq!(backend.offloads.lock().unwrap().last(), Some(&0));
}

#[test]
fn transmit_passes_header_and_frame_through() {
    let (mut n, peer, _) = fake(u64::MAX);
    let f = frame(12 + 60, 1);
    n.mem
        .write_slice(&f[..20], GuestAddress(0x10_0000))
        .unwrap();
    n.mem
        .write_slice(&f[20..], GuestAddress(0x10_1000))
        .unwrap();
    n.tx.add(&n.mem, &[(0x10_0000, 20, false), (0x10_1000, 52, false)]);
    // Too short to hold a header: completed, not sent.
    n.tx.add(&n.mem, &[(0x10_2000, 4, false)]);
    n.tx.publish(&n.mem);
    n.drv.notify(1);
    let used = n.tx.wait_used(&n.mem, 2);
    assert_eq!(used.len(), 2);
    let mut got = vec![0u8; 70000];
    let len = recv_timeout(peer.as_raw_fd(), &mut got);
    assert_eq!(&got[..len], &f[..]);
    assert!(
        recv_fd(peer.as_raw_fd(), &mut got).is_err(),
        "only one frame sent"
    );
    assert!(n.msi.wait_for(MSI_BASE + 1, 1));
}

#[test]
fn receive_into_mergeable_buffers() {
    let (mut n, peer, _) = fake(u64::MAX);
    assert_ne!(n.features & feature_bits::MRG_RXBUF, 0);
    for i in 0..8u64 {
        n.rx.add(&n.mem, &[(0x20_0000 + i * 0x1000, 1500, true)]);
    }
    n.rx.publish(&n.mem);
    n.drv.notify(0);
    let small = frame(12 + 60, 2);
    let big = frame(12 + 4000, 3);
    send_fd(peer.as_raw_fd(), &small).unwrap();
    send_fd(peer.as_raw_fd(), &big).unwrap();
    let used = n.rx.wait_used(&n.mem, 4);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![72, 1500, 1500, 1012]
    );
    let read = |addr: u64, len: usize| {
        let mut v = vec![0u8; len];
        n.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    };
    let first = read(0x20_0000, 72);
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 1, "num_buffers");
    assert_eq!(first[12..], small[12..]);
    let mut merged = read(0x20_1000, 1500);
    assert_eq!(u16::from_le_bytes([merged[10], merged[11]]), 3);
    merged.extend(read(0x20_2000, 1500));
    merged.extend(read(0x20_3000, 1012));
    assert_eq!(merged[12..], big[12..]);
    assert!(n.msi.wait_for(MSI_BASE, 1));
}

#[test]
fn receive_waits_for_buffers_and_drops_what_cannot_fit() {
    let (mut n, peer, _) = fake(!feature_bits::MRG_RXBUF);
    assert_eq!(n.features & feature_bits::MRG_RXBUF, 0);
    let big = frame(12 + 3000, 4);
    let small = frame(12 + 100, 5);
    send_fd(peer.as_raw_fd(), &big).unwrap();
    send_fd(peer.as_raw_fd(), &small).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(n.rx.take_used(&n.mem).len(), 0, "no buffers yet");
    // A 2 KiB buffer cannot take the 3 KiB frame without merging: it is dropped and
    // the same buffer takes the next frame.
    n.rx.add(&n.mem, &[(0x30_0000, 2048, true)]);
    n.rx.publish(&n.mem);
    n.drv.notify(0);
    let used = n.rx.wait_used(&n.mem, 1);
    assert_eq!(used[0].1, 112);
    let mut got = vec![0u8; 112];
    n.mem.read_slice(&mut got, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[12..], small[12..]);
    assert_eq!(n.drv.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn many_frames_both_ways() {
    let (mut n, peer, _) = fake(u64::MAX);
    for i in 0..128u64 {
        n.rx.add(&n.mem, &[(0x40_0000 + i * 0x800, 2048, true)]);
    }
    n.rx.publish(&n.mem);
    n.drv.notify(0);
    for i in 0..100u64 {
        send_fd(peer.as_raw_fd(), &frame(12 + 64 + i as usize, 100 + i)).unwrap();
    }
    let used = n.rx.wait_used(&n.mem, 100);
    for (i, u) in used.iter().enumerate() {
        assert_eq!(u.1 as usize, 12 + 64 + i);
    }
    for i in 0..100u64 {
        let f = frame(12 + 64 + i as usize, 200 + i);
        n.mem
            .write_slice(&f, GuestAddress(0x80_0000 + i * 0x1000))
            .unwrap();
        n.tx.add(&n.mem, &[(0x80_0000 + i * 0x1000, f.len() as u32, false)]);
    }
    n.tx.publish(&n.mem);
    n.drv.notify(1);
    n.tx.wait_used(&n.mem, 100);
    let mut buf = vec![0u8; 2048];
    for i in 0..100u64 {
        let len = recv_timeout(peer.as_raw_fd(), &mut buf);
        assert_eq!(buf[..len], frame(12 + 64 + i as usize, 200 + i)[..]);
    }
}

// --- A real TAP interface ---------------------------------------------------------

fn require_root() -> bool {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = "skipped: creating a TAP interface needs root";
    if std::env::var("VESSEL_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{reason} (VESSEL_REQUIRE_KVM=1)");
    }
    eprintln!("{reason}");
    false
}

/// Brings `name` up (with IPv6 off, so the host sends no chatter of its own).
fn link_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    // SAFETY: a plain socket for interface ioctls.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0);
    // SAFETY: zeroed ifreq is a valid value to fill.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    unsafe {
        assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &req), 0);
        libc::close(s);
    }
}

/// A packet socket on `name` for one EtherType.
fn packet_socket(name: &str, ethertype: u16) -> (OwnedFd, i32) {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    assert!(index > 0);
    // SAFETY: creating a socket has no memory effects.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(ethertype.to_be()),
        )
    };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: a zeroed sockaddr_ll is valid; we set the fields bind needs.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ethertype.to_be();
    sa.sll_ifindex = index;
    // SAFETY: bind reads a sockaddr_ll of the size we pass.
    let r = unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    (unsafe { OwnedFd::from_raw_fd(fd) }, index)
}

#[test]
fn real_tap_both_directions() {
    if !require_root() {
        return;
    }
    const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental
    let name = format!("vsltap{}", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).unwrap());
    assert_eq!(tap.name(), name);
    link_up(&name);
    let (sock, _) = packet_socket(&name, ETHERTYPE);
    let mut n = bring_up(tap, u64::MAX);
    for i in 0..32u64 {
        n.rx.add(&n.mem, &[(0x20_0000 + i * 0x1000, 4096, true)]);
    }
    n.rx.publish(&n.mem);
    n.drv.notify(0);

    // Guest to host: a broadcast frame of our EtherType, header all zero.
    let mut f = vec![0u8; HEADER_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(b"vessel guest to host");
    f.resize(HEADER_LEN + 60, 0);
    n.mem.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
    n.tx.add(&n.mem, &[(0x10_0000, f.len() as u32, false)]);
    n.tx.publish(&n.mem);
    n.drv.notify(1);
    n.tx.wait_used(&n.mem, 1);
    let mut buf = vec![0u8; 2048];
    let len = recv_timeout(sock.as_raw_fd(), &mut buf);
    assert_eq!(&buf[..len], &f[HEADER_LEN..]);

    // Host to guest: a frame sent on the interface comes out of the TAP.
    let mut g = MAC.to_vec();
    g.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    g.extend_from_slice(&ETHERTYPE.to_be_bytes());
    g.extend_from_slice(b"vessel host to guest");
    g.resize(60, 0);
    send_fd(sock.as_raw_fd(), &g).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while !seen {
        assert!(Instant::now() < deadline, "frame from the host");
        for (id, len) in n.rx.take_used(&n.mem) {
            let mut got = vec![0u8; len as usize];
            let addr = 0x20_0000 + u64::from(id) * 0x1000;
            n.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            if got.len() >= HEADER_LEN + 14
                && got[HEADER_LEN + 12..HEADER_LEN + 14] == ETHERTYPE.to_be_bytes()
            {
                assert_eq!(&got[HEADER_LEN..], &g[..]);
                assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
                seen = true;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(n.msi.wait_for(MSI_BASE, 1));
    assert_eq!(n.drv.status() & status::DEVICE_NEEDS_RESET, 0);
}
