//! How far the kit's Linux kernel gets on KVM with and without vessel's interpreter
//! taking over where KVM's emulator gives up (issue 3), written to BENCHMARKS.md: the
//! last kernel log line, its timestamp, the wall time, why the VM stopped and the
//! fallbacks by mnemonic.
//!
//! On a host with VT-x/AMD-V both runs reach user space in about a second. On the
//! hosts of HOST.md (no hardware virtualization) KVM emulates every guest instruction,
//! so the run with the fallback takes minutes: `VESSEL_BENCH_KVM_DEADLINE_S` bounds it
//! (default 1800 s).
//!
//! Run with `cargo bench -p vessel --bench kvm_reach`. Needs /dev/kvm and the kit.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testguest::report::update_section;

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
/// `noxsave`: the kernel command line, not CPUID, is what keeps the kernel off XSAVE
/// features here; earlyprintk shows the early boot.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 cryptomgr.notests noxsave";
/// After the options: what init runs once user space is reached.
const COMMAND: &str = "-- \"echo linux-reached-userspace\"";
/// Linux's feature numbers (word * 32 + bit) for SSE3, PCLMULQDQ, SSSE3, FMA, SSE4.1,
/// SSE4.2, MOVBE, AES, RDRAND (CPUID 1 ECX, word 4) and BMI1, BMI2, RDSEED, ADX, SHA
/// (CPUID 7 EBX, word 9): the extensions the interpreter does not run.
const CLEAR_UNEMULATED: &str = "clearcpuid=128,129,137,140,147,148,150,153,158,291,296,306,307,317";

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm not usable");
        return;
    }
    let dir = kit::default_cache_dir().expect("kit dir");
    let kit =
        kit::locate(&dir).unwrap_or_else(|| kit::build(&kit::KitOptions::default()).expect("kit"));
    let deadline = Duration::from_secs(
        std::env::var("VESSEL_BENCH_KVM_DEADLINE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1800),
    );
    let without = reach(&kit, false, "", deadline);
    eprintln!("without fallback: {without:?}");
    let with = reach(&kit, true, "", deadline);
    eprintln!("with fallback: {with:?}");
    let cleared = reach(&kit, true, CLEAR_UNEMULATED, deadline);
    eprintln!("with fallback and clearcpuid: {cleared:?}");
    let host = if cpu::kvm::host_has_hardware_virtualization() {
        "with VT-x/AMD-V"
    } else {
        "without VT-x/AMD-V: KVM emulates every guest instruction"
    };
    let body = format!(
        "## Linux on KVM: how far the kit kernel gets, with and without the fallback\n\n\
         Host: {host}. The kit's PVH vmlinux and initramfs, `--accel kvm --stats`, \
         command line `{CMDLINE} {COMMAND}`; each run is bounded by {} s.\n\n\
         | run | wall time | last kernel log line | why it stopped |\n\
         | --- | --- | --- | --- |\n{}{}{}\n\
         Interpreter fallbacks: {} (fallback on); {} (with `clearcpuid`).\n\n\
         The third run adds `{CLEAR_UNEMULATED}`: SSE3, SSSE3, SSE4, AES, PCLMULQDQ, MOVBE, \
         RDRAND, BMI, ADX, RDSEED, SHA, which neither KVM's emulator nor vessel's \
         interpreter runs.\n",
        deadline.as_secs(),
        without.row("`--no-kvm-fallback`"),
        with.row("fallback on (default)"),
        cleared.row("fallback on, `clearcpuid`"),
        with.fallbacks,
        cleared.fallbacks,
    );
    update_section("kvm-reach", &body).expect("write BENCHMARKS.md");
}

#[derive(Debug)]
struct Reach {
    wall: Duration,
    last_line: String,
    reached_userspace: bool,
    /// The kernel's panic line, if it panicked (its last lines are the panic's trailer).
    panic: Option<String>,
    /// The kernel finished booting and ran /init.
    init_started: bool,
    stopped: String,
    fallbacks: String,
}

impl Reach {
    fn row(&self, run: &str) -> String {
        let last = if self.reached_userspace {
            "user space: `linux-reached-userspace`".to_string()
        } else if self.init_started {
            format!(
                "`Run /init as init process`, then `{}`",
                self.last_line.replace('|', "\\|")
            )
        } else {
            format!("`{}`", self.last_line.replace('|', "\\|"))
        };
        let stopped = match &self.panic {
            Some(panic) => format!("{} after `{panic}`", self.stopped),
            None => self.stopped.clone(),
        };
        format!(
            "| {run} | {:.1} min | {last} | {} |\n",
            self.wall.as_secs_f64() / 60.0,
            stopped.replace('|', "\\|")
        )
    }
}

fn reach(kit: &kit::Kit, fallback: bool, extra: &str, deadline: Duration) -> Reach {
    let mut cmd = Command::new(VESSEL);
    cmd.args(["run", "--accel", "kvm", "--stats", "--memory", "512M"])
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", &format!("{CMDLINE} {extra} {COMMAND}")]);
    if !fallback {
        cmd.arg("--no-kvm-fallback");
    }
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let last_line = Arc::new(Mutex::new(String::new()));
    let reached = Arc::new(Mutex::new(false));
    let panic = Arc::new(Mutex::new(None));
    let init_started = Arc::new(Mutex::new(false));
    let stdout = child.stdout.take().unwrap();
    let out = {
        let (last_line, reached) = (last_line.clone(), reached.clone());
        let (panic, init_started) = (panic.clone(), init_started.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end().to_string();
                if line == "linux-reached-userspace" {
                    *reached.lock().unwrap() = true;
                }
                if line.contains("Run /init as init process") {
                    *init_started.lock().unwrap() = true;
                }
                let mut panic = panic.lock().unwrap();
                if panic.is_none() && line.contains("Kernel panic - not syncing") {
                    *panic = line.split("] ").nth(1).map(str::to_string);
                }
                // The last line before a panic says more than the panic's trailer.
                if line.starts_with('[') && panic.is_none() {
                    *last_line.lock().unwrap() = line;
                }
            }
        })
    };
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let timed_out = loop {
        if child.try_wait().expect("wait").is_some() {
            break false;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = start.elapsed();
    let _ = out.join();
    let stderr = err.join().unwrap_or_default();
    let stat = |prefix: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or("not reported")
            .trim()
            .to_string()
    };
    let stopped = if timed_out {
        format!("still running at the {} s deadline", deadline.as_secs())
    } else {
        stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("vessel: ") && !l.starts_with("vessel: stats:"))
            .unwrap_or("no message")
            .trim_start_matches("vessel: ")
            .to_string()
    };
    let last_line = last_line.lock().unwrap().clone();
    let reached_userspace = *reached.lock().unwrap();
    let panic = panic.lock().unwrap().clone();
    let init_started = *init_started.lock().unwrap();
    Reach {
        wall,
        last_line,
        reached_userspace,
        panic,
        init_started,
        stopped,
        fallbacks: stat("vessel: stats: interpreter fallbacks:"),
    }
}
