//! Networks with the kit's Linux on the software CPU: user-mode NAT through passt
//! (DHCP, DNS, a page from the host, a port forward), named networks between VMs
//! (DHCP from vessel's switch, 16 MiB across, isolation from other networks) — all run
//! as an unprivileged user — then a bridged VM (root), and passt killed under a running
//! guest.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(120);
const NOBODY: u32 = 65534;

fn required() -> bool {
    std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

fn skip(reason: &str) {
    assert!(!required(), "VESSEL_REQUIRE_KVM=1 but {reason}");
    eprintln!("skipped: {reason}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Where an unprivileged vessel runs from: the kit's kernel and initramfs copied where
/// any user can read them, and a VESSEL_HOME it owns.
struct Rootless {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Rootless {
    fn new() -> Option<Self> {
        if !have("passt") {
            skip("passt is not installed");
            return None;
        }
        let kit = common::kit()?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let kernel = dir.path().join("vmlinux");
        let initrd = dir.path().join("initrd.img");
        std::fs::copy(&kit.vmlinux, &kernel).unwrap();
        std::fs::copy(&kit.initrd, &initrd).unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        if is_root() {
            std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        Some(Rootless {
            dir,
            kernel,
            initrd,
        })
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `vessel ARGS` in this home, as nobody when we are root; must succeed.
    fn vessel(&self, args: &[&str]) -> String {
        let mut cmd = self.cli();
        cmd.args(args);
        let r = common::run_with_deadline(cmd, Duration::from_secs(30));
        assert_eq!(r.code, Some(0), "vessel {args:?}: {}", r.dump());
        r.stdout
    }

    /// `vessel run` of the kit with `script` after ` -- `, as nobody when we are root.
    fn command(&self, net: &[&str], cmdline_extra: &str, script: &str) -> Command {
        let mut cmd = self.cli();
        let cmdline = format!("{} {cmdline_extra} -- {script}", kit::DEFAULT_CMDLINE);
        cmd.args(["run", "--accel", "emu", "--memory", "256M"])
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd)
            .args(["--cmdline", &cmdline])
            .args(net.iter().flat_map(|n| ["--net", n]));
        cmd
    }

    /// The vessel binary in this home, as nobody when we are root.
    fn cli(&self) -> Command {
        let vessel = env!("CARGO_BIN_EXE_vessel");
        let mut cmd = if is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
                vessel,
            ]);
            c
        } else {
            Command::new(vessel)
        };
        cmd.env("VESSEL_HOME", self.home()).env("HOME", self.home());
        cmd
    }
}

/// A VM running in the background whose console output is collected.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
        let out = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Running { child, out }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until the output contains `what`; returns the output.
    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let t = self.text();
            if t.contains(what) {
                return t;
            }
            assert!(Instant::now() < deadline, "no {what:?} in:\n{t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the VM to end; returns its exit code and output.
    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                return (s.code(), self.text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the VM did not end:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// The address the kit's DHCP client got (`VESSEL-KIT: eth0 10.1.2.3/24`).
fn address(out: &str) -> Ipv4Addr {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(kit::ADDRESS_MARKER_PREFIX))
        .unwrap_or_else(|| panic!("no address in:\n{out}"));
    let ip = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    ip.parse().unwrap()
}

/// The host's default gateway, which passt maps to the host's loopback for the guest.
fn default_gateway() -> Option<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "default"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "via")?;
    words.next()?.parse().ok()
}

/// Serves `body` to every HTTP request on a loopback port; returns the port.
fn http_server(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// A DNS server on 127.0.0.1:53 that knows one name (root binds port 53).
fn dns_server(name: &'static str, answer: Ipv4Addr) -> Option<()> {
    let sock = UdpSocket::bind("127.0.0.1:53").ok()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            // The question name, label by label.
            let mut at = 12;
            let mut labels = Vec::new();
            while at < n && q[at] != 0 {
                let len = usize::from(q[at]);
                labels
                    .push(String::from_utf8_lossy(&q[at + 1..(at + 1 + len).min(n)]).into_owned());
                at += 1 + len;
            }
            let question_end = (at + 5).min(n);
            let qtype = u16::from_be_bytes([q[(at + 1).min(n - 1)], q[(at + 2).min(n - 1)]]);
            let known = labels.join(".") == name;
            let mut r = q[..question_end].to_vec();
            r[2] = 0x81;
            r[3] = if known { 0x80 } else { 0x83 };
            r[6..8].copy_from_slice(&u16::from(known && qtype == 1).to_be_bytes());
            if known && qtype == 1 {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(&answer.octets());
            }
            let _ = sock.send_to(&r, from);
        }
    });
    Some(())
}

