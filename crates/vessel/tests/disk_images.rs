//! qcow2 disks under a real Linux guest (the kit on the software CPU), checked with
//! QEMU's own tools: images qemu-img made (cluster sizes, a backing chain, zlib and zstd
//! clusters) read right; what the guest writes checks clean; fstrim gives space back;
//! a monitor killed mid-write loses no flushed write; a full host file system is an
//! I/O error, not a dead VM; a guest cannot turn its raw disk into a qcow2 that names
//! a host file; VMDK and VDI disks are imported and booted.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::home::Home;
use testguest::qemu_img::{self as qemu, overlay, qemu_img, qemu_io};

const DEADLINE: Duration = Duration::from_secs(300);

/// The kit, and qemu-img/qemu-io to check vessel against; None (after saying why)
/// when either is missing.
fn setup() -> Option<kit::Kit> {
    if !qemu::available() {
        return None;
    }
    common::kit()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn vessel_ok(args: &[&str]) -> String {
    let mut cmd = common::vessel();
    cmd.args(args);
    let r = common::run_with_deadline(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "vessel {args:?}: {}", r.dump());
    r.stdout
}

fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `vessel run` of the kit on the software CPU with these disks and this script.
fn kit_run(kit: &kit::Kit, disks: &[String], extra_cmdline: &str, script: &str) -> Command {
    let mut cmd = common::vessel();
    cmd.args(["run", "--accel", "emu", "--memory", "256M", "--net", "none"])
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", &kit::cmdline(extra_cmdline, Some(script))]);
    for d in disks {
        cmd.args(["--disk", d]);
    }
    cmd
}

#[test]
fn qemu_made_qcow2_images_read_right_in_linux_and_what_it_writes_checks_clean() {
    let Some(kit) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let mut images: Vec<PathBuf> = Vec::new();
    let writes = [
        "write -P 0xab 0 256k",
        "write -P 0x12 3M 300k",
        "write -P 0x34 8388096 1536",
        "write -z 64k 64k",
        "write -P 0x56 15M 1M",
    ];
    for cluster in ["4k", "64k", "2M"] {
        let img = d(&format!("c{cluster}.qcow2"));
        qemu::create(&img, "qcow2", &format!("cluster_size={cluster}"), "16M");
        qemu_io(&img, "qcow2", &writes);
        images.push(img);
    }
    // A chain two levels deep over a raw base, names relative as qemu-img writes them.
    let base = d("base.raw");
    qemu::create(&base, "raw", "", "16M");
    qemu_io(&base, "raw", &["write -P 0x11 0 16M"]);
    let mid = d("mid.qcow2");
    overlay(&mid, "base.raw", "raw", "");
    qemu_io(&mid, "qcow2", &["write -P 0x22 1M 1M"]);
    let top = d("top.qcow2");
    overlay(&top, "mid.qcow2", "qcow2", "");
    qemu_io(&top, "qcow2", &["write -P 0x33 1536k 1M"]);
    images.push(top.clone());
    // Compressed clusters: zlib at 64 KiB, zstd at 2 MiB.
    for (kind, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd,cluster_size=2M"),
    ] {
        let compressed = d(&format!("{kind}.qcow2"));
        let (from, to) = (p(&top), p(&compressed));
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", opts, from, to]);
        images.push(compressed);
    }
    let sums: Vec<String> = images.iter().map(|i| sha256(&qemu::reads(i))).collect();

    // A blank image made by vessel, for the guest to write.
    let blank = d("blank.qcow2");
    vessel_ok(&["disk", "create", p(&blank), "16M"]);
    // An ext4 file system with 8 MiB in one file, imported to qcow2, for fstrim.
    let tree = d("tree");
    std::fs::create_dir(&tree).unwrap();
    let noise: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(tree.join("big"), &noise).unwrap();
    let fs_raw = d("fs.raw");
    let (tree, fs_path) = (p(&tree), p(&fs_raw));
    let mke2fs = [
        "-q", "-t", "ext4", "-E", "discard", "-d", tree, fs_path, "32M",
    ];
    let made = Command::new("mke2fs").args(mke2fs).status().unwrap();
    assert!(made.success());
    let fs = d("fs.qcow2");
    vessel_ok(&["disk", "convert", p(&fs_raw), p(&fs)]);
    let fs_before = allocated(&fs);

    let mut disks: Vec<String> = images
        .iter()
        .map(|i| format!("path={}", i.display()))
        .collect();
    disks.push(format!("path={}", blank.display()));
    disks.push(format!("path={},format=qcow2", fs.display()));
    let script = [
        "for v in a b c d e f; do sha256sum /dev/vd$v; done",
        "seq 1 100000 > /dev/vdg && sync && echo written",
        "mkdir /m && mount /dev/vdh /m && rm /m/big && sync && fstrim -v /m && umount /m",
    ]
    .join("; ");
    let r = common::run_with_deadline(kit_run(&kit, &disks, "", &script), DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    for (i, sum) in sums.iter().enumerate() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        assert!(
            r.stdout.contains(&format!("{sum}  {dev}")),
            "{} read wrong in the guest: {}",
            images[i].display(),
            r.dump()
        );
    }
    assert!(r.stdout.contains("written"), "{}", r.dump());
    qemu::assert_checks(&blank, false);
    let seq: String = (1..=100_000).map(|n| format!("{n}\n")).collect();
    let back = qemu::reads(&blank);
    assert_eq!(&back[..seq.len()], seq.as_bytes());
    assert!(back[seq.len()..].iter().all(|&b| b == 0));
    qemu::assert_checks(&fs, false);
    let fs_after = allocated(&fs);
    assert!(
        fs_after + (6 << 20) < fs_before,
        "fstrim: {fs_before} -> {fs_after} bytes allocated on the host\n{}",
        r.dump()
    );
}

#[test]
fn a_monitor_killed_mid_write_leaves_a_valid_image_with_every_flushed_write() {
    let Some(kit) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    vessel_ok(&["disk", "create", p(&img), "64M"]);
    // A writer scribbling 256 KiB at a time over 16..48 MiB, and a logger writing block
    // N with its number and saying so once fsync returned.
    let script = [
        "(while true; do dd if=/dev/urandom of=/dev/vda bs=64k seek=$((256 + RANDOM % 508)) count=4 2>/dev/null; done) &",
        "i=1; while [ $i -lt 250 ]; do echo seq-$i | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync 2>/dev/null && echo flushed $i; i=$((i + 1)); done",
    ]
    .join(" ");
    let disks = [format!("path={}", img.display())];
    // run_until kills vessel (SIGKILL) as soon as the marker shows.
    let r = common::run_until(kit_run(&kit, &disks, "", &script), "flushed 60\n", DEADLINE);
    assert!(r.stdout.contains("flushed 60"), "{}", r.dump());
    qemu::assert_checks(&img, true);
    let back = qemu::reads(&img);
    let flushed: Vec<usize> = r
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("flushed ")?.parse().ok())
        .collect();
    assert!(flushed.len() >= 60);
    for n in flushed {
        let block = &back[n * 4096..n * 4096 + 16];
        let want = format!("seq-{n}\n");
        assert!(
            block.starts_with(want.as_bytes()),
            "block {n} lost its flushed write: {:?}",
            String::from_utf8_lossy(block)
        );
    }
}

