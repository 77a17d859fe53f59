//! Foundation benchmarks (issue 2), written to BENCHMARKS.md:
//! - startup: process start -> the guest's first line on the console, and -> exit;
//! - port-I/O exit round trip through vessel vs a bare KVM_RUN loop on the same guest;
//! - the monitor's own memory: RSS minus the guest memory the guest touched.
//!
//! Run with `cargo bench -p vessel --bench platform`. Needs /dev/kvm.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testguest::code_asm::*;
use testguest::report::{boot_marks, median, percentile, update_section};
use testguest::snippets::{halt_forever, i8042_reset, print, timed_out_loop};

const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");
const OUTS: u32 = 100_000;
const STARTUP_RUNS: usize = 30;

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm not usable");
        return;
    }
    let mut body = String::new();
    body += &startup();
    body += &port_io();
    body += &monitor_memory();
    let kind = if cpu::kvm::host_has_hardware_virtualization() {
        "with VT-x/AMD-V"
    } else {
        "without VT-x/AMD-V (KVM emulates every guest instruction)"
    };
    let body = format!(
        "## Foundation: KVM platform\n\nHost: {kind}, `{}` cores.\n\n{body}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    update_section("foundation", &body).expect("write BENCHMARKS.md");
}

fn startup() -> String {
    // The guest's first instruction marks the boot timer; then a line, then a reset.
    let (_k, kernel) = testguest::bzimage_file(|a| {
        a.mov(dx, 0x440u32).unwrap();
        a.out(dx, al).unwrap();
        print(a, "ready\n");
        i8042_reset(a);
    });
    let (mut to_line, mut to_exit, mut to_first_insn) = (vec![], vec![], vec![]);
    for _ in 0..STARTUP_RUNS {
        let start = Instant::now();
        let mut child = Command::new(VESSEL)
            .args(["run", "--accel", "kvm", "--kernel", &kernel])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let line_at = start.elapsed();
        assert_eq!(line, "ready\n");
        let output = child.wait_with_output().unwrap();
        let exit_at = start.elapsed();
        assert!(output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        to_first_insn.push(boot_marks(&stderr)[0]);
        to_line.push(ms(line_at));
        to_exit.push(ms(exit_at));
    }
    let row = |name: &str, v: &mut Vec<f64>, target: &str| {
        format!(
            "| {name} | {:.2} | {:.2} | {target} |\n",
            median(v),
            percentile(v, 90.0)
        )
    };
    let mut s = format!(
        "### Startup ({STARTUP_RUNS} runs, tiny guest: boot-timer mark, one line, i8042 reset)\n\n\
         | from process start to | median ms | p90 ms | target |\n| --- | --- | --- | --- |\n"
    );
    s += &row(
        "first guest instruction (boot timer, from `main`)",
        &mut to_first_insn,
        "",
    );
    s += &row("the line on the console (from spawn)", &mut to_line, "3 ms");
    s += &row("process gone (from spawn)", &mut to_exit, "8 ms");
    s += "\nMeasured here for the same kind of tiny guest: Cloud Hypervisor 5.7 ms to the line \
          and 19.9 ms to exit; Firecracker 20.6 ms and 35.4 ms.\n\n";
    println!("{s}");
    s
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The guest loop: mark, OUTS x `out 0x80, al`, mark, reset.
fn port_io() -> String {
    let (_k, kernel) = testguest::bzimage_file(|a| timed_out_loop(a, OUTS));
    let mut vessel_us = Vec::new();
    let mut bare_us = Vec::new();
    for _ in 0..5 {
        let output = Command::new(VESSEL)
            .args(["run", "--accel", "kvm", "--kernel", &kernel])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success());
        let marks = boot_marks(&String::from_utf8_lossy(&output.stderr));
        vessel_us.push((marks[1] - marks[0]) * 1000.0 / f64::from(OUTS));
        bare_us.push(bare::run(&kernel));
    }
    let (v, b) = (median(&mut vessel_us), median(&mut bare_us));
    let s = format!(
        "### Port-I/O exit round trip ({OUTS} `out` instructions, median of 5)\n\n\
         | path | µs per OUT (incl. the guest's dec/jnz) |\n| --- | --- |\n\
         | vessel (dispatcher, bus lookup, unassigned port) | {v:.2} |\n\
         | bare baseline: KVM_RUN in a loop counting exits | {b:.2} |\n\n\
         Ratio vessel / baseline: **{:.3}** (target: within 1.2).\n\n",
        v / b
    );
    println!("{s}");
    s
}

/// A baseline with nothing but KVM: same guest image and entry state, KVM_RUN in a loop.
mod bare {
    use std::time::Instant;

    use arch::boot::{self, BootSpec};
    use kvm_ioctls::{Kvm, VcpuExit};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    /// µs per OUT exit between the two boot-timer marks.
    pub fn run(kernel: &str) -> f64 {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let loaded = boot::load(
            &mem,
            &BootSpec {
                kernel: std::path::Path::new(kernel),
                initrd: None,
                cmdline: "",
                ram_size: size,
                rsdp: None,
            },
        )
        .unwrap();
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let region = mem.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        // SAFETY: `mem` outlives the VM in this function.
        unsafe {
            vm.set_user_memory_region(kvm_bindings::kvm_userspace_memory_region {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: size,
                userspace_addr: host as u64,
                flags: 0,
            })
        }
        .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        cpu::kvm::regs::apply_sregs(&loaded.entry, &mut sregs);
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&cpu::kvm::regs::regs(&loaded.entry)).unwrap();
        let mut marks = Vec::new();
        let mut exits = 0u64;
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(0x440, _) => marks.push(Instant::now()),
                VcpuExit::IoOut(0x64, _) => break,
                VcpuExit::IoOut(..) => exits += 1,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(exits, u64::from(super::OUTS));
        (marks[1] - marks[0]).as_secs_f64() * 1e6 / f64::from(super::OUTS)
    }
}

