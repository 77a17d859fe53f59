//! Real distributions: a Debian 12 image built from Debian's packages (once per run,
//! then cached), VMs made from it reaching `systemctl is-system-running` on the software
//! CPU with identities of their own, the kit's initramfs booting the same disk, and
//! every kind of bad input refused with one line.

mod common;

use common::home::Home;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image::{IDENTITY_PREFIX, ImageStore, READY_PREFIX};

const IMAGE: &str = "debian-12";
/// A Debian boot on the software CPU takes about 45 s alone; three share two cores here.
const BOOT_DEADLINE: Duration = Duration::from_secs(420);

fn required() -> bool {
    std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// The debian-12 image, built on first use (every test binary and process shares the
/// cache; a build in progress elsewhere is waited for). None when mmdebstrap is missing
/// (a failure under VESSEL_REQUIRE_KVM=1).
fn debian() -> Option<image::Image> {
    let store = ImageStore::from_env().unwrap();
    if let Ok(i) = store.open(IMAGE) {
        return Some(i);
    }
    let started = Instant::now();
    match store.get_or_build(IMAGE, &mut |line| eprintln!("image: {line}")) {
        Ok(i) => {
            eprintln!("built {IMAGE} in {:.1?}", started.elapsed());
            Some(i)
        }
        Err(e) => {
            assert!(
                !required(),
                "VESSEL_REQUIRE_KVM=1 but no {IMAGE} image: {e}"
            );
            eprintln!("skipped: cannot build {IMAGE}: {e}");
            None
        }
    }
}

fn home() -> Home {
    Home::with_deadline(Duration::from_secs(180))
}

/// Waits for the guest's `vessel-ready:` line and its login prompt; returns the
/// serial log.
fn wait_ready(home: &Home, name: &str) -> String {
    let deadline = Instant::now() + BOOT_DEADLINE;
    let prompt = format!("{name} login:");
    loop {
        let log = home.log(name);
        let ready = log
            .find(READY_PREFIX)
            .is_some_and(|at| log[at..].contains('\n'));
        if ready && log.contains(&prompt) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not finish starting:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The values after `vessel-identity: KEY ` lines in a console log.
fn identity(log: &str, key: &str) -> Vec<String> {
    let prefix = format!("{IDENTITY_PREFIX}{key} ");
    log.lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, v)| v.trim().to_string()))
        .collect()
}

/// What `vessel-ready:` said: the state, then the failed units.
fn readiness(log: &str) -> (String, Vec<String>) {
    let said: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once(READY_PREFIX).map(|(_, v)| v.trim()))
        .collect();
    let failed = said
        .iter()
        .filter_map(|v| v.strip_prefix("failed "))
        .map(str::to_string)
        .collect();
    (said.first().unwrap_or(&"").to_string(), failed)
}

#[test]
fn vms_from_the_image_run_systemd_on_1_and_2_vcpus_with_identities_of_their_own() {
    let Some(_image) = debian() else { return };
    let home = home();
    let key = home.path().join("user.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJtest test@host\n",
    )
    .unwrap();
    let key = key.display().to_string();
    for (name, cpus) in [("deb-a", "1"), ("deb-b", "2")] {
        let out = home.ok(&[
            "create",
            name,
            "--image",
            IMAGE,
            "--cpus",
            cpus,
            "--memory",
            "512M",
            "--accel",
            "emu",
            "--ssh-key",
            &key,
        ]);
        assert!(
            out.contains(&format!("created {name} from image {IMAGE}")),
            "{out}"
        );
        let toml = std::fs::read_to_string(home.vm_dir(name).join("vm.toml")).unwrap();
        assert!(toml.contains("seed.img"), "{toml}");
        // The VM's disk is its own, and sparse.
        use std::os::unix::fs::MetadataExt;
        let disk = std::fs::metadata(home.vm_dir(name).join(image::DISK)).unwrap();
        assert!(
            disk.blocks() * 512 < disk.len() / 4,
            "the copy is not sparse"
        );
    }
    for name in ["deb-a", "deb-b"] {
        home.ok(&["start", name]);
    }
    let logs: Vec<String> = ["deb-a", "deb-b"]
        .iter()
        .map(|n| wait_ready(&home, n))
        .collect();
    for (log, (name, cpus)) in logs.iter().zip([("deb-a", 1), ("deb-b", 2)]) {
        let (state, failed) = readiness(log);
        assert_eq!(
            state, "running",
            "{name}: systemd says {state}, failed units {failed:?}:\n{log}"
        );
        assert_eq!(identity(log, "hostname"), [name]);
        assert_eq!(identity(log, "cpus"), [cpus.to_string()], "{log}");
    }
    let (a, b) = (&logs[0], &logs[1]);
    let (ids_a, ids_b) = (identity(a, "machine-id"), identity(b, "machine-id"));
    assert_eq!(ids_a.len(), 1, "{a}");
    assert_eq!(ids_a.first().map(String::len), Some(32));
    assert_ne!(ids_a, ids_b, "two VMs share a machine ID");
    let (keys_a, keys_b) = (identity(a, "host-key"), identity(b, "host-key"));
    assert!(keys_a.len() >= 2, "{a}");
    for k in &keys_a {
        assert!(!keys_b.contains(k), "two VMs share the SSH host key {k}");
    }
    // SSH through the NAT NIC's forward, with vessel's own key, as the user the seed made.
    let kernel = identity(a, "kernel");
    let uname = home.ok(&["ssh", "deb-a", "--", "uname", "-r"]);
    assert_eq!([uname.trim().to_string()], kernel.as_slice(), "{uname}");
    let info = home.ok(&["info", "deb-a"]);
    assert!(info.contains("nic       net0 user "), "{info}");
    // The guest agent the image carries answers through vsock.
    let uname = home.ok(&["exec", "deb-a", "--", "uname", "-r"]);
    assert_eq!([uname.trim().to_string()], kernel.as_slice(), "{uname}");
    assert!(info.contains("guest     Debian GNU/Linux 12"), "{info}");
    // The seed gave the user the key; the user's home exists.
    let user = manager::ssh::user_name();
    let disk = home.vm_dir("deb-b").join(image::DISK);
    // The ACPI power button shuts systemd down cleanly, and so does the agent.
    home.ok(&["stop", "deb-b", "--button", "--timeout", "180"]);
    home.ok(&["stop", "deb-a", "--timeout", "180"]);
    assert!(home.log("deb-a").contains("reboot: Power down"));
    let keys = debugfs(
        &disk,
        &format!("cat {}/.ssh/authorized_keys", home_of(&user)),
    );
    assert!(keys.contains("AAAAC3NzaC1lZDI1NTE5AAAAIJtest"), "{keys}");
    let log = home.log("deb-b");
    assert!(log.contains("reboot: Power down"), "{log}");
}

fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".into()
    } else {
        format!("/home/{user}")
    }
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("/sbin/debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kit_initramfs_boots_the_image_disk() {
    let Some(image) = debian() else { return };
    if common::kit().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("root.raw");
    disk::sparse_copy(&image.disk(), &disk).unwrap();
    let mut cmd = common::vessel();
    cmd.args(["run", "--accel", "emu", "--memory", "512M"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .args([
            "--cmdline",
            &format!("{} root=/dev/vda ro", kit::DEFAULT_CMDLINE),
        ]);
    let r = common::run_until(cmd, READY_PREFIX, BOOT_DEADLINE);
    assert!(r.stdout.contains(kit::INIT_MARKER), "{}", r.dump());
    assert!(
        !r.stdout.contains("staying in the initramfs"),
        "{}",
        r.dump()
    );
    assert!(r.stdout.contains(READY_PREFIX), "{}", r.dump());
    // No seed disk: the image's own defaults.
    assert_eq!(identity(&r.stdout, "hostname"), ["debian"], "{}", r.dump());
}

#[test]
fn bad_image_input_is_one_line_and_leaves_nothing_behind() {
    let store_dir = tempfile::tempdir().unwrap();
    let home = home();
    let with_store = |args: &[&str]| {
        let mut cmd = common::vessel();
        cmd.args(args)
            .env("VESSEL_HOME", home.path())
            .env("VESSEL_IMAGE_DIR", store_dir.path());
        common::run_with_deadline(cmd, Duration::from_secs(60))
    };
    let one_line = |r: &common::Finished, needle: &str| {
        assert_eq!(r.code, Some(2), "{}", r.dump());
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
        assert!(r.stderr.contains(needle), "{needle:?}: {}", r.dump());
    };
    one_line(
        &with_store(&["create", "x", "--image", "nope"]),
        "no image named nope",
    );
    one_line(
        &with_store(&["image", "build", "windows-95"]),
        "unknown image recipe \"windows-95\": vessel builds debian-12",
    );
    one_line(&with_store(&["image", "rm", "nope"]), "no image named nope");
    // An image whose kernel is missing.
    let broken = store_dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("image.toml"),
        format!(
            "format = {}\nrecipe = \"debian-12\"\nkernel_version = \"6.1\"\n\
             size = 1048576\nbuilt_unix = 0\nbuild_seconds = 1.0\n",
            image::FORMAT
        ),
    )
    .unwrap();
    std::fs::write(broken.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(broken.join("initrd.img"), b"x").unwrap();
    one_line(
        &with_store(&["create", "x", "--image", "broken"]),
        "image broken is incomplete: the kernel (vmlinuz) is missing",
    );
    one_line(
        &with_store(&["run", "--image", "broken"]),
        "image broken is incomplete",
    );
    assert!(!home.vm_dir("x").exists(), "nothing half-made");
    let ls = with_store(&["image", "ls"]);
    assert!(
        ls.stdout.contains("broken") && ls.stdout.contains("invalid"),
        "{}",
        ls.dump()
    );
    // mmdebstrap missing.
    let mut cmd = common::vessel();
    cmd.args(["image", "build", "debian-12"])
        .env("VESSEL_IMAGE_DIR", store_dir.path())
        .env("PATH", "/nonexistent");
    one_line(
        &common::run_with_deadline(cmd, Duration::from_secs(60)),
        "mmdebstrap not found: install the Debian package mmdebstrap",
    );
}

#[test]
fn a_disk_too_small_for_the_packages_fails_the_build_and_leaves_nothing() {
    if debian().is_none() {
        return;
    }
    let store_dir = tempfile::tempdir().unwrap();
    let mut cmd = common::vessel();
    cmd.args([
        "image",
        "build",
        "debian-12",
        "--name",
        "tiny",
        "--size",
        "64M",
    ])
    .env("VESSEL_IMAGE_DIR", store_dir.path());
    let r = common::run_with_deadline(cmd, Duration::from_secs(600));
    assert_eq!(r.code, Some(2), "{}", r.dump());
    let last = r.stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "vessel: error: the disk (64 MiB) is too small for the packages: give a larger --size",
        "{}",
        r.dump()
    );
    let left: Vec<_> = std::fs::read_dir(store_dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
