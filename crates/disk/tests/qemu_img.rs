//! vessel's images against QEMU's own tools (Debian's qemu-utils): what qemu-img and
//! qemu-io write, vessel reads byte for byte; what vessel writes, qemu-img checks
//! clean and reads back the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{Backing, ConvertOptions, CreateOptions, Format, Image, OpenOptions};

fn required() -> bool {
    std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// True when qemu-img and qemu-io are installed; otherwise says why the test skips
/// (a failure under VESSEL_REQUIRE_KVM=1, as CI runs).
fn have_qemu_utils() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            !required(),
            "VESSEL_REQUIRE_KVM=1 but qemu-utils is missing"
        );
        eprintln!("skipped: needs qemu-img and qemu-io (Debian package qemu-utils)");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands on an image (format given, so nothing is probed).
fn qemu_io(image: &Path, format: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(image));
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The guest-visible bytes of an image, as QEMU reads them.
fn qemu_reads(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-reads.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-O", "raw", p(image), p(&out)]);
    std::fs::read(&out).unwrap()
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
    qemu_img(&["check", p(image)]);
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
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["4k", "64k", "2M"] {
        let img = dir.path().join(format!("c{cluster}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            p(&img),
            "64M",
        ]);
        qemu_io(&img, "qcow2", &WRITES);
        assert_same(&vessel_reads(&img), &qemu_reads(&img, dir.path()), cluster);
    }
}

#[test]
fn a_two_level_backing_chain_and_compressed_clusters_read_the_same() {
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&base), "64M"]);
    qemu_io(&base, "raw", &["write -P 0x11 0 64M"]);
    let mid = d.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&mid),
    ]);
    qemu_io(&mid, "qcow2", &WRITES[..3]);
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io(&top, "qcow2", &WRITES[3..]);
    let chain = disk::info(&top, None).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2].format, Format::Raw);
    assert_same(&vessel_reads(&top), &qemu_reads(&top, d), "chain");

    let want = qemu_reads(&top, d);
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
        assert_same(&qemu_reads(&compressed, d), &model, kind);
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
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "32M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 32M"]);
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    let mut model = qemu_reads(&top, d);
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
    assert_same(&qemu_reads(&top, d), &model, "after vessel's writes");
    assert_same(&vessel_reads(&top), &model, "vessel reading its own writes");
}

#[test]
fn discarded_clusters_go_back_to_the_host() {
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("d.qcow2");
    disk::create(
        &img_path,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(64 << 20),
            backing: None,
            cluster_size: None,
        },
    )
    .unwrap();
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
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    disk::create(
        &base,
        &CreateOptions {
            format: Format::Raw,
            size: Some(16 << 20),
            backing: None,
            cluster_size: None,
        },
    )
    .unwrap();
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    for (img, below, format) in [(&mid, &base, Format::Raw), (&top, &mid, Format::Qcow2)] {
        disk::create(
            img,
            &CreateOptions {
                format: Format::Qcow2,
                size: None,
                backing: Some(Backing {
                    path: below.clone(),
                    format: Some(format),
                }),
                cluster_size: None,
            },
        )
        .unwrap();
        check_clean(img);
    }
    let json = qemu_img(&["info", "--backing-chain", "--output=json", p(&top)]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = v.iter().map(|l| l["filename"].as_str().unwrap()).collect();
    assert_eq!(names, [p(&top), p(&mid), p(&base)]);
    assert_eq!(v[0]["backing-filename-format"], "qcow2");
    assert_eq!(v[0]["virtual-size"], 16 << 20);
    assert!(
        disk::create(
            &top,
            &CreateOptions {
                format: Format::Qcow2,
                size: Some(1 << 20),
                backing: None,
                cluster_size: None
            }
        )
        .is_err(),
        "never overwrites"
    );
}

#[test]
fn an_external_snapshot_freezes_the_base_and_a_copy_still_finds_it() {
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    qemu_io(&img, "qcow2", &["write -P 0x42 0 1M"]);
    let before = qemu_reads(&img, d);
    let base = disk::snapshot(&img, None).unwrap();
    assert_eq!(base, d.join("vm.snap-1.qcow2"));
    assert!(std::fs::metadata(&base).unwrap().permissions().readonly());
    assert_same(&vessel_reads(&img), &before, "overlay");
    {
        let w = open(&img, false);
        w.write_from(&[7u8; 4096], 0).unwrap();
        w.flush().unwrap();
    }
    assert_same(&qemu_reads(&base, d), &before, "the base is untouched");
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
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&src), "8M"]);
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
    if !have_qemu_utils() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let unknown = d.join("zstd.qcow2");
    let opt = "compression_type=zstd";
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opt, p(&unknown), "1M"]);
    let mut bytes = std::fs::read(&unknown).unwrap();
    bytes[104] = 7;
    std::fs::write(&unknown, &bytes).unwrap();
    let dirty = d.join("dirty.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&dirty), "1M"]);
    let mut bytes = std::fs::read(&dirty).unwrap();
    bytes[79] |= 1;
    std::fs::write(&dirty, &bytes).unwrap();
    let looped = d.join("loop.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "loop.qcow2",
        "-F",
        "qcow2",
        p(&looped),
        "1M",
    ]);
    let missing = d.join("orphan.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        p(&missing),
        "1M",
    ]);
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
    let _: PathBuf = d.to_path_buf();
}
