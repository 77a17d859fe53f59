//! Networking (issue 13), written to BENCHMARKS.md: TCP through passt (`--net user`),
//! through a TAP device (root), and between two VMs on a named network, with the kit's
//! Linux on the software CPU; QEMU (TCG) with the same kit and the same passt through
//! `-netdev stream` as the outside reference. Per path: host -> guest (the guest's
//! busybox `wget` of 64 MiB from a server on the host, timed in the guest), guest ->
//! host (the host fetching 64 MiB from the guest's busybox `httpd`, first byte to last)
//! and connection setup (the host's connect + a tiny request + the answer, median of 20).
//!
//! Run with `cargo bench -p vessel --bench network` (root for the TAP row).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testguest::report::{median, update_section};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const QEMU: &str = "qemu-system-x86_64";
const MIB: u64 = 64;
/// The host's server (64 MiB at /f, a few bytes at /s), on every address.
const HOST_PORT: u16 = 18081;
/// Where a passt forward reaches the guest's httpd (vessel's; QEMU's passt gets the
/// next port, so a helper still exiting from the row before cannot answer for it).
const FORWARD_PORT: u16 = 18080;
const QEMU_FORWARD_PORT: u16 = 18082;
const TAP: &str = "vnetbench0";
const TAP_HOST: Ipv4Addr = Ipv4Addr::new(10, 98, 7, 1);
const TAP_GUEST: Ipv4Addr = Ipv4Addr::new(10, 98, 7, 2);
const REQUESTS: usize = 20;

fn kit() -> kit::Kit {
    let dir = kit::default_cache_dir().expect("kit dir");
    kit::locate(&dir).unwrap_or_else(|| kit::build(&kit::KitOptions::default()).expect("kit"))
}

/// Serves 64 MiB at /f and a few bytes at anything else, to every connection.
fn host_server() {
    let l = TcpListener::bind(("0.0.0.0", HOST_PORT)).expect("bind the host's server");
    std::thread::spawn(move || {
        let big = vec![0x5au8; (MIB << 20) as usize];
        for c in l.incoming().flatten() {
            let big = big.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut req = [0u8; 512];
                let n = c.read(&mut req).unwrap_or(0);
                let body: &[u8] = if req[..n].starts_with(b"GET /f ") {
                    &big
                } else {
                    b"small\n"
                };
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(body);
            });
        }
    });
}

/// A VM (or QEMU) whose console output is collected.
struct Vm {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Vm {
    fn spawn(mut cmd: Command) -> Vm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut o = o.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        Vm { child, out }
    }

