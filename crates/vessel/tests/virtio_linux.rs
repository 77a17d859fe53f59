//! virtio devices used by a real Linux guest (the kit on the software CPU): disks that
//! keep what the guest writes, a read-only disk that refuses writes, discard that frees
//! host blocks, a root file system on a disk, the entropy device, the virtio console,
//! and the network through a TAP device.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{is_root, kit};

const DEADLINE: Duration = Duration::from_secs(240);

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn vessel_emu(kit: &kit::Kit, extra: &[String], cmdline: &str) -> Command {
    let mut cmd = common::vessel();
    cmd.args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", cmdline])
        .args(extra);
    cmd
}

#[test]
fn disks_entropy_and_console_serve_a_linux_guest() {
    let Some(kit) = kit() else { return };
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch.img");
    std::fs::File::create(&scratch)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let filled = dir.path().join("filled.img");
    let mut data = vec![0u8; 8 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&filled, &data).unwrap();
    let filled_sum = sha256(&filled);
    let trim = dir.path().join("trim.img");
    std::fs::write(&trim, vec![0x5au8; 64 << 20]).unwrap();
    let trim_blocks = std::fs::metadata(&trim).unwrap().blocks();
    let hvc = dir.path().join("hvc.sock");

    let script = [
        "seq 1 200000 > /dev/vda && sync && echo pattern-written",
        "sha256sum /dev/vdb",
        "dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>&1 | head -1",
        "blkdiscard /dev/vdc && echo discarded",
        "dd if=/dev/hwrng bs=1024 count=1024 2>/dev/null | wc -c",
        "read line < /dev/hvc0; echo echo:$line > /dev/hvc0; sleep 1",
    ]
    .join("; ");
    let cmdline = kit::cmdline("", Some(&script));
    let disks = [
        format!("path={}", scratch.display()),
        format!("path={},readonly=on", filled.display()),
        format!("path={}", trim.display()),
    ];
    let mut extra: Vec<String> = disks
        .iter()
        .flat_map(|d| ["--disk".to_string(), d.clone()])
        .collect();
    extra.extend([
        "--rng".into(),
        "--hvc".into(),
        format!("socket={}", hvc.display()),
    ]);
    let cmd = vessel_emu(&kit, &extra, &cmdline);
    // The guest's hvc0 echoes a line back through the socket.
    let echo = std::thread::spawn({
        let hvc = hvc.clone();
        move || {
            let deadline = Instant::now() + DEADLINE;
            let mut s = loop {
                if let Ok(s) = UnixStream::connect(&hvc) {
                    break s;
                }
                assert!(Instant::now() < deadline, "no hvc socket");
                std::thread::sleep(Duration::from_millis(50));
            };
            s.set_read_timeout(Some(Duration::from_secs(200))).unwrap();
            // The guest reads hvc0 only once its command runs; repeat until it answers.
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            let mut last_sent = Instant::now() - Duration::from_secs(10);
            while !String::from_utf8_lossy(&got).contains("echo:vessel-hvc") {
                if last_sent.elapsed() > Duration::from_secs(2) {
                    let _ = s.write_all(b"vessel-hvc\n");
                    last_sent = Instant::now();
                }
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) if Instant::now() < deadline => {}
                    Err(_) => break,
                }
            }
            String::from_utf8_lossy(&got).into_owned()
        }
    });
    let r = common::run_with_deadline(cmd, DEADLINE);
    let hvc_seen = echo.join().unwrap();
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 0"),
        "{}",
        r.dump()
    );

    // What the guest wrote is on the host's file.
    let written = std::fs::read(&scratch).unwrap();
    let seq: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(
        &written[..seq.len()],
        seq.as_bytes(),
        "the pattern on the host file"
    );
    assert!(written[seq.len()..].iter().all(|b| *b == 0));
    // A host-filled disk reads back identically; read-only refuses writes.
    assert!(
        r.stdout.contains(&format!("{filled_sum}  /dev/vdb")),
        "{}",
        r.dump()
    );
    assert!(r.stdout.contains("Operation not permitted"), "{}", r.dump());
    assert_eq!(sha256(&filled), filled_sum, "a read-only disk is unchanged");
    // Discard punched holes: the file's allocation shrank.
    assert!(r.stdout.contains("discarded"), "{}", r.dump());
    let blocks = std::fs::metadata(&trim).unwrap().blocks();
    assert!(
        blocks < trim_blocks / 4,
        "allocation {trim_blocks} -> {blocks} blocks"
    );
    // 1 MiB from the virtio entropy device.
    assert!(r.stdout.contains("\n1048576"), "{}", r.dump());
    assert!(
        hvc_seen.contains("echo:vessel-hvc"),
        "hvc0 said {hvc_seen:?}"
    );
}

