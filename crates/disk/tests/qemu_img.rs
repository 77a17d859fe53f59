//! vessel's images against QEMU's own tools (Debian's qemu-utils): what qemu-img and
//! qemu-io write, vessel reads byte for byte; what vessel writes, qemu-img checks
//! clean and reads back the same.

use std::path::Path;

use disk::{Backing, ConvertOptions, CreateOptions, Format, Image, OpenOptions};
use testguest::qemu_img::{self as qemu, create as qemu_create, overlay, qemu_img, qemu_io};

/// A directory for one test's images; None (the test skips) without qemu-utils.
fn scratch() -> Option<tempfile::TempDir> {
    qemu::available().then(|| tempfile::tempdir().unwrap())
}

/// `disk::create` with the usual options.
fn new_image(path: &Path, format: Format, size: Option<u64>, backing: Option<(&Path, Format)>) {
    let opts = CreateOptions {
        format,
        size,
        backing: backing.map(|(b, f)| Backing {
            path: b.to_path_buf(),
            format: Some(f),
        }),
        cluster_size: None,
    };
    disk::create(path, &opts).unwrap();
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn open(path: &Path, readonly: bool) -> Image {
    Image::open(
        path,
        OpenOptions {
            format: None,
            readonly,
        },
    )
    .unwrap()
}

/// The guest-visible bytes of an image, as vessel reads them (in odd-sized pieces, so
/// reads cross cluster and L2 boundaries).
fn vessel_reads(image: &Path) -> Vec<u8> {
    let img = open(image, true);
    let mut out = vec![0u8; img.size() as usize];
    let mut at = 0;
    for piece in [512usize, 4096, 65536 + 512, 3 << 20].iter().cycle() {
        if at >= out.len() {
            break;
        }
        let n = (*piece).min(out.len() - at);
        img.read_into(&mut out[at..at + n], at as u64).unwrap();
        at += n;
    }
    out
}

fn check_clean(image: &Path) {
    qemu::assert_checks(image, false);
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

/// Data at scattered places: a pattern per write, zero writes, a write crossing a
/// cluster boundary.
const WRITES: [&str; 6] = [
    "write -P 0xab 0 1M",
    "write -P 0x12 5M 300k",
    "write -P 0x34 8388096 1536",
    "write -z 512k 64k",
    "write -P 0x56 30M 4k",
    "write -P 0x78 63M 1M",
];

#[test]
fn qemu_made_images_read_the_same_at_every_cluster_size() {
    let Some(dir) = scratch() else { return };
    for cluster in ["4k", "64k", "2M"] {
        let img = dir.path().join(format!("c{cluster}.qcow2"));
        qemu_create(&img, "qcow2", &format!("cluster_size={cluster}"), "64M");
        qemu_io(&img, "qcow2", &WRITES);
        assert_same(&vessel_reads(&img), &qemu::reads(&img), cluster);
    }
}

#[test]
fn a_two_level_backing_chain_and_compressed_clusters_read_the_same() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let base = d.join("base.raw");
    qemu_create(&base, "raw", "", "64M");
    qemu_io(&base, "raw", &["write -P 0x11 0 64M"]);
    let mid = d.join("mid.qcow2");
    overlay(&mid, "base.raw", "raw", "");
    qemu_io(&mid, "qcow2", &WRITES[..3]);
    let top = d.join("top.qcow2");
    overlay(&top, "mid.qcow2", "qcow2", "");
    qemu_io(&top, "qcow2", &WRITES[3..]);
    let chain = disk::info(&top, None).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2].format, Format::Raw);
    assert_same(&vessel_reads(&top), &qemu::reads(&top), "chain");

    let want = qemu::reads(&top);
    for kind in ["zlib", "zstd"] {
        let compressed = d.join(format!("{kind}.qcow2"));
        let opt = format!("compression_type={kind}");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opt,
            p(&top),
            p(&compressed),
        ]);
        assert_same(&vessel_reads(&compressed), &want, kind);
        // A partial write into a compressed cluster copies the rest of it out first.
        let mut model = want.clone();
        {
            let img = open(&compressed, false);
            img.write_from(&[0xc3; 512], (1 << 20) + 4096).unwrap();
            img.flush().unwrap();
        }
        model[(1 << 20) + 4096..(1 << 20) + 4608].fill(0xc3);
        check_clean(&compressed);
        assert_same(&qemu::reads(&compressed), &model, kind);
    }
}

