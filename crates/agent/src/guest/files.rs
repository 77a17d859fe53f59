//! `ReadFile` and `WriteFile` (`vessel cp`).
//!
//! A file is written into a temporary file next to it, synced, and renamed over the
//! path: the path has either its old contents or all of the new ones, never a part.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Connection, GuestError, Receiver, Sender};
use crate::protocol::{self, CHUNK, Frame, Message, Stream};

/// Sends `path`: its mode and size, its bytes, the end.
pub(crate) fn read_file<C: Connection>(path: &str, sender: &Sender<C>) -> Result<(), GuestError> {
    let mut file = OpenOptions::new()
        .read(true)
        // A FIFO would block the open; the flag is cleared below.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| GuestError::io(path, &e))?;
    let meta = file.metadata().map_err(|e| GuestError::io(path, &e))?;
    if meta.is_dir() {
        return Err(GuestError::Failed(format!("is a directory: {path}")));
    }
    clear_nonblock(&file).map_err(|e| GuestError::io(path, &e))?;
    sender.message(&Message::FileInfo {
        mode: meta.mode() & 0o7777,
        size: meta.size(),
    })?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(GuestError::io(path, &e)),
        };
        sender.data(Stream::File, &buf[..n])?;
    }
    sender.end(Stream::File)
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor `file` owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives `path` with `mode` up to the end of its data, then answers `Done`.
pub(crate) fn write_file<C: Connection>(
    path: &str,
    mode: u32,
    mut receiver: Receiver<C>,
    sender: &Sender<C>,
) -> Result<(), GuestError> {
    let mode = mode & 0o7777;
    let target = resolve(Path::new(path));
    let mut temp = TempFile::create(&target, mode)?;
    loop {
        match protocol::read_frame(&mut receiver)? {
            Frame::Data {
                stream: Stream::File,
                bytes,
            } if bytes.is_empty() => break,
            Frame::Data {
                stream: Stream::File,
                bytes,
            } => temp.write(&bytes)?,
            _ => return Err(GuestError::UnexpectedFrame("write-file")),
        }
    }
    temp.commit(&target)?;
    sender.message(&Message::Done)
}

/// Where writing `path` lands: through a symbolic link to its target (as `cp` does),
/// unless the link dangles.
fn resolve(path: &Path) -> PathBuf {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match is_link {
        true => fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        false => path.to_path_buf(),
    }
}

/// `.name.vessel-agent-tmp-PID-N`, the name cut short enough to be a valid one.
fn temp_name(name: &str, serial: u64) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        ".{}.vessel-agent-tmp-{}-{serial}",
        &name[..end],
        std::process::id()
    )
}

