//! The monitor's confinement (issue 17), written to BENCHMARKS.md ("seccomp"):
//! - the system calls each thread class may make, beside Firecracker's;
//! - what the sandbox costs: a tiny guest's start-up (process start to exit) and a
//!   port-I/O exit round trip (every exit on KVM is a KVM_RUN system call the filter
//!   sees), with nothing, seccomp, and seccomp with the jail (`vessel run --sandbox`),
//!   in the same run, in turn.
//!
//! Run with `cargo bench -p vessel --bench sandbox`.

use std::process::{Command, Stdio};
use std::time::Instant;

use sandbox::ThreadClass;
use testguest::report::{boot_marks, median, update_section};
use testguest::snippets::{i8042_reset, print, timed_out_loop};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const RUNS: usize = 11;
const OUTS: u32 = 100_000;

fn main() {
    // Every process vessel leaves behind (the launcher, a child that closes the KVM VM)
    // becomes ours when its parent exits, so a run ends when they are all gone.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut body = String::from("## The sandbox: the monitor's system calls, and their cost\n\n");
    body += &counts();
    let backends: Vec<&str> = if std::fs::File::open("/dev/kvm").is_ok() {
        vec!["kvm", "emu"]
    } else {
        vec!["emu"]
    };
    body += &startup(&backends);
    body += &exits(&backends);
    update_section("seccomp", &body).expect("write BENCHMARKS.md");
}

fn counts() -> String {
    let firecracker = |c: ThreadClass| match c {
        ThreadClass::Vmm => "~50 (VMM thread)",
        ThreadClass::Vcpu => "27",
        _ => "",
    };
    let mut s = String::from(
        "### System calls allowed per thread class\n\n\
         Counted from vessel's lists (`crates/sandbox/src/seccomp/lists.rs`: the runtime's \
         common set plus the class's own). Firecracker's figures for x86_64 as issue 17 \
         quotes them (its API thread: 31). vessel's VMM class holds every other class's \
         calls, since every thread starts under its filter; its main and API threads \
         also rebuild VMs on reboot, take snapshots and serve the guest agent.\n\n\
         | class | vessel | Firecracker |\n| --- | --- | --- |\n",
    );
    for c in ThreadClass::ALL {
        s += &format!(
            "| {} | {} | {} |\n",
            c.name(),
            sandbox::seccomp::lists::allowed(c).len(),
            firecracker(c)
        );
    }
    s + &format!(
        "\nNever allowed to any class: {} calls (exec, fork, ptrace, mount, namespaces, \
         credentials, BPF, modules, io_uring, ...).\n\n",
        sandbox::seccomp::lists::NEVER.len()
    )
}

/// The confinements compared: their names and `vessel run` options.
const MODES: [(&str, &[&str]); 3] = [
    ("none", &["--seccomp", "off"]),
    ("seccomp", &["--seccomp", "on"]),
    ("seccomp + jail", &["--seccomp", "on", "--sandbox"]),
];

fn run(accel: &str, kernel: &str, mode: &[&str]) -> (f64, String) {
    let start = Instant::now();
    let out = Command::new(VESSEL)
        .args(["run", "--accel", accel, "--net", "none", "--kernel", kernel])
        .args(mode)
        .stdin(Stdio::null())
        .output()
        .expect("spawn vessel");
    // SAFETY: waitpid on any child, with a null status pointer, until there is none.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    assert!(out.status.success(), "{out:?}");
    (elapsed, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn startup(backends: &[&str]) -> String {
    let (_k, kernel) = testguest::bzimage_file(|a| {
        print(a, "ready\n");
        i8042_reset(a);
    });
    let mut s = format!(
        "### Start-up: process start to exit, a guest that prints a line and resets \
         (median of {RUNS}, the modes in turn)\n\n{}",
        header("ms")
    );
    for accel in backends {
        let figures = compare(|mode| run(accel, &kernel, mode).0);
        s += &row(accel, &figures, 1);
    }
    println!("{s}");
    s + "\nWith seccomp on, every thread compiles and installs its filters as it starts, \
         and a KVM VM also starts a launcher (a confined process may not fork the child \
         that otherwise closes the VM after vessel exits; the launcher keeps the VM and \
         closes it when it dies with vessel). The jail adds a fork into a PID namespace \
         (the first process waits outside), the mount namespace with its tmpfs root, \
         bind mounts, device nodes and /proc, pivot_root, the dropped identity and \
         Landlock. Each run ends when every process vessel made is gone (the bench is \
         their subreaper): a launcher, or the child that closes a KVM VM after vessel \
         exits without one, counts; KVM's teardown of the VM (8-24 ms here) is in every \
         KVM figure.\n\n"
}

/// A table's header for figures in `unit`.
fn header(unit: &str) -> String {
    let names: Vec<&str> = MODES.iter().map(|m| m.0).collect();
    format!(
        "| backend | {} ({unit}) | {} / none | {} / none |\n| --- | --- | --- | --- | --- | --- |\n",
        names.join(&format!(" ({unit}) | ")),
        names[1],
        names[2]
    )
}

/// The median of `measure` per mode, the modes taken in turn RUNS times.
fn compare(mut measure: impl FnMut(&[&str]) -> f64) -> [f64; 3] {
    let mut all: [Vec<f64>; 3] = Default::default();
    for _ in 0..RUNS {
        for (i, (_, mode)) in MODES.iter().enumerate() {
            all[i].push(measure(mode));
        }
    }
    all.map(|mut v| median(&mut v))
}

fn row(accel: &str, f: &[f64; 3], digits: usize) -> String {
    format!(
        "| {accel} | {:.digits$} | {:.digits$} | {:.digits$} | **{:.3}** | **{:.3}** |\n",
        f[0],
        f[1],
        f[2],
        f[1] / f[0],
        f[2] / f[0]
    )
}

/// µs per `out` between the two boot-timer marks.
fn per_exit(stderr: &str) -> f64 {
    let marks = boot_marks(stderr);
    (marks[1] - marks[0]) * 1000.0 / f64::from(OUTS)
}

fn exits(backends: &[&str]) -> String {
    let (_k, kernel) = testguest::bzimage_file(|a| timed_out_loop(a, OUTS));
    let mut s = format!(
        "### Port-I/O exit round trip ({OUTS} `out` instructions to an unassigned port, \
         median of {RUNS}, the modes in turn)\n\n{}",
        header("µs per exit")
    );
    for accel in backends {
        let figures = compare(|mode| per_exit(&run(accel, &kernel, mode).1));
        s += &row(accel, &figures, 3);
    }
    println!("{s}");
    s + "\nOn KVM every exit is a KVM_RUN system call through the vCPU's filter; on the \
         software CPU an exit to an unassigned port makes no system call at all.\n"
}
