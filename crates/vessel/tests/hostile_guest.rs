//! Issue 17, hostile guests: a tiny guest (`testguest::hostile`) attacks every device
//! vessel gives it — random port I/O, random MMIO into the virtio BARs, the local APIC
//! and IOAPIC and nowhere, random PCI configuration writes (BARs included), and virtio
//! devices driven with random features, queues, descriptors and avail indexes — from a
//! seeded generator, so a failure names the seed that replays it. Whatever the guest
//! does, the monitor must not panic, die by a signal or hang, nor leave a helper
//! behind: each run must end with the guest's own power-off after its last iteration.
//! virtio-fs has its own test (a wedged virtiofsd must not freeze the vCPU).

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use testguest::hostile::{self, Plan};

/// Fixed seeds: a failure is replayed by running its seed again.
const SEEDS: [u64; 4] = [0x1, 0x5eed, 0xdead_beef, 0x1717_1717];
/// Enough for every device to be reset, driven and notified thousands of times; on
/// the software CPU a seed takes about 3 s here (twice that on a busy host).
const EMU_ITERATIONS: u32 = 250_000;
/// KVM without VT-x/AMD-V runs the guest through its instruction emulator and exits
/// to vessel for every device access: about 5 s a seed here.
const KVM_ITERATIONS: u32 = 10_000;
/// Past this the monitor counts as hung.
const DEADLINE: Duration = Duration::from_secs(60);

/// Everything a run attaches, in a temporary directory: a raw disk, a NIC on a named
/// network of vessel's own switch (no way out of the host), the entropy device, the
/// balloon, vsock and a virtio console on sockets, and, with `share`, a shared folder
/// (virtio-fs, served by virtiofsd).
struct Machine {
    dir: tempfile::TempDir,
    share: bool,
}

impl Machine {
    fn new(share: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = std::fs::File::create(dir.path().join("disk.raw")).unwrap();
        disk.set_len(1 << 20).unwrap();
        for sub in ["share", "home", "run"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Machine { dir, share }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--memory",
            &format!("{}M", hostile::MEMORY_MIB),
            "--disk",
            &format!("path={},format=raw", self.path("disk.raw").display()),
            "--net",
            "network=hostile",
            "--rng",
            "--balloon",
            "--vsock",
            &format!("cid=3,socket={}", self.path("vsock.sock").display()),
            "--hvc",
            &format!("socket={}", self.path("hvc.sock").display()),
            "--stats",
        ]
        .map(String::from)
        .into();
        if self.share {
            args.push("--share".into());
            args.push(format!("{},tag=hostile", self.path("share").display()));
        }
        args
    }

    /// The virtio device types the guest must find.
    fn device_types(&self) -> Vec<u32> {
        use hostile::{BALLOON, BLOCK, CONSOLE, FS, NET, RNG, VSOCK};
        let mut types = vec![BLOCK, NET, RNG, BALLOON, VSOCK, CONSOLE];
        if self.share {
            types.push(FS);
        }
        types
    }

    /// Runs the hostile guest for `plan` on `accel`.
    fn run(&self, accel: &str, plan: Plan) -> Run {
        let kernel = testguest::bzimage(&hostile::code(plan));
        let (_kernel, kernel_path) = testguest::temp_path(&kernel);
        let mut cmd = common::vessel();
        // Sockets `vessel run` makes (virtio-fs's is named by the tag alone) stay ours.
        cmd.env("VESSEL_HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .arg("run")
            .arg("--kernel")
            .arg(&kernel_path)
            .args(["--accel", accel])
            .args(self.args());
        Run::of(cmd, DEADLINE)
    }

    /// Processes vessel started for this machine that are still running a few seconds
    /// after it ended (the network's switch excepted: it stays a few seconds for other
    /// VMs), as (pid, command line); each is killed, so a failing test leaves none
    /// behind.
    fn kill_leftover_helpers(&self) -> Vec<(i32, String)> {
        let mut left = self.helpers();
        let give_up = Instant::now() + Duration::from_secs(5);
        while !left.is_empty() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(50));
            left = self.helpers();
        }
        for (pid, _) in &left {
            // SAFETY: kill(2) on a process this test's vessel started; no memory is
            // involved.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        left
    }