/// A file being written next to its final path; removed unless committed.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(target: &Path, mode: u32) -> Result<TempFile, GuestError> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let shown = target.display().to_string();
        let Some(name) = target.file_name() else {
            return Err(GuestError::Failed(format!("not a file name: {shown}")));
        };
        let serial = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = target.with_file_name(temp_name(&name.to_string_lossy(), serial));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    GuestError::Failed(format!("no such directory for {shown}"))
                }
                _ => GuestError::io(&shown, &e),
            })?;
        let temp = TempFile {
            path,
            file: Some(file),
        };
        // The umask took bits off the mode given at creation.
        temp.file()?
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| GuestError::io(&shown, &e))?;
        Ok(temp)
    }

    fn file(&self) -> Result<&File, GuestError> {
        self.file
            .as_ref()
            .ok_or_else(|| GuestError::Failed("the file is closed".into()))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), GuestError> {
        let shown = self.path.display().to_string();
        self.file()?
            .write_all(bytes)
            .map_err(|e| GuestError::io(&shown, &e))
    }

    /// Syncs the file and renames it to `target` (syncing the directory too).
    fn commit(mut self, target: &Path) -> Result<(), GuestError> {
        let shown = target.display().to_string();
        let file = self.file.take();
        if let Some(file) = &file {
            file.sync_all().map_err(|e| GuestError::io(&shown, &e))?;
        }
        drop(file);
        fs::rename(&self.path, target).map_err(|e| GuestError::io(&shown, &e))?;
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // The rename is durable once the directory is; a failure here loses nothing
        // that the host could act on.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        // Renamed: nothing left to remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use crate::guest::testing::{frames, round_trip, start};
    use crate::protocol::{self, Frame, Message, Stream};

    /// A fresh empty directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "vessel-agent-test-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn entries(&self) -> Vec<String> {
            fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn contents() -> Vec<u8> {
        (0..3u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect()
    }

    fn write(path: &Path, mode: u32, bytes: &[u8]) -> Vec<Frame> {
        let mut host = start(&Message::WriteFile {
            path: path.display().to_string(),
            mode,
        });
        protocol::write_data(&mut host.conn, Stream::File, bytes).unwrap();
        protocol::write_end(&mut host.conn, Stream::File).unwrap();
        let frames = frames(&mut host.conn);
        host.server.join().unwrap().unwrap();
        frames
    }

    #[test]
    fn a_file_goes_in_and_comes_back() {
        let dir = TempDir::new("roundtrip");
        let path = dir.0.join("data.bin");
        let data = contents();
        assert_eq!(write(&path, 0o640, &data), [Frame::Message(Message::Done)]);
        assert_eq!(dir.entries(), ["data.bin"]);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);

        let (frames, result) = round_trip(&Message::ReadFile {
            path: path.display().to_string(),
        });
        result.unwrap();
        let mut frames = frames.into_iter();
        assert_eq!(
            frames.next(),
            Some(Frame::Message(Message::FileInfo {
                mode: 0o640,
                size: data.len() as u64
            }))
        );
        let mut back = Vec::new();
        let mut ended = false;
        for frame in frames {
            match frame {
                Frame::Data {
                    stream: Stream::File,
                    bytes,
                } if !ended => {
                    ended = bytes.is_empty();
                    back.extend(bytes);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(ended);
        assert!(back == data);

        // Over an existing file, with a mode the umask would cut.
        assert_eq!(write(&path, 0o777, b"new"), [Frame::Message(Message::Done)]);
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o777);
    }

    #[test]
    fn writes_go_through_links_and_take_long_names() {
        let dir = TempDir::new("links");
        let real = dir.0.join("real");
        let link = dir.0.join("link");
        fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink("real", &link).unwrap();
        assert_eq!(write(&link, 0o644, b"new"), [Frame::Message(Message::Done)]);
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&real).unwrap(), b"new");

        let long = dir.0.join("é".repeat(127));
        assert_eq!(write(&long, 0o600, b"x"), [Frame::Message(Message::Done)]);
        assert_eq!(fs::read(&long).unwrap(), b"x");
        assert_eq!(dir.entries().len(), 3);
    }

    #[test]
    fn a_cut_off_write_leaves_nothing() {
        let dir = TempDir::new("cutoff");
        let path = dir.0.join("partial");
        let mut host = start(&Message::WriteFile {
            path: path.display().to_string(),
            mode: 0o600,
        });
        protocol::write_data(&mut host.conn, Stream::File, &contents()[..200_000]).unwrap();
        drop(host.conn);
        assert!(host.server.join().unwrap().is_err());
        assert!(dir.entries().is_empty(), "{:?}", dir.entries());

        // A wrong frame in the middle ends it the same way, with an answer.
        let mut host = start(&Message::WriteFile {
            path: path.display().to_string(),
            mode: 0o600,
        });
        protocol::write_data(&mut host.conn, Stream::File, b"abc").unwrap();
        protocol::write_data(&mut host.conn, Stream::Stdin, b"abc").unwrap();
        let frames = frames(&mut host.conn);
        assert!(host.server.join().unwrap().is_err());
        assert!(matches!(
            &frames[..],
            [Frame::Message(Message::Error { .. })]
        ));
        assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    }

    #[test]
    fn missing_files_and_directories_are_errors() {
        let dir = TempDir::new("errors");
        let error = |m: Message| match &round_trip(&m).0[..] {
            [Frame::Message(Message::Error { message })] => message.clone(),
            other => panic!("{other:?}"),
        };
        let missing = dir.0.join("nope").display().to_string();
        assert_eq!(
            error(Message::ReadFile {
                path: missing.clone()
            }),
            format!("no such file: {missing}")
        );
        let shown = dir.0.display().to_string();
        assert!(error(Message::ReadFile { path: shown }).starts_with("is a directory"));
        let deep = dir.0.join("a/b").display().to_string();
        assert!(
            error(Message::WriteFile {
                path: deep,
                mode: 0o644
            })
            .contains("no such")
        );
    }
}
