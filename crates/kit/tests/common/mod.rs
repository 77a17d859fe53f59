//! Shared by the integration tests: get the kit (or skip), and run QEMU with a deadline.
#![allow(dead_code)] // each test file uses its own part of this

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kit::{Kit, KitOptions};

/// Hard limit for one QEMU run.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(120);

/// CI sets this: there, a missing kit or QEMU is a failure, not a reason to skip.
pub fn required() -> bool {
    std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Reports why a test cannot run: a skip locally, a failure when required.
pub fn skip<T>(reason: &str) -> Option<T> {
    if required() {
        panic!("VESSEL_REQUIRE_KVM=1 but {reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

/// The kit in the default cache (or `VESSEL_KIT_DIR`), built if needed.
pub fn kit() -> Option<Kit> {
    let started = Instant::now();
    match kit::build(&KitOptions::default()) {
        Ok(kit) => {
            eprintln!(
                "kit ready in {:.2?}: {}",
                started.elapsed(),
                kit.dir.display()
            );
            Some(kit)
        }
        Err(e) => skip(&format!("the kit cannot be built: {e}")),
    }
}

/// `qemu-system-x86_64` from PATH.
pub fn qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file());
    found.or_else(|| skip("qemu-system-x86_64 is not installed"))
}

/// An e2fsprogs tool (mkfs.ext4, debugfs, e2fsck), also from /usr/sbin and /sbin.
pub fn e2fs(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file());
    found.or_else(|| skip(&format!("{tool} (e2fsprogs) is not installed")))
}

/// `debugfs -R request image`: its standard output (it reads images without root).
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new(e2fs("debugfs").expect("debugfs"))
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `e2fsck -fn` finds the image clean; its report otherwise.
pub fn fsck(image: &Path) -> Result<(), String> {
    let out = Command::new(e2fs("e2fsck").expect("e2fsck"))
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A path under the temp directory unique to this test run and call.
pub fn temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("kit-{name}-{}-{n}", std::process::id()))
}

/// What [`boot`] does once the console shows a given text.
pub enum Action<'a> {
    /// Types this on the serial console.
    Type(&'a str),
    /// Presses the ACPI power button (QMP `system_powerdown`).
    PowerButton,
}

/// What one QEMU run printed and how it ended.
pub struct Run {
    pub output: String,
    pub status: ExitStatus,
    /// From spawning QEMU to its exit.
    pub elapsed: Duration,
    /// From spawning QEMU to the init marker on the serial console.
    pub marker_after: Option<Duration>,
    /// From spawning QEMU to the [`Action`].
    pub acted_after: Option<Duration>,
}

impl Run {
    pub fn assert_contains(&self, text: &str) {
        assert!(
            self.output.contains(text),
            "no {text:?} in the output:\n{}",
            self.output
        );
    }
    pub fn assert_lacks(&self, text: &str) {
        assert!(
            !self.output.contains(text),
            "unexpected {text:?} in the output:\n{}",
            self.output
        );
    }
}

/// Boots the kit's bzImage under QEMU's software CPU with `append` as the command line
/// and `extra` arguments; when `act` is given, does its action once the output shows its
/// text. Kills QEMU after [`QEMU_TIMEOUT`].
pub fn boot(
    qemu: &PathBuf,
    kit: &Kit,
    append: &str,
    extra: &[&str],
    act: Option<(&str, Action)>,
) -> Run {
    let qmp = temp_path("qmp").with_extension("sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-cpu",
            "max",
            "-m",
            "512",
            "-nodefaults",
            "-no-reboot",
        ])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kit.bzimage)
        .arg("-initrd")
        .arg(&kit.initrd)
        .args(["-append", append])
        .args(["-qmp", &qmp_arg])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let (tx, rx) = mpsc::channel();
    for mut pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx); // the channel closes when both pipes do
    let mut stdin = child.stdin.take();
    let mut raw = Vec::new();
    let mut marker_after = None;
    let mut acted_after = None;
    let status = loop {
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(chunk) => raw.extend_from_slice(&chunk),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(20));
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&raw).replace('\r', "");
        if marker_after.is_none() && text.contains(kit::INIT_MARKER) {
            marker_after = Some(started.elapsed());
        }
        if let (Some((prompt, action)), None) = (&act, acted_after)
            && text.contains(prompt)
        {
            match action {
                Action::Type(input) => {
                    let stdin = stdin.as_mut().expect("qemu stdin");
                    stdin.write_all(input.as_bytes()).expect("write to qemu");
                    stdin.flush().expect("flush qemu stdin");
                }
                Action::PowerButton => qmp_command(&qmp, "system_powerdown"),
            }
            acted_after = Some(started.elapsed());
        }
        if let Some(status) = child.try_wait().expect("wait for qemu") {
            break status;
        }
        if started.elapsed() > QEMU_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU still running after {QEMU_TIMEOUT:?}; output:\n{text}");
        }
    };
    let elapsed = started.elapsed();
    drop(stdin);
    let _ = std::fs::remove_file(&qmp);
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(chunk) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        raw.extend_from_slice(&chunk);
    }
    let run = Run {
        output: String::from_utf8_lossy(&raw).replace('\r', ""),
        status,
        elapsed,
        marker_after,
        acted_after,
    };
    eprintln!(
        "--- qemu -append {append:?}: {:?} after {:.2?}, marker after {:.2?}, acted after {:.2?}\n{}",
        run.status, run.elapsed, run.marker_after, run.acted_after, run.output
    );
    run
}

/// Runs one QMP command on QEMU's socket and waits for its `return`.
fn qmp_command(socket: &Path, command: &str) {
    let stream = UnixStream::connect(socket).expect("connect to QEMU's QMP socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
    let mut send = |execute: &str| {
        (&stream)
            .write_all(format!("{{\"execute\": \"{execute}\"}}\n").as_bytes())
            .expect("write to QMP");
        // Events ({"event": ...}) may come first; the reply has "return" or "error".
        loop {
            let line = lines.next().expect("QMP reply").expect("read QMP");
            assert!(!line.contains("\"error\""), "QMP {execute}: {line}");
            if line.contains("\"return\"") {
                break;
            }
        }
    };
    send("qmp_capabilities");
    send(command);
}