#[test]
fn user_networking_without_root_gives_dhcp_dns_and_the_host() {
    let Some(r) = Rootless::new() else { return };
    let Some(gw) = default_gateway() else {
        skip("the host has no default route for passt to copy");
        return;
    };
    let port = http_server("hello from the host\n");
    let dns =
        is_root() && dns_server("vessel-test.example", Ipv4Addr::new(198, 51, 100, 7)).is_some();
    let dns_opt = format!("user,dns={gw}");
    let net: Vec<&str> = if dns { vec![&dns_opt] } else { vec!["user"] };
    let script = format!(
        "wget -q -O- http://{gw}:{port}/; nslookup vessel-test.example; cat /etc/resolv.conf"
    );
    let vm = Running::spawn(r.command(&net, "", &script));
    let (code, out) = vm.finish();
    assert_eq!(code, Some(0), "{out}");
    let ip = address(&out);
    assert!(!ip.is_unspecified(), "{out}");
    assert!(out.contains("\nhello from the host\n"), "{out}");
    if dns {
        assert!(
            out.contains("198.51.100.7"),
            "the guest did not resolve the name:\n{out}"
        );
    } else {
        eprintln!("DNS part skipped: port 53 is not ours to serve on");
    }
    assert!(out.contains("VESSEL-KIT: exit status 0"), "{out}");
}

#[test]
fn a_port_forward_reaches_a_server_in_the_guest() {
    let Some(r) = Rootless::new() else { return };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fwd = format!("user,hostfwd=tcp:127.0.0.1:{port}-:80");
    let vm = Running::spawn(r.command(
        &[&fwd],
        "",
        "mkdir -p /www; echo guest-page > /www/index.html; echo serving; httpd -f -p 80 -h /www",
    ));
    vm.wait_for("serving");
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut page = String::new();
            let _ = s.read_to_string(&mut page);
            if page.contains("guest-page") {
                break page;
            }
        }
        assert!(Instant::now() < deadline, "no page:\n{}", vm.text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        page.starts_with("HTTP/1.") && page.contains("guest-page"),
        "{page}"
    );
    // A second VM asking for the same host port is refused at once, in one line.
    let taken = r.command(&[&fwd], "", "true").output().unwrap();
    let err = String::from_utf8_lossy(&taken.stderr);
    assert_eq!(taken.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.trim().ends_with(&format!(
            "host port {port}/tcp cannot be forwarded: Address already in use (os error 98)"
        )),
        "{err}"
    );
}

