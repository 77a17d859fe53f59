//! The real kit: the vmlinux extracted from Debian's bzImage, and the initramfs contents.

mod common;

use std::io::Read;

#[test]
fn vmlinux_is_the_bzimage_payload_with_a_pvh_entry() {
    let Some(kit) = common::kit() else { return };
    let bzimage = std::fs::read(&kit.bzimage).unwrap();
    let vmlinux = std::fs::read(&kit.vmlinux).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert_eq!(vmlinux[4], 2, "64-bit ELF");
    let entry = kit::pvh_entry(&vmlinux).expect("PVH note");
    assert!(
        (0x100_0000..0x8000_0000).contains(&entry),
        "PVH entry {entry:#x}"
    );
    assert_eq!(kit::extract_vmlinux(&bzimage).unwrap(), vmlinux);
    let banner = format!("Linux version {}", kit.kernel_version);
    assert!(
        vmlinux
            .windows(banner.len())
            .any(|w| w == banner.as_bytes()),
        "the vmlinux does not contain {banner:?}"
    );
}

#[test]
fn initramfs_holds_init_busybox_and_the_virtio_modules() {
    let Some(kit) = common::kit() else { return };
    let gz = std::fs::read(&kit.initrd).unwrap();
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut cpio)
        .unwrap();
    let has = |s: &str| cpio.windows(s.len()).any(|w| w == s.as_bytes());
    for name in [
        "init\0",
        "dev/console\0",
        "bin/busybox\0",
        "bin/sh\0",
        "bin/vessel-boot-mark\0",
        "/virtio_pci.ko\0",
        "/virtio_blk.ko\0",
        "/virtio_net.ko\0",
        "/virtio-rng.ko\0",
        "/virtio_console.ko\0",
        "/virtio_ring.ko\0",
        "/button.ko\0",
        "/evdev.ko\0",
        "/modules.dep\0",
        "sbin/vessel-halt\0",
        "etc/acpid.conf\0",
        "etc/acpi/PWRF/00000080\0",
        kit::POWER_BUTTON_MARKER,
        kit::INIT_MARKER,
        "TRAILER!!!\0",
    ] {
        assert!(has(name), "{name:?} missing from the initramfs");
    }
}

#[test]
fn a_cached_kit_is_returned_without_rebuilding() {
    let Some(kit) = common::kit() else { return };
    let before = std::fs::metadata(&kit.initrd).unwrap().modified().unwrap();
    let again = kit::build(&kit::KitOptions::default()).unwrap();
    assert_eq!(again, kit);
    assert_eq!(
        std::fs::metadata(&again.initrd)
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    assert_eq!(kit::locate(&kit.dir), Some(kit));
}
