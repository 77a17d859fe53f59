//! The kit boots on its own, independently of vessel: QEMU's software CPU runs it and
//! every mode of `/init` is checked from the serial console.

mod common;

use std::time::Duration;

use common::Action;
use kit::{
    EXIT_STATUS_PREFIX, INIT_MARKER, POWER_BUTTON_MARKER, ROOT_MARKER_PREFIX, cmdline, fresh_rootfs,
};

const POWER_DOWN: &str = "reboot: Power down";
const RESTART: &str = "reboot: Restarting system";

fn setup() -> Option<(std::path::PathBuf, kit::Kit)> {
    let qemu = common::qemu()?;
    Some((qemu, common::kit()?))
}

#[test]
fn a_command_after_dashes_runs_and_powers_off() {
    let Some((qemu, kit)) = setup() else { return };
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("", Some("echo hello-$((6*7)); hostname")),
        &[],
        None,
    );
    assert!(run.status.success(), "{:?}", run.status);
    run.assert_contains(&format!("{INIT_MARKER}\n"));
    run.assert_contains("\nhello-42\nvessel\n");
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}0\n"));
    run.assert_contains(POWER_DOWN);
    run.assert_lacks("failed");
    let marker = run.output.find(INIT_MARKER).unwrap();
    assert!(marker < run.output.find("hello-42").unwrap());
}

#[test]
fn the_command_status_is_reported() {
    let Some((qemu, kit)) = setup() else { return };
    let run = common::boot(&qemu, &kit, &cmdline("", Some("exit 3")), &[], None);
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}3\n"));
    run.assert_contains(POWER_DOWN);
}

#[test]
fn unquoted_arguments_after_dashes_are_one_command() {
    let Some((qemu, kit)) = setup() else { return };
    let append = format!("{} -- echo split words", kit::DEFAULT_CMDLINE);
    let run = common::boot(&qemu, &kit, &append, &[], None);
    run.assert_contains("\nsplit words\n");
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}0\n"));
}

#[test]
fn vessel_poweroff_powers_off_at_once() {
    let Some((qemu, kit)) = setup() else { return };
    let run = common::boot(&qemu, &kit, &cmdline("vessel.poweroff", None), &[], None);
    assert!(run.status.success(), "{:?}", run.status);
    run.assert_contains(INIT_MARKER);
    run.assert_contains(POWER_DOWN);
    run.assert_lacks(EXIT_STATUS_PREFIX);
    run.assert_lacks(RESTART);
}

#[test]
fn vessel_reboot_resets_instead() {
    let Some((qemu, kit)) = setup() else { return };
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("vessel.reboot", Some("echo before-reset")),
        &[],
        None,
    );
    run.assert_contains("before-reset");
    run.assert_contains(RESTART);
    run.assert_lacks(POWER_DOWN);
}

#[test]
fn without_a_command_init_gives_an_interactive_shell() {
    let Some((qemu, kit)) = setup() else { return };
    // Job control needs a controlling tty; leaving the shell must power the machine off.
    let input = "echo hi-$((6*7)) $(tty); sleep 1 & jobs; exit\n";
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("", None),
        &[],
        Some(("vessel:/# ", Action::Type(input))),
    );
    assert!(run.status.success(), "{:?}", run.status);
    run.assert_contains("hi-42 /dev/ttyS0");
    run.assert_lacks("can't access tty");
    run.assert_contains("[1]+  Running");
    run.assert_contains(POWER_DOWN);
}