/// A tiny deterministic generator (no extra crate for a test).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn what_vessel_writes_qemu_reads_back_and_checks_clean() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "qcow2", "", "32M");
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 32M"]);
    let top = d.join("top.qcow2");
    overlay(&top, "base.qcow2", "qcow2", "cluster_size=4k");
    let mut model = qemu::reads(&top);
    {
        let img = open(&top, false);
        let mut rng = Lcg(7);
        for i in 0..400u64 {
            let sectors = 1 + rng.next() % 40;
            let at = (rng.next() % (model.len() as u64 / 512 - sectors)) * 512;
            let len = (sectors * 512) as usize;
            let fill = (i % 251) as u8;
            let data = vec![fill; len];
            img.write_from(&data, at).unwrap();
            model[at as usize..at as usize + len].copy_from_slice(&data);
            if i % 50 == 0 {
                img.write_zeroes(at, 8192.min(model.len() as u64 - at), i % 100 == 0)
                    .unwrap();
                let end = (at as usize + 8192).min(model.len());
                model[at as usize..end].fill(0);
            }
        }
        img.flush().unwrap();
    }
    check_clean(&top);
    assert_same(&qemu::reads(&top), &model, "after vessel's writes");
    assert_same(&vessel_reads(&top), &model, "vessel reading its own writes");
}

#[test]
fn discarded_clusters_go_back_to_the_host() {
    let Some(dir) = scratch() else { return };
    let img_path = dir.path().join("d.qcow2");
    new_image(&img_path, Format::Qcow2, Some(64 << 20), None);
    let allocated = || disk::info(&img_path, None).unwrap()[0].allocated;
    let img = open(&img_path, false);
    img.write_from(&vec![0xeeu8; 32 << 20], 0).unwrap();
    img.flush().unwrap();
    let full = allocated();
    assert!(full >= 32 << 20, "{full}");
    img.discard(4096, (32 << 20) - 4096).unwrap();
    img.flush().unwrap();
    let after = allocated();
    assert!(after < full - (24 << 20), "allocated {full} -> {after}");
    let mut b = vec![1u8; 128 << 10];
    img.read_into(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(img);
    check_clean(&img_path);
}

#[test]
fn vessel_made_images_check_clean_and_show_their_chain() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let base = d.join("base.raw");
    new_image(&base, Format::Raw, Some(16 << 20), None);
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    for (img, below, format) in [(&mid, &base, Format::Raw), (&top, &mid, Format::Qcow2)] {
        new_image(img, Format::Qcow2, None, Some((below, format)));
        check_clean(img);
    }
    let json = qemu_img(&["info", "--backing-chain", "--output=json", p(&top)]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = v.iter().map(|l| l["filename"].as_str().unwrap()).collect();
    assert_eq!(names, [p(&top), p(&mid), p(&base)]);
    assert_eq!(v[0]["backing-filename-format"], "qcow2");
    assert_eq!(v[0]["virtual-size"], 16 << 20);
    let again = CreateOptions {
        format: Format::Qcow2,
        size: Some(1 << 20),
        backing: None,
        cluster_size: None,
    };
    assert!(disk::create(&top, &again).is_err(), "never overwrites");
}

#[test]
fn an_external_snapshot_freezes_the_base_and_a_copy_still_finds_it() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let img = d.join("vm.qcow2");
    qemu_create(&img, "qcow2", "", "16M");
    qemu_io(&img, "qcow2", &["write -P 0x42 0 1M"]);
    let before = qemu::reads(&img);
    let base = disk::snapshot(&img, None).unwrap();
    assert_eq!(base, d.join("vm.snap-1.qcow2"));
    assert!(std::fs::metadata(&base).unwrap().permissions().readonly());
    assert_same(&vessel_reads(&img), &before, "overlay");
    {
        let w = open(&img, false);
        w.write_from(&[7u8; 4096], 0).unwrap();
        w.flush().unwrap();
    }
    assert_same(&qemu::reads(&base), &before, "the base is untouched");
    check_clean(&img);
    let second = disk::snapshot(&img, Some("before-upgrade")).unwrap();
    assert_eq!(second, d.join("vm.before-upgrade.qcow2"));
    let chain = disk::info(&img, None).unwrap();
    assert_eq!(chain.len(), 3);

    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("copy.qcow2");
    disk::copy_image(&img, &copy).unwrap();
    assert_same(&vessel_reads(&copy), &vessel_reads(&img), "copy");
    check_clean(&copy);
}