    fn wait_for(&self, row: &str, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let t = self.out.lock().unwrap().clone();
            if t.contains(what) {
                return t;
            }
            assert!(Instant::now() < deadline, "{row}: no {what:?} in:\n{t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest's part: fetch /f from `server` (timed), then serve 64 MiB and a small file
/// with httpd on port 80 and say so.
fn script(setup: &str, server: &str) -> String {
    format!(
        "{setup}; mkdir /www; dd if=/dev/zero of=/www/f bs=1M count={MIB} 2>/dev/null; \
         echo small > /www/s; sleep 1; time wget -q -O /dev/null http://{server}/f 2>&1; \
         httpd -p 80 -h /www; echo www-ready; sleep 1000"
    )
}

/// The gateway, once DHCP has given one (the kit's udhcpc retries in the background
/// when the first three seconds bring no lease).
const VIA_GATEWAY: &str = "until ip route | grep -q default; do sleep 1; done; gw=$(ip route | grep default | cut -d' ' -f3)";

/// Seconds from busybox `time`'s first "real 0m 1.23s" line.
fn guest_seconds(out: &str) -> f64 {
    testguest::timing::busybox_time_after(out, "").unwrap_or_else(|| panic!("no timing in:\n{out}"))
}

fn get(at: SocketAddr, path: &str) -> (usize, f64) {
    let started = Instant::now();
    let mut c = TcpStream::connect_timeout(&at, Duration::from_secs(10)).expect("connect");
    // A stalled answer ends the attempt instead of the benchmark.
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut first) = (0, None);
    loop {
        let k = c.read(&mut buf).unwrap_or(0);
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        n += k;
    }
    let from = if path == "/f" {
        first.unwrap_or(started)
    } else {
        started
    };
    (n, from.elapsed().as_secs_f64())
}

struct Row {
    path: String,
    host_to_guest: f64,
    guest_to_host: f64,
    setup_ms: f64,
}

/// Host -> guest from the guest's timing; guest -> host and setup latency against the
/// guest's httpd at `guest`.
fn measure(path: &str, vm: &Vm, guest: SocketAddr) -> Row {
    let out = vm.wait_for(path, "www-ready");
    let mb = (MIB << 20) as f64 / 1e6;
    let host_to_guest = mb / guest_seconds(&out);
    // The guest's httpd answers once its forward or address is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&guest, Duration::from_secs(1)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{path}: the guest's httpd does not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Up to three attempts: the count of stalled ones is reported with the figures.
    let mut stalled = 0;
    let (n, secs) = loop {
        let (n, secs) = get(guest, "/f");
        if n as u64 > MIB << 20 || stalled == 2 {
            break (n, secs);
        }
        stalled += 1;
    };
    if stalled > 0 {
        eprintln!("{path}: {stalled} transfer(s) of /f stalled before one completed");
    }
    if n as u64 <= MIB << 20 {
        let tail: String = vm
            .out
            .lock()
            .unwrap()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{path}: short answer ({n} bytes); the guest's console, last lines first:\n{tail}");
    }
    let mut setup: Vec<f64> = (0..REQUESTS).map(|_| get(guest, "/s").1 * 1e3).collect();
    let note = match stalled {
        0 => String::new(),
        n => format!(" ({n} guest -> host transfer(s) stalled for 30 s and were retried)"),
    };
    Row {
        path: format!("{path}{note}"),
        host_to_guest,
        guest_to_host: mb / secs,
        setup_ms: median(&mut setup),
    }
}

fn vessel_run(kit: &kit::Kit, net: &[&str], cmdline_extra: &str, script: &str) -> Command {
    let mut cmd = Command::new(VESSEL);
    cmd.args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", &kit::cmdline(cmdline_extra, Some(script))]);
    for n in net {
        cmd.args(["--net", n]);
    }
    cmd
}

fn passt_row(kit: &kit::Kit) -> Row {
    let net = format!("user,hostfwd=tcp:127.0.0.1:{FORWARD_PORT}-:80");
    let server = format!("$gw:{HOST_PORT}");
    let vm = Vm::spawn(vessel_run(kit, &[&net], "", &script(VIA_GATEWAY, &server)));
    measure(
        "vessel, `--net user` (passt)",
        &vm,
        SocketAddr::from(([127, 0, 0, 1], FORWARD_PORT)),
    )
}

/// QEMU with the same kit, and a passt of its own over `-netdev stream`.
fn qemu_row(kit: &kit::Kit) -> Option<Row> {
    Command::new(QEMU).arg("--version").output().ok()?;
    // Straight in /tmp: passt, having given up root for nobody, says it bound a socket
    // in a folder only root may write to, but none appears there and QEMU's NIC stays
    // unconnected.
    let sock = std::env::temp_dir().join(format!("vessel-bench-passt-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    // Killed however this row ends: a passt left behind would hold the port.
    let passt = KillOnDrop(
        Command::new("passt")
            .args(["-f", "-q", "-s"])
            .arg(&sock)
            .args(["-t", &format!("127.0.0.1/{QEMU_FORWARD_PORT}:80")])
            .stderr(Stdio::null())
            .spawn()
            .ok()?,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let server = format!("$gw:{HOST_PORT}");
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "512M"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kit.bzimage)
        .arg("-initrd")
        .arg(&kit.initrd)
        .args([
            "-append",
            &kit::cmdline("", Some(&script(VIA_GATEWAY, &server))),
        ])
        .arg("-netdev")
        .arg(format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .args(["-device", "virtio-net-pci,netdev=n0"]);
    let vm = Vm::spawn(cmd);
    let row = measure(
        "QEMU 7.2 (TCG), `-netdev stream` + passt",
        &vm,
        SocketAddr::from(([127, 0, 0, 1], QEMU_FORWARD_PORT)),
    );
    drop(vm);
    drop(passt);
    let _ = std::fs::remove_file(&sock);
    Some(row)
}

fn sh(c: &str) -> bool {
    Command::new("sh")
        .args(["-c", c])
        .status()
        .is_ok_and(|s| s.success())
}

fn tap_row(kit: &kit::Kit) -> Option<Row> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let _ = sh(&format!("ip link del {TAP} 2>/dev/null"));
    assert!(sh(&format!(
        "ip tuntap add dev {TAP} mode tap && ip addr add {TAP_HOST}/24 dev {TAP} && \
         ip link set {TAP} up"
    )));
    let up = format!("ifconfig eth0 {TAP_GUEST} netmask 255.255.255.0 up");
    let server = format!("{TAP_HOST}:{HOST_PORT}");
    let net = format!("tap={TAP}");
    let vm = Vm::spawn(vessel_run(
        kit,
        &[&net],
        "vessel.dhcp=off",
        &script(&up, &server),
    ));
    let row = measure(
        "vessel, TAP device (root)",
        &vm,
        SocketAddr::from((TAP_GUEST, 80)),
    );
    drop(vm);
    let _ = sh(&format!("ip link del {TAP}"));
    Some(row)
}

/// Two VMs on one named network: the second fetches 64 MiB from the first's httpd.
fn vm_to_vm(kit: &kit::Kit) -> f64 {
    let home = tempfile::tempdir().unwrap();
    let serve = format!(
        "mkdir /www; dd if=/dev/zero of=/www/f bs=1M count={MIB} 2>/dev/null; \
         httpd -p 80 -h /www; echo www-ready; sleep 1000"
    );
    let mut a = vessel_run(kit, &["network=bench"], "", &serve);
    a.env("VESSEL_HOME", home.path());
    let a = Vm::spawn(a);
    let out = a.wait_for("VM -> VM, server", "www-ready");
    let ip = out
        .lines()
        .find_map(|l| l.strip_prefix(kit::ADDRESS_MARKER_PREFIX))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|a| a.split('/').next())
        .expect("the server VM's address")
        .to_string();
    let fetch = format!("sleep 1; time wget -q -O /dev/null http://{ip}/f 2>&1");
    let mut b = vessel_run(kit, &["network=bench"], "", &fetch);
    b.env("VESSEL_HOME", home.path());
    let b = Vm::spawn(b);
    let out = b.wait_for("VM -> VM, client", "VESSEL-KIT: exit status");
    (MIB << 20) as f64 / 1e6 / guest_seconds(&out)
}

fn main() {
    let kit = kit();
    host_server();
    let mut rows = vec![passt_row(&kit)];
    let qemu = qemu_row(&kit);
    rows.extend(qemu);
    rows.extend(tap_row(&kit));
    let vm_vm = vm_to_vm(&kit);
    let mut body = format!(
        "## Networking (the kit's Linux on `--accel emu`)\n\n\
         {MIB} MiB over TCP with busybox in the guest: host -> guest is the guest's `wget` \
         from a server on the host (timed in the guest); guest -> host is the host fetching \
         from the guest's `httpd` (first byte to last); setup is the host's connect, a tiny \
         request and its answer (median of {REQUESTS}). Every figure is bound by the \
         guest's CPU (an interpreter here; QEMU's is TCG).\n\n\
         | path | host -> guest MB/s | guest -> host MB/s | setup ms |\n\
         | --- | --- | --- | --- |\n"
    );
    for r in &rows {
        body += &format!(
            "| {} | {:.0} | {:.0} | {:.1} |\n",
            r.path, r.host_to_guest, r.guest_to_host, r.setup_ms
        );
    }
    body += &format!(
        "| vessel, VM -> VM on a named network (`wget` in one, `httpd` in the other) | \
         {vm_vm:.0} | | |\n\n"
    );
    match &rows[..] {
        [v, q, ..] if q.path.starts_with("QEMU") => {
            body += &format!(
                "vessel / QEMU through passt, same run: host -> guest **{:.2}**, guest -> \
                 host **{:.2}**, setup {:.2} (QEMU's time / vessel's).\n",
                v.host_to_guest / q.host_to_guest,
                v.guest_to_host / q.guest_to_host,
                q.setup_ms / v.setup_ms
            );
        }
        _ => body += "QEMU was not installed: no outside reference this run.\n",
    }
    if rows.iter().all(|r| !r.path.contains("TAP")) {
        body += "The TAP row needs root.\n";
    }
    println!("{body}");
    update_section("network", &body).unwrap();
}
