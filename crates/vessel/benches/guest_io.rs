//! In-guest I/O (issue 5), written to BENCHMARKS.md: `dd` on a virtio disk and TCP from
//! the guest to the host through a TAP device, with the kit's Linux on the software
//! CPU. The guest's CPU (an interpreter here) is the bottleneck on these hosts.
//! KVM on these hosts cannot run Linux user space (see HOST.md), so it has no row.
//!
//! Run with `cargo bench -p vessel --bench guest_io` (root for the TAP part).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

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

/// Seconds from busybox `time`'s "real 0m 1.23s" lines, in order.
fn times(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("real"))
        .filter_map(|t| {
            let t = t.trim();
            let (m, s) = t.split_once('m')?;
            Some(
                m.trim().parse::<f64>().ok()? * 60.0
                    + s.trim().trim_end_matches('s').parse::<f64>().ok()?,
            )
        })
        .collect()
}

fn main() {
    let kit = kit();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let script = format!(
        "time dd if=/dev/zero of=/dev/vda bs=1M count={MIB} oflag=direct 2>&1; \
         time dd if=/dev/vda of=/dev/null bs=1M count={MIB} iflag=direct 2>&1; \
         time dd if=/dev/zero of=/dev/null bs=1M count={MIB} 2>&1"
    );
    let out = run(
        &kit,
        &["--disk", &format!("path={}", disk.display())],
        &script,
    );
    let t = times(&out);
    assert_eq!(t.len(), 3, "{out}");
    let mb = MIB as f64 * 1.048_576;
    let mut body = format!(
        "## In-guest I/O (the kit's Linux on `--accel emu`)\n\n\
         {MIB} MiB with busybox `dd` (1 MiB blocks, O_DIRECT) on a virtio-blk disk backed by a \
         sparse file on the host; a memory-to-memory `dd` in the same guest shows what the \
         guest's CPU alone allows.\n\n\
         | in the guest | MB/s |\n| --- | --- |\n\
         | write /dev/vda (O_DIRECT) | {:.0} |\n| read /dev/vda (O_DIRECT) | {:.0} |\n\
         | /dev/zero to /dev/null (no device) | {:.0} |\n\n",
        mb / t[0],
        mb / t[1],
        mb / t[2]
    );

    // TCP needs root for the TAP device.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let tap = "vbenchtap0";
        let sh = |c: &str| {
            Command::new("sh")
                .args(["-c", c])
                .status()
                .unwrap()
                .success()
        };
        let _ = sh(&format!("ip link del {tap} 2>/dev/null"));
        assert!(sh(&format!(
            "ip tuntap add dev {tap} mode tap && ip addr add 10.99.0.1/24 dev {tap} && ip link set {tap} up"
        )));
        let listener = std::net::TcpListener::bind("10.99.0.1:7788").unwrap();
        let receiver = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
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
        });
        let script = format!(
            "ifconfig eth0 10.99.0.2 netmask 255.255.255.0 up; \
             dd if=/dev/zero bs=1M count={MIB} 2>/dev/null | nc 10.99.0.1 7788"
        );
        run(&kit, &["--net", &format!("tap={tap}")], &script);
        let (n, secs) = receiver.join().unwrap();
        let _ = sh(&format!("ip link del {tap}"));
        assert_eq!(n as u64, MIB << 20);
        body += &format!(
            "TCP from the guest to the host over virtio-net and a TAP device (busybox `nc`, \
             {MIB} MiB, timed on the host from the first byte to the last): **{:.0} MB/s**.\n\n",
            n as f64 / secs / 1e6
        );
    } else {
        body += "TCP: not measured (the TAP device needs root).\n\n";
    }
    body += "On KVM these hosts cannot run Linux user space (KVM emulates every instruction \
             and stops the kernel before init, see the KVM section), so there are no KVM rows; \
             on a host with VT-x/AMD-V the same benchmark runs the guest on KVM.\n";
    println!("{body}");
    update_section("guest-io", &body).unwrap();
}
