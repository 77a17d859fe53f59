//! The software CPU against QEMU's (TCG) in the same run (issue 4), written to
//! BENCHMARKS.md:
//! - Linux boot to init: the kit's kernel and initramfs, time from spawning the VMM to
//!   the init's marker line on the serial console; vessel `--accel emu` (PVH vmlinux
//!   and bzImage) vs `qemu-system-x86_64 -accel tcg -M pc -cpu max` (bzImage);
//! - MIPS on a tight integer loop, the same PVH guest on both; two loop lengths, so the
//!   start-up cost cancels out of the rate;
//! - work in the guest (issue 19): the kit's busybox running `gzip -9` over 64 MiB and
//!   `md5sum` and `sha256sum` over 256 MiB, timed between marker lines the guest prints
//!   around each job (their output must be the same on both).
//!
//! Run with `cargo bench -p vessel --bench emu`. Needs qemu-system-x86_64 and the kit.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use testguest::code_asm::*;
use testguest::report::{median, update_section};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const QEMU: &str = "qemu-system-x86_64";
const BOOTS: usize = 5;

fn main() {
    if Command::new(QEMU).arg("--version").output().is_err() {
        eprintln!("skipped: {QEMU} not installed (apt-get install qemu-system-x86)");
        return;
    }
    let dir = kit::default_cache_dir().expect("kit dir");
    let kit =
        kit::locate(&dir).unwrap_or_else(|| kit::build(&kit::KitOptions::default()).expect("kit"));
    let mut body = String::from("## Software CPU (`--accel emu`) against QEMU TCG\n\n");
    body += &boot(&kit);
    body += &mips();
    body += &guest_work(&kit);
    update_section("emu", &body).expect("write BENCHMARKS.md");
}

/// Spawns `cmd` with nothing on stdin, its stdout read line by line.
fn spawn_reading(mut cmd: Command) -> (Child, std::io::Lines<BufReader<ChildStdout>>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, out)
}