#[test]
fn vms_on_a_named_network_exchange_16_mib_reach_out_by_nat_and_other_networks_see_nothing() {
    let Some(r) = Rootless::new() else { return };
    // lab has a NAT uplink: through its gateway a VM reaches the host's loopback.
    r.vessel(&["net", "create", "lab", "--nat"]);
    let port = http_server("through-the-uplink");
    let receiver = Running::spawn(r.command(
        &["network=lab"],
        "",
        &format!(
            "gw=$(ip route | grep default | cut -d' ' -f3); wget -q -O - http://$gw:{port}/; echo; \
             nc -l -p 5000 > /tmp/got; md5sum /tmp/got; ls -l /tmp/got"
        ),
    ));
    let ip = address(&receiver.wait_for(kit::ADDRESS_MARKER_PREFIX));
    let sender = Running::spawn(r.command(
        &["network=lab"],
        "",
        &format!(
            "ping -c 2 -W 2 {ip} && head -c 16777216 /dev/urandom > /tmp/f && md5sum /tmp/f \
             && nc {ip} 5000 < /tmp/f"
        ),
    ));
    // A VM on another network, with an address in lab's subnet, reaches nobody.
    let [a, b, c, _] = ip.octets();
    let stranger = Running::spawn(r.command(
        &["network=elsewhere"],
        "vessel.dhcp=off",
        &format!(
            "ip link set eth0 up; ip addr add {a}.{b}.{c}.250/24 dev eth0; ping -c 3 -W 1 {ip}"
        ),
    ));
    let (code, sent) = sender.finish();
    assert_eq!(code, Some(0), "{sent}");
    assert!(sent.contains("0% packet loss"), "{sent}");
    let (_, got) = receiver.finish();
    let md5 = |out: &str, file: &str| {
        out.lines()
            .find(|l| l.ends_with(file))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .unwrap_or_else(|| panic!("no md5 of {file}:\n{out}"))
    };
    assert_eq!(md5(&sent, "/tmp/f"), md5(&got, "/tmp/got"), "{got}");
    assert!(got.contains(" 16777216 "), "{got}");
    assert!(got.contains("through-the-uplink"), "{got}");
    let (_, alone) = stranger.finish();
    assert!(alone.contains("100% packet loss"), "{alone}");
    // `vessel net ls` knows the network and the addresses it gave.
    let mut ls = common::vessel();
    ls.args(["net", "ls"]).env("VESSEL_HOME", r.home());
    let ls = common::run_with_deadline(ls, Duration::from_secs(10));
    let nat_of = |net: &str| {
        ls.stdout
            .lines()
            .find(|l| l.starts_with(net))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
    };
    assert_eq!(nat_of("lab").as_deref(), Some("yes"), "{}", ls.dump());
    assert_eq!(nat_of("elsewhere").as_deref(), Some("no"), "{}", ls.dump());
}

#[test]
fn a_bridged_vm_reaches_the_bridge() {
    if !common::is_root() || !have("ip") {
        return;
    }
    let Some(kit) = common::kit() else { return };
    let br = "vtestbr0";
    let _ = Command::new("ip").args(["link", "del", br]).status();
    common::sh(&format!(
        "ip link add {br} type bridge && ip addr add 10.98.0.1/24 dev {br} && ip link set {br} up"
    ));
    // Jailed: root makes the TAP on the bridge for the jail's user, which lets it go.
    let mut cmd = common::vessel();
    cmd.args(["run", "--sandbox", "--accel", "emu", "--memory", "256M"])
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args(["--net", &format!("bridge={br}")])
        .args([
            "--cmdline",
            &format!(
                "{} vessel.dhcp=off -- ip link set eth0 up; ip addr add 10.98.0.2/24 dev eth0; \
                 ping -c 3 -W 2 10.98.0.1",
                kit::DEFAULT_CMDLINE
            ),
        ]);
    let r = common::run_with_deadline(cmd, DEADLINE);
    let left = Command::new("ip")
        .args(["-o", "link", "show", "master", br])
        .output()
        .unwrap();
    let _ = Command::new("ip").args(["link", "del", br]).status();
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains("0% packet loss"), "{}", r.dump());
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(left.trim().is_empty(), "TAPs left on the bridge: {left}");
}

/// The guest's count of carrier changes on eth0, as its loop prints them.
fn carrier_changes(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("changes="))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The passt serving vessel process `pid`: its child, or its launcher's.
fn passt_child_of(pid: u32) -> Option<u32> {
    let children = |parent: u32, pattern: &str| -> Vec<u32> {
        let out = Command::new("pgrep")
            .args(["-P", &parent.to_string(), pattern])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.lines().filter_map(|l| l.trim().parse().ok()).collect()
    };
    std::iter::once(pid)
        .chain(children(pid, ""))
        .find_map(|p| children(p, "^passt").first().copied())
}