#[test]
fn linux_boots_from_an_ext4_root_disk_to_the_shell() {
    let Some(kit) = kit() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = kit::fresh_rootfs(&kit, dir.path()).unwrap();
    let cmdline = kit::cmdline("root=/dev/vda", None);
    let extra = ["--disk".to_string(), format!("path={}", root.display())];
    let cmd = vessel_emu(&kit, &extra, &cmdline);
    let r = common::run_interactive(
        cmd,
        &[(
            "vessel:/# ",
            b"grep vda /proc/mounts; echo on-disk > /root/proof; sync; poweroff -f\n",
        )],
        DEADLINE,
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains("VESSEL-KIT: root on /dev/vda"),
        "{}",
        r.dump()
    );
    assert!(r.stdout.contains("/dev/vda / ext4 rw"), "{}", r.dump());
    assert!(
        r.stdout.contains("vessel:/# "),
        "the busybox shell prompt: {}",
        r.dump()
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /root/proof"])
        .arg(&root)
        .output();
    if let Ok(out) = out {
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("on-disk"),
            "{out:?}"
        );
    }
}

/// A TAP device on the host, configured and removed by the test.
struct Tap(String);

impl Tap {
    fn new(name: &str, addr: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        common::sh(&format!(
            "ip tuntap add dev {name} mode tap && ip addr add {addr} dev {name} && ip link set {name} up"
        ));
        Tap(name.into())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn the_guest_pings_the_host_and_sends_16_mib_over_tcp() {
    if !is_root() {
        return;
    }
    let Some(kit) = kit() else { return };
    let tap = Tap::new("vesseltap0", "10.88.0.1/24");
    let listener = std::net::TcpListener::bind("10.88.0.1:7777").unwrap();
    let receiver = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let (mut c, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        all
    });
    let script = "ifconfig eth0 10.88.0.2 netmask 255.255.255.0 up; ping -c 2 10.88.0.1; \
                  dd if=/dev/urandom of=/tmp/f bs=1M count=16 2>/dev/null; sha256sum /tmp/f; \
                  nc 10.88.0.1 7777 < /tmp/f";
    let cmdline = kit::cmdline("", Some(script));
    let extra = ["--net".to_string(), format!("tap={}", tap.0)];
    let r = common::run_with_deadline(vessel_emu(&kit, &extra, &cmdline), DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout
            .contains("2 packets transmitted, 2 packets received"),
        "{}",
        r.dump()
    );
    let received = receiver.join().unwrap();
    assert_eq!(received.len(), 16 << 20);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("received");
    std::fs::write(&file, &received).unwrap();
    assert!(
        r.stdout.contains(&format!("{}  /tmp/f", sha256(&file))),
        "{}",
        r.dump()
    );
}

/// Seconds from the first busybox `time` line ("real 0m 4.12s") after `after`.
fn seconds_after(out: &str, after: &str) -> f64 {
    testguest::timing::busybox_time_after(out, after)
        .unwrap_or_else(|| panic!("no timing after {after:?} in:\n{out}"))
}

/// Rate limits on disks as the guest sees them: `dd` with O_DIRECT reads a disk limited
/// to 10 MiB/s at 10 ± 1 MiB/s, and 4 KiB reads from one limited to 50 operations a
/// second at 50 ± 5 per second; two disks sharing one 10 MiB/s group read at 10 MiB/s
/// together; an unlimited disk beside them is not held back.
#[test]
fn a_guest_reads_rate_limited_disks_at_the_rates_set() {
    let Some(kit) = kit() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, vec![0x5au8; 48 << 20]).unwrap();
        p
    };
    let (bw, ops, free) = (image("bw.img"), image("ops.img"), image("free.img"));
    let (pair_a, pair_b) = (image("a.img"), image("b.img"));
    let script = [
        "echo bw-start; time dd if=/dev/vda of=/dev/null bs=1M count=40 iflag=direct 2>&1",
        "echo ops-start; time dd if=/dev/vdb of=/dev/null bs=4k count=150 iflag=direct 2>&1",
        "echo free-start; time dd if=/dev/vdc of=/dev/null bs=1M count=40 iflag=direct 2>&1",
        "echo pair-start; time sh -c 'dd if=/dev/vdd of=/dev/null bs=1M count=20 iflag=direct & \
         dd if=/dev/vde of=/dev/null bs=1M count=20 iflag=direct; wait' 2>&1",
    ]
    .join("; ");
    let extra: Vec<String> = [
        format!("path={},bw=10M", bw.display()),
        format!("path={},iops=50", ops.display()),
        format!("path={}", free.display()),
        format!("path={},bw=10M,group=pair", pair_a.display()),
        format!("path={},group=pair", pair_b.display()),
    ]
    .iter()
    .flat_map(|d| ["--disk".to_string(), d.clone()])
    .collect();
    let cmd = vessel_emu(&kit, &extra, &kit::cmdline("", Some(&script)));
    let r = common::run_with_deadline(cmd, DEADLINE);
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 0"),
        "{}",
        r.dump()
    );
    let mib_per_s = 40.0 / seconds_after(&r.stdout, "bw-start");
    let ops_per_s = 150.0 / seconds_after(&r.stdout, "ops-start");
    let free_mib_per_s = 40.0 / seconds_after(&r.stdout, "free-start");
    let pair_mib_per_s = 40.0 / seconds_after(&r.stdout, "pair-start");
    eprintln!(
        "bw=10M: {mib_per_s:.2} MiB/s; iops=50: {ops_per_s:.1}/s; group: {pair_mib_per_s:.2} MiB/s; unlimited: {free_mib_per_s:.0} MiB/s"
    );
    assert!(
        (mib_per_s - 10.0).abs() <= 1.0,
        "bw=10M gave {mib_per_s:.2} MiB/s"
    );
    assert!(
        (ops_per_s - 50.0).abs() <= 5.0,
        "iops=50 gave {ops_per_s:.1}/s"
    );
    assert!(
        free_mib_per_s > 20.0,
        "the unlimited disk read at {free_mib_per_s:.1} MiB/s"
    );
}

