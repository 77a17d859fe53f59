//! Live migration between two vessel homes: a counting guest moves while it runs and
//! neither restarts nor skips; across CPU backends; a guest rewriting its memory all
//! the time moves with every page intact (it checks them itself); a destination that
//! dies, refuses or is sent garbage leaves the source running.

mod common;

use common::home::Home;
use common::receiver::Receiver;

use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use testguest::snippets::{counter, dirtier};

/// Every complete `count N` line of `text`.
fn counts(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .filter(|n| n.len() == 8)
        .filter_map(|n| u32::from_str_radix(n, 16).ok())
        .collect()
}

/// The source's console then the destination's: one count after the other, none
/// missing, none twice.
fn assert_continuous(before: &str, after: &str) {
    let all = counts(&format!("{before}{after}"));
    assert!(all.len() >= 5, "too few counts: {all:x?}");
    for w in all.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "a gap or a repeat across the move: {all:x?}"
        );
    }
}

fn create(home: &Home, name: &str, kernel: &str, memory: &str, accel: &str) {
    let mut args = vec![
        "create", name, "--kernel", kernel, "--memory", memory, "--accel", accel, "--net", "none",
    ];
    if accel == "kvm" {
        args.extend(["--cpu-model", "portable"]);
    }
    home.ok(&args);
}

/// A counting guest moves from `from` to `to` and goes on where it was.
fn counting_guest_moves(from: &str, to: &str) {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| counter(a, 20_000));
    create(&src, "g", &kernel, "64M", from);
    src.ok(&["start", "g"]);
    src.wait_count("g", 20);
    let rx = Receiver::start(&dst, &["--accel", to]);
    let said = src.ok(&["migrate", "g", "--to", &rx.addr]);
    assert!(said.contains("migrated g to tcp:"), "{said}");
    let (ok, out) = rx.finish();
    assert!(ok, "vessel receive: {out}");
    assert!(out.contains(&format!("it runs here on {to}")), "{out}");
    // The source's monitor ends once the destination runs the VM.
    let deadline = Instant::now() + Duration::from_secs(10);
    while src.status("g")["state"] != "stopped" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = src.status("g");
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(
        st["last_exit"]
            .as_str()
            .unwrap()
            .starts_with("migrated to tcp:"),
        "{st}"
    );
    let before = src.log("g");
    let last = counts(&before).last().copied().unwrap();
    dst.wait_log("g", 0, &format!("count {:08x}\n", last + 20));
    assert_continuous(&before, &dst.log("g"));
    dst.ok(&["kill", "g"]);
}

#[test]
fn a_counting_guest_moves_between_homes_on_emu() {
    counting_guest_moves("emu", "emu");
}

#[test]
fn a_counting_guest_moves_from_kvm_to_emu_and_from_emu_to_kvm() {
    if !common::kvm_available() {
        return;
    }
    counting_guest_moves("kvm", "emu");
    counting_guest_moves("emu", "kvm");
}

/// Over a Unix socket (monitors without a jail: a jailed one sees only its VM's
/// folder), with LZ4.
#[test]
fn a_counting_guest_moves_over_a_unix_socket() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| counter(a, 20_000));
    src.ok(&[
        "create",
        "g",
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--accel",
        "emu",
        "--net",
        "none",
        "--sandbox",
        "off",
    ]);
    src.ok(&["start", "g"]);
    src.wait_count("g", 5);
    let sock = dst.path().join("in.sock");
    let listen = format!("unix:{}", sock.display());
    let mut cmd = common::vessel();
    cmd.args(["receive", "--listen", &listen])
        .env("VESSEL_HOME", dst.path());
    let rx = Receiver::spawn(cmd);
    assert_eq!(rx.addr, listen);
    src.ok(&["migrate", "g", "--to", &listen, "--compress"]);
    let (ok, out) = rx.finish();
    assert!(ok, "{out}");
    assert!(!sock.exists(), "the listening socket is left behind");
    let before = src.log("g");
    let last = counts(&before).last().copied().unwrap();
    dst.wait_log("g", 0, &format!("count {:08x}\n", last + 10));
    assert_continuous(&before, &dst.log("g"));
    dst.ok(&["kill", "g"]);
}

