//! Encapsulation: VMs saved to files and brought back. An assembled guest counting in
//! memory is snapshotted mid-run, its monitor killed, and continued in a new process
//! (emu and KVM); the kit's Linux is suspended and started again; a tree of snapshots
//! with a branch; clones; and every kind of bad snapshot refused in one line.

mod common;

use common::home::Home;

use std::path::{Path, PathBuf};
use std::time::Duration;

use testguest::snippets::{COUNT_AT, counter};

/// A guest that counts in memory at [`COUNT_AT`] and prints every count.
fn counting_guest() -> (tempfile::TempPath, String) {
    testguest::bzimage_file(|a| counter(a, 20_000))
}

/// The complete `count N` lines of `text`, in order.
fn counts(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .filter(|n| n.len() == 8)
        .filter_map(|n| u32::from_str_radix(n, 16).ok())
        .collect()
}

fn count_in_memory(snapshot: &Path) -> u32 {
    let mem = std::fs::read(snapshot.join("memory")).unwrap();
    let at = COUNT_AT as usize;
    u32::from_le_bytes(mem[at..at + 4].try_into().unwrap())
}

fn counting_continues(accel: &str) {
    let home = Home::new();
    let (_k, kernel) = counting_guest();
    home.ok(&[
        "create", "g", "--kernel", &kernel, "--memory", "64M", "--accel", accel, "--net", "none",
    ]);
    home.ok(&["start", "g"]);
    home.wait_count("g", 20);
    home.ok(&["snapshot", "g", "s1"]);
    home.kill_monitor("g");
    let before = home.log("g");
    let c = count_in_memory(&home.vm_dir("g").join("snapshots/s1"));
    home.ok(&["snapshot", "restore", "g", "s1"]);
    home.ok(&["start", "g"]);
    let mark = before.len();
    let log = home.wait_log("g", mark, &format!("count {:08x}\n", c + 10));
    let after = counts(&log[mark..]);
    let first = after[0];
    assert!(
        first == c || first == c + 1,
        "the count in memory was {c:#x}, the restored guest went on at {first:#x}"
    );
    for w in after.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "a gap or a repeat after the restore: {after:x?}"
        );
    }
    assert!(
        counts(&before).contains(&(first - 1)),
        "{:#x} was never printed before the snapshot",
        first - 1
    );
}

#[test]
fn a_counting_guest_goes_on_after_its_monitor_is_killed_on_emu() {
    counting_continues("emu");
}

#[test]
fn a_counting_guest_goes_on_after_its_monitor_is_killed_on_kvm() {
    if common::kvm_available() {
        counting_continues("kvm");
    }
}