/// A small tmpfs mounted for one test, unmounted after it.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_host_file_system_is_an_io_error_for_the_guest_and_the_image_stays_valid() {
    if !common::is_root() {
        return;
    }
    let Some(kit) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    common::sh(&format!(
        "mount -t tmpfs -o size=12M vessel-enospc {}",
        mnt.display()
    ));
    let _mounted = Tmpfs(mnt.clone());
    let img = mnt.join("full.qcow2");
    vessel_ok(&["disk", "create", p(&img), "64M"]);
    let script = "dd if=/dev/urandom of=/dev/vda bs=1M count=32 conv=fsync; echo dd-exit-$?; \
                  dd if=/dev/vda bs=1M count=1 2>/dev/null | wc -c; echo still-alive";
    let disks = [format!("path={}", img.display())];
    let r = common::run_with_deadline(kit_run(&kit, &disks, "", script), DEADLINE);
    assert_eq!(r.code, Some(0), "the VM ends normally: {}", r.dump());
    assert!(
        r.stdout.contains("I/O error"),
        "the guest saw EIO: {}",
        r.dump()
    );
    assert!(!r.stdout.contains("dd-exit-0"), "{}", r.dump());
    assert!(r.stdout.contains("still-alive"), "{}", r.dump());
    assert!(
        r.stdout.contains("\n1048576"),
        "reads still work: {}",
        r.dump()
    );
    qemu::assert_checks(&img, true);
}

