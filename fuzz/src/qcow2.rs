//! A hostile qcow2 image, as vessel opens a guest's disk: its own header parser, then the
//! image and its backing chain through imago, read and written as virtio-blk does.
//!
//! The input is the whole image file. It is written into a private directory (one per
//! process, on /dev/shm when there is one, removed at exit; those of dead processes are
//! swept) and opened twice: read-only, then writable on a second copy, so the read-only
//! run sees the input's own bytes.
//!
//! Backing files: vessel opens whatever name the header records, relative to the image's
//! directory or absolute. A name the fuzzer chose must never reach the host's files, so
//! its bytes are rewritten in place, keeping its length, to a name that resolves to the
//! sandbox's own backing image (`b`, `bb`, `./b`, `.//b`, ...: a fixed qcow2 image with
//! data), and the rewritten header is parsed again: unless vessel's parser (the one
//! `Image::open` runs before anything else) then finds no name or exactly that one, the
//! image is not opened. Rewriting rather than skipping keeps the backing chain under the
//! fuzzer (the format extension, probing, a raw view of a qcow2 file, reads falling
//! through to the lower layer). Not a memfd: vessel resolves backing names against the
//! image's directory, which for `/proc/self/fd/N` is the process's descriptor table.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use disk::qcow2::header::Header;
use disk::{Format, Image, OpenOptions, SECTOR_SIZE};

/// The sandbox's backing image: compressed and plain clusters over 1 MiB, no backing.
const BACKING: &[u8] = include_bytes!("../corpus/qcow2_image/compressed-4k.qcow2");
const DIR_PREFIX: &str = "vessel-fuzz-qcow2-";
/// Largest read or write buffer.
const MAX_IO: u64 = 64 << 10;
/// Largest discard or write-zeroes range: a guest may ask for 2 GiB at once, but zeroing
/// that much data (version 2 images cannot mark clusters zero) only slows the fuzzer.
const MAX_ZERO: u64 = 16 << 20;

static DIR: OnceLock<PathBuf> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The process's directory, with the backing image in it (as `b` and `bb`).
fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        sweep(&root);
        let dir = root.join(format!("{DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("fuzz sandbox directory");
        std::fs::write(dir.join("b"), BACKING).expect("fuzz backing image");
        std::fs::hard_link(dir.join("b"), dir.join("bb")).expect("fuzz backing image");
        // SAFETY: registers a plain function that touches only the OnceLock, set by the
        // time it can run.
        unsafe { libc::atexit(remove_dir) };
        dir
    })
}

/// Removes the directories of processes that are gone (killed before exit).
fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A backing name of `len` bytes naming the sandbox's backing image from any image in
/// the sandbox.
fn sandbox_name(len: usize) -> Vec<u8> {
    match len {
        1 => b"b".to_vec(),
        2 => b"bb".to_vec(),
        _ => {
            let mut n = b"./".to_vec();
            n.resize(len - 1, b'/');
            n.push(b'b');
            n
        }
    }
}

/// The input with any backing name pointed into the sandbox (`parsed`: the input's
/// header); None when vessel could still be led elsewhere.
fn confined(data: &[u8], parsed: Result<Header, String>) -> Option<Vec<u8>> {
    let Ok(h) = parsed else {
        // `Image::open` stops at this same refusal before opening anything else.
        return Some(data.to_vec());
    };
    if h.backing_file.is_none() {
        return Some(data.to_vec());
    }
    // The parse checked the name lies within the input.
    let off = u64::from_be_bytes(data[8..16].try_into().unwrap()) as usize;
    let len = u32::from_be_bytes(data[16..20].try_into().unwrap()) as usize;
    let name = sandbox_name(len);
    let mut image = data.to_vec();
    image[off..off + len].copy_from_slice(&name);
    match Header::parse(&image, image.len() as u64) {
        Err(_) => Some(image),
        Ok(h) => match h.backing_file {
            None => Some(image),
            Some(n) if n.as_bytes() == name => Some(image),
            // The name overlapped the fields that locate it.
            Some(_) => None,
        },
    }
}