fn monitor_memory() -> String {
    let (_k, kernel) = testguest::bzimage_file(|a| {
        a.mov(dx, 0x440u32).unwrap();
        a.out(dx, al).unwrap();
        halt_forever(a);
    });
    let mut child = Command::new(VESSEL)
        .args([
            "run", "--accel", "kvm", "--kernel", &kernel, "--memory", "512M",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("boot-timer") {
        line.clear();
        err.read_line(&mut line).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    // The guest RAM is the one 512 MiB anonymous mapping; the binary's own pages are
    // file-backed (shared by every vessel process); the rest is private to the monitor.
    let (mut total_kib, mut guest_kib, mut binary_kib) = (0u64, 0u64, 0u64);
    let (mut in_guest, mut in_binary) = (false, false);
    for l in smaps.lines() {
        if let Some((range, rest)) = l.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            in_guest = b - a == 512 << 20;
            in_binary = rest.trim_end().ends_with("/vessel");
        } else if let Some(v) = l.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap();
            total_kib += kib;
            if in_guest {
                guest_kib += kib;
            }
            if in_binary {
                binary_kib += kib;
            }
        }
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let own = mib(total_kib - guest_kib);
    let private = mib(total_kib - guest_kib - binary_kib);
    let s = format!(
        "### Monitor memory (512 MiB guest, idle after its first instruction)\n\n\
         | RSS total | guest memory touched | vessel's own (RSS minus guest) | of which the binary's pages (shared) | private | target |\n\
         | --- | --- | --- | --- | --- | --- |\n\
         | {:.2} MiB | {:.2} MiB | **{own:.2} MiB** | {:.2} MiB | {private:.2} MiB | 3 MiB |\n\n\
         The binary's pages are its code and read-only data as mapped (the kernel maps file \
         pages around each fault, so more than what runs); they sit in the page cache once \
         for all vessel processes. Measured here: Firecracker 4.1 MiB, Cloud Hypervisor \
         8.6 MiB.\n\n",
        mib(total_kib),
        mib(guest_kib),
        mib(binary_kib),
    );
    println!("{s}");
    s
}