    /// Running processes (not zombies) whose command line names this machine's
    /// directory, but the switch.
    fn helpers(&self) -> Vec<(i32, String)> {
        let ours = self.dir.path().display().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&ours) && !cmdline.contains("__switch") {
                found.push((pid, cmdline));
            }
        }
        found
    }

    /// Panics reported by the network's switch (a process of its own).
    fn switch_log(&self) -> String {
        let log = self.path("home").join("networks/hostile/switch.log");
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

/// virtio-fs needs virtiofsd (CI installs it: under VESSEL_REQUIRE_KVM=1 it must be
/// there).
fn virtiofsd_installed() -> bool {
    if devices::virtio::fs::find_virtiofsd().is_some() {
        return true;
    }
    assert!(
        std::env::var("VESSEL_REQUIRE_KVM").as_deref() != Ok("1"),
        "VESSEL_REQUIRE_KVM=1 but virtiofsd is not installed"
    );
    eprintln!("skipped: virtiofsd is not installed");
    false
}

/// How a `vessel run` ended: its exit status (None if it was still running at the
/// deadline and had to be killed), what it printed (the first and last
/// [`KEEP_BYTES`] of each stream: a flood must not take the test down), and whether
/// something it started still held its output open afterwards.
struct Run {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    output_held_open: bool,
    /// Lines of stderr reporting a panic.
    panics: Vec<String>,
}

const KEEP_BYTES: usize = 1 << 20;

/// A stream's first and last bytes, the middle dropped (and counted), and every line
/// that reports a panic, wherever it was.
#[derive(Default)]
struct Capture {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
    line: Vec<u8>,
    panics: Vec<String>,
}

impl Capture {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if line.contains("panicked") && self.panics.len() < 16 {
                    self.panics.push(line.into_owned());
                }
                self.line.clear();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        let room = KEEP_BYTES.saturating_sub(self.head.len()).min(bytes.len());
        self.head.extend_from_slice(&bytes[..room]);
        self.tail.extend(&bytes[room..]);
        let over = self.tail.len().saturating_sub(KEEP_BYTES);
        self.tail.drain(..over);
        self.dropped += over as u64;
    }

    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!("\n[... {} bytes left out ...]\n", self.dropped));
        }
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        s.push_str(&String::from_utf8_lossy(&tail));
        s
    }
}

impl Run {
    fn of(mut cmd: Command, deadline: Duration) -> Run {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<u8>)>();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for (i, mut from) in streams.into_iter().enumerate() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    if tx.send((i, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut captures = [Capture::default(), Capture::default()];
        let mut status = None;
        let mut output_held_open = false;
        // Until vessel has ended and both streams are closed; the streams get a few
        // seconds past vessel's end (a helper it started may hold them).
        let mut open = true;
        loop {
            if open {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok((i, bytes)) => captures[i].push(&bytes),
                    Err(RecvTimeoutError::Disconnected) => open = false,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
            match status {
                None => {
                    if let Some(s) = child.try_wait().expect("wait for vessel") {
                        status = Some((s, Instant::now()));
                    } else if start.elapsed() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
                Some(_) if !open => break,
                Some((_, ended)) if ended.elapsed() > Duration::from_secs(5) => {
                    output_held_open = true;
                    break;
                }
                Some(_) => {}
            }
        }
        let [stdout, stderr] = captures;
        Run {
            status: status.map(|(s, _)| s),
            stdout: stdout.text(),
            stderr: stderr.text(),
            elapsed: start.elapsed(),
            output_held_open,
            panics: stderr.panics,
        }
    }

    /// The end of both outputs (the guest's random serial writes can be long).
    fn dump(&self) -> String {
        let tail = |s: &str| {
            let from = s.len().saturating_sub(6000);
            let from = (from..s.len())
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(0);
            s[from..].to_string()
        };
        format!(
            "status {:?} after {:?}\n--- stdout (end)\n{}\n--- stderr (end)\n{}",
            self.status,
            self.elapsed,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }

    /// The virtio device types the guest reported finding.
    fn device_types(&self) -> Vec<u32> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(hostile::DEVICE))
            .filter_map(|l| {
                let hex = l.split(" type=").nth(1)?.get(..8)?;
                u32::from_str_radix(hex, 16).ok()
            })
            .collect()
    }

    /// The guest's last line: its counts of iterations and of each attack.
    fn done_line(&self) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(hostile::DONE))
    }
}