#[test]
fn the_boot_mark_reaches_port_0x440() {
    let Some((qemu, kit)) = setup() else { return };
    let log = std::env::temp_dir().join(format!("kit-debugcon-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let chardev = format!("file,id=dbg,path={}", log.display());
    let extra = [
        "-device",
        "isa-debugcon,iobase=0x440,chardev=dbg",
        "-chardev",
        &chardev,
    ];
    let mark = format!("{} Z", kit::BOOT_MARK_PATH);
    let run = common::boot(&qemu, &kit, &cmdline("", Some(&mark)), &extra, None);
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}0\n"));
    let bytes = std::fs::read(&log).expect("debugcon log");
    std::fs::remove_file(&log).unwrap();
    assert_eq!(bytes, b"\x01Z", "init's mark, then the command's");
}

#[test]
fn virtio_drivers_bind_to_virtio_devices() {
    let Some((qemu, kit)) = setup() else { return };
    let disk = std::env::temp_dir().join(format!("kit-virtio-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("if=none,id=d0,format=raw,file={}", disk.display());
    let extra = [
        "-device",
        "virtio-rng-pci",
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0",
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-device",
        "virtio-serial-pci",
    ];
    let command = "cat /sys/class/misc/hw_random/rng_available; ls -1 /sys/block /sys/class/net; \
                   for d in /sys/bus/virtio/devices/*; do echo bound: $(basename $(readlink $d/driver)); done; \
                   ls -1d /sys/module/button /sys/module/evdev";
    let run = common::boot(&qemu, &kit, &cmdline("", Some(command)), &extra, None);
    std::fs::remove_file(&disk).unwrap();
    run.assert_contains("virtio_rng.0");
    run.assert_contains("\nvda\n");
    run.assert_contains("\neth0\n");
    for driver in ["virtio_blk", "virtio_net", "virtio_rng", "virtio_console"] {
        run.assert_contains(&format!("bound: {driver}\n"));
    }
    run.assert_contains("/sys/module/button\n/sys/module/evdev\n");
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}0\n"));
    run.assert_lacks("insmod");
    run.assert_lacks("Unknown symbol");
}

/// A fresh copy of the kit's root disk, and the QEMU arguments that attach it as the
/// first virtio disk (`/dev/vda`).
fn root_disk(kit: &kit::Kit, name: &str) -> (std::path::PathBuf, String) {
    let copy = fresh_rootfs(kit, &common::temp_path(name).with_extension("ext4")).unwrap();
    let drive = format!("file={},format=raw,if=virtio", copy.display());
    (copy, drive)
}

#[test]
fn the_root_disk_boots_and_keeps_what_the_guest_wrote() {
    let Some((qemu, kit)) = setup() else { return };
    if common::e2fs("debugfs").is_none() {
        return;
    }
    let pristine = std::fs::metadata(&kit.rootfs).unwrap().modified().unwrap();
    let (copy, drive) = root_disk(&kit, "rootdisk");
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline(
            "root=/dev/vda",
            Some("cat /proc/mounts; echo data > /root/f; sync"),
        ),
        &["-drive", &drive],
        None,
    );
    assert!(run.status.success(), "{:?}", run.status);
    run.assert_contains(&format!("{INIT_MARKER}\n"));
    run.assert_contains(&format!("{ROOT_MARKER_PREFIX}/dev/vda\n"));
    run.assert_contains("\n/dev/vda / ext4 rw,");
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}0\n"));
    run.assert_contains(POWER_DOWN);
    run.assert_lacks("failed");
    run.assert_lacks("staying in the initramfs");
    let (init, root) = (
        run.output.find(INIT_MARKER).unwrap(),
        run.output.find(ROOT_MARKER_PREFIX).unwrap(),
    );
    assert!(init < root && root < run.output.find("/dev/vda / ext4").unwrap());

    // The guest wrote its disk, and left it clean (remounted read-only before power-off).
    assert_eq!(common::debugfs(&copy, "cat /root/f"), "data\n");
    common::fsck(&copy).unwrap_or_else(|report| panic!("after the guest: {report}"));
    assert_eq!(
        std::fs::metadata(&kit.rootfs).unwrap().modified().unwrap(),
        pristine,
        "the kit's own image is untouched"
    );
    std::fs::remove_file(&copy).unwrap();
}

#[test]
fn ro_on_the_command_line_mounts_the_root_read_only() {
    let Some((qemu, kit)) = setup() else { return };
    let (copy, drive) = root_disk(&kit, "rootdisk-ro");
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline(
            "root=/dev/vda ro",
            Some("grep ' / ' /proc/mounts; touch /x"),
        ),
        &["-drive", &drive],
        None,
    );
    std::fs::remove_file(&copy).unwrap();
    run.assert_contains(&format!("{ROOT_MARKER_PREFIX}/dev/vda\n"));
    run.assert_contains("\n/dev/vda / ext4 ro,");
    run.assert_contains("Read-only file system");
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}1\n"));
    run.assert_contains(POWER_DOWN);
}

#[test]
fn a_missing_root_disk_leaves_the_initramfs_in_charge() {
    let Some((qemu, kit)) = setup() else { return };
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("root=/dev/vdb", Some("echo still-here")),
        &[],
        None,
    );
    run.assert_contains(
        "VESSEL-KIT: root device /dev/vdb did not appear; staying in the initramfs\n",
    );
    run.assert_lacks(ROOT_MARKER_PREFIX);
    run.assert_contains("\nstill-here\n");
    run.assert_contains(&format!("{EXIT_STATUS_PREFIX}0\n"));
}