/// A KVM guest shown the host's CPU (the default model) may use features the software
/// CPU cannot give: a destination on emu refuses it by name, before any page moves.
/// Where this host's KVM shows its guests nothing emu lacks (a KVM without hardware,
/// as some of these hosts have), the move has nothing to refuse and must succeed.
#[test]
fn a_destination_that_cannot_present_the_guests_cpu_refuses_by_feature_name() {
    if !common::kvm_available() {
        return;
    }
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| counter(a, 20_000));
    src.ok(&[
        "create", "g", "--kernel", &kernel, "--memory", "64M", "--accel", "kvm", "--net", "none",
    ]);
    src.ok(&["start", "g"]);
    src.wait_count("g", 3);
    // What the guest saw of its CPU, from a snapshot of it.
    src.ok(&["snapshot", "g", "cpu"]);
    let saw = vmm::snapshot::file::read_state(&src.vm_dir("g").join("snapshots/cpu"))
        .unwrap()
        .cpuid;
    let missing = vmm::snapshot::convert::missing_features(&saw, &cpu::emu::cpuid(0, 1, None));
    let rx = Receiver::start(&dst, &["--accel", "emu"]);
    if missing.is_empty() {
        eprintln!("this host's KVM shows its guests nothing emu lacks: the move must succeed");
        src.ok(&["migrate", "g", "--to", &rx.addr]);
        let (ok, out) = rx.finish();
        assert!(ok, "{out}");
        let c = dst.count("g");
        dst.wait_count("g", c + 5);
        dst.ok(&["kill", "g"]);
        return;
    }
    let (code, err) = src.refused(&["migrate", "g", "--to", &rx.addr]);
    assert_eq!(code, Some(1), "{err}");
    let says = format!(
        "the guest uses CPU features emu cannot give here: {}",
        missing.join(", ")
    );
    assert!(err.contains(&says), "{err}");
    let (ok, out) = rx.finish();
    assert!(!ok, "{out}");
    still_counting(&src, "g");
    assert!(dst.ls().as_array().unwrap().is_empty());
    src.ok(&["kill", "g"]);
}

/// A guest rewriting 32 MiB (spinning `delay` times per page), migrated over a link of
/// `bandwidth` with a 100 ms downtime and `extra` flags: returns what `vessel migrate`
/// and `vessel receive` said, once the guest has counted on at the destination,
/// finding no page lost on either side and no count skipped or repeated.
fn dirtier_moves(delay: u32, bandwidth: &str, extra: &[&str]) -> (String, String) {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| dirtier(a, 16 << 20, 32 << 20, delay));
    create(&src, "d", &kernel, "128M", "emu");
    src.ok(&["start", "d"]);
    src.wait_count("d", 3);
    let rx = Receiver::start(&dst, &[]);
    let mut args = vec![
        "migrate",
        "d",
        "--to",
        &rx.addr,
        "--max-bandwidth",
        bandwidth,
        "--downtime-ms",
        "100",
    ];
    args.extend_from_slice(extra);
    let said = src.ok(&args);
    eprintln!("{said}");
    let (ok, out) = rx.finish();
    assert!(ok, "vessel receive: {out}");
    let before = src.log("d");
    let last = counts(&before).last().copied().unwrap();
    let log = dst.wait_log("d", 0, &format!("count {:08x}\n", last + 3));
    assert!(!log.contains("lost page"), "{log}");
    assert!(!before.contains("lost page"), "{before}");
    assert_continuous(&before, &log);
    dst.ok(&["kill", "d"]);
    (said, out)
}

/// Over a link slower than the guest writes (about 500 MiB/s on emu here), pre-copy
/// alone would never converge; auto-converge slows the guest down until it does, and
/// the guest, checking every page on each sweep, finds none lost.
#[test]
fn a_guest_dirtying_memory_faster_than_the_link_converges_with_every_page_intact() {
    let (said, _) = dirtier_moves(1_000, "64M", &[]);
    assert!(said.contains("throttled"), "never throttled: {said}");
}

/// The same with post-copy: after two rounds the destination runs the guest and takes
/// the pages it still lacks as it touches them (or as they arrive); every page the
/// guest checks holds what it wrote last. (A slower link than the other's: a guest
/// slowed by a busy host must still outrun it, or pre-copy converges first.)
#[test]
fn a_guest_dirtying_memory_faster_than_the_link_moves_with_postcopy() {
    let (said, out) = dirtier_moves(5_000, "16M", &["--postcopy"]);
    assert!(said.contains("post-copy:"), "{said}");
    assert!(!said.contains("throttled"), "{said}");
    assert!(out.contains("post-copy"), "vessel receive: {out}");
}