/// Little-endian u64 from the input's last bytes: where the reads and writes go.
fn knob(data: &[u8]) -> u64 {
    let tail = &data[data.len().saturating_sub(8)..];
    let mut b = [0u8; 8];
    b[..tail.len()].copy_from_slice(tail);
    u64::from_le_bytes(b) ^ data.len() as u64
}

/// A sector-aligned range of at most `max` bytes at `off`, ending within `size`.
fn clamp(off: u64, len: u64, size: u64, max: u64) -> (u64, u64) {
    let off = off.min(size) / SECTOR_SIZE * SECTOR_SIZE;
    let len = len.min(max).min(size - off) / SECTOR_SIZE * SECTOR_SIZE;
    (off, len)
}

fn open(path: &Path, bytes: &[u8], readonly: bool) -> Option<Image> {
    std::fs::write(path, bytes).expect("fuzz image file");
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        readonly,
    };
    Image::open(path, opts).ok()
}

/// The image at its start, middle and end, across the end (clamped) and where the input
/// says; and nothing at all first (imago refuses empty buffers: vessel drops them).
fn read_ranges(img: &Image, k: u64, buf: &mut Vec<u8>) {
    let _ = img.read_into(&mut [], 0);
    let size = img.size();
    let n = (k >> 48) % MAX_IO + 1;
    let at = [
        0,
        size / 2,
        size.saturating_sub(n),
        size.saturating_sub(n / 2),
        k % size,
    ];
    for off in at {
        let (off, len) = clamp(off, n, size, MAX_IO);
        buf.resize(len as usize, 0);
        let _ = img.read_into(buf, off);
    }
}

/// The harness: vessel's header parser on the input, then the image opened read-only and
/// read, then (a copy) opened writable, written, zeroed, discarded, flushed and read.
pub fn qcow2_image(data: &[u8]) {
    let parsed = Header::parse(data, data.len() as u64);
    let Some(bytes) = confined(data, parsed) else {
        return;
    };
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = dir();
    let k = knob(data);
    let mut buf = Vec::new();
    if let Some(img) = open(&dir.join("ro"), &bytes, true) {
        assert!(img.size() > 0 && img.size().is_multiple_of(SECTOR_SIZE));
        read_ranges(&img, k, &mut buf);
        assert!(
            img.write_from(&[0u8; 512], 0).is_err(),
            "wrote a read-only image"
        );
    }
    if let Some(img) = open(&dir.join("rw"), &bytes, false) {
        let size = img.size();
        let (off, len) = clamp(k % size, (k >> 40) % 8192 + 1, size, MAX_IO);
        buf.clear();
        buf.resize(len as usize, (k >> 8) as u8 | 1);
        let _ = img.write_from(&[], off);
        let _ = img.write_from(&buf, off);
        let zero_len = 1 << ((k >> 20) % 25);
        let (off, len) = clamp(k.rotate_left(17) % size, zero_len, size, MAX_ZERO);
        let _ = img.write_zeroes(off, len, k & 1 == 0);
        let (off, len) = clamp(k.rotate_left(31) % size, zero_len, size, MAX_ZERO);
        let _ = img.discard(off, len);
        let _ = img.flush();
        read_ranges(&img, k.rotate_left(7), &mut buf);
        drop(img);
        // The guest's writes never land on the header (they would choose the backing
        // file the next open reads). Only the magic is read: the file may have grown,
        // sparsely, to gigabytes.
        let mut magic = [0u8; 4];
        let file = std::fs::File::open(dir.join("rw")).expect("fuzz image file");
        file.read_exact_at(&mut magic, 0).expect("fuzz image file");
        assert_eq!(&magic, b"QFI\xfb", "guest data over the header");
    }
}

/// Whether the image opens both ways (for checking the seeds mean something).
pub fn qcow2_opens(data: &[u8]) -> Result<(), String> {
    let parsed = Header::parse(data, data.len() as u64);
    let bytes = confined(data, parsed).ok_or("backing name not confined")?;
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for (name, readonly) in [("ro", true), ("rw", false)] {
        let path = dir().join(name);
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            readonly,
        };
        Image::open(&path, opts).map_err(|e| e.to_string())?;
    }
    Ok(())
}
