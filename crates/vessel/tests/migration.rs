//! Live migration between two vessel homes: a counting guest moves while it runs and
//! neither restarts nor skips; across CPU backends; a guest rewriting its memory all
//! the time moves with every page intact (it checks them itself); a destination that
//! dies, refuses or is sent garbage leaves the source running.

mod common;

use common::home::Home;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testguest::snippets::{counter, dirtier};

/// A `vessel receive` listening in `home` on a port of its own.
struct Receiver {
    child: Child,
    addr: String,
}

impl Receiver {
    fn start(home: &Home, extra: &[&str]) -> Receiver {
        let mut child = common::vessel()
            .args(["receive", "--listen", "tcp:127.0.0.1:0"])
            .args(extra)
            .env("VESSEL_HOME", home.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("vessel receive said {line:?}"))
            .to_string();
        Receiver { child, addr }
    }

    /// Waits for it to end; returns whether it succeeded and what it printed.
    fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                let _ = std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out);
                let _ = std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut out);
                return (status.success(), out);
            }
            assert!(Instant::now() < deadline, "vessel receive never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
        assert_eq!(w[1], w[0] + 1, "a gap or a repeat across the move: {all:x?}");
    }
}

fn create(home: &Home, name: &str, kernel: &str, memory: &str, accel: &str) {
    let mut args = vec![
        "create", name, "--kernel", kernel, "--memory", memory, "--accel", accel, "--net",
        "none",
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
    assert!(st["last_exit"].as_str().unwrap().starts_with("migrated to tcp:"), "{st}");
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

/// A guest rewriting 32 MiB (about 100 MiB/s on emu here), over a link slower than it
/// writes: pre-copy alone would never converge; auto-converge slows the guest down until it does, and
/// the guest, checking every page on each sweep, finds none lost.
#[test]
fn a_guest_dirtying_memory_faster_than_the_link_converges_with_every_page_intact() {
    let (src, dst) = (Home::new(), Home::new());
    let (_k, kernel) = testguest::bzimage_file(|a| dirtier(a, 16 << 20, 32 << 20, 5_000));
    create(&src, "d", &kernel, "128M", "emu");
    src.ok(&["start", "d"]);
    src.wait_count("d", 3);
    let rx = Receiver::start(&dst, &[]);
    let said = src.ok(&[
        "migrate",
        "d",
        "--to",
        &rx.addr,
        "--max-bandwidth",
        "64M",
        "--downtime-ms",
        "100",
    ]);
    assert!(said.contains("throttled"), "never throttled: {said}");
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
        let mut s =
            std::net::TcpStream::connect(rx.addr.strip_prefix("tcp:").unwrap()).unwrap();
        s.write_all(junk).unwrap();
        drop(s);
        let (ok, out) = rx.finish();
        assert!(!ok, "{out}");
        let err: Vec<&str> = out.lines().filter(|l| !l.starts_with("listening")).collect();
        assert_eq!(err.len(), 1, "{out}");
        assert!(
            err[0].contains("malformed migration stream") || err[0].contains("link failed"),
            "{out}"
        );
        assert!(dst.ls().as_array().unwrap().is_empty());
    }
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
    assert!(!ok && out.contains("the source gave up: cancelled"), "{out}");
    still_counting(&src, "g");
    assert!(!dst.vm_dir("g").exists());
    src.ok(&["kill", "g"]);
}