#[test]
fn vmdk_and_vdi_images_are_imported() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let src = d.join("src.raw");
    qemu_create(&src, "raw", "", "8M");
    qemu_io(&src, "raw", &["write -P 0x99 1M 1M", "write -P 0x17 6M 4k"]);
    let want = std::fs::read(&src).unwrap();
    for (fmt, ext) in [
        ("vmdk", "vmdk"),
        ("vdi", "vdi"),
        ("vpc", "vhd"),
        ("vhdx", "vhdx"),
    ] {
        let foreign = d.join(format!("src.{ext}"));
        qemu_img(&["convert", "-O", fmt, p(&src), p(&foreign)]);
        let e = Image::open(&foreign, OpenOptions::default()).err().unwrap();
        assert!(e.to_string().contains("vessel disk convert"), "{e}");
        let out = d.join(format!("from-{ext}.qcow2"));
        disk::convert(
            &foreign,
            &out,
            ConvertOptions {
                format: Format::Qcow2,
                cluster_size: None,
            },
        )
        .unwrap();
        let got = vessel_reads(&out);
        // VHD rounds the size up to its geometry.
        assert_same(&got[..want.len()], &want, fmt);
        check_clean(&out);
    }
}

#[test]
fn a_probed_raw_disk_never_turns_into_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[7] = 3;
    let img = open(&raw, false);
    let e = img.write_from(&header, 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    img.write_from(&[1u8; 512], 0).unwrap();
    drop(img);
    // Given as raw, the write goes through; reopened as raw it stays raw.
    let explicit = OpenOptions {
        format: Some(Format::Raw),
        readonly: false,
    };
    Image::open(&raw, explicit)
        .unwrap()
        .write_from(&header, 0)
        .unwrap();
    let again = Image::open(&raw, explicit).unwrap();
    assert_eq!((again.format(), again.size()), (Format::Raw, 1 << 20));
}

#[test]
fn damaged_and_unsupported_images_are_refused_in_one_line() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let unknown = d.join("zstd.qcow2");
    let opt = "compression_type=zstd";
    qemu_create(&unknown, "qcow2", opt, "1M");
    let mut bytes = std::fs::read(&unknown).unwrap();
    bytes[104] = 7;
    std::fs::write(&unknown, &bytes).unwrap();
    let dirty = d.join("dirty.qcow2");
    qemu_create(&dirty, "qcow2", "", "1M");
    let mut bytes = std::fs::read(&dirty).unwrap();
    bytes[79] |= 1;
    std::fs::write(&dirty, &bytes).unwrap();
    let looped = d.join("loop.qcow2");
    qemu::unchecked_overlay(&looped, "loop.qcow2", "qcow2", "1M");
    let missing = d.join("orphan.qcow2");
    qemu::unchecked_overlay(&missing, "gone.raw", "raw", "1M");
    let short = d.join("short.qcow2");
    std::fs::write(&short, &bytes[..100]).unwrap();
    for (img, says) in [
        (&unknown, "compression type 7"),
        (&dirty, "qemu-img check -r all"),
        (&looped, "loops"),
        (&missing, "gone.raw"),
        (&short, "not a valid qcow2"),
    ] {
        let e = Image::open(img, OpenOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(says) && !e.contains('\n'),
            "{}: {e}",
            img.display()
        );
    }
    let e = Image::open(&d.join("none.raw"), OpenOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("none.raw"));
}
