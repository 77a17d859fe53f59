//! Guest additions (issue 14), written to BENCHMARKS.md, all in one kit VM on the
//! software CPU, each figure beside a baseline from the same VM in the same run:
//! - `vessel exec NAME -- true` (a vsock connection, the agent forks and reports the
//!   exit), against a small HTTP request to the guest's busybox httpd through passt's
//!   port forward (a TCP round trip through the same guest);
//! - guest -> host throughput over vsock (`vessel exec NAME -- cat` of a 64 MiB file),
//!   against the same file fetched from the guest's httpd through passt;
//! - virtio-fs (a virtiofsd share) against an ext4 file system on a virtio-blk disk:
//!   64 MiB written (with fsync) and read back (caches dropped), and 500 small files
//!   written; timed on the host around `vessel exec`, less the exec's own latency.
//!
//! Run with `cargo bench -p vessel --bench guest_additions`. Needs virtiofsd.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testguest::report::{median, update_section};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const MIB: u64 = 64;
const ROUNDS: usize = 20;
const PORT: u16 = 18780;

struct Home(tempfile::TempDir);

impl Home {
    fn vessel(&self, args: &[&str]) -> std::process::Output {
        Command::new(VESSEL)
            .args(args)
            .env("VESSEL_HOME", self.0.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.vessel(args);
        assert!(
            out.status.success(),
            "vessel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Seconds `sh -c script` takes in the guest, measured around `vessel exec`.
    fn timed(&self, script: &str) -> f64 {
        let t = Instant::now();
        self.ok(&["exec", "ga", "--", "sh", "-c", script]);
        t.elapsed().as_secs_f64()
    }

    fn wait_log(&self, what: &str) {
        self.wait_log_after(0, what);
    }

    /// Waits for `what` on the console after its first `from` bytes.
    fn wait_log_after(&self, from: usize, what: &str) {
        let log = self.0.path().join("vms/ga/serial.log");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .get(from..)
            .is_some_and(|l| l.contains(what))
        {
            assert!(Instant::now() < deadline, "no {what:?} on the console");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.vessel(&["kill", "ga"]);
    }
}

/// `GET path` from the guest's httpd: bytes and seconds.
fn get(at: SocketAddr, path: &str) -> (usize, f64) {
    let t = Instant::now();
    let mut c = TcpStream::connect_timeout(&at, Duration::from_secs(10)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    while let Ok(k) = c.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    (n, t.elapsed().as_secs_f64())
}

fn main() {
    if devices::virtio::fs::find_virtiofsd().is_none() {
        eprintln!("skipped: virtiofsd is not installed (cargo install virtiofsd)");
        return;
    }
    let kit = kit::build(&kit::KitOptions::default()).expect("kit");
    let home = Home(tempfile::tempdir().unwrap());
    let share = home.0.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let disk = home.0.path().join("data.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .status()
        .expect("mkfs.ext4");
    assert!(mkfs.success());
    let script = format!(
        "mkdir -p /mnt/disk /www && mount /dev/vda /mnt/disk && \
         dd if=/dev/zero of=/www/f bs=1M count={MIB} 2>/dev/null && echo small > /www/s && \
         httpd -p 80 -h /www && echo bench-ready; while :; do sleep 1; done"
    );
    let net = format!("user,hostfwd=tcp:127.0.0.1:{PORT}-:80");
    home.ok(&[
        "create",
        "ga",
        "--accel",
        "emu",
        "--memory",
        "1G",
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initrd.to_str().unwrap(),
        "--cmdline",
        &kit::cmdline("", Some(&script)),
        "--net",
        &net,
        "--disk",
        &format!("path={}", disk.display()),
        "--share",
        share.to_str().unwrap(),
    ]);
    home.ok(&["start", "ga"]);
    home.wait_log(kit::AGENT_MARKER);
    home.wait_log("bench-ready");
    let at: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();

    // Round trips.
    let mut exec_ms: Vec<f64> = (0..ROUNDS).map(|_| home.timed("true") * 1e3).collect();
    let mut http_ms: Vec<f64> = (0..ROUNDS).map(|_| get(at, "/s").1 * 1e3).collect();
    let (exec_ms, http_ms) = (median(&mut exec_ms), median(&mut http_ms));

    // Guest -> host.
    let mb = (MIB << 20) as f64 / 1e6;
    let t = Instant::now();
    let out = home.ok(&["exec", "ga", "--", "cat", "/www/f"]);
    let vsock_mbs = out.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    assert_eq!(out.len() as u64, MIB << 20);
    let (n, secs) = get(at, "/f");
    assert!(n as u64 > MIB << 20, "short answer: {n} bytes");
    let tcp_mbs = mb / secs;

    // virtio-fs against virtio-blk + ext4.
    let overhead = exec_ms / 1e3;
    let fs_rows: Vec<(&str, f64, f64)> = [
        (
            "64 MiB written, fsync",
            format!("dd if=/dev/zero of=@/f bs=1M count={MIB} conv=fsync 2>/dev/null"),
        ),
        (
            "64 MiB read, caches dropped",
            "echo 3 > /proc/sys/vm/drop_caches; dd if=@/f of=/dev/null bs=1M 2>/dev/null"
                .to_string(),
        ),
        (
            "500 small files written, sync",
            "mkdir @/many && i=0; while [ $i -lt 500 ]; do echo $i > @/many/$i; i=$((i+1)); done; sync"
                .to_string(),
        ),
    ]
    .iter()
    .map(|(what, script)| {
        let fs = home.timed(&script.replace('@', "/mnt/share")) - overhead;
        let blk = home.timed(&script.replace('@', "/mnt/disk")) - overhead;
        (*what, fs, blk)
    })
    .collect();

    // A clean stop through the agent, then (booted again) through the ACPI button:
    // from the command to the monitor gone.
    let stop = |args: &[&str]| {
        let t = Instant::now();
        home.ok(args);
        t.elapsed().as_secs_f64() * 1e3
    };
    let agent_stop_ms = stop(&["stop", "ga"]);
    let log_len =
        std::fs::read_to_string(home.0.path().join("vms/ga/serial.log")).map_or(0, |l| l.len());
    home.ok(&["start", "ga"]);
    home.wait_log_after(log_len, "bench-ready");
    let button_stop_ms = stop(&["stop", "ga", "--button"]);

    let mut body = String::from(
        "## Guest additions (issue 14)\n\n\
         One kit VM on the software CPU (1 vCPU, 1 GiB), `cargo bench -p vessel --bench guest_additions`; \
         every figure beside a baseline from the same VM in the same run.\n\n\
         | | vessel | baseline | ratio |\n|---|---|---|---|\n",
    );
    body += &format!(
        "| `vessel exec NAME -- true` vs an HTTP request through passt (median of {ROUNDS}) | {exec_ms:.1} ms | {http_ms:.1} ms | {:.2} |\n",
        exec_ms / http_ms
    );
    body += &format!(
        "| guest -> host, {MIB} MiB: vsock (`vessel exec -- cat`) vs TCP through passt | {vsock_mbs:.1} MB/s | {tcp_mbs:.1} MB/s | {:.2} |\n",
        vsock_mbs / tcp_mbs
    );
    for (what, fs, blk) in &fs_rows {
        body += &format!(
            "| {what}: virtio-fs vs virtio-blk ext4 | {fs:.2} s | {blk:.2} s | {:.2} |\n",
            fs / blk
        );
    }
    body += &format!(
        "| `vessel stop` through the agent vs the ACPI button (command to monitor gone) | {agent_stop_ms:.0} ms | {button_stop_ms:.0} ms | {:.2} |\n",
        agent_stop_ms / button_stop_ms
    );
    body += "\nvirtio-fs runs through virtiofsd (`--cache auto`, its default thread pool); the \
             times are the guest command's, measured on the host around `vessel exec` less the \
             median exec latency above.\n";
    print!("{body}");
    update_section("guest-additions", &body).expect("write BENCHMARKS.md");
}