/// Spawns `cmd` and returns the time until a stdout line contains `marker` (then kills it).
fn time_to_line(cmd: Command, marker: &str, deadline: Duration) -> Option<f64> {
    let start = Instant::now();
    let (mut child, out) = spawn_reading(cmd);
    let mut found = None;
    for line in out {
        let Ok(line) = line else { break };
        if line.contains(marker) {
            found = Some(start.elapsed().as_secs_f64());
            break;
        }
        if start.elapsed() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

/// vessel on the software CPU booting the kit's `kernel` with `cmdline`.
fn vessel_kit(
    kit: &kit::Kit,
    kernel: &std::path::Path,
    jit: &str,
    cmdline: &str,
    memory: &str,
) -> Command {
    let mut c = Command::new(VESSEL);
    c.env("VESSEL_JIT", jit)
        .args(["run", "--accel", "emu", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--cmdline", cmdline, "--memory", memory]);
    c
}

/// QEMU's TCG booting the kit's bzImage with `cmdline`.
fn qemu_kit(kit: &kit::Kit, cmdline: &str, memory: &str) -> Command {
    let mut c = Command::new(QEMU);
    c.args(["-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", memory])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&kit.bzimage)
        .arg("-initrd")
        .arg(&kit.initrd)
        .args(["-append", cmdline]);
    c
}

fn boot(kit: &kit::Kit) -> String {
    let cmdline = kit::cmdline("", Some("true"));
    let vessel =
        |kernel: &std::path::Path, jit: &str| vessel_kit(kit, kernel, jit, &cmdline, "512M");
    let qemu = || qemu_kit(kit, &cmdline, "512M");
    let deadline = Duration::from_secs(300);
    let (mut pvh, mut bz, mut q) = (Vec::new(), Vec::new(), Vec::new());
    let mut interp = Vec::new();
    for _ in 0..BOOTS {
        q.extend(time_to_line(qemu(), kit::INIT_MARKER, deadline));
        pvh.extend(time_to_line(
            vessel(&kit.vmlinux, "on"),
            kit::INIT_MARKER,
            deadline,
        ));
        bz.extend(time_to_line(
            vessel(&kit.bzimage, "on"),
            kit::INIT_MARKER,
            deadline,
        ));
        interp.extend(time_to_line(
            vessel(&kit.vmlinux, "off"),
            kit::INIT_MARKER,
            deadline,
        ));
    }
    let row = |name: &str, v: &mut Vec<f64>, q: f64| {
        if v.is_empty() {
            return format!("| {name} | did not reach init | |\n");
        }
        let m = median(v);
        format!("| {name} | {m:.2} | {:.2}x |\n", m / q)
    };
    let qm = median(&mut q.clone());
    let mut s = format!(
        "### Linux boot to init (median of {BOOTS}; kit kernel {}, 512 MiB, 1 vCPU)\n\n\
         From spawning the VMM to `{}` on the serial console. Command line: `{cmdline}`.\n\n\
         | VMM | seconds | vessel / QEMU |\n| --- | --- | --- |\n",
        kit.kernel_version,
        kit::INIT_MARKER
    );
    s += &format!("| QEMU TCG `-M pc -cpu max`, bzImage (via SeaBIOS) | {qm:.2} | 1.00x |\n");
    s += &row("vessel `--accel emu`, PVH vmlinux", &mut pvh, qm);
    s += &row(
        "vessel `--accel emu`, bzImage (64-bit entry, decompresses itself)",
        &mut bz,
        qm,
    );
    s += &row(
        "vessel `--accel emu`, PVH vmlinux, interpreter only (`VESSEL_JIT=off`)",
        &mut interp,
        qm,
    );
    s += "\nTargets: within 10x of QEMU TCG (issue 4); at most 0.7x with the translating \
          tier (issue 19).\n\n";
    s += &translated_share("the boot to init and power-off", vessel(&kit.vmlinux, "on"));
    println!("{s}");
    s
}

/// One run of `cmd` (vessel) to its end with `--stats`: the share of the guest
/// instructions that ran as translated code, as a line for BENCHMARKS.md.
fn translated_share(what: &str, mut cmd: Command) -> String {
    let out = cmd
        .arg("--stats")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("run vessel");
    let stats = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| -> Option<f64> {
        let at = stats.find(&format!(" {name}="))? + name.len() + 2;
        let digits: String = stats[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    match (field("translated_instructions"), field("instructions")) {
        (Some(t), Some(all)) if all > 0.0 => format!(
            "Share of guest instructions run translated ({what}, one run): **{:.1}%** \
             ({:.2e} of {:.2e}).\n\n",
            100.0 * t / all,
            t,
            all
        ),
        _ => format!("Share run translated ({what}): no statistics from vessel.\n\n"),
    }
}

/// A PVH guest: `n` iterations of a 5-instruction integer loop, then an exit.
fn loop_guest(n: u32, exit: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    testguest::pvh_elf(&testguest::assemble(32, testguest::PVH_ENTRY, |a| {
        let mut lp = a.create_label();
        a.mov(ecx, n).unwrap();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut lp).unwrap();
        a.add(eax, ecx).unwrap();
        a.xor(eax, 0x5555u32).unwrap();
        a.shl(eax, 1u32).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(lp).unwrap();
        exit(a);
    }))
}

#[derive(Clone, Copy, PartialEq)]
enum Runner {
    Qemu,
    /// vessel with `VESSEL_JIT` set to this.
    Vessel(&'static str),
}

fn mips() -> String {
    // Lengths sized so the long run takes seconds on each.
    let lengths = |who: Runner| match who {
        Runner::Vessel("off") => (10_000_000u32, 60_000_000u32),
        _ => (200_000_000u32, 2_000_000_000u32),
    };
    let run = |n: u32, who: Runner| -> f64 {
        let t0 = Instant::now();
        if let Runner::Vessel(jit) = who {
            let g = loop_guest(n, testguest::snippets::acpi_power_off);
            let (_t, p) = testguest::temp_path(&g);
            let out = Command::new(VESSEL)
                .env("VESSEL_JIT", jit)
                .args(["run", "--accel", "emu", "--memory", "64M", "--kernel"])
                .arg(&p)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            // QEMU's isa-debug-exit device ends QEMU when the guest writes to its port.
            let g = loop_guest(n, |a| {
                a.mov(al, 0u32).unwrap();
                a.out(0xf4u32, al).unwrap();
            });
            let (_t, p) = testguest::temp_path(&g);
            let out = Command::new(QEMU)
                .args([
                    "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "64M", "-display", "none",
                ])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-kernel"])
                .arg(&p)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(1),
                "QEMU did not exit through isa-debug-exit"
            );
        }
        t0.elapsed().as_secs_f64()
    };
    let rate = |who: Runner| {
        let (short, long) = lengths(who);
        let insns = f64::from(long - short) * 5.0;
        let mut v: Vec<f64> = (0..3)
            .map(|_| insns / (run(long, who) - run(short, who)) / 1e6)
            .collect();
        median(&mut v)
    };
    let q = rate(Runner::Qemu);
    let t = rate(Runner::Vessel("on"));
    let v = rate(Runner::Vessel("off"));
    let s = format!(
        "### Tight integer loop (5 instructions per iteration, 32-bit PVH guest)\n\n\
         MIPS from the difference between a long and a short run of the same loop (start-up \
         cancels out; 200M vs 2,000M iterations, the interpreter 10M vs 60M), median of 3.\n\n\
         | VMM | MIPS |\n| --- | --- |\n| QEMU TCG (JIT) | {q:.0} |\n\
         | vessel `--accel emu` (translating tier, the default) | {t:.0} |\n\
         | vessel `--accel emu`, interpreter only (`VESSEL_JIT=off`) | {v:.0} |\n\n\
         vessel / QEMU: **{:.2}** with the translating tier (target 1.0), {:.3} interpreted.\n\n",
        t / q,
        v / q
    );
    println!("{s}");
    s
}

/// The in-guest jobs: a name, and the shell command timed (the files are made before).
const JOBS: &[(&str, &str)] = &[
    ("`gzip -9` of 64 MiB of text", "gzip -9 -c /tmp/t | md5sum"),
    ("`md5sum` of 256 MiB", "md5sum /tmp/z"),
    ("`sha256sum` of 256 MiB", "sha256sum /tmp/z"),
];

/// The guest's script: make the files, then each job between `WORK-n-start` and
/// `WORK-n-end` lines (the jobs' output between them).
fn work_script() -> String {
    // Numbers as text (about 0.8 MB) doubled to 64 MiB: quick to make in the guest, and
    // as much work for gzip as 64 MiB of distinct numbers (it repeats far beyond gzip's
    // 32 KiB window).
    let mut s = String::from(
        "seq 1 120000 > /tmp/s; \
         for i in 1 2 3 4 5 6 7; do cat /tmp/s /tmp/s > /tmp/s2; mv /tmp/s2 /tmp/s; done; \
         head -c 67108864 /tmp/s > /tmp/t; rm /tmp/s; \
         dd if=/dev/zero of=/tmp/z bs=1M count=256 2>/dev/null; ",
    );
    for (n, (_, job)) in JOBS.iter().enumerate() {
        s += &format!("echo WORK-{n}-start; {job}; echo WORK-{n}-end; ");
    }
    s
}

/// Each job's seconds (between its two marker lines as they reach the host) and what
/// it printed; None where the run ended before the job did.
fn work_times(cmd: Command) -> Vec<Option<(f64, String)>> {
    let (mut child, out) = spawn_reading(cmd);
    let mut done = vec![None; JOBS.len()];
    let mut open: Option<(usize, Instant, String)> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    for line in out {
        let Ok(line) = line else { break };
        let line = line.trim().to_string();
        let marker = line.strip_prefix("WORK-").and_then(|m| m.split_once('-'));
        match (marker, &mut open) {
            (Some((n, "start")), _) => {
                open = n.parse().ok().map(|n| (n, Instant::now(), String::new()));
            }
            (Some((_, "end")), Some((n, t, said))) => {
                done[*n] = Some((t.elapsed().as_secs_f64(), std::mem::take(said)));
                if *n + 1 == JOBS.len() {
                    break;
                }
                open = None;
            }
            (None, Some((_, _, said))) => *said += &line,
            _ => {}
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    done
}

fn guest_work(kit: &kit::Kit) -> String {
    let cmdline = kit::cmdline("", Some(&work_script()));
    const RUNS: usize = 3;
    let collect = |make: &dyn Fn() -> Command, runs: usize| -> Vec<Vec<(f64, String)>> {
        let mut per_job = vec![Vec::new(); JOBS.len()];
        for _ in 0..runs {
            for (k, r) in work_times(make()).into_iter().enumerate() {
                per_job[k].extend(r);
            }
        }
        per_job
    };
    let q = collect(&|| qemu_kit(kit, &cmdline, "1G"), RUNS);
    let t = collect(
        &|| vessel_kit(kit, &kit.vmlinux, "on", &cmdline, "1G"),
        RUNS,
    );
    let i = collect(&|| vessel_kit(kit, &kit.vmlinux, "off", &cmdline, "1G"), 1);
    let med = |v: &[(f64, String)]| {
        let mut s: Vec<f64> = v.iter().map(|r| r.0).collect();
        (!s.is_empty()).then(|| median(&mut s))
    };
    let cell = |v: Option<f64>| v.map_or("did not finish".into(), |x| format!("{x:.2}"));
    let mut s = format!(
        "### Work in the guest (kit kernel {}, busybox, 1 GiB, 1 vCPU; median of {RUNS}, \
         the interpreter once)\n\n\
         Seconds between the marker lines the guest prints around each job (the files are \
         made before, untimed). QEMU: `-M pc -cpu max`, bzImage; vessel: PVH vmlinux.\n\n\
         | job | QEMU TCG s | vessel s | vessel / QEMU speed | interpreter only s |\n\
         | --- | --- | --- | --- | --- |\n",
        kit.kernel_version
    );
    for (k, (name, _)) in JOBS.iter().enumerate() {
        // The same output everywhere, or the figures mean nothing.
        let outputs: Vec<&String> = q[k]
            .iter()
            .chain(&t[k])
            .chain(&i[k])
            .map(|r| &r.1)
            .collect();
        assert!(
            outputs.windows(2).all(|w| w[0] == w[1]),
            "{name}: the runs printed different things: {outputs:?}"
        );
        let (qm, tm) = (med(&q[k]), med(&t[k]));
        let speed = match (qm, tm) {
            (Some(a), Some(b)) => format!("**{:.2}x**", a / b),
            _ => "-".into(),
        };
        s += &format!(
            "| {name} | {} | {} | {speed} | {} |\n",
            cell(qm),
            cell(tm),
            cell(med(&i[k]))
        );
    }
    s += "\nTarget (issue 19): at least 1.0x QEMU's speed for each.\n\n";
    s += &translated_share(
        "the boot, making the files and the three jobs",
        vessel_kit(kit, &kit.vmlinux, "on", &cmdline, "1G"),
    );
    println!("{s}");
    s
}