/// A relay between a source and a destination that carries the source's bytes at 16
/// MiB/s and cuts both ways once the destination has said it runs the guest (post-copy
/// has just begun). Returns its address.
fn cutting_relay(to: &str) -> String {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    let to = to.strip_prefix("tcp:").unwrap().to_string();
    std::thread::spawn(move || {
        let (src, _) = l.accept().unwrap();
        let dst = TcpStream::connect(to).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (mut s_in, mut d_out) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let c = cut.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            let start = Instant::now();
            let mut sent = 0u64;
            while !c.load(Ordering::SeqCst) {
                let Ok(n) = std::io::Read::read(&mut s_in, &mut buf) else {
                    break;
                };
                if n == 0 || c.load(Ordering::SeqCst) || d_out.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
                let due = Duration::from_secs_f64(sent as f64 / (16 << 20) as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        });
        // The destination's frames, one by one: cut at its first `Running` (kind 7).
        let (mut d_in, mut s_out) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
        loop {
            let mut head = [0u8; 5];
            if std::io::Read::read_exact(&mut d_in, &mut head).is_err() {
                break;
            }
            let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            if std::io::Read::read_exact(&mut d_in, &mut body).is_err() {
                break;
            }
            if head[0] == 7 {
                cut.store(true, Ordering::SeqCst);
            }
            if s_out.write_all(&head).is_err() || s_out.write_all(&body).is_err() || head[0] == 7 {
                break;
            }
        }
        let _ = src.shutdown(Shutdown::Both);
        let _ = dst.shutdown(Shutdown::Both);
    });
    addr
}

/// Post-copy whose link fails just after the switch: the guest, running at the
/// destination, waits for the pages it lacks; the source keeps them with its guest
/// stopped; `vessel receive NAME --recover` and `vessel migrate NAME --recover` finish
/// the move over a new connection, and every page the guest checks is right.
#[test]
fn a_postcopy_whose_link_fails_is_finished_by_a_recovery() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| dirtier(a, 16 << 20, 8 << 20, 5_000));
    create(&src, "d", &kernel, "64M", "emu");
    src.ok(&["start", "d"]);
    src.wait_count("d", 3);
    let rx = Receiver::start(&dst, &[]);
    let relay = cutting_relay(&rx.addr);
    let (code, err) = src.refused(&[
        "migrate",
        "d",
        "--to",
        &relay,
        "--postcopy",
        "--downtime-ms",
        "1",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the guest stays paused here"), "{err}");
    let (ok, out) = rx.finish();
    assert!(ok && out.contains("post-copy"), "{out}");
    // The source's guest stays stopped: it runs at the destination.
    assert_eq!(src.status("d")["state"], "paused");
    let (code, err) = src.refused(&["resume", "d"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("finish with vessel migrate --recover"),
        "{err}"
    );
    let frozen = src.count("d");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.count("d"), frozen, "the source's guest must not run");

    let listening = dst.ok(&["receive", "d", "--recover", "--listen", "tcp:127.0.0.1:0"]);
    let addr = listening
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let said = src.ok(&["migrate", "d", "--recover", "--to", &addr]);
    assert!(said.contains("migrated d to"), "{said}");
    let before = src.log("d");
    let last = counts(&before).last().copied().unwrap();
    let log = dst.wait_log("d", 0, &format!("count {:08x}\n", last + 3));
    assert!(!log.contains("lost page"), "{log}");
    assert_continuous(&before, &log);
    dst.ok(&["kill", "d"]);
}

/// The source goes on counting after a failed migration.
fn still_counting(home: &Home, name: &str) {
    let st = home.status(name);
    assert_eq!(st["state"], "running", "{st}");
    let c = home.count(name);
    home.wait_count(name, c + 5);
}

#[test]
fn a_destination_killed_mid_way_leaves_the_source_running() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| dirtier(a, 16 << 20, 8 << 20, 1));
    create(&src, "g", &kernel, "64M", "emu");
    src.ok(&["start", "g"]);
    src.wait_count("g", 3);
    let mut rx = Receiver::start(&dst, &[]);
    let addr = rx.addr.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        rx.child.kill().unwrap();
        rx.child.wait().unwrap();
    });
    // 8 MiB at 1 MiB/s: the destination dies during the first round.
    let (code, err) = src.refused(&["migrate", "g", "--to", &addr, "--max-bandwidth", "1M"]);
    killer.join().unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("migration of g to tcp:"), "{err}");
    still_counting(&src, "g");
    assert!(!src.log("g").contains("lost page"));
    // Nothing is left at the destination.
    assert!(!dst.vm_dir("g").exists());
    src.ok(&["kill", "g"]);
}

