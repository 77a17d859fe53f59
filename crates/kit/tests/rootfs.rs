//! The kit's root disk image: what it holds, that the 6.1 kernel can mount it, and that
//! fresh copies stay sparse and leave the cached image alone.

mod common;

use std::os::unix::fs::MetadataExt;

fn setup() -> Option<kit::Kit> {
    common::e2fs("debugfs")?;
    common::e2fs("e2fsck")?;
    common::kit()
}

#[test]
fn the_image_holds_busybox_the_modules_and_both_inits() {
    let Some(kit) = setup() else { return };
    let image = &kit.rootfs;
    let sbin = common::debugfs(image, "ls -l /sbin");
    eprintln!("/sbin:\n{sbin}");
    for name in [" init\n", " vessel-halt\n", " switch_root\n", " acpid\n"] {
        assert!(sbin.contains(name), "no{name:?} in /sbin");
    }
    let init = common::debugfs(image, "cat /sbin/init");
    assert!(init.starts_with("#!/bin/sh\n"), "{init}");
    assert!(init.contains(kit::ROOT_MARKER_PREFIX));
    assert!(init.contains("acpid -c /etc/acpi"));
    assert!(!init.contains("switch_root"));
    let handler = common::debugfs(image, "cat /etc/acpi/PWRF/00000080");
    assert!(handler.contains(kit::POWER_BUTTON_MARKER), "{handler}");

    let busybox = common::debugfs(image, "stat /bin/busybox");
    assert!(busybox.contains("Mode:  0755"), "{busybox}");
    assert!(busybox.contains("User:     0   Group:     0"), "{busybox}");
    assert!(common::debugfs(image, "stat /tmp").contains("Mode:  01777"));
    for dir in ["/dev", "/proc", "/sys", "/run", "/root", "/etc"] {
        let listing = common::debugfs(image, &format!("stat {dir}"));
        assert!(listing.contains("Type: directory"), "{dir}: {listing}");
    }
    assert_eq!(common::debugfs(image, "cat /etc/hostname"), "vessel\n");
    let modules = format!("/lib/modules/{}", kit.kernel_version);
    let dep = common::debugfs(image, &format!("cat {modules}/modules.dep"));
    for module in [
        "virtio_blk.ko:",
        "virtio_pci.ko:",
        "evdev.ko:",
        "button.ko:",
    ] {
        assert!(
            dep.contains(module),
            "{module} missing from modules.dep:\n{dep}"
        );
    }
    let blk = dep.lines().find(|l| l.contains("virtio_blk.ko:")).unwrap();
    let blk = blk.split(':').next().unwrap();
    assert!(
        common::debugfs(image, &format!("stat {modules}/{blk}")).contains("Type: regular"),
        "{blk}"
    );
}

#[test]
fn the_image_is_a_clean_sparse_ext4_the_kernel_mounts() {
    let Some(kit) = setup() else { return };
    common::fsck(&kit.rootfs).unwrap_or_else(|report| panic!("{report}"));
    let meta = std::fs::metadata(&kit.rootfs).unwrap();
    let allocated = meta.blocks() * 512;
    eprintln!(
        "root.ext4: {} MiB, {:.1} MiB allocated",
        meta.len() >> 20,
        allocated as f64 / (1 << 20) as f64
    );
    assert!(meta.len() >= 64 << 20);
    assert!(allocated < 16 << 20, "{allocated} bytes allocated");
    let stats = common::debugfs(&kit.rootfs, "stats");
    let features = stats
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap();
    // Exactly the features the kit asks for (all mountable by Linux 6.1's built-in ext4),
    // none that the host's /etc/mke2fs.conf would add.
    for f in features.split_whitespace().skip(2) {
        assert!(
            [
                "has_journal",
                "ext_attr",
                "resize_inode",
                "dir_index",
                "filetype",
                "extent",
                "64bit",
                "flex_bg",
                "sparse_super",
                "large_file",
                "huge_file",
                "dir_nlink",
                "extra_isize",
                "metadata_csum",
            ]
            .contains(&f),
            "unexpected feature {f}: {features}"
        );
    }
    assert!(
        stats.contains("Filesystem volume name:   vessel-root"),
        "{stats}"
    );
}

#[test]
fn a_fresh_copy_is_sparse_identical_and_separate() {
    let Some(kit) = setup() else { return };
    let dir = common::temp_path("fresh");
    std::fs::create_dir_all(&dir).unwrap();
    let started = std::time::Instant::now();
    let copy = kit::fresh_rootfs(&kit, &dir).unwrap();
    eprintln!("fresh copy in {:.2?}", started.elapsed());
    assert_eq!(copy, dir.join("root.ext4"));
    let (orig, new) = (
        std::fs::metadata(&kit.rootfs).unwrap(),
        std::fs::metadata(&copy).unwrap(),
    );
    assert_eq!(new.len(), orig.len());
    assert!(
        new.blocks() <= orig.blocks(),
        "the copy allocates {} blocks, the original {}",
        new.blocks(),
        orig.blocks()
    );
    assert_ne!(new.ino(), orig.ino());
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&kit.rootfs).unwrap());

    // Named explicitly, an existing file is replaced.
    let named = dir.join("other.img");
    std::fs::write(&named, b"old").unwrap();
    assert_eq!(kit::fresh_rootfs(&kit, &named).unwrap(), named);
    assert_eq!(std::fs::metadata(&named).unwrap().len(), orig.len());
    std::fs::remove_dir_all(&dir).unwrap();
}