#[test]
fn killing_passt_takes_the_link_down_and_back_and_the_vm_runs_on() {
    if !have("passt") || !have("pgrep") {
        skip("passt or pgrep is not installed");
        return;
    }
    let Some(kit) = common::kit() else { return };
    let mut cmd = common::vessel();
    cmd.args(["run", "--accel", "emu", "--memory", "256M", "--net", "user"])
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initrd)
        .args([
            "--cmdline",
            &format!(
                "{} -- i=0; while [ $i -lt 40 ]; do echo changes=$(cat /sys/class/net/eth0/carrier_changes); \
                 sleep 0.25; i=$((i+1)); done; udhcpc -i eth0 -n -q -t 5 -T 1 -s /etc/udhcpc.script",
                kit::DEFAULT_CMDLINE
            ),
        ]);
    let vm = Running::spawn(cmd);
    let out = vm.wait_for("changes=");
    let before = *carrier_changes(&out).last().unwrap();
    let pid = passt_child_of(vm.child.id()).expect("passt runs under vessel");
    // SAFETY: kill(2) of a process ID; passt is our child's child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let (code, out) = vm.finish();
    assert_eq!(code, Some(0), "the VM ended badly:\n{out}");
    let after = *carrier_changes(&out).last().unwrap();
    assert!(
        after >= before + 2,
        "the link did not go down and up ({before} -> {after}):\n{out}"
    );
    let new = out.contains("passt exited");
    assert!(new, "vessel did not say passt died:\n{out}");
    // The new passt serves DHCP: the guest gets a lease again.
    assert!(
        out.matches(kit::ADDRESS_MARKER_PREFIX).count() >= 2,
        "no lease after the restart:\n{out}"
    );
}

/// Rate limits per direction on a NAT NIC hold for a TCP stream: the guest's `wget` of
/// 6 MiB from the host under rx_bw=1M (the software CPU receives at about 4 MiB/s
/// unlimited), and the host fetching 6 MiB from the guest's httpd under tx_bw=3M, each
/// within 10% of the limit (which counts whole frames, so
/// the payload rate sits a few percent under it).
#[test]
fn a_nics_rate_limits_hold_for_tcp_streams_each_way() {
    let Some(r) = Rootless::new() else { return };
    const MIB: usize = 6;
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let body = vec![0x42u8; MIB << 20];
        for mut c in listener.incoming().flatten() {
            let mut req = [0u8; 256];
            let _ = c.read(&mut req);
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(&body);
        }
    });
    let fwd_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let net = format!("user,hostfwd=tcp:127.0.0.1:{fwd_port}-:80,rx_bw=1M,tx_bw=3M");
    let script = format!(
        "\"until ip route | grep -q default; do sleep 1; done; \
         gw=$(ip route | grep default | cut -d' ' -f3); mkdir /www; \
         dd if=/dev/zero of=/www/f bs=1M count={MIB} 2>/dev/null; \
         time wget -q -O /dev/null http://$gw:{host_port}/f 2>&1; \
         httpd -p 80 -h /www; echo serving; sleep 1000\""
    );
    let vm = Running::spawn(r.command(&[&net], "", &script));
    let out = vm.wait_for("serving");
    let secs = testguest::timing::busybox_time_after(&out, "")
        .unwrap_or_else(|| panic!("no timing:\n{out}"));
    let rx = MIB as f64 / secs;
    let mut c = TcpStream::connect(("127.0.0.1", fwd_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(b"GET /f HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut first) = (0, None);
    while let Ok(k) = c.read(&mut buf) {
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        n += k;
    }
    let tx = n as f64 / (1 << 20) as f64 / first.unwrap().elapsed().as_secs_f64();
    eprintln!("rx_bw=1M: {rx:.2} MiB/s; tx_bw=3M: {tx:.2} MiB/s");
    assert!(n > MIB << 20, "short answer: {n} bytes");
    assert!((rx - 0.95).abs() <= 0.1, "rx_bw=1M gave {rx:.2} MiB/s");
    assert!(
        (tx / 3.0 - 0.95).abs() <= 0.1,
        "tx_bw=3M gave {tx:.2} MiB/s"
    );
}