#[test]
fn a_destination_that_cannot_host_the_vm_refuses_before_any_page_moves() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| counter(a, 20_000));
    create(&src, "g", &kernel, "64M", "emu");
    create(&dst, "g", &kernel, "64M", "emu");
    src.ok(&["start", "g"]);
    src.wait_count("g", 5);
    let rx = Receiver::start(&dst, &[]);
    let (code, err) = src.refused(&["migrate", "g", "--to", &rx.addr]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("refused the VM: a VM named g exists here already"),
        "{err}"
    );
    let (ok, out) = rx.finish();
    assert!(!ok && out.contains("refused g"), "{out}");
    still_counting(&src, "g");
    // A bad address is the user's mistake, said in one line.
    let (code, err) = src.refused(&["migrate", "g", "--to", "udp:1.2.3.4:5"]);
    assert_eq!(code, Some(2), "{err}");
    src.ok(&["kill", "g"]);
}

#[test]
fn a_malformed_stream_is_refused_in_one_line() {
    let dst = Home::new();
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"VESSEL-MIGRATE 1\n\x01\xff\xff\xff\x7f",
        b"VESSEL-MIGRATE 1\n\x01\x05\x00\x00\x00{\"a\":",
        b"VESSEL-MIGRATE 9\n",
    ] {
        let rx = Receiver::start(&dst, &[]);
        let mut s = std::net::TcpStream::connect(rx.addr.strip_prefix("tcp:").unwrap()).unwrap();
        s.write_all(junk).unwrap();
        drop(s);
        let (ok, out) = rx.finish();
        assert!(!ok, "{out}");
        let err: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("listening"))
            .collect();
        assert_eq!(err.len(), 1, "{out}");
        assert!(
            err[0].contains("malformed migration stream") || err[0].contains("link failed"),
            "{out}"
        );
        assert!(dst.ls().as_array().unwrap().is_empty());
    }
}

/// Something that is not a `vessel receive` at the address: the source says so in one
/// line and its guest runs on.
#[test]
fn a_destination_that_answers_garbage_leaves_the_source_running() {
    let src = Home::new();
    let (_k, kernel) = testguest::bzimage_file(|a| counter(a, 20_000));
    create(&src, "g", &kernel, "64M", "emu");
    src.ok(&["start", "g"]);
    src.wait_count("g", 5);
    for reply in [
        &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
        b"\x02\x01\x00\x00\x00",
        b"",
    ] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp:{}", l.local_addr().unwrap());
        let fake = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; 64];
            let _ = std::io::Read::read(&mut s, &mut hello);
            let _ = s.write_all(reply);
        });
        let (code, err) = src.refused(&["migrate", "g", "--to", &addr]);
        fake.join().unwrap();
        assert_eq!(code, Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("malformed migration stream") || err.contains("link failed"),
            "{err}"
        );
        still_counting(&src, "g");
    }
    src.ok(&["kill", "g"]);
}

#[test]
fn a_migration_can_be_cancelled_and_the_source_runs_on() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| dirtier(a, 16 << 20, 8 << 20, 1));
    create(&src, "g", &kernel, "64M", "emu");
    src.ok(&["start", "g"]);
    src.wait_count("g", 3);
    let rx = Receiver::start(&dst, &[]);
    let home = src.path().to_path_buf();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        // Nothing but a kill cuts into a migration.
        let paused = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["pause", "g"])
            .env("VESSEL_HOME", &home)
            .output()
            .unwrap();
        assert!(!paused.status.success(), "{paused:?}");
        assert!(
            String::from_utf8_lossy(&paused.stderr).contains("is migrating"),
            "{paused:?}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["migrate", "--cancel", "g"])
            .env("VESSEL_HOME", home)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    });
    let (code, err) = src.refused(&["migrate", "g", "--to", &rx.addr, "--max-bandwidth", "1M"]);
    canceller.join().unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    let (ok, out) = rx.finish();
    assert!(
        !ok && out.contains("the source gave up: cancelled"),
        "{out}"
    );
    still_counting(&src, "g");
    assert!(!dst.vm_dir("g").exists());
    src.ok(&["kill", "g"]);
}

/// Two hosts on one machine: network namespaces A and B, each with a bridge `vmbr`,
/// joined by a veth pair (one Ethernet segment, 192.168.77.0/24: A is .3, B is .1).
struct TwoHosts {
    a: String,
    b: String,
}