/// vessel survived: no hang, no signal, no panic; the guest found every device, ran
/// every iteration and powered off.
fn assert_survived(machine: &Machine, accel: &str, plan: Plan, run: &Run) {
    let what = format!("{accel}, seed {:#x}", plan.seed);
    let leftovers = machine.kill_leftover_helpers();
    let Some(status) = run.status else {
        panic!(
            "{what}: vessel still running after {DEADLINE:?} (helpers left: {leftovers:?})\n{}",
            run.dump()
        );
    };
    assert!(
        leftovers.is_empty(),
        "{what}: helpers outlived vessel (killed now): {leftovers:?}\n{}",
        run.dump()
    );
    assert_eq!(
        status.signal(),
        None,
        "{what}: vessel killed by a signal\n{}",
        run.dump()
    );
    assert!(
        run.panics.is_empty(),
        "{what}: vessel panicked: {:?}\n{}",
        run.panics,
        run.dump()
    );
    assert_eq!(status.code(), Some(0), "{what}\n{}", run.dump());
    assert!(
        run.stderr.contains("vessel: guest powered off"),
        "{what}\n{}",
        run.dump()
    );
    let found = run.device_types();
    for t in machine.device_types() {
        assert!(
            found.contains(&t),
            "{what}: no virtio device of type {t} found ({found:?})\n{}",
            run.dump()
        );
    }
    let done = run.done_line().unwrap_or_default();
    assert!(
        done.contains(&format!(" iterations={:08x} ", plan.iterations)),
        "{what}: the guest did not finish\n{}",
        run.dump()
    );
    assert!(
        !run.output_held_open,
        "{what}: something vessel started still held its output open after it ended\n{}",
        run.dump()
    );
    let switch = machine.switch_log();
    assert!(
        !switch.contains("panicked"),
        "{what}: the network switch panicked\n{switch}"
    );
    eprintln!("{what}: {:.1} s, {done}", run.elapsed.as_secs_f64());
}

/// Runs every seed on `accel`; virtio-fs has a test of its own (below).
fn attack_every_device(accel: &str, iterations: u32) {
    let machine = Machine::new(false);
    for seed in SEEDS {
        let plan = Plan::new(seed, iterations);
        let run = machine.run(accel, plan);
        assert_survived(&machine, accel, plan, &run);
    }
}

#[test]
fn hostile_guests_do_not_bring_down_the_monitor_on_the_software_cpu() {
    attack_every_device("emu", EMU_ITERATIONS);
}

#[test]
fn hostile_guests_do_not_bring_down_the_monitor_on_kvm() {
    if !common::kvm_available() {
        return;
    }
    attack_every_device("kvm", KVM_ITERATIONS);
}

/// A guest writing the boot-timer port in a loop gets its first marks kept and
/// logged, not a mark and a line per write (which grew the monitor without bound).
#[test]
fn a_guest_hammering_the_boot_timer_port_is_logged_a_bounded_number_of_times() {
    let (_kernel, path) = testguest::bzimage_file(|a| {
        use testguest::code_asm::*;
        let mut again = a.create_label();
        a.mov(ecx, 1_000_000u32).unwrap();
        a.mov(dx, 0x440u32).unwrap();
        a.set_label(&mut again).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(again).unwrap();
        testguest::snippets::acpi_power_off(a);
    });
    let r = common::boot(
        std::path::Path::new(&path),
        &["--accel", "emu", "--memory", "64M"],
        DEADLINE,
    );
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let marks = r.stderr.matches("boot-timer:").count();
    assert_eq!(
        marks,
        devices::legacy::boot_timer::MAX_MARKS,
        "{}",
        r.dump()
    );
}

/// virtio-fs under the same attacks. The first plan is what the hostile guest found
/// once froze its vCPU for good: a driver that publishes an avail index more than a
/// queue size ahead, then resets the device. virtiofsd's vring worker spins on the bad
/// index and never answers GET_VRING_BASE, and vhost's connection retries a read
/// that timed out forever; now a watchdog of the device's own closes the connection
/// at the deadline, the device ends virtiofsd and the share fails, and the guest goes
/// on. The seeds then attack the share at random.
#[test]
fn hostile_guests_do_not_bring_down_the_monitor_through_virtio_fs() {
    if !virtiofsd_installed() {
        return;
    }
    let machine = Machine::new(true);
    let wedge = Plan {
        target: Some(hostile::FS),
        avail_jumps: true,
        ..Plan::new(SEEDS[0], 2_000)
    };
    let plans = SEEDS.map(|seed| Plan {
        target: Some(hostile::FS),
        ..Plan::new(seed, EMU_ITERATIONS)
    });
    for plan in std::iter::once(wedge).chain(plans) {
        let run = machine.run("emu", plan);
        assert_survived(&machine, "emu", plan, &run);
    }
}
