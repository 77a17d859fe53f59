//! Performance isolation through the real CLI, monitors and cgroups: CPU-bound tiny
//! guests on the software CPU, their CPU time read back from their cgroups (`vessel
//! info --json`). Shares split one host CPU, a cap holds, shares change live,
//! reservations pass admission or are refused; without the rights to cgroups, a VM
//! that asks for controls is refused in one line.
//!
//! The CPU measurements run one after the other in one test: two tests splitting the
//! host's CPUs at once would measure each other.

mod common;

use std::time::{Duration, Instant};

use common::home::Home;
use testguest::snippets;

/// A guest that never stops computing (and prints a count now and then).
fn busy_kernel() -> (tempfile::TempPath, String) {
    testguest::bzimage_file(|a| snippets::counter(a, 20_000_000))
}

/// A home whose VMs' cgroups are apart from any other test's (`vessel/NAME` would be
/// shared between homes), all removed at the end.
struct CgroupHome {
    home: Option<Home>,
    parent: String,
}

impl std::ops::Deref for CgroupHome {
    type Target = Home;
    fn deref(&self) -> &Home {
        self.home.as_ref().unwrap()
    }
}

impl CgroupHome {
    /// The VMs' cgroups under the home's parent (v1's `cpu` hierarchy, or v2's).
    fn cgroups(&self) -> Vec<String> {
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu").join(&self.parent);
        let v2 = std::path::Path::new("/sys/fs/cgroup").join(&self.parent);
        let dir = if v1.is_dir() { v1 } else { v2 };
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for CgroupHome {
    fn drop(&mut self) {
        // The home kills its monitors; then their cgroups can go.
        drop(self.home.take());
        for controller in ["cpu", "cpuacct", ""] {
            let dir = std::path::Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&self.parent);
            for vm in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(vm.path());
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn home() -> CgroupHome {
    let home = Home::new();
    let parent = format!(
        "vessel-test-{}",
        home.path().file_name().unwrap().to_string_lossy()
    );
    std::fs::write(
        home.path().join("host.toml"),
        format!("cgroup_parent = \"{parent}\"\n"),
    )
    .unwrap();
    CgroupHome {
        home: Some(home),
        parent,
    }
}

fn create(home: &Home, name: &str, kernel: &str, extra: &[&str]) {
    let mut args = vec![
        "create", name, "--kernel", kernel, "--memory", "32M", "--accel", "emu", "--net", "none",
    ];
    args.extend(extra);
    home.ok(&args);
}

/// CPU seconds the VM's cgroup has used.
fn cpu_seconds(home: &Home, name: &str) -> f64 {
    let info: serde_json::Value =
        serde_json::from_str(&home.ok(&["info", name, "--json"])).unwrap();
    info["cgroup"]["cpu_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no cgroup usage for {name}: {info}"))
}

/// A request to the VM's monitor on its control socket: the whole answer.
fn request(home: &Home, name: &str, method: &str, what: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let sock = home.vm_dir(name).join("control.sock");
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} /v1/vms/{name}/{what} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The monitor's Prometheus metrics.
fn metrics(home: &Home, name: &str) -> String {
    request(home, name, "GET", "metrics", "")
}

fn post(home: &Home, name: &str, what: &str, body: &str) -> String {
    request(home, name, "POST", what, body)
}

/// CPU each VM used over `window`, as a fraction of one host CPU.
fn cpu_over(home: &Home, names: &[&str], window: Duration) -> Vec<f64> {
    let before: Vec<f64> = names.iter().map(|n| cpu_seconds(home, n)).collect();
    let start = Instant::now();
    std::thread::sleep(window);
    let after: Vec<f64> = names.iter().map(|n| cpu_seconds(home, n)).collect();
    let secs = start.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) / secs)
        .collect()
}

fn split(home: &Home, a: &str, b: &str) -> f64 {
    let u = cpu_over(home, &[a, b], Duration::from_secs(3));
    eprintln!("{a} {:.3} CPUs, {b} {:.3} CPUs", u[0], u[1]);
    u[0] / (u[0] + u[1])
}

#[test]
fn shares_split_one_cpu_70_30_a_cap_holds_and_shares_change_live() {
    if !common::is_root() {
        return;
    }
    let home = home();
    let (_k, kernel) = busy_kernel();
    create(
        &home,
        "web",
        &kernel,
        &["--cpu-shares", "700", "--cpu-affinity", "0"],
    );
    // The API's CPU settings reach the cgroups from a monitor without the jail only
    // (a jailed one, as "web", leaves them to `vessel set`).
    create(
        &home,
        "backup",
        &kernel,
        &[
            "--cpu-shares",
            "300",
            "--cpu-affinity",
            "0",
            "--sandbox",
            "off",
        ],
    );
    home.ok(&["start", "web"]);
    home.ok(&["start", "backup"]);
    home.wait_count("web", 1);
    home.wait_count("backup", 1);
    let web = split(&home, "web", "backup");
    assert!((web - 0.70).abs() <= 0.05, "700:300 gave web {web:.3}");
    let info = home.ok(&["info", "web"]);
    assert!(
        info.contains("cpu       cpu_shares=700 cpu_affinity=0"),
        "{info}"
    );
    assert!(info.contains("cgroup    "), "{info}");

    // Live: equal shares, and within a second the split is even.
    // This change through the monitor's API (`vessel set` does the cap below).
    let answer = post(
        &home,
        "backup",
        "settings",
        r#"{"settings": ["cpu_shares=700"]}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(home.ok(&["info", "backup"]).contains("cpu_shares=700"));
    std::thread::sleep(Duration::from_secs(1));
    let web = split(&home, "web", "backup");
    assert!((web - 0.50).abs() <= 0.05, "700:700 gave web {web:.3}");
    home.ok(&["kill", "backup"]);
    let left = home.cgroups();
    assert!(
        left.len() == 1 && left[0].starts_with("web."),
        "the VMs' cgroups: {left:?}"
    );

    // A cap of half a CPU, alone on its CPU: through `vessel set`, the jailed web's
    // monitor refusing it through its API.
    let answer = post(
        &home,
        "web",
        "settings",
        r#"{"settings": ["cpu_limit=0.5"]}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    assert!(answer.contains("changes through `vessel set`"), "{answer}");
    home.ok(&["set", "web", "cpu_limit=0.5"]);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_over(&home, &["web"], Duration::from_secs(3))[0];
    assert!((used - 0.5).abs() <= 0.025, "capped at 0.5, used {used:.3}");
    let info: serde_json::Value =
        serde_json::from_str(&home.ok(&["info", "web", "--json"])).unwrap();
    assert!(
        info["cgroup"]["throttled_seconds"].as_f64().unwrap() > 0.5,
        "{info}"
    );
    let metrics = metrics(&home, "web");
    let throttled = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vessel_cgroup_throttled_seconds_total{vm=\"web\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(throttled.is_some_and(|t| t > 0.5), "{metrics}");
    home.ok(&["kill", "web"]);
    assert_eq!(
        home.cgroups(),
        Vec::<String>::new(),
        "a stopped VM leaves no cgroup"
    );
}

#[test]
fn reservations_pass_admission_or_are_refused() {
    let home = home();
    let (_k, kernel) = busy_kernel();
    let cpus = std::thread::available_parallelism().unwrap().get();
    // More than the host has: refused at create.
    let (code, err) = home.refused(&[
        "create",
        "big",
        "--kernel",
        &kernel,
        "--cpu-reservation",
        &(cpus + 1).to_string(),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("must be above 0 and at most {cpus} CPUs")),
        "{err}"
    );
    // Bad values: one line each.
    for (flag, value, says) in [
        ("--cpu-shares", "1", "must be 2 to 262144"),
        ("--cpu-limit", "0", "must be 0.01 to"),
        ("--cpu-affinity", "0-", "not a CPU number"),
        ("--cpu-affinity", "4095", "not a CPU number"),
    ] {
        let (_, err) = home.refused(&["create", "bad", "--kernel", &kernel, flag, value]);
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
    if !common::is_root() {
        return;
    }
    // Three quarters of the host's CPUs reserved, then a VM that wants half: refused,
    // and it fits once the first has stopped.
    let r = cpus as f64 * 0.75;
    // Busy guests kept off CPU 0, where the shares test measures.
    let last = (cpus - 1).to_string();
    let off0 = ["--cpu-affinity", last.as_str()];
    create(
        &home,
        "db",
        &kernel,
        &[&off0[..], &["--cpu-reservation", &r.to_string()]].concat(),
    );
    let half = (cpus as f64 / 2.0).to_string();
    create(
        &home,
        "etl",
        &kernel,
        &[&off0[..], &["--cpu-reservation", &half]].concat(),
    );
    home.ok(&["start", "db"]);
    let (code, err) = home.refused(&["start", "etl"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("it reserves {half} CPUs")), "{err}");
    // A live increase that does not fit is refused too, and changes nothing.
    home.ok(&["set", "etl", "cpu_reservation=0.1"]);
    home.ok(&["start", "etl"]);
    let (_, err) = home.refused(&["set", "etl", &format!("cpu_reservation={half}")]);
    assert!(err.contains("not reserved"), "{err}");
    assert!(home.ok(&["info", "etl"]).contains("cpu_reservation=0.1"));
    home.ok(&["kill", "db"]);
    home.ok(&["kill", "etl"]);
    // A cap above one CPU starts (the monitor, inside its cap, still sees the host's
    // CPUs when it checks vm.toml).
    let cap = (cpus as f64 - 0.5).to_string();
    create(
        &home,
        "wide",
        &kernel,
        &[&off0[..], &["--cpu-limit", &cap]].concat(),
    );
    home.ok(&["start", "wide"]);
    home.ok(&["kill", "wide"]);
}

/// Without the rights to cgroups: a VM that asks for shares is refused in one line; one
/// that asks for nothing starts, and its log says once that it has no controls.
#[test]
fn without_rights_to_cgroups_controls_are_refused_in_one_line() {
    if !common::is_root() {
        return;
    }
    let home = home();
    let (_k, kernel) = busy_kernel();
    // The home and the kernel must be reachable by the unprivileged user.
    common::sh(&format!(
        "chmod -R a+rwX {} && chmod a+r {kernel}",
        home.path().display()
    ));
    let nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_vessel"))
            .args(args)
            .env("VESSEL_HOME", home.path());
        common::run_with_deadline(cmd, Duration::from_secs(60))
    };
    let r = nobody(&[
        "create",
        "capped",
        "--kernel",
        &kernel,
        "--memory",
        "32M",
        "--accel",
        "emu",
        "--net",
        "none",
        "--cpu-limit",
        "0.5",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let r = nobody(&["start", "capped"]);
    assert_eq!(r.code, Some(1), "{}", r.dump());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
    assert!(
        r.stderr.contains("capped: cgroup controls:") && r.stderr.contains("need root"),
        "{}",
        r.dump()
    );
    let r = nobody(&[
        "create", "plain", "--kernel", &kernel, "--memory", "32M", "--accel", "emu", "--net",
        "none",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let r = nobody(&["start", "plain"]);
    assert_eq!(r.code, Some(0), "{}", r.dump());
    let log = std::fs::read_to_string(home.vm_dir("plain").join("monitor.log")).unwrap_or_default();
    assert_eq!(
        log.matches("runs without cgroup controls").count(),
        1,
        "{log}"
    );
    let r = nobody(&["kill", "plain"]);
    assert_eq!(r.code, Some(0), "{}", r.dump());
}