impl TwoHosts {
    fn new() -> TwoHosts {
        let id = std::process::id();
        let (a, b) = (format!("vmigA{id}"), format!("vmigB{id}"));
        common::sh(&format!(
            "ip netns add {a} && ip netns add {b} && \
             ip link add vmig0 netns {a} type veth peer name vmig1 netns {b}"
        ));
        // Each bridge with an address of its own: a bridge without one takes its
        // lowest port's, and a VM's TAP joining would change it under its peers' ARP
        // caches.
        for (ns, veth, ip, mac) in [
            (&a, "vmig0", "192.168.77.3", "02:76:65:73:00:03"),
            (&b, "vmig1", "192.168.77.1", "02:76:65:73:00:01"),
        ] {
            common::sh(&format!(
                "ip -n {ns} link set lo up && ip -n {ns} link add vmbr address {mac} type bridge && \
                 ip -n {ns} link set {veth} master vmbr && ip -n {ns} link set {veth} up && \
                 ip -n {ns} addr add {ip}/24 dev vmbr && ip -n {ns} link set vmbr up"
            ));
        }
        TwoHosts { a, b }
    }

    /// `vessel ARGS` in namespace `ns` with `home`.
    fn vessel(ns: &str, home: &Home) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vessel")])
            .env("VESSEL_HOME", home.path());
        c
    }

    /// This thread's network namespace becomes `ns`'s (its sockets live there).
    fn enter(ns: &str) {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a namespace file we opened; it affects this thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The kit's Linux on emu, its root on a disk both homes see, bridged to `vmbr` in
/// namespace A: a shell loop appends a counter to a file on its disk and prints it, and
/// `nc` holds a TCP connection to a process in namespace B, sending a numbered line
/// every 300 ms. The VM moves to B, then back to A into another home with its disk
/// copied (`--copy-disks`): the counter goes on from where it was on the console and on
/// the disk, and the same TCP connection carries on.
#[test]
fn the_kits_linux_moves_to_another_host_with_its_disk_and_a_tcp_connection() {
    if !common::is_root() {
        return;
    }
    let Some(kit) = common::kit() else { return };
    let hosts = TwoHosts::new();
    let (src, dst) = (Home::new(), Home::new());
    let disk = src.path().join("root.ext4");
    disk::sparse_copy(&kit.rootfs, &disk).unwrap();
    let cmdline = format!("{} root=/dev/vda vessel.dhcp=off", kit::DEFAULT_CMDLINE);
    src.ok(&[
        "create",
        "lin",
        "--accel",
        "emu",
        "--memory",
        "256M",
        "--net",
        "bridge=vmbr",
        "--disk",
        &format!("path={}", disk.display()),
        "--cmdline",
        &cmdline,
    ]);
    let out = TwoHosts::vessel(&hosts.a, &src)
        .args(["start", "lin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    src.wait_log("lin", 0, "vessel:/# ");

    // The peer in B: one connection, numbered lines until it closes.
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let b = hosts.b.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        TwoHosts::enter(&b);
        let l = std::net::TcpListener::bind("192.168.77.1:7777").unwrap();
        ready_tx.send(()).unwrap();
        let (s, _) = l.accept().unwrap();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        let _ = tx.send("EOF".into());
    });
    ready.recv().unwrap();
    src.type_text(
        "lin",
        "ip link set eth0 up; ip addr add 192.168.77.2/24 dev eth0\n\
         (i=0; while true; do i=$((i+1)); echo tick $i; echo $i >> /ticks; sleep 0.2; done) &\n\
         (j=0; while true; do j=$((j+1)); echo ping $j; sleep 0.3; done) | nc 192.168.77.1 7777 &\n",
    );
    let first = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("no line over TCP");
    assert_eq!(first, "ping 1");
    src.wait_log("lin", 0, "tick 5\n");

    let mut cmd = TwoHosts::vessel(&hosts.b, &dst);
    cmd.args(["receive", "--listen", "tcp:192.168.77.1:0"]);
    let rx = Receiver::spawn(cmd);
    let moved = src.ok(&["migrate", "lin", "--to", &rx.addr]);
    let (ok, out) = rx.finish();
    assert!(ok, "{out}");
    eprintln!("{moved}");

    // The counter goes on at B, from where it was.
    let before = src.log("lin");
    // (A tick may land in the middle of the console's echo of typed text: it ends
    // its line.)
    let ticks = |text: &str| -> Vec<u32> {
        text.lines()
            .filter_map(|l| l.rfind("tick ").map(|at| &l[at + 5..]))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    };
    let last = *ticks(&before).last().unwrap();
    let after = dst.wait_log("lin", 0, &format!("tick {}\n", last + 10));
    let all = ticks(&format!("{before}{after}"));
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the counter skipped or restarted: {all:?}");
    }
    // The same connection carries on: numbered lines, none lost, past the move.
    let mut n = 1;
    while n < 40 {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the TCP connection went quiet");
        n += 1;
        assert_eq!(line, format!("ping {n}"), "the TCP stream broke");
    }
    // Back to A, into another home, without shared storage: the disk is copied while
    // the guest writes it.
    let back = Home::new();
    let mut cmd = TwoHosts::vessel(&hosts.a, &back);
    cmd.args(["receive", "--listen", "tcp:192.168.77.3:0"]);
    let rx = Receiver::spawn(cmd);
    let moved = dst.ok(&["migrate", "lin", "--to", &rx.addr, "--copy-disks"]);
    let (ok, out) = rx.finish();
    assert!(ok, "{out}");
    eprintln!("{moved}");
    let copy = back.vm_dir("lin").join("disk0.raw");
    assert_eq!(
        std::fs::metadata(&copy).unwrap().len(),
        std::fs::metadata(&disk).unwrap().len()
    );
    let before = format!("{}{}", src.log("lin"), dst.log("lin"));
    let last = *ticks(&before).last().unwrap();
    let again = back.wait_log("lin", 0, &format!("tick {}\n", last + 10));
    let all = ticks(&format!("{before}{again}"));
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the counter skipped or restarted: {all:?}");
    }
    while n < 60 {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the TCP connection went quiet after the second move");
        n += 1;
        assert_eq!(line, format!("ping {n}"), "the TCP stream broke");
    }
    // And on the copied disk, every count once, in order.
    let mark = again.len();
    back.type_text(
        "lin",
        // (Split strings: the console's echo of this line must not match.)
        "sync; awk 'NR != $1 { print \"GA\" \"P at \" NR; exit 1 } END { print \"ticks on\" \" disk: \" NR }' /ticks\n",
    );
    let log = back.wait_log("lin", mark, "ticks on disk: ");
    assert!(!log[mark..].contains("GAP at"), "{}", &log[mark..]);
    back.ok(&["kill", "lin"]);
}

