//! In-guest I/O (issue 5), written to BENCHMARKS.md: `dd` on a virtio disk and TCP from
//! the guest to the host through a TAP device, with the kit's Linux on the software
//! CPU. The guest's CPU (an interpreter here) is the bottleneck on these hosts.
//! KVM on these hosts cannot run Linux user space, so it has no row.
//!
//! Run with `cargo bench -p vessel --bench guest_io` (root for the TAP part).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testguest::report::update_section;

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const MIB: u64 = 128;

fn kit() -> kit::Kit {
    let dir = kit::default_cache_dir().expect("kit dir");
    kit::locate(&dir).unwrap_or_else(|| kit::build(&kit::KitOptions::default()).expect("kit"))
}

fn run(kit: &kit::Kit, extra: &[&str], script: &str) -> String {
    let cmdline = kit::cmdline("", Some(script));
    let out = Command::new(VESSEL)
        .args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", &cmdline])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("vessel");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let kit = kit();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    let made = Command::new(VESSEL)
        .args(["disk", "create"])
        .arg(&qcow2)
        .arg("512M")
        .output()
        .expect("vessel disk create");
    assert!(made.status.success(), "{made:?}");
    // Per disk: the first write (a qcow2 allocates every cluster), a rewrite, a read.
    let per_disk = |dev: &str| {
        format!(
            "time dd if=/dev/zero of={dev} bs=1M count={MIB} oflag=direct 2>&1; \
             time dd if=/dev/zero of={dev} bs=1M count={MIB} oflag=direct 2>&1; \
             time dd if={dev} of=/dev/null bs=1M count={MIB} iflag=direct 2>&1; "
        )
    };
    let script = format!(
        "{}{}time dd if=/dev/zero of=/dev/null bs=1M count={MIB} 2>&1",
        per_disk("/dev/vda"),
        per_disk("/dev/vdb")
    );
    let out = run(
        &kit,
        &[
            "--disk",
            &format!("path={},format=raw", raw.display()),
            "--disk",
            &format!("path={},format=qcow2", qcow2.display()),
        ],
        &script,
    );
    let t = testguest::timing::busybox_times(&out);
    assert_eq!(t.len(), 7, "{out}");
    let mb = MIB as f64 * 1.048_576;
    let row = |what: &str, i: usize| {
        format!(
            "| {what} | {:.0} | {:.0} | {:.2} |\n",
            mb / t[i],
            mb / t[i + 3],
            t[i] / t[i + 3]
        )
    };
    let mut body = format!(
        "## In-guest I/O (the kit's Linux on `--accel emu`)\n\n\
         {MIB} MiB with busybox `dd` (1 MiB blocks, O_DIRECT) on two virtio-blk disks: a \
         sparse raw file and a qcow2 image (64 KiB clusters) on the host; a \
         memory-to-memory `dd` in the same guest shows what the guest's CPU alone allows.\n\n\
         | in the guest | raw MB/s | qcow2 MB/s | qcow2 / raw |\n| --- | --- | --- | --- |\n\
         {}{}{}\
         | /dev/zero to /dev/null (no device) | {:.0} | | |\n\n",
        row("first write (qcow2 allocates)", 0),
        row("rewrite", 1),
        row("read", 2),
        mb / t[6]
    );

    // TCP needs root for the TAP device.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        body += &tcp(&kit);
    } else {
        body += "TCP: not measured (the TAP device needs root).\n\n";
    }
    body += "On KVM these hosts cannot run Linux user space (KVM emulates every instruction \
             and stops the kernel before init, see the KVM section), so there are no KVM rows; \
             on a host with VT-x/AMD-V the same benchmark runs the guest on KVM.\n";
    println!("{body}");
    update_section("guest-io", &body).unwrap();
}

const TAP: &str = "vbenchtap0";
const HOST_IP: &str = "10.99.0.1";
const GUEST_IP: &str = "10.99.0.2";

fn sh(c: &str) -> bool {
    Command::new("sh")
        .args(["-c", c])
        .status()
        .unwrap()
        .success()
}

/// Frames and bytes the host received on the TAP device so far.
fn tap_rx() -> (u64, u64) {
    let stat = |name: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{TAP}/statistics/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    (stat("rx_packets"), stat("rx_bytes"))
}