/// Seconds of the `time` line after the `dd-N` marker, once that dd has finished.
fn dd_seconds(log: &str, n: u32) -> Option<f64> {
    testguest::timing::busybox_time_after(log, &format!("dd-{n}"))
}

/// A running VM's disk limit changes with `vessel set NAME disk0.bw=...`: a guest
/// reading 8 MiB over and over under bw=32M slows to 4 MiB/s at once, and is quick
/// again when the limit is lifted; vm.toml keeps what was set.
#[test]
fn a_running_vms_disk_limit_changes_live() {
    let Some(kit) = kit() else { return };
    let home = common::home::Home::new();
    let disk = home.path().join("data.img");
    std::fs::write(&disk, vec![0x5au8; 16 << 20]).unwrap();
    let script = "i=0; while :; do i=$((i+1)); echo dd-$i; \
                  time dd if=/dev/vda of=/dev/null bs=1M count=8 iflag=direct 2>&1; done";
    let spec = format!("path={},bw=32M", disk.display());
    home.create_kit_vm("io", &kit, script, &["--disk", &spec]);
    home.ok(&["start", "io"]);
    // The dd that starts after a change is the first to run wholly under it.
    let next_dd = |after: u32| {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let log = home.log("io");
            let done = (after..after + 50)
                .take_while(|&n| dd_seconds(&log, n).is_some())
                .last();
            if let Some(n) = done {
                return n + 1;
            }
            assert!(
                Instant::now() < deadline,
                "no dd done after {after}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let wait_dd = |n: u32| {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = dd_seconds(&home.log("io"), n) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "dd-{n} never ended:\n{}",
                home.log("io")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = wait_dd(2);
    home.ok(&["set", "io", "disk0.bw=4M"]);
    let n = next_dd(2) + 1;
    let slow = 8.0 / wait_dd(n);
    let info = home.ok(&["info", "io"]);
    assert!(info.contains("throttled disk0: "), "{info}");
    home.ok(&["set", "io", "disk0.bw=none"]);
    let m = next_dd(n) + 1;
    let fast = 8.0 / wait_dd(m);
    eprintln!(
        "bw=32M: {:.1} MiB/s, then 4M: {slow:.2} MiB/s, then none: {fast:.1} MiB/s",
        8.0 / first
    );
    assert!(
        (slow - 4.0).abs() <= 0.4,
        "bw=4M set live gave {slow:.2} MiB/s"
    );
    assert!(fast > 12.0, "lifted, the disk read at {fast:.1} MiB/s");
    let toml = std::fs::read_to_string(home.vm_dir("io").join("vm.toml")).unwrap();
    assert!(!toml.contains("bw="), "{toml}");
    let (code, err) = home.refused(&["set", "io", "disk3.bw=1M"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("the VM has no disk3"), "{err}");
    home.ok(&["kill", "io"]);
}