/// The kit's Linux with its root on a copy of the kit's disk, a shell on the console.
fn kit_vm(home: &Home, name: &str) -> Option<()> {
    let kit = common::kit()?;
    let disk = home.path().join(format!("{name}.ext4"));
    disk::sparse_copy(&kit.rootfs, &disk).unwrap();
    let cmdline = format!("{} root=/dev/vda", kit::DEFAULT_CMDLINE);
    home.ok(&[
        "create",
        name,
        "--accel",
        "emu",
        "--net",
        "none",
        "--disk",
        &format!("path={}", disk.display()),
        "--cmdline",
        &cmdline,
    ]);
    home.ok(&["start", name]);
    home.wait_log(name, 0, "vessel:/# ");
    Some(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_suspended_linux_goes_on_where_it_was() {
    let home = Home::new();
    if kit_vm(&home, "lin").is_none() {
        return;
    }
    home.type_text(
        "lin",
        "sleep 1000 & i=0; while true; do i=$((i+1)); echo $i >> /appended; \
         echo tick=$i sh=$$ bg=$! up=$(cut -d. -f1 /proc/uptime) lines=$(wc -l < /appended) \
         date=$(date +%s); sleep 1; done\n",
    );
    let log = home.wait_log("lin", 0, "tick=3 ");
    let line = |log: &str| {
        log.lines()
            .rev()
            .find(|l| l.starts_with("tick=") && l.contains(" date="))
            .map(str::to_string)
            .unwrap()
    };
    let field = |l: &str, k: &str| -> u64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {l}"))
    };
    let before = line(&log);
    let out = home.ok(&["suspend", "lin"]);
    assert!(out.contains("suspended lin"), "{out}");
    let ls = home.ok(&["ls"]);
    assert!(ls.contains("suspended"), "{ls}");
    std::thread::sleep(Duration::from_secs(3));
    let mark = home.log("lin").len();
    home.ok(&["start", "lin"]);
    let tick = field(&before, "tick");
    let log = home.wait_log("lin", mark, &format!("tick={} ", tick + 3));
    let after = line(&log);
    let now = unix_now();
    for k in ["sh", "bg"] {
        assert_eq!(
            field(&before, k),
            field(&after, k),
            "{k}: {before} / {after}"
        );
    }
    assert!(
        field(&after, "up") > field(&before, "up"),
        "{before} / {after}"
    );
    assert!(
        field(&after, "lines") > field(&before, "lines"),
        "{before} / {after}"
    );
    let date = field(&after, "date") as f64;
    assert!(
        (now - date).abs() <= 1.5,
        "the guest's clock is {:.1} s off the host's after the suspend: {after}",
        now - date
    );
    // The background process is still the guest's.
    home.type_text(
        "lin",
        &format!("kill -0 {} && echo bg-alive\n", field(&after, "bg")),
    );
    home.wait_log("lin", mark, "bg-alive");
}

#[test]
fn a_tree_of_snapshots_branches() {
    let home = Home::new();
    if kit_vm(&home, "tree").is_none() {
        return;
    }
    let check = |home: &Home, want: &str| {
        let mark = home.log("tree").len();
        home.type_text(
            "tree",
            "echo state: $(test -e /A && echo A) $(test -e /B && echo B) end\n",
        );
        // The console echoes the command (which ends in " end" too): wait for the
        // answer's own line.
        let log = home.wait_log("tree", mark, "\nstate: ");
        let mut log = log;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let line = loop {
            if let Some(l) = log[mark..]
                .lines()
                .find(|l| l.starts_with("state:") && l.ends_with(" end"))
            {
                break l.to_string();
            }
            assert!(std::time::Instant::now() < deadline, "{}", &log[mark..]);
            std::thread::sleep(Duration::from_millis(20));
            log = home.log("tree");
        };
        let expect = format!("state: {want} end").replace("  ", " ");
        assert_eq!(line, expect, "{}", &log[mark..]);
    };
    let restart_at = |home: &Home, snap: &str| {
        home.ok(&["kill", "tree"]);
        home.ok(&["snapshot", "restore", "tree", snap]);
        home.ok(&["start", "tree"]);
    };
    home.ok(&["snapshot", "tree", "S1"]);
    home.type_text("tree", "echo a > /A; sync\n");
    home.ok(&["snapshot", "tree", "S2", "--description", "with A"]);
    restart_at(&home, "S1");
    check(&home, "");
    home.type_text("tree", "echo b > /B; sync\n");
    home.ok(&["snapshot", "tree", "S3"]);
    restart_at(&home, "S2");
    check(&home, "A");
    let ls = home.ok(&["snapshot", "ls", "tree"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert!(lines[0].starts_with("S1 (running"), "{ls}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  S2 (running") && l.contains("with A")),
        "{ls}"
    );
    assert!(lines.iter().any(|l| l.starts_with("  S3 (running")), "{ls}");
    assert!(
        ls.contains("S2")
            && ls
                .lines()
                .find(|l| l.contains("<- you are here"))
                .unwrap()
                .contains("S2"),
        "{ls}"
    );
    // Removing the root keeps its children.
    home.ok(&["snapshot", "rm", "tree", "S1"]);
    let json: serde_json::Value =
        serde_json::from_str(&home.ok(&["snapshot", "ls", "tree", "--json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["parent"].is_null()), "{json}");
}

#[test]
fn a_clone_runs_beside_its_source_with_new_macs() {
    let home = Home::new();
    let (_k, kernel) = counting_guest();
    home.ok(&[
        "create", "src", "--kernel", &kernel, "--memory", "64M", "--accel", "emu",
    ]);
    home.ok(&["start", "src"]);
    home.ok(&["snapshot", "src", "base"]);
    let out = home.ok(&["clone", "src", "copy", "--snapshot", "base"]);
    assert!(out.contains("cloned src to copy"), "{out}");
    home.ok(&["start", "copy"]);
    home.wait_log("copy", 0, "count 00000005\n");
    let mac = |name: &str| {
        let t = std::fs::read_to_string(home.vm_dir(name).join("vm.toml")).unwrap();
        t.split("mac=").nth(1).unwrap()[..17].to_string()
    };
    assert_ne!(mac("src"), mac("copy"));
    let ls = home.ok(&["ls"]);
    assert_eq!(ls.matches("running").count(), 2, "{ls}");
    // Each reads its own VM generation ID where the ACPI VMGENID device says.
    home.ok(&["snapshot", "copy", "now"]);
    let genid = |snap: PathBuf| {
        let mem = std::fs::read(snap.join("memory")).unwrap();
        let at = arch::layout::VMGENID_ADDR as usize;
        mem[at..at + 16].to_vec()
    };
    let (a, b) = (
        genid(home.vm_dir("src").join("snapshots/base")),
        genid(home.vm_dir("copy").join("snapshots/now")),
    );
    assert_ne!(a, b, "the clone has its source's VM generation ID");
    assert!(a.iter().any(|x| *x != 0) && b.iter().any(|x| *x != 0));
}

/// Writes a copy of `from` with `edit` applied to its state file's bytes.
fn edited(from: &Path, to: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["memory", "vm.toml"] {
        let _ = std::fs::copy(from.join(f), to.join(f));
    }
    let mut state = std::fs::read(from.join("state")).unwrap();
    edit(&mut state);
    std::fs::write(to.join("state"), state).unwrap();
}

#[test]
fn bad_snapshots_are_refused_in_one_line() {
    let home = Home::new();
    let (_k, kernel) = counting_guest();
    home.ok(&[
        "create", "g", "--kernel", &kernel, "--memory", "64M", "--accel", "emu", "--net", "none",
    ]);
    home.ok(&["start", "g"]);
    home.ok(&["snapshot", "g", "good"]);
    home.ok(&["kill", "g"]);
    let good = home.vm_dir("g").join("snapshots/good");
    let bad = home.path().join("bad");
    let run = |dir: &Path| {
        let mut c = common::vessel();
        c.args(["run", "--accel", "emu", "--restore"]).arg(dir);
        common::run_with_deadline(c, Duration::from_secs(30))
    };
    let one_line = |r: &common::Finished, needle: &str| {
        assert_eq!(r.code, Some(2), "{}", r.dump());
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
        assert!(r.stderr.contains(needle), "{needle:?}: {}", r.dump());
    };
    // Truncated.
    edited(&good, &bad.join("cut"), |s| s.truncate(s.len() / 2));
    one_line(&run(&bad.join("cut")), "the checksum does not match");
    // Edited by hand.
    edited(&good, &bad.join("hand"), |s| {
        let at = s.len() - 10;
        s[at] ^= 1;
    });
    one_line(&run(&bad.join("hand")), "the checksum does not match");
    // Another format.
    edited(&good, &bad.join("format"), |s| {
        let text = String::from_utf8_lossy(s).replacen("VESSEL-STATE 1\n", "VESSEL-STATE 99\n", 1);
        *s = text.into_bytes();
    });
    one_line(
        &run(&bad.join("format")),
        "state format 99, this vessel reads format 1",
    );
    // Not a state at all.
    edited(&good, &bad.join("junk"), |s| *s = b"hello".to_vec());
    one_line(&run(&bad.join("junk")), "not a vessel state file");
    // A memory file cut short.
    edited(&good, &bad.join("mem"), |_| {});
    std::fs::File::options()
        .write(true)
        .open(bad.join("mem/memory"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    one_line(&run(&bad.join("mem")), "the memory file holds 4096 bytes");
    // A missing memory file.
    edited(&good, &bad.join("nomem"), |_| {});
    std::fs::remove_file(bad.join("nomem/memory")).unwrap();
    one_line(
        &run(&bad.join("nomem")),
        "memory: No such file or directory",
    );
    // Unknown names.
    let (code, err) = home.refused(&["snapshot", "restore", "g", "nope"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("VM g has no snapshot named nope"), "{err}");
    let (_, err) = home.refused(&["snapshot", "g", "good"]);
    assert!(err.contains("has a snapshot named good already"), "{err}");
    // A snapshot whose disk copy went missing: refused, the VM's own disks untouched.
    let disk = home.path().join("d.raw");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    home.ok(&[
        "create",
        "h",
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--accel",
        "emu",
        "--net",
        "none",
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    home.ok(&["snapshot", "h", "cold"]);
    std::fs::write(&disk, vec![9u8; 1 << 20]).unwrap();
    std::fs::remove_file(home.vm_dir("h").join("snapshots/cold/disk0.raw")).unwrap();
    let (_, err) = home.refused(&["snapshot", "restore", "h", "cold"]);
    assert!(err.contains("disk0.raw"), "{err}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        vec![9u8; 1 << 20],
        "the disk was touched"
    );
    // A disk copy changed since the snapshot.
    home.ok(&["snapshot", "h", "warm"]);
    let copy = home.vm_dir("h").join("snapshots/warm/disk0.raw");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&copy, vec![1u8; 1 << 20]).unwrap();
    let (_, err) = home.refused(&["snapshot", "restore", "h", "warm"]);
    assert!(
        err.contains("changed since the snapshot was taken"),
        "{err}"
    );
    assert_eq!(std::fs::read(&disk).unwrap(), vec![9u8; 1 << 20]);
}

/// Snapshots `accel`'s counting guest and continues it with `vessel run --accel other`.
fn moves_between_backends(from: &str, to: &str, extra: &[&str]) -> common::Finished {
    let home = Home::new();
    let (_k, kernel) = counting_guest();
    let mut args = vec![
        "create", "g", "--kernel", &kernel, "--memory", "64M", "--accel", from, "--net", "none",
    ];
    args.extend_from_slice(extra);
    home.ok(&args);
    home.ok(&["start", "g"]);
    home.wait_count("g", 5);
    home.ok(&["snapshot", "g", "s1"]);
    home.ok(&["kill", "g"]);
    let snap = home.vm_dir("g").join("snapshots/s1");
    let c = count_in_memory(&snap);
    let mut cmd = common::vessel();
    cmd.args(["run", "--accel", to, "--restore"])
        .arg(&snap)
        .env("VESSEL_HOME", home.path());
    let r = common::run_until(
        cmd,
        &format!("count {:08x}\n", c + 5),
        Duration::from_secs(120),
    );
    if r.stdout.contains(&format!("count {:08x}\n", c + 5)) {
        let after = counts(&r.stdout);
        assert!(after[0] == c || after[0] == c + 1, "{c:#x} then {after:x?}");
        for w in after.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{after:x?}");
        }
    }
    r
}

#[test]
fn a_snapshot_taken_on_emu_goes_on_on_kvm() {
    if !common::kvm_available() {
        return;
    }
    let r = moves_between_backends("emu", "kvm", &[]);
    assert!(counts(&r.stdout).len() > 5, "{}", r.dump());
}

#[test]
fn a_snapshot_taken_on_kvm_goes_on_on_emu_with_the_portable_cpu() {
    if !common::kvm_available() {
        return;
    }
    let r = moves_between_backends("kvm", "emu", &["--cpu-model", "portable"]);
    assert!(counts(&r.stdout).len() > 5, "{}", r.dump());
}

/// A snapshot of a KVM guest that saw CPU features the software CPU cannot give is
/// refused on emu, naming them. Where this host's KVM shows its guests nothing emu
/// lacks (a KVM without hardware, as some of these hosts have), the snapshot is made to
/// say its guest saw AVX, as a guest on a host that passes AVX through would have.
#[test]
fn a_guest_that_saw_more_cpu_than_the_destination_has_is_refused_by_name() {
    if !common::kvm_available() {
        return;
    }
    let home = Home::new();
    let (_k, kernel) = counting_guest();
    home.ok(&[
        "create", "g", "--kernel", &kernel, "--memory", "64M", "--accel", "kvm", "--net", "none",
    ]);
    home.ok(&["start", "g"]);
    home.wait_count("g", 3);
    home.ok(&["snapshot", "g", "s1"]);
    home.ok(&["kill", "g"]);
    let snap = home.vm_dir("g").join("snapshots/s1");
    let mut state = vmm::snapshot::file::read_state(&snap).unwrap();
    let emu = cpu::emu::cpuid(0, 1, None);
    let mut missing = vmm::snapshot::convert::missing_features(&state.cpuid, &emu);
    if missing.is_empty() {
        eprintln!("this host's KVM shows its guests nothing emu lacks: the snapshot says AVX");
        let leaf1 = state.cpuid.iter_mut().find(|e| e.function == 1).unwrap();
        leaf1.ecx |= 1 << 28;
        let bytes = vmm::snapshot::file::encode_state(&state).unwrap();
        std::fs::write(snap.join(vmm::snapshot::file::STATE), bytes).unwrap();
        missing = vec!["avx"];
    }
    let mut cmd = common::vessel();
    cmd.args(["run", "--accel", "emu", "--restore"])
        .arg(&snap)
        .env("VESSEL_HOME", home.path());
    let r = common::run_until(cmd, "count", Duration::from_secs(60));
    assert_eq!(r.code, Some(2), "{}", r.dump());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
    let says = format!(
        "cannot restore on emu: the guest saw CPU features emu cannot give here: {}",
        missing.join(", ")
    );
    assert!(r.stderr.contains(&says), "{}", r.dump());
}

/// A linked clone of a snapshot copies no disk: its disk is a qcow2 overlay on the
/// snapshot's. The kit's Linux writes into the clone's disk; the clone reads its own
/// write back after a restart, the source and the snapshot still read theirs, and the
/// snapshot cannot be removed while the clone exists.
#[test]
fn a_linked_clone_writes_over_its_snapshot_and_leaves_it_as_it_was() {
    let Some(kit) = common::kit() else { return };
    let home = Home::new();
    let data = home.path().join("data.img");
    let mut bytes = b"base-data\n".to_vec();
    bytes.resize(8 << 20, 0);
    std::fs::write(&data, &bytes).unwrap();
    let read = "head -c 11 /dev/vda";
    let write =
        "echo clone-wrote | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; head -c 11 /dev/vda";
    let cmdline = |script: &str| kit::cmdline("", Some(script));
    let disk = format!("path={}", data.display());
    home.create_kit_vm("src", &kit, read, &["--disk", &disk]);
    home.ok(&["snapshot", "src", "base"]);
    // Without a snapshot to share: refused in one line.
    let (_, err) = home.refused(&["clone", "src", "lc", "--linked"]);
    assert!(err.contains("give --snapshot NAME"), "{err}");
    let out = home.ok(&["clone", "src", "lc", "--snapshot", "base", "--linked"]);
    assert!(out.contains("linked to snapshot base"), "{out}");
    let overlay = home.vm_dir("lc").join("disk0.qcow2");
    assert!(
        std::fs::metadata(&overlay).unwrap().len() < 1 << 20,
        "the clone's disk is an overlay, not a copy"
    );
    // Boots the VM to its command's end and waits for it to stop.
    let boot = |name: &str, from: usize| {
        home.ok(&["start", name]);
        let log = home.wait_log(name, from, "VESSEL-KIT: exit status");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while home.state_in_ls(name) != "stopped" {
            assert!(std::time::Instant::now() < deadline, "{name} does not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        log
    };
    home.ok(&["set", "lc", &format!("cmdline={}", cmdline(write))]);
    let log = boot("lc", 0);
    assert!(log.contains("clone-wrote"), "{log}");
    home.ok(&["set", "lc", &format!("cmdline={}", cmdline(read))]);
    let again = boot("lc", log.len());
    assert!(again[log.len()..].contains("clone-wrote"), "{again}");
    let src = boot("src", 0);
    assert!(
        src.contains("base-data") && !src.contains("clone-wrote"),
        "{src}"
    );
    // The snapshot's copy of the disk is byte for byte what it was.
    let base_disks: Vec<Vec<u8>> = std::fs::read_dir(home.vm_dir("src").join("snapshots/base"))
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.len() == 8 << 20))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(base_disks.len(), 1);
    assert!(base_disks[0] == bytes, "the snapshot's disk changed");
    let (_, err) = home.refused(&["snapshot", "rm", "src", "base"]);
    assert!(err.contains("linked clones (lc)"), "{err}");
    home.ok(&["rm", "lc"]);
    home.ok(&["snapshot", "rm", "src", "base"]);
}
