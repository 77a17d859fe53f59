use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::*;

const GUEST: u64 = 3;

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vsock-{name}-{}.sock", std::process::id()))
}

fn from_guest(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

/// The next packet for the guest, waiting a little for host sockets to have news.
fn next(m: &mut Muxer, buf: &mut Vec<u8>) -> Option<Header> {
    for _ in 0..200 {
        m.process_host_events();
        if let Some(h) = m.next_rx(4096, buf) {
            return Some(h);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A host program's connection to guest port `port`, answered by the guest.
fn host_connects(m: &mut Muxer, path: &Path, port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(path).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut buf = Vec::new();
    let req = next(m, &mut buf).expect("a request for the guest");
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid),
        (op::REQUEST, port, GUEST)
    );
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    m.guest_packet(&from_guest(op::RESPONSE, port, req.src_port, 0), &[]);
    let mut line = String::new();
    BufReader::new(host.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
    (host, req.src_port)
}

#[test]
fn a_host_program_connects_to_a_guest_port_and_both_talk() {
    let path = socket_path("host");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let (mut host, local) = host_connects(&mut m, &path, 1024);
    host.write_all(b"hello").unwrap();
    let mut buf = Vec::new();
    let rw = next(&mut m, &mut buf).unwrap();
    assert_eq!((rw.op, rw.len, &buf[..]), (op::RW, 5, &b"hello"[..]));
    assert_eq!(rw.buf_alloc, BUF_ALLOC);
    m.guest_packet(&from_guest(op::RW, 1024, local, 5), b"world");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"world");
    drop(host);
    let end = next(&mut m, &mut buf).unwrap();
    assert_eq!(end.op, op::SHUTDOWN);
    assert_eq!(end.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    m.guest_packet(&from_guest(op::RST, 1024, local, 0), &[]);
    assert_eq!(m.connections(), 0);
    drop(m);
    assert!(!path.exists(), "the socket goes with the device");
}

#[test]
fn a_guest_connects_to_a_host_listener_or_is_refused() {
    let path = socket_path("guest");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    m.guest_packet(&from_guest(op::REQUEST, 40000, 5000, 0), &[]);
    let mut buf = Vec::new();
    let resp = next(&mut m, &mut buf).unwrap();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, 5000, 40000)
    );
    let (mut server, _) = listener.accept().unwrap();
    m.guest_packet(&from_guest(op::RW, 40000, 5000, 3), b"abc");
    let mut got = [0u8; 3];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");
    server.write_all(b"xyz").unwrap();
    let rw = next(&mut m, &mut buf).unwrap();
    assert_eq!((rw.op, &buf[..]), (op::RW, &b"xyz"[..]));

    m.guest_packet(&from_guest(op::REQUEST, 40001, 5001, 0), &[]);
    let rst = next(&mut m, &mut buf).unwrap();
    assert_eq!(
        (rst.op, rst.dst_port),
        (op::RST, 40001),
        "no listener on 5001"
    );
    let _ = std::fs::remove_file(format!("{}_5000", path.display()));
}

#[test]
fn a_host_program_that_speaks_first_reaches_a_guest_that_only_asked_to_connect() {
    // A server with a banner: the guest's REQUEST is all it sends before reading, so
    // the credit the REQUEST announces is what the banner goes out on.
    let path = socket_path("banner");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    m.guest_packet(&from_guest(op::REQUEST, 40000, 5000, 0), &[]);
    let mut buf = Vec::new();
    assert_eq!(next(&mut m, &mut buf).unwrap().op, op::RESPONSE);
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(b"SSH-2.0-banner\r\n").unwrap();
    let rw = next(&mut m, &mut buf).expect("the banner, within the REQUEST's credit");
    assert_eq!((rw.op, &buf[..]), (op::RW, &b"SSH-2.0-banner\r\n"[..]));
    let _ = std::fs::remove_file(format!("{}_5000", path.display()));
}

#[test]
fn a_receive_buffer_without_room_for_data_is_not_the_end_of_the_stream() {
    let path = socket_path("noroom");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let (mut host, local) = host_connects(&mut m, &path, 1024);
    m.guest_packet(&from_guest(op::CREDIT_UPDATE, 1024, local, 0), &[]);
    host.write_all(b"data").unwrap();
    let mut buf = Vec::new();
    for _ in 0..200 {
        m.process_host_events();
        assert_eq!(m.next_rx(0, &mut buf), None, "a header-only buffer");
        if m.has_rx() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rw = m
        .next_rx(4096, &mut buf)
        .expect("the data, in a buffer with room");
    assert_eq!((rw.op, &buf[..]), (op::RW, &b"data"[..]));
}

#[test]
fn data_to_the_guest_waits_for_its_credit() {
    let path = socket_path("credit");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let (mut host, local) = host_connects(&mut m, &path, 1024);
    // The guest says it has 4 bytes of room.
    let mut small = from_guest(op::CREDIT_UPDATE, 1024, local, 0);
    small.buf_alloc = 4;
    m.guest_packet(&small, &[]);
    host.write_all(b"0123456789").unwrap();
    let mut buf = Vec::new();
    let rw = next(&mut m, &mut buf).unwrap();
    assert_eq!(&buf[..], b"0123");
    assert_eq!(rw.len, 4);
    assert!(next(&mut m, &mut buf).is_none(), "no credit left");
    // It read them.
    small.fwd_cnt = 4;
    m.guest_packet(&small, &[]);
    next(&mut m, &mut buf).unwrap();
    assert_eq!(&buf[..], b"4567");
}

#[test]
fn a_guest_past_its_credit_or_on_no_connection_gets_a_reset() {
    let path = socket_path("abuse");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let (_host, local) = host_connects(&mut m, &path, 1024);
    let chunk = vec![7u8; 64 << 10];
    let mut buf = Vec::new();
    // The host reads nothing: its socket buffer fills, then ours, then the guest is
    // past the credit it was given.
    let mut reset = false;
    for _ in 0..64 {
        m.guest_packet(&from_guest(op::RW, 1024, local, chunk.len() as u32), &chunk);
        if m.connections() == 0 {
            reset = true;
            break;
        }
    }
    assert!(reset);
    let mut ops = Vec::new();
    while let Some(h) = m.next_rx(4096, &mut buf) {
        ops.push(h.op);
    }
    assert_eq!(ops.last(), Some(&op::RST));
    m.guest_packet(&from_guest(op::RW, 9, 9, 1), b"x");
    let h = m.next_rx(4096, &mut buf).unwrap();
    assert_eq!((h.op, h.dst_port, h.src_port), (op::RST, 9, 9));
}

#[test]
fn a_host_program_that_says_nonsense_is_dropped() {
    let path = socket_path("nonsense");
    let mut m = Muxer::new(GUEST, &path).unwrap();
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"HELLO THERE\n").unwrap();
    let mut buf = Vec::new();
    assert!(next(&mut m, &mut buf).is_none());
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "closed");
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
}
