//! The monitor's confinement (issue 17), written to BENCHMARKS.md ("seccomp"):
//! - the system calls each thread class may make, beside Firecracker's;
//! - what the filters cost: a tiny guest's start-up (process start to exit) and a
//!   port-I/O exit round trip (every exit on KVM is a KVM_RUN system call the filter
//!   sees), with `--seccomp on` against `--seccomp off` in the same run, alternating.
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
    let mut body = String::from("## Seccomp: the monitor's system calls, and their cost\n\n");
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

fn run(accel: &str, kernel: &str, seccomp: &str) -> (f64, String) {
    let start = Instant::now();
    let out = Command::new(VESSEL)
        .args(["run", "--accel", accel, "--net", "none", "--kernel", kernel])
        .args(["--seccomp", seccomp])
        .stdin(Stdio::null())
        .output()
        .expect("spawn vessel");
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
         (median of {RUNS}, on and off alternating)\n\n\
         | backend | seccomp on (ms) | off (ms) | on / off |\n| --- | --- | --- | --- |\n"
    );
    for accel in backends {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            on.push(run(accel, &kernel, "on").0);
            off.push(run(accel, &kernel, "off").0);
        }
        let (on, off) = (median(&mut on), median(&mut off));
        s += &format!("| {accel} | {on:.1} | {off:.1} | **{:.3}** |\n", on / off);
    }
    println!("{s}");
    s + "\nWith seccomp on, every thread compiles and installs its filters as it starts, \
         and a KVM VM also starts a launcher (a confined process may not fork the child \
         that otherwise closes the VM after vessel exits; the launcher keeps the VM and \
         closes it when it dies with vessel).\n\n"
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
         median of {RUNS}, on and off alternating)\n\n\
         | backend | seccomp on (µs per exit) | off | on / off |\n| --- | --- | --- | --- |\n"
    );
    for accel in backends {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            on.push(per_exit(&run(accel, &kernel, "on").1));
            off.push(per_exit(&run(accel, &kernel, "off").1));
        }
        let (on, off) = (median(&mut on), median(&mut off));
        s += &format!("| {accel} | {on:.3} | {off:.3} | **{:.3}** |\n", on / off);
    }
    println!("{s}");
    s + "\nOn KVM every exit is a KVM_RUN system call through the vCPU's filter; on the \
         software CPU an exit to an unassigned port makes no system call at all.\n"
}
