//! The root disk: a raw ext4 image made with `mkfs.ext4 -d` from a staged directory (no
//! root privileges needed), and fresh sparse copies of it for guests to write to.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{Kit, KitError};

/// The image's size; a sparse file, so only what it holds takes space on the host.
pub(crate) const ROOTFS_SIZE: u64 = 128 << 20;
/// The file name of the pristine image in a kit directory, and of a fresh copy.
pub(crate) const ROOTFS_FILE: &str = "root.ext4";
/// ext4 features the 6.1 kernel mounts (all are older than 4.x), listed in full after
/// `none` so the host's /etc/mke2fs.conf cannot add newer ones.
const EXT4_FEATURES: &str = "none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,\
                             64bit,flex_bg,sparse_super,large_file,huge_file,dir_nlink,\
                             extra_isize,metadata_csum";
const VOLUME_LABEL: &str = "vessel-root";
/// Copy and hole-detection granularity: the file system's block size.
const BLOCK: usize = 4096;

/// An e2fsprogs tool: from PATH, else /usr/sbin or /sbin (not in a user's PATH on Debian).
pub(crate) fn e2fs_tool(name: &'static str) -> Result<PathBuf, KitError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(KitError::ToolNeedsPackage {
            tool: name,
            package: "e2fsprogs",
        })
}

fn run(tool: &'static str, args: &[&std::ffi::OsStr]) -> Result<Output, KitError> {
    let command = || {
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        format!("{tool} {}", args.join(" "))
    };
    let out = Command::new(e2fs_tool(tool)?)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| KitError::ToolFailed {
            command: command(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(KitError::ToolFailed {
            command: command(),
            detail: stderr.trim().lines().last().unwrap_or("failed").to_string(),
        });
    }
    Ok(out)
}

/// Makes `image` (`size` bytes, sparse) an ext4 file system holding `staging`'s files,
/// all owned by root whoever builds it.
pub(crate) fn make_image(staging: &Path, image: &Path, size: u64) -> Result<(), KitError> {
    let _ = fs::remove_file(image);
    File::create(image)
        .and_then(|f| f.set_len(size))
        .map_err(KitError::io(image))?;
    // On a regular file mke2fs punches holes instead of writing zeros, and marks the
    // inode tables as zeroed; lazy_journal_init leaves the journal a hole too.
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-L".as_ref(),
            VOLUME_LABEL.as_ref(),
            "-O".as_ref(),
            EXT4_FEATURES.as_ref(),
            "-E".as_ref(),
            "root_owner=0:0,lazy_journal_init=1".as_ref(),
            "-d".as_ref(),
            staging.as_os_str(),
            image.as_os_str(),
        ],
    )?;
    chown_to_root(staging, image)
}

/// `mkfs.ext4 -d` copies each file's owner; a build that is not root stages files as
/// itself, so debugfs rewrites those inodes' owner to root:root.
fn chown_to_root(staging: &Path, image: &Path) -> Result<(), KitError> {
    let mut script = String::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = staging.join(&rel);
        for entry in fs::read_dir(&dir).map_err(KitError::io(&dir))? {
            let entry = entry.map_err(KitError::io(&dir))?;
            let meta = entry.metadata().map_err(KitError::io(entry.path()))?;
            let rel = rel.join(entry.file_name());
            if meta.is_dir() {
                dirs.push(rel.clone());
            }
            if meta.uid() != 0 || meta.gid() != 0 {
                let path = rel.to_string_lossy();
                if path.contains(['"', '\n']) {
                    return Err(KitError::ToolFailed {
                        command: "debugfs".into(),
                        detail: format!("cannot name {path:?} in a debugfs script"),
                    });
                }
                script.push_str(&format!("sif \"/{path}\" uid 0\nsif \"/{path}\" gid 0\n"));
            }
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    let script_path = image.with_extension("debugfs");
    fs::write(&script_path, &script).map_err(KitError::io(&script_path))?;
    let out = run(
        "debugfs",
        &[
            "-w".as_ref(),
            "-f".as_ref(),
            script_path.as_os_str(),
            image.as_os_str(),
        ],
    );
    let _ = fs::remove_file(&script_path);
    // debugfs exits 0 even when a command fails; the reason is on stderr after its banner.
    let stderr = String::from_utf8_lossy(&out?.stderr).into_owned();
    match stderr.lines().find(|l| !l.starts_with("debugfs ")) {
        Some(line) => Err(KitError::ToolFailed {
            command: format!("debugfs -w -f {}", script_path.display()),
            detail: line.to_string(),
        }),
        None => Ok(()),
    }
}

/// A fresh, writable copy of the kit's root disk image, for one guest to use: at `dest`,
/// or at `dest/root.ext4` when `dest` is a directory. Holes stay holes (a copy takes the
/// few MiB the file system holds, not its full size); an existing file is replaced.
pub fn fresh_rootfs(kit: &Kit, dest: &Path) -> Result<PathBuf, KitError> {
    let dest = if dest.is_dir() {
        dest.join(ROOTFS_FILE)
    } else {
        dest.to_path_buf()
    };
    sparse_copy(&kit.rootfs, &dest)?;
    Ok(dest)
}

/// Copies `src` to `dst` block by block, seeking over all-zero blocks instead of writing
/// them (as `cp --sparse=always` does), then sets the length. `std::fs::copy` would fill
/// the holes: copy_file_range writes zeros on file systems that cannot share extents.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> Result<(), KitError> {
    let mut input = File::open(src).map_err(KitError::io(src))?;
    let len = input.metadata().map_err(KitError::io(src))?.len();
    let part = dst.with_file_name(format!(
        ".{}.part-{}",
        dst.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let copied = (|| -> std::io::Result<()> {
        let mut output = File::create(&part)?;
        let mut buf = vec![0u8; 256 * BLOCK];
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut input, &mut buf)?;
            if n == 0 {
                break;
            }
            for block in buf[..n].chunks(BLOCK) {
                if block.iter().all(|&b| b == 0) {
                    output.seek(SeekFrom::Current(block.len() as i64))?;
                } else {
                    output.write_all(block)?;
                }
            }
            offset += n as u64;
        }
        output.set_len(offset)?;
        output.sync_all()
    })();
    let result = copied
        .map_err(KitError::io(&part))
        .and_then(|()| fs::rename(&part, dst).map_err(KitError::io(dst)));
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    match result {
        Ok(()) if fs::metadata(dst).is_ok_and(|m| m.len() == len) => Ok(()),
        Ok(()) => Err(KitError::io(dst)(std::io::Error::other(
            "copy is not as long as the original",
        ))),
        Err(e) => Err(e),
    }
}

