//! Live migration (issue 18), written to BENCHMARKS.md: the kit's Linux (1 GiB, software
//! CPU) moves between two network namespaces joined by a veth pair, idle and busy (a
//! loop rewriting 64 MiB), by pre-copy, pre-copy with LZ4, and post-copy. For each: the
//! whole migration's time, the downtime as the host sees it (from the stop at the
//! source to the destination running the guest) and as the guest sees it (the longest
//! gap in a heartbeat it prints every millisecond, its own monotonic clock), and the
//! bytes sent. Baseline in the same run: the same number of bytes through a plain TCP
//! connection over the same veth pair.
//!
//! Needs root (namespaces), a C compiler (the guest's heartbeat and dirtier, built
//! static) and the kit. Run with `cargo bench -p vessel --bench migration`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testguest::report::update_section;

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const SRC_IP: &str = "10.77.0.1";
const DST_IP: &str = "10.77.0.2";

/// The guest's programs: `hb` prints its monotonic clock (µs) every millisecond;
/// `dirty` rewrites 64 MiB over and over with bytes that are never zero.
const GUEST_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "dirty") == 0) {
        size_t n = 64u << 20;
        volatile unsigned char *p = malloc(n);
        printf("dirtying 64 MiB\n");
        fflush(stdout);
        for (unsigned v = 1;; v++) {
            for (size_t i = 0; i < n; i += 64) p[i] = (unsigned char)(v | 1);
        }
    }
    struct timespec t, d = {0, 1000000};
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        printf("hb %ld\n", (long)t.tv_sec * 1000000L + t.tv_nsec / 1000);
        fflush(stdout);
        nanosleep(&d, 0);
    }
}
"#;

fn sh(cmd: &str) {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{cmd}");
}