#[test]
fn a_guest_cannot_turn_its_raw_disk_into_a_qcow2_naming_a_host_file() {
    let Some(kit) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    // What a hostile guest writes: a qcow2 header whose backing file is /etc/shadow.
    let evil = dir.path().join("evil.qcow2");
    qemu::unchecked_overlay(&evil, "/etc/shadow", "raw", "1M");
    let script = "if head -c 3 /dev/vda | grep -q QFI; then \
                  echo second-boot-size-$(blockdev --getsize64 /dev/vda); \
                  else dd if=/dev/vdb of=/dev/vda bs=512 count=1 conv=fsync 2>&1 | head -1; \
                  head -c 3 /dev/vda | grep -q QFI && echo header-written || echo header-refused; fi";
    let raw = dir.path().join("guest.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();

    // A VM made with `vessel create`: the format is recorded then, the write lands
    // (the disk is the guest's), and after a restart the disk is still raw.
    let home = Home::new();
    home.ok(&[
        "create",
        "vm",
        "--accel",
        "emu",
        "--memory",
        "256M",
        "--net",
        "none",
        "--kernel",
        p(&kit.vmlinux),
        "--initrd",
        p(&kit.initrd),
        "--cmdline",
        &kit::cmdline("", Some(script)),
        "--disk",
        &format!("path={}", raw.display()),
        "--disk",
        &format!("path={},format=raw,readonly=on", evil.display()),
    ]);
    let toml = std::fs::read_to_string(home.vm_dir("vm").join("vm.toml")).unwrap();
    assert!(toml.contains("format=raw"), "{toml}");
    home.ok(&["start", "vm"]);
    home.wait_log("vm", 0, "VESSEL-KIT: exit status");
    assert!(
        home.log("vm").contains("header-written"),
        "{}",
        home.log("vm")
    );
    while home.state_in_ls("vm") != "stopped" {
        std::thread::sleep(Duration::from_millis(50));
    }
    let from = home.log("vm").len();
    home.ok(&["start", "vm"]);
    let log = home.wait_log("vm", from, "VESSEL-KIT: exit status");
    assert!(
        log[from..].contains(&format!("second-boot-size-{}", 4 << 20)),
        "still the 4 MiB raw disk: {}",
        &log[from..]
    );

    // `vessel run` with no format probes each time: the probed raw disk refuses the write.
    let fresh = dir.path().join("fresh.raw");
    std::fs::write(&fresh, vec![0u8; 4 << 20]).unwrap();
    let disks = [
        format!("path={}", fresh.display()),
        format!("path={},format=raw,readonly=on", evil.display()),
    ];
    let r = common::run_with_deadline(kit_run(&kit, &disks, "", script), DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("header-refused"), "{}", r.dump());
    assert!(std::fs::read(&fresh).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn vmdk_and_vdi_disks_are_imported_and_booted() {
    let Some(kit) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let root_sum = sha256(&std::fs::read(&kit.rootfs).unwrap());
    let mut imported = Vec::new();
    for fmt in ["vmdk", "vdi"] {
        let foreign = d(&format!("root.{fmt}"));
        qemu_img(&["convert", "-O", fmt, p(&kit.rootfs), p(&foreign)]);
        let out = d(&format!("from-{fmt}.qcow2"));
        let said = vessel_ok(&["disk", "convert", p(&foreign), p(&out)]);
        assert!(said.contains("qcow2"), "{said}");
        imported.push(out);
    }
    let disks: Vec<String> = imported
        .iter()
        .map(|i| format!("path={}", i.display()))
        .collect();
    let script = "grep ' / ' /proc/mounts; sha256sum /dev/vdb";
    let r = common::run_with_deadline(kit_run(&kit, &disks, "root=/dev/vda", script), DEADLINE);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(
        r.stdout.contains("VESSEL-KIT: root on /dev/vda"),
        "{}",
        r.dump()
    );
    assert!(r.stdout.contains("/dev/vda / ext4"), "{}", r.dump());
    assert!(
        r.stdout.contains(&format!("{root_sum}  /dev/vdb")),
        "{}",
        r.dump()
    );
}