/// A migration through a relay that records what the source sends (LZ4 pages): the
/// recording is a whole stream by itself. With `VESSEL_RECORD_SEED=1` it becomes the
/// `migration_stream` fuzz target's seed (fuzz/corpus/migration_stream).
#[test]
fn a_migration_through_a_relay_is_a_stream_a_receiver_takes_whole() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| counter(a, 20_000));
    create(&src, "g", &kernel, "32M", "emu");
    src.ok(&["start", "g"]);
    src.wait_count("g", 5);
    let rx = Receiver::start(&dst, &[]);
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = format!("tcp:{}", relay.local_addr().unwrap());
    let to = rx.addr.strip_prefix("tcp:").unwrap().to_string();
    let recorder = std::thread::spawn(move || {
        let (mut from_src, _) = relay.accept().unwrap();
        let mut to_dst = std::net::TcpStream::connect(to).unwrap();
        let (mut back_src, mut back_dst) =
            (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_dst, &mut back_src));
        let mut seen = vec![0u8];
        let mut buf = [0u8; 65536];
        loop {
            let n = std::io::Read::read(&mut from_src, &mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        seen
    });
    src.ok(&["migrate", "g", "--to", &relay_addr, "--compress"]);
    let (ok, out) = rx.finish();
    assert!(ok, "{out}");
    dst.ok(&["kill", "g"]);
    let seen = recorder.join().unwrap();
    let mut r = &seen[1..];
    let hello = vmm::migration::receive::hello(&mut r).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let got = vmm::migration::receive::into_folder(&mut r, &hello, folder.path(), &[]).unwrap();
    assert!(got.pages > 0 && !got.postcopy);
    vmm::snapshot::read_state(folder.path()).unwrap();
    if std::env::var("VESSEL_RECORD_SEED").is_ok_and(|v| v == "1") {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/migration_stream");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("counter-32m-lz4"), &seen).unwrap();
        eprintln!("recorded {} bytes", seen.len());
    }
}