/// Namespaces A (source) and B (destination) over a veth pair.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn new() -> Hosts {
        let id = std::process::id();
        let (a, b) = (format!("vbenchA{id}"), format!("vbenchB{id}"));
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && \
             ip link add vb0 netns {a} type veth peer name vb1 netns {b} && \
             ip -n {a} addr add {SRC_IP}/24 dev vb0 && ip -n {b} addr add {DST_IP}/24 dev vb1 && \
             ip -n {a} link set vb0 up && ip -n {b} link set vb1 up && \
             ip -n {a} link set lo up && ip -n {b} link set lo up"
        ));
        Hosts { a, b }
    }

    fn vessel(ns: &str, home: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, VESSEL])
            .env("VESSEL_HOME", home);
        c
    }

    fn enter(ns: &str) {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a namespace file we opened; it affects this thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn vessel(home: &Path, args: &[&str]) -> String {
    let out = Command::new(VESSEL)
        .args(args)
        .env("VESSEL_HOME", home)
        .output()
        .unwrap();
    assert!(out.status.success(), "vessel {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn log(home: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(home.join("vms/g/serial.log")).unwrap_or_default())
        .replace('\r', "")
}

fn heartbeats(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("hb "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn wait_beats(home: &Path, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let b = heartbeats(&log(home));
        if b.len() >= n {
            return b;
        }
        assert!(Instant::now() < deadline, "no heartbeat: {}", log(home));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A figure `vessel migrate` printed: the token before `unit` ("in 0.18 s", "70 MiB").
fn figure(out: &str, before: &str) -> f64 {
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].trim_end_matches([',', ':']) == before)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(f64::NAN)
}

struct Moved {
    /// Post-copy happened (pages went after the switch).
    switched: bool,
    rounds: f64,
    seconds: f64,
    host_ms: f64,
    guest_ms: f64,
    mib: f64,
    jitter_ms: f64,
}

/// Boots the guest at A, moves it to B with `flags`; returns what it measured.
fn migrate(hosts: &Hosts, kit: &kit::Kit, disk: &Path, busy: bool, flags: &[&str]) -> Moved {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let size = std::fs::metadata(disk).unwrap().len() / 4096;
    let script = format!(
        "dd if=/dev/vda of=/g bs=4096 count={size} 2>/dev/null; chmod +x /g; {} /g hb",
        if busy { "/g dirty & " } else { "" }
    );
    vessel(
        src.path(),
        &[
            "create",
            "g",
            "--kernel",
            &kit.vmlinux.display().to_string(),
            "--initrd",
            &kit.initrd.display().to_string(),
            "--memory",
            "1G",
            "--accel",
            "emu",
            "--net",
            "none",
            "--disk",
            &format!("path={},readonly=on", disk.display()),
            "--cmdline",
            &format!("{} -- {script}", kit::DEFAULT_CMDLINE),
        ],
    );
    let out = Hosts::vessel(&hosts.a, src.path())
        .args(["start", "g"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Two seconds of heartbeats first (the busy loop running all along).
    wait_beats(src.path(), 2000);
    assert!(
        !busy || log(src.path()).contains("dirtying"),
        "{}",
        log(src.path())
    );
    let mut rx = Hosts::vessel(&hosts.b, dst.path())
        .args(["receive", "--listen", &format!("tcp:{DST_IP}:0")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(rx.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let mut args = vec!["migrate", "g", "--to", &addr];
    args.extend_from_slice(flags);
    let said = vessel(src.path(), &args);
    eprint!("{said}");
    let done = rx.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let before = heartbeats(&log(src.path()));
    let first_after = wait_beats(dst.path(), 500);
    let _ = vessel(dst.path(), &["kill", "g"]);
    // Lines the guest wrote just before the stop may come out after the move: the gap
    // is the longest one anywhere around it, in the guest's own order.
    let around: Vec<u64> = before[before.len().saturating_sub(200)..]
        .iter()
        .chain(&first_after)
        .copied()
        .collect();
    let gap = around
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    // The longest gap while the guest ran undisturbed, for reference.
    let jitter = before
        .windows(2)
        .take(before.len().saturating_sub(200))
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    Moved {
        switched: said.contains("post-copy:"),
        rounds: figure(&said, "rounds"),
        seconds: figure(&said, "s"),
        host_ms: figure(&said, "ms"),
        guest_ms: gap as f64 / 1000.0,
        mib: figure(&said, "MiB"),
        jitter_ms: jitter as f64 / 1000.0,
    }
}

/// Seconds to push `bytes` through one TCP connection from A to B.
fn link_baseline(hosts: &Hosts, bytes: u64) -> f64 {
    let (b, a) = (hosts.b.clone(), hosts.a.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = std::thread::spawn(move || {
        Hosts::enter(&b);
        let l = std::net::TcpListener::bind(format!("{DST_IP}:7788")).unwrap();
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while s.read(&mut buf).unwrap_or(0) > 0 {}
    });
    rx.recv().unwrap();
    let secs = std::thread::spawn(move || {
        Hosts::enter(&a);
        let mut s = std::net::TcpStream::connect(format!("{DST_IP}:7788")).unwrap();
        let buf = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
        drop(s);
        start.elapsed().as_secs_f64()
    })
    .join()
    .unwrap();
    sink.join().unwrap();
    secs
}

fn guest_program(dir: &Path) -> PathBuf {
    let c = dir.join("g.c");
    std::fs::write(&c, GUEST_C).unwrap();
    let exe = dir.join("g");
    let ok = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&exe)
        .arg(&c)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cc -static");
    // A raw disk holding the program, whole 4 KiB blocks.
    let mut bytes = std::fs::read(&exe).unwrap();
    bytes.resize(bytes.len().next_multiple_of(4096), 0);
    let disk = dir.join("g.raw");
    std::fs::write(&disk, bytes).unwrap();
    disk
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the migration benchmark needs root (network namespaces)");
        return;
    }
    let kit = kit::build(&kit::KitOptions::default()).expect("the kit");
    let work = tempfile::tempdir().unwrap();
    let disk = guest_program(work.path());
    let hosts = Hosts::new();
    let mut body = String::from(
        "The kit's Linux (1 GiB, software CPU, one vCPU) moved from one network namespace \
         to another over a veth pair: `vessel migrate` at the source, `vessel receive` at \
         the destination, both monitors jailed. Guest downtime: the gap in a heartbeat the \
         guest prints every millisecond (its monotonic clock) across the move; host \
         downtime: from the stop at the source to the destination saying the guest runs. \
         Busy: a loop rewriting 64 MiB all the time.\n\n\
         | guest | how | rounds | total s | host downtime ms | guest downtime ms | MiB sent | link at the same bytes s | ratio | largest gap before the move ms |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for busy in [false, true] {
        for (how, flags) in [
            ("pre-copy", &[][..]),
            ("pre-copy, LZ4", &["--compress"][..]),
            // A downtime no round can meet: post-copy after the second.
            ("post-copy", &["--postcopy", "--downtime-ms", "1"][..]),
        ] {
            let m = migrate(&hosts, &kit, &disk, busy, flags);
            let base = link_baseline(&hosts, (m.mib * (1 << 20) as f64) as u64);
            let how = if flags.contains(&"--postcopy") && !m.switched {
                format!("{how} (converged before the switch)")
            } else {
                how.to_string()
            };
            body += &format!(
                "| {} | {how} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} |\n",
                if busy { "busy" } else { "idle" },
                m.rounds,
                m.seconds,
                m.host_ms,
                m.guest_ms,
                m.mib,
                base,
                m.seconds / base,
                m.jitter_ms,
            );
            eprintln!("{}", body.lines().last().unwrap());
        }
    }
    body += "\nRatio: the whole migration against the same bytes through one plain TCP \
             connection over the same veth pair; the rest is the pauses for the dirty log, \
             reading the pages the guest touched to find those of zeros (pages it never \
             touched are not read: /proc/self/pagemap), compressing (LZ4 rows: the \
             baseline is the compressed bytes) and starting the monitor at the \
             destination. Post-copy: after two rounds that did not meet a 1 ms downtime; \
             its host downtime ends when the destination runs the guest, its guest \
             downtime includes the first pages the guest had to wait for. Targets: the \
             idle 1 GiB guest moved in at most 1 s with at most 50 ms of downtime; the busy \
             guest converging with at most 300 ms.\n";
    update_section("migration", &format!("## Live migration\n\n{body}")).expect("BENCHMARKS.md");
}
