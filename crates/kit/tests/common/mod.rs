//! Shared by the integration tests: get the kit (or skip), and run QEMU with a deadline.
#![allow(dead_code)] // each test file uses its own part of this

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
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

/// What one QEMU run printed and how it ended.
pub struct Run {
    pub output: String,
    pub status: ExitStatus,
    pub elapsed: Duration,
    /// From spawning QEMU to the init marker on the serial console.
    pub marker_after: Option<Duration>,
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
/// and `extra` arguments; when `reply` is given, types its text once the output shows its
/// prompt. Kills QEMU after [`QEMU_TIMEOUT`].
pub fn boot(
    qemu: &PathBuf,
    kit: &Kit,
    append: &str,
    extra: &[&str],
    reply: Option<(&str, &str)>,
) -> Run {
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
    let mut stdin = child.stdin.take();
    let mut raw = Vec::new();
    let mut marker_after = None;
    let mut replied = false;
    let status = loop {
        while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(20)) {
            raw.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&raw);
        if marker_after.is_none() && text.contains(kit::INIT_MARKER) {
            marker_after = Some(started.elapsed());
        }
        if let (Some((prompt, input)), false) = (reply, replied)
            && text.contains(prompt)
            && let Some(stdin) = stdin.as_mut()
        {
            stdin.write_all(input.as_bytes()).expect("write to qemu");
            stdin.flush().expect("flush qemu stdin");
            replied = true;
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
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(chunk) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        raw.extend_from_slice(&chunk);
    }
    let run = Run {
        output: String::from_utf8_lossy(&raw).replace('\r', ""),
        status,
        elapsed: started.elapsed(),
        marker_after,
    };
    eprintln!(
        "--- qemu -append {append:?}: {:?} after {:.2?}, marker after {:.2?}\n{}",
        run.status, run.elapsed, run.marker_after, run.output
    );
    run
}
