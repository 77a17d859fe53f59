//! Memory across VMs (issue 15): the balloon takes memory from a running kit Linux and
//! gives it back, pages the guest frees go back to the host (free page reporting), and
//! two identical guests offered to KSM share pages. All on the software CPU, the figures
//! read from the monitor (`vessel info --json`) and the guest.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::home::Home;

const IDLE: &str = "while :; do sleep 1; done";

/// A running kit VM with `extra` options (balloon, disks...), its agent up.
fn kit_vm(home: &Home, name: &str, memory: &str, extra: &[&str]) -> Option<()> {
    let kit = common::kit()?;
    home.create_kit_vm_of(name, &kit, memory, IDLE, extra);
    home.ok(&["start", name]);
    home.wait_log(name, 0, kit::AGENT_MARKER);
    Some(())
}

fn sh(home: &Home, name: &str, script: &str) -> String {
    let out = common::vessel()
        .env("VESSEL_HOME", home.path())
        .args(["exec", name, "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn memory(home: &Home, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&home.ok(&["info", name, "--json"])).unwrap();
    v["live"]["memory"].clone()
}

fn rss_mib(home: &Home, name: &str) -> u64 {
    memory(home, name)["rss_bytes"].as_u64().unwrap() >> 20
}

/// Waits up to `secs` for `check` on the VM's memory figures; returns the last ones.
fn wait_memory(
    home: &Home,
    name: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = memory(home, name);
        if check(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: {m}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// MemAvailable in the guest, MiB.
fn available_mib(home: &Home, name: &str) -> u64 {
    let out = sh(home, name, "grep MemAvailable /proc/meminfo");
    out.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        >> 10
}

#[test]
fn the_balloon_takes_memory_from_a_running_guest_and_gives_it_back() {
    let home = Home::new();
    // A disk the guest reads into its page cache: memory it has touched and can give up.
    let disk = home.path().join("cache.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(400 << 20)
        .unwrap();
    let disk_spec = format!("path={},readonly=on", disk.display());
    if kit_vm(&home, "b", "512M", &["--balloon", "--disk", &disk_spec]).is_none() {
        return;
    }
    sh(&home, "b", "dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null");
    let (rss_before, avail_before) = (rss_mib(&home, "b"), available_mib(&home, "b"));
    assert!(
        rss_before > 250,
        "the page cache is in the monitor's memory: {rss_before} MiB"
    );

    home.ok(&["set", "b", "balloon=128M"]);
    let m = wait_memory(&home, "b", 60, "the guest filled the balloon", |m| {
        m["balloon"]["actual_bytes"].as_u64() == Some(128 << 20)
    });
    assert!(
        m["balloon"]["inflated_bytes"].as_u64().unwrap() >= 128 << 20,
        "{m}"
    );
    let (rss_in, avail_in) = (rss_mib(&home, "b"), available_mib(&home, "b"));
    assert!(
        avail_in + 100 <= avail_before,
        "the guest's available memory: {avail_before} -> {avail_in} MiB"
    );
    assert!(
        rss_in + 100 <= rss_before,
        "the monitor's RSS: {rss_before} -> {rss_in} MiB"
    );
    // The guest's statistics came through the stats queue.
    assert!(
        m["balloon"]["guest_total_bytes"].as_u64().unwrap() > 400 << 20,
        "{m}"
    );

    home.ok(&["set", "b", "balloon=0"]);
    wait_memory(&home, "b", 60, "the guest emptied the balloon", |m| {
        m["balloon"]["actual_bytes"].as_u64() == Some(0)
    });
    let avail_after = available_mib(&home, "b");
    assert!(
        avail_after >= avail_in + 100,
        "given back: {avail_in} -> {avail_after} MiB"
    );
    // Nothing is kept in vm.toml: the balloon's size is the running VM's.
    let toml = std::fs::read_to_string(home.vm_dir("b").join("vm.toml")).unwrap();
    assert!(toml.contains("balloon = true"), "{toml}");
    let (code, err) = home.refused(&["set", "b", "balloon=600M"]);
    assert_eq!(code, Some(1), "{err}");
    home.ok(&["stop", "b"]);
    let (code, err) = home.refused(&["set", "b", "balloon=64M"]);
    assert!(err.contains("running"), "{code:?} {err}");
}

#[test]
fn pages_the_guest_frees_go_back_to_the_host() {
    let home = Home::new();
    if kit_vm(&home, "r", "512M", &["--balloon"]).is_none() {
        return;
    }
    sh(
        &home,
        "r",
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=200 2>/dev/null",
    );
    let full = rss_mib(&home, "r");
    let reported = memory(&home, "r")["balloon"]["reported_bytes"]
        .as_u64()
        .unwrap();
    sh(&home, "r", "rm /dev/shm/fill");
    // The guest reports free 2 MiB blocks about two seconds after they are freed.
    let m = wait_memory(&home, "r", 60, "the freed pages went back", |m| {
        (m["rss_bytes"].as_u64().unwrap() >> 20) + 150 <= full
    });
    assert!(
        m["balloon"]["reported_bytes"].as_u64().unwrap() >= reported + (150 << 20),
        "{m}"
    );
    home.ok(&["stop", "r"]);
}

/// KSM's knobs, put back as they were when the test ends.
struct Ksm {
    run: String,
    pages_to_scan: String,
}

impl Ksm {
    const DIR: &str = "/sys/kernel/mm/ksm";

    fn start() -> Option<Ksm> {
        let read = |f: &str| std::fs::read_to_string(format!("{}/{f}", Self::DIR)).ok();
        let saved = Ksm {
            run: read("run")?,
            pages_to_scan: read("pages_to_scan")?,
        };
        // A faster scan than the default's 100 pages every 20 ms, for the test's sake.
        std::fs::write(format!("{}/pages_to_scan", Self::DIR), "5000").ok()?;
        Some(saved)
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{}/run", Self::DIR), &self.run);
        let _ = std::fs::write(format!("{}/pages_to_scan", Self::DIR), &self.pages_to_scan);
    }
}

#[test]
fn two_identical_guests_share_pages_through_ksm() {
    if !common::is_root() {
        assert!(
            std::env::var("VESSEL_REQUIRE_KVM").is_err(),
            "VESSEL_REQUIRE_KVM=1 but KSM needs root"
        );
        eprintln!("skipped: turning KSM on needs root");
        return;
    }
    let home = Home::new();
    let Some(_ksm) = Ksm::start() else {
        eprintln!("skipped: this host has no KSM");
        return;
    };
    for name in ["k1", "k2"] {
        if kit_vm(&home, name, "256M", &["--memory-merge"]).is_none() {
            return;
        }
    }
    home.ok(&["host", "ksm", "on"]);
    let status: serde_json::Value =
        serde_json::from_str(&home.ok(&["host", "ksm", "status", "--json"])).unwrap();
    assert_eq!(status["running"], true, "{status}");
    for name in ["k1", "k2"] {
        let m = wait_memory(&home, name, 120, "pages merged", |m| {
            m["ksm_merging_pages"].as_u64().unwrap_or(0) > 1000
        });
        eprintln!("{name}: {} pages merged", m["ksm_merging_pages"]);
    }
    let info = home.ok(&["info", "k1"]);
    assert!(info.contains("pages merged"), "{info}");
    // Merging needs private memory: a VM with shared memory cannot ask for it.
    let (code, err) = home.refused(&[
        "create",
        "k3",
        "--memory-merge",
        "--memory-backing",
        "shared",
        "--net",
        "none",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("private"), "{err}");
}

#[test]
fn cold_pages_are_compressed_and_come_back_bit_identical() {
    let home = Home::new();
    if kit_vm(&home, "z", "1G", &["--memory-compress", "--balloon"]).is_none() {
        return;
    }
    let settled = |what: &str| {
        // Two readings a few seconds apart that agree within 8 MiB: the scanner is done.
        let mut last = rss_mib(&home, "z");
        for _ in 0..40 {
            std::thread::sleep(Duration::from_secs(2));
            let now = rss_mib(&home, "z");
            if now.abs_diff(last) <= 8 {
                return now;
            }
            last = now;
        }
        panic!("{what}: the monitor's RSS never settled");
    };
    let before = settled("idle");
    // 256 MiB of compressible data, every page different (its number, then text), so a
    // page brought back in the wrong place changes the checksum; then idle.
    let sum = sh(
        &home,
        "z",
        "awk 'BEGIN { t = sprintf(\"%4088s\", \"\"); gsub(/ /, \"x\", t); \
         for (p = 0; p < 65536; p++) printf \"%08d%s\", p, t }' > /dev/shm/data; \
         md5sum /dev/shm/data; ls -l /dev/shm/data",
    );
    let (sum, size) = sum.split_once('\n').unwrap();
    assert!(size.contains(" 268435456 "), "{size}");
    let after = settled("after the fill");
    let m = memory(&home, "z");
    let c = &m["compression"];
    assert!(
        after <= before + 128,
        "256 MiB written: the monitor's RSS went {before} -> {after} MiB ({c})"
    );
    assert!(c["pages"].as_u64().unwrap() * 4096 >= 128 << 20, "{c}");
    assert!(
        c["bytes"].as_u64().unwrap() * 4 <= c["pages"].as_u64().unwrap() * 4096,
        "compressed at least 4:1: {c}"
    );
    // Read back through faults: bit-identical.
    let faults = c["faults"].as_u64().unwrap();
    let again = sh(&home, "z", "md5sum /dev/shm/data");
    assert_eq!(again.trim_end(), sum);
    let m = memory(&home, "z");
    assert!(
        m["compression"]["faults"].as_u64().unwrap() > faults + 10_000,
        "{m}"
    );
    // Pages the guest frees (and reports) leave the cache without coming back.
    let m = memory(&home, "z");
    let (pages, faults) = (
        m["compression"]["pages"].as_u64().unwrap(),
        m["compression"]["faults"].as_u64().unwrap(),
    );
    sh(&home, "z", "rm /dev/shm/data");
    let m = wait_memory(&home, "z", 60, "freed pages dropped from the cache", |m| {
        m["compression"]["pages"].as_u64().unwrap() + (32 << 20) / 4096 <= pages
    });
    assert!(
        m["compression"]["faults"].as_u64().unwrap() < faults + 2048,
        "dropped, not decompressed: {m}"
    );
    home.ok(&["stop", "z"]);
}

/// The memory cgroup's limit in the overcommit test, MiB: less than the two guests'
/// 1 GiB, more than two idle ones hold.
const LIMIT: u64 = 450;

/// A cgroup v1 memory group of the test's own with a limit; its processes are killed and
/// it is removed at the end.
struct MemoryGroup(std::path::PathBuf);

impl MemoryGroup {
    fn new(name: &str, limit: u64) -> Option<MemoryGroup> {
        let dir = std::path::Path::new("/sys/fs/cgroup/memory")
            .join(format!("vessel-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let g = MemoryGroup(dir);
        std::fs::write(g.0.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        Some(g)
    }

    fn peak_mib(&self) -> u64 {
        std::fs::read_to_string(self.0.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
            >> 20
    }

    fn ooms(&self) -> u64 {
        std::fs::read_to_string(self.0.join("memory.oom_control"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) of a process this test put in its group.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What one run of the overcommit test saw: per guest, whether it still answers and
/// its monitor's log; the cgroup's OOM kills.
struct Overcommit {
    alive: Vec<bool>,
    logs: Vec<String>,
    ooms: u64,
}

/// The balloon targets a governor set under pressure, in order (MiB), from its log.
fn inflations(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("memory pressure"))
        .filter_map(|l| l.split_once("-> ")?.1.strip_suffix(" MiB")?.parse().ok())
        .collect()
}

/// Two kit guests of 512 MiB in a memory cgroup whose limit is smaller than their
/// memory fill their page caches with 384 MiB each, one after the other: which of them
/// are still running and answering? With the techniques, the first to fill has a quarter
/// of the second's memory shares.
fn overcommitted(techniques: bool) -> Option<Overcommit> {
    let home = Home::new();
    let group = MemoryGroup::new(if techniques { "with" } else { "without" }, LIMIT << 20)?;
    let disk = home.path().join("cache.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(400 << 20)
        .unwrap();
    let disk_spec = format!("path={},readonly=on", disk.display());
    let guests = [("o0", "512"), ("o1", "2048")];
    let kit = common::kit()?;
    for (name, shares) in guests {
        let mut extra = vec!["--disk", &disk_spec];
        if techniques {
            extra.extend([
                "--balloon",
                "--memory-min",
                "128M",
                "--memory-compress=auto",
                "--memory-shares",
                shares,
            ]);
        }
        home.create_kit_vm_of(name, &kit, "512M", IDLE, &extra);
        // Started from inside the group: every page the monitor ever touches is charged
        // to it.
        let started = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {} start {name}",
                group.0.display(),
                env!("CARGO_BIN_EXE_vessel")
            ))
            .env("VESSEL_HOME", home.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(started.status.success(), "{started:?}");
        home.wait_log(name, 0, kit::AGENT_MARKER);
    }
    for (name, _) in guests {
        // 16 MiB a second, the disk kept open (its cache goes when it is closed): the
        // guest's page cache grows, and the host's memory with it.
        let _ = common::vessel()
            .env("VESSEL_HOME", home.path())
            .args(["exec", name, "--", "sh", "-c"])
            .arg(
                "(i=0; while [ $i -lt 24 ]; do dd bs=1M count=16 2>/dev/null; sleep 1; \
                 i=$((i+1)); done) < /dev/vda > /dev/null",
            )
            .stdin(Stdio::null())
            .output();
    }
    let alive = guests
        .iter()
        .map(|(name, _)| {
            common::vessel()
                .env("VESSEL_HOME", home.path())
                .args(["exec", name, "--timeout", "5", "--", "true"])
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    let logs: Vec<String> = guests
        .iter()
        .map(|(n, _)| {
            std::fs::read_to_string(home.vm_dir(n).join("monitor.log")).unwrap_or_default()
        })
        .collect();
    eprintln!(
        "{}: peak {} MiB of {LIMIT}, {} OOM kills, alive {alive:?}\n{}",
        if techniques { "with" } else { "without" },
        group.peak_mib(),
        group.ooms(),
        logs.concat()
    );
    Some(Overcommit {
        alive,
        logs,
        ooms: group.ooms(),
    })
}

#[test]
fn overcommitted_guests_survive_a_memory_limit_with_the_balloon_and_die_without() {
    if !common::is_root() || !std::path::Path::new("/sys/fs/cgroup/memory").is_dir() {
        assert!(
            std::env::var("VESSEL_REQUIRE_KVM").is_err(),
            "VESSEL_REQUIRE_KVM=1 but there is no cgroup v1 memory controller to use"
        );
        eprintln!("skipped: needs root and the cgroup v1 memory controller");
        return;
    }
    let Some(with) = overcommitted(true) else {
        return;
    };
    assert!(
        with.alive.iter().all(|&a| a),
        "with the balloon and the governor: {:?} ({} OOM kills)",
        with.alive,
        with.ooms
    );
    assert_eq!(with.ooms, 0);
    // Both governors saw the same pressure; the guest with a quarter of the shares gave
    // faster: each of its first steps (96 or 192 MiB, up to 384) took more than the
    // other's (24 or 48).
    let (low, high) = (inflations(&with.logs[0]), inflations(&with.logs[1]));
    assert!(!low.is_empty() && !high.is_empty(), "{:?}", with.logs);
    assert!(
        low.iter().zip(&high).take(7).all(|(l, h)| l > h),
        "balloon steps with 512 shares {low:?} MiB, with 2048 {high:?}"
    );
    let without = overcommitted(false).expect("the same host");
    assert!(
        without.alive.contains(&false) && without.ooms > 0,
        "without them the limit's OOM killer ends one: {:?}, {} OOM kills",
        without.alive,
        without.ooms
    );
}

#[test]
fn bad_memory_settings_are_refused_with_one_line() {
    let home = Home::new();
    for (args, says) in [
        (
            &["--memory-shares", "1"][..],
            "--memory-shares 1: must be 2 to 262144",
        ),
        (&["--memory-shares", "many"], "not a whole number"),
        (&["--memory-compress=sometimes"], "on, auto, or a size"),
        (&["--memory-min", "2G"], "more than the VM's 512 MiB"),
    ] {
        let mut all = vec!["create", "bad", "--net", "none"];
        all.extend(args);
        let (code, err) = home.refused(&all);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    home.ok(&["create", "good", "--net", "none", "--memory-shares", "300"]);
    let (_, err) = home.refused(&["set", "good", "memory_shares=0"]);
    assert!(err.contains("must be 2 to 262144"), "{err}");
    let toml = std::fs::read_to_string(home.vm_dir("good").join("vm.toml")).unwrap();
    assert!(toml.contains("memory_shares = 300"), "unchanged: {toml}");
}