/// QEMU's `system_powerdown` is what `vessel stop` does: the ACPI power button. Linux's
/// button driver turns it into KEY_POWER; acpid runs the kit's handler, which powers off.
fn assert_powered_off_by_the_button(run: &common::Run) {
    assert!(run.status.success(), "{:?}", run.status);
    run.assert_contains(&format!("{POWER_BUTTON_MARKER}\n"));
    run.assert_contains(POWER_DOWN);
    let pressed = run.acted_after.expect("the button was pressed");
    let took = run.elapsed - pressed;
    eprintln!("powered off {took:.2?} after the button");
    assert!(took < Duration::from_secs(15), "{took:?} after the button");
    let button = run.output.find(POWER_BUTTON_MARKER).unwrap();
    assert!(button < run.output.find(POWER_DOWN).unwrap());
}

#[test]
fn the_power_button_powers_the_guest_off() {
    let Some((qemu, kit)) = setup() else { return };
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("", Some("echo button-ready; sleep 60; echo slept")),
        &[],
        Some(("button-ready\n", Action::PowerButton)),
    );
    assert_powered_off_by_the_button(&run);
    run.assert_lacks("slept");
    run.assert_lacks(EXIT_STATUS_PREFIX);
}

#[test]
fn the_power_button_powers_a_disk_root_off_cleanly() {
    let Some((qemu, kit)) = setup() else { return };
    if common::e2fs("e2fsck").is_none() {
        return;
    }
    let (copy, drive) = root_disk(&kit, "rootdisk-button");
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("root=/dev/vda", None),
        &["-drive", &drive],
        Some(("vessel:/# ", Action::PowerButton)),
    );
    assert_powered_off_by_the_button(&run);
    run.assert_contains(&format!("{ROOT_MARKER_PREFIX}/dev/vda\n"));
    common::fsck(&copy).unwrap_or_else(|report| panic!("after the button: {report}"));
    std::fs::remove_file(&copy).unwrap();
}

/// The file-system UUID of an ext4 image, as `dumpe2fs -h` reports it.
fn ext4_uuid(image: &std::path::Path) -> String {
    let out = std::process::Command::new(common::e2fs("dumpe2fs").expect("dumpe2fs"))
        .arg("-h")
        .arg(image)
        .output()
        .expect("run dumpe2fs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem UUID:"))
        .expect("a UUID line")
        .trim()
        .to_string()
}

#[test]
fn the_root_is_found_by_label_and_uuid_and_init_is_honoured() {
    let Some((qemu, kit)) = setup() else { return };
    if common::e2fs("debugfs").is_none() {
        return;
    }
    let (copy, drive) = root_disk(&kit, "rootdisk-names");
    // An absolute symlink, as a distribution's /sbin/init -> /lib/systemd/systemd: it
    // must be resolved inside the new root, not in the initramfs.
    let out = std::process::Command::new(common::e2fs("debugfs").unwrap())
        .args(["-w", "-R", "symlink /sbin/init2 /sbin/init"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let uuid = ext4_uuid(&copy);
    for root in [
        "root=LABEL=vessel-root".to_string(),
        format!("root=UUID={uuid} init=/sbin/init2"),
    ] {
        let run = common::boot(
            &qemu,
            &kit,
            &cmdline(&root, Some("echo on-disk")),
            &["-drive", &drive],
            None,
        );
        run.assert_contains(&format!("{ROOT_MARKER_PREFIX}/dev/vda\n"));
        run.assert_contains("\non-disk\n");
        run.assert_lacks("staying in the initramfs");
    }
    std::fs::remove_file(&copy).unwrap();
}

#[test]
fn a_root_that_cannot_be_mounted_says_so_and_leaves_a_shell() {
    let Some((qemu, kit)) = setup() else { return };
    let blank = common::temp_path("blank").with_extension("img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let drive = format!("file={},format=raw,if=virtio", blank.display());
    let run = common::boot(
        &qemu,
        &kit,
        &cmdline("root=/dev/vda", Some("echo looking-around")),
        &["-drive", &drive],
        None,
    );
    std::fs::remove_file(&blank).unwrap();
    run.assert_contains("VESSEL-KIT: cannot mount /dev/vda (/dev/vda); staying in the initramfs\n");
    run.assert_contains("\nlooking-around\n");
    run.assert_lacks(ROOT_MARKER_PREFIX);
}