/// One row: MB/s from the first byte to the last, and the average frame the TAP saw.
fn tcp_row(sender: &str, bytes: usize, secs: f64, frames: (u64, u64)) -> String {
    format!(
        "| {sender} | **{:.0}** | {:.0} |\n",
        bytes as f64 / secs / 1e6,
        frames.1 as f64 / frames.0.max(1) as f64
    )
}

/// TCP from the guest to the host over virtio-net and a TAP device, with two senders:
/// busybox `nc` (its copy loop moves about a KiB per read/write pair, so the guest's
/// syscalls set the pace) and busybox `httpd` serving a file (sendfile: the guest hands
/// the device 64 KiB TSO frames).
fn tcp(kit: &kit::Kit) -> String {
    let _ = sh(&format!("ip link del {TAP} 2>/dev/null"));
    assert!(sh(&format!(
        "ip tuntap add dev {TAP} mode tap && ip addr add {HOST_IP}/24 dev {TAP} && \
         ip link set {TAP} up"
    )));
    let net = format!("tap={TAP}");
    let up = format!("ifconfig eth0 {GUEST_IP} netmask 255.255.255.0 up");

    // nc: the host listens, the guest connects and sends.
    let listener = std::net::TcpListener::bind(format!("{HOST_IP}:7788")).unwrap();
    let receiver = std::thread::spawn(move || {
        let (c, _) = listener.accept().unwrap();
        drain(c)
    });
    let before = tap_rx();
    run(
        kit,
        &["--net", &net],
        &format!("{up}; dd if=/dev/zero bs=1M count={MIB} 2>/dev/null | nc {HOST_IP} 7788"),
    );
    let (n, secs) = receiver.join().unwrap();
    let after = tap_rx();
    assert_eq!(n as u64, MIB << 20);
    let nc = tcp_row(
        "busybox `nc` (stdin to socket)",
        n,
        secs,
        (after.0 - before.0, after.1 - before.1),
    );

    // httpd: the guest serves a file from RAM, the host fetches it.
    let cmdline = kit::cmdline(
        "",
        Some(&format!(
            "{up}; mkdir /www; dd if=/dev/zero of=/www/f bs=1M count={MIB} 2>/dev/null; \
             echo www-ready; httpd -f -p 8080 -h /www"
        )),
    );
    let mut vm = Command::new(VESSEL)
        .args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", &cmdline, "--net", &net])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    let mut lines = BufReader::new(vm.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.trim() == "www-ready")),
        "the guest's web server did not start"
    );
    std::thread::spawn(move || lines.for_each(drop));
    let mut conn = None;
    for _ in 0..100 {
        match TcpStream::connect((GUEST_IP, 8080)) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let mut conn = conn.expect("connect to the guest's httpd");
    let before = tap_rx();
    conn.write_all(b"GET /f HTTP/1.0\r\n\r\n").unwrap();
    let (n, secs) = drain(conn);
    let after = tap_rx();
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = sh(&format!("ip link del {TAP}"));
    assert!(n as u64 > MIB << 20, "short response: {n} bytes");
    let httpd = tcp_row(
        "busybox `httpd` (a file, sent with sendfile)",
        n,
        secs,
        (after.0 - before.0, after.1 - before.1),
    );
    format!(
        "TCP from the guest to the host over virtio-net and a TAP device, {MIB} MiB, timed \
         on the host from the first byte to the last:\n\n\
         | sender in the guest | MB/s | average frame on the TAP (bytes) |\n\
         | --- | --- | --- |\n{nc}{httpd}\n\
         busybox `nc` moves about a KiB per read/write pair, so the guest's system calls set \
         its pace (MTU-sized frames); `httpd` hands the socket the whole file and the guest \
         passes the device TSO frames of up to 64 KiB, which the TAP device takes as they \
         are. Both are bound by the guest's CPU, an interpreter here.\n\n"
    )
}

/// Reads `c` to the end: (bytes, seconds from the first byte to the last).
fn drain(mut c: TcpStream) -> (usize, f64) {
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut first) = (0usize, None);
    loop {
        let k = c.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        n += k;
    }
    (n, first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(1.0))
}