/// Fills `buf` unless the file ends first; returns how much was read.
fn read_full(input: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Tree;
    use std::os::unix::fs::FileExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kit-rootfs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn required() -> bool {
        std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1")
    }

    #[test]
    fn a_sparse_copy_keeps_holes_and_data() {
        let dir = scratch("copy");
        let src = dir.join("src.img");
        let len = 64u64 << 20;
        let f = File::create(&src).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[7u8; 3 * BLOCK], 20 << 20).unwrap();
        f.write_all_at(b"end", len - 3).unwrap();
        drop(f);
        let dst = dir.join("dst.img");
        fs::write(&dst, vec![1u8; 1 << 20]).unwrap(); // replaced, not merged
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let blocks = fs::metadata(&dst).unwrap().blocks(); // 512-byte units
        assert!(blocks * 512 <= 64 * 1024, "{} KiB allocated", blocks / 2);
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 2, "no .part file left");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_copy_of_a_missing_image_names_it() {
        let dir = scratch("missing");
        let err = sparse_copy(&dir.join("nope.ext4"), &dir.join("x")).unwrap_err();
        assert!(err.to_string().contains("nope.ext4"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// mkfs.ext4 -d on a small tree, one file handed to another owner (as a build by an
    /// ordinary user stages it): every inode in the image belongs to root.
    #[test]
    fn the_image_holds_the_tree_owned_by_root() {
        if e2fs_tool("mkfs.ext4").is_err() || e2fs_tool("debugfs").is_err() {
            assert!(!required(), "e2fsprogs is not installed");
            eprintln!("skipping: e2fsprogs is not installed");
            return;
        }
        let dir = scratch("mkfs");
        let staging = dir.join("root");
        fs::create_dir(&staging).unwrap();
        let mut tree = Tree::default();
        tree.dir("tmp", 0o1777);
        tree.file("sbin/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec());
        tree.symlink("bin/sh", "/bin/busybox");
        tree.write_dir(&staging).unwrap();
        let as_root = fs::metadata(&staging).unwrap().uid() == 0;
        if as_root {
            std::os::unix::fs::lchown(staging.join("sbin/init"), Some(1000), Some(1000)).unwrap();
        }
        let image = dir.join("root.ext4");
        make_image(&staging, &image, 16 << 20).unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), 16 << 20);
        assert!(
            fs::metadata(&image).unwrap().blocks() * 512 < 8 << 20,
            "sparse"
        );

        let debugfs = |cmd: &str| {
            let out = run("debugfs", &["-R".as_ref(), cmd.as_ref(), image.as_os_str()]).unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(debugfs("cat /sbin/init"), "#!/bin/sh\necho hi\n");
        let stat = debugfs("stat /sbin/init");
        assert!(stat.contains("User:     0   Group:     0"), "{stat}");
        assert!(stat.contains("Mode:  0755"), "{stat}");
        assert!(debugfs("stat /tmp").contains("Mode:  01777"));
        assert!(debugfs("stat /").contains("User:     0   Group:     0"));
        assert!(debugfs("ls -l /bin").contains(" sh"));
        assert!(
            !dir.join("root.debugfs").exists(),
            "the debugfs script is removed"
        );
        let fsck = Command::new(e2fs_tool("e2fsck").unwrap())
            .args(["-fn".as_ref(), image.as_os_str()])
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
