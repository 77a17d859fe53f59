//! The VM lifecycle: define, list, start, stop, pause, resume, inspect, change, delete.
//! Running VMs are reached only through their control API.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::model::{Action, ActionRequest, StateBody, VmInfo};
use clap::Args;
use manager::host::{self, Host};
use manager::spec::{KIT, Restart, VmSpec};
use manager::{Bundle, Home, ManagerError, Status, VmState};
use serde_json::json;

use super::{CliResult, Failure, VmArgs};

mod info;
pub use info::info;

#[derive(Args)]
pub struct NameArg {
    /// The VM's name.
    name: String,
}

impl NameArg {
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    #[command(flatten)]
    vm: VmArgs,
    /// What a guest-initiated reboot does: boot again (on-reboot) or stop (never).
    #[arg(long, default_value = "on-reboot", value_parser = ["on-reboot", "never"])]
    restart: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StopArgs {
    name: String,
    /// Kill the VM if it has not powered off within the timeout.
    #[arg(long)]
    force: bool,
    /// Seconds to wait for the guest to power off.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    timeout: u64,
    /// Press the ACPI power button even if a guest agent answers.
    #[arg(long)]
    button: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    name: String,
    /// Keep printing new output until the VM stops.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Args)]
pub struct SshArgs {
    name: String,
    /// A command to run instead of a login shell.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct SetArgs {
    name: String,
    /// key=value pairs.
    #[arg(required = true, value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

pub(super) fn home() -> Result<Home, Failure> {
    Ok(Home::from_env()?)
}

fn absolute(p: &Path) -> Result<String, Failure> {
    std::path::absolute(p)
        .map(|p| p.display().to_string())
        .map_err(|e| Failure::usage(format!("{}: {e}", p.display())))
}

/// A --disk spec with its path made absolute (vm.toml paths are relative to the bundle)
/// and its format recorded: told by the content now, when the user hands the image
/// over, never again by what a guest may since have written into it.
fn absolute_disk(spec: &str) -> Result<String, Failure> {
    let mut c = devices::virtio::block::BlockConfig::parse(spec)
        .map_err(|e| Failure::usage(format!("--disk {spec:?}: {e}")))?;
    c.path = absolute(&c.path)?.into();
    if c.format.is_none() {
        let top = disk::info(&c.path, None).map_err(|e| Failure::usage(e.to_string()))?;
        c.format = top.first().map(|l| l.format);
    }
    Ok(c.to_spec())
}

pub fn create(args: CreateArgs) -> CliResult {
    if args.vm.image.is_some() {
        return create_from_image(args);
    }
    let a = args.vm;
    // Paths given here are relative to where the command runs; vm.toml keeps them absolute.
    let kernel = match &a.kernel {
        Some(k) => {
            std::fs::metadata(k)
                .map_err(|e| Failure::usage(format!("kernel {}: {e}", k.display())))?;
            absolute(k)?
        }
        None => KIT.to_string(),
    };
    let initrd = match &a.initrd {
        Some(i) => {
            std::fs::metadata(i)
                .map_err(|e| Failure::usage(format!("initrd {}: {e}", i.display())))?;
            Some(absolute(i)?)
        }
        None => None,
    };
    let spec = VmSpec {
        cpus: a.cpus,
        memory: a.memory.clone(),
        kernel,
        initrd,
        cmdline: a.cmdline.clone(),
        accel: a.accel.name().to_string(),
        restart: restart(&args.restart),
        disks: a
            .disks
            .iter()
            .map(|d| absolute_disk(d))
            .collect::<Result<_, _>>()?,
        nets: nets_with_macs(&a, &args.name)?,
        rng: a.rng,
        vsock: a.spec_vsock()?,
        shares: a.share_specs()?,
        memory_backing: a.memory_backing.clone(),
        balloon: a.balloon,
        memory_merge: a.memory_merge,
        memory_min: a.memory_min.clone(),
        memory_shares: a.memory_shares()?,
        seccomp: a.seccomp.clone().filter(|m| m != "on"),
        sandbox: a.sandbox.clone(),
        memory_compress: a.memory_compress.clone(),
        cpu_model: a.cpu_model.clone(),
        vmgenid: Some(vmm::vmgenid_hex(&vmm::new_vmgenid())),
        cpu: a.cpu_policy()?,
    };
    a.devices()?;
    let home = home()?;
    let bundle = Bundle::create(&home, &args.name, &spec)?;
    println!("created {} in {}", bundle.name, bundle.dir.display());
    Ok(ExitCode::SUCCESS)
}

/// The VM's --net specs (the default NAT NIC when none is given), each with a MAC of
/// its own written down, so the VM keeps its addresses and a copy can be given new ones.
fn nets_with_macs(a: &VmArgs, name: &str) -> Result<Vec<String>, Failure> {
    use devices::virtio::net::{NetConfig, generated_mac};
    let seed = format!("{name}-{:?}", std::time::SystemTime::now());
    a.net_specs()?
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut c = NetConfig::parse(spec)
                .map_err(|e| Failure::usage(format!("--net {spec:?}: {e}")))?;
            c.mac
                .get_or_insert_with(|| generated_mac(seed.as_bytes(), i as u32));
            Ok(c.to_spec())
        })
        .collect()
}

fn restart(policy: &str) -> Restart {
    if policy == "never" {
        Restart::Never
    } else {
        Restart::OnReboot
    }
}

/// `create --image`: the VM's folder gets its own copy of the image and a seed disk.
fn create_from_image(args: CreateArgs) -> CliResult {
    let a = &args.vm;
    let image = super::images::open(a.image.as_deref().unwrap_or_default())?;
    manager::bundle::check_name(&args.name)?;
    let extra = a
        .disks
        .iter()
        .map(|d| absolute_disk(d))
        .collect::<Result<Vec<_>, _>>()?;
    a.devices()?;
    // The default NIC of a VM from an image also forwards a port to its SSH server.
    let nets = nets_with_macs(a, &args.name)?
        .into_iter()
        .map(|n| match a.nets.is_empty() && n.starts_with("user,mac=") {
            true => n.replacen("user,", "user,ssh=on,", 1),
            false => n,
        })
        .collect();
    let spec = VmSpec {
        cpus: a.cpus,
        memory: a.memory.clone(),
        kernel: image::KERNEL.to_string(),
        initrd: Some(image::INITRD.to_string()),
        cmdline: Some(a.cmdline.clone().unwrap_or_else(|| image::CMDLINE.into())),
        accel: a.accel.name().to_string(),
        restart: restart(&args.restart),
        disks: Vec::new(),
        nets,
        rng: a.rng,
        vsock: a.spec_vsock()?,
        shares: a.share_specs()?,
        memory_backing: a.memory_backing.clone(),
        balloon: a.balloon,
        memory_merge: a.memory_merge,
        memory_min: a.memory_min.clone(),
        memory_shares: a.memory_shares()?,
        seccomp: a.seccomp.clone().filter(|m| m != "on"),
        sandbox: a.sandbox.clone(),
        memory_compress: a.memory_compress.clone(),
        cpu_model: a.cpu_model.clone(),
        vmgenid: Some(vmm::vmgenid_hex(&vmm::new_vmgenid())),
        cpu: a.cpu_policy()?,
    };
    spec.validate().map_err(Failure::usage)?;
    let home = home()?;
    let bundle = Bundle::create_with(&home, &args.name, |dir| {
        let p = super::images::provision(&home, &image, dir, &args.name, a.ssh_key.as_ref())
            .map_err(|f| ManagerError::Other(f.message))?;
        Ok(VmSpec {
            disks: super::images::disks(&p, None, &extra),
            ..spec
        })
    })?;
    println!(
        "created {} from image {} in {}",
        bundle.name,
        image.name,
        bundle.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn open(name: &str) -> Result<(Home, Bundle), Failure> {
    let home = home()?;
    let bundle = Bundle::open(&home, name)?;
    Ok((home, bundle))
}

fn uptime(status: &Status) -> String {
    match (status.state, status.started_unix) {
        (VmState::Running | VmState::Paused, Some(t)) => {
            let s = manager::status::now_unix().saturating_sub(t);
            format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
        }
        _ => "-".into(),
    }
}

pub fn list(args: ListArgs) -> CliResult {
    let home = home()?;
    let vms = Bundle::list(&home)?;
    if args.json {
        let rows: Vec<serde_json::Value> = vms
            .iter()
            .map(|(b, spec)| {
                let s = b.status();
                match spec {
                    Ok(spec) => json!({
                        "name": b.name, "state": s.state, "cpus": spec.cpus,
                        "memory_mib": spec.memory_bytes() >> 20, "pid": s.pid,
                        "boots": s.boots, "last_exit": s.last_exit,
                        "log_tail": if s.state == VmState::Crashed { b.log_tail(5) } else { vec![] },
                    }),
                    Err(e) => json!({"name": b.name, "state": "invalid", "error": e.to_string()}),
                }
            })
            .collect();
        return super::print_json(&rows);
    }
    println!(
        "{:<20} {:<9} {:>4} {:>8}  {:>10}",
        "NAME", "STATE", "CPUS", "MEMORY", "UPTIME"
    );
    for (b, spec) in &vms {
        match spec {
            Ok(spec) => {
                let s = b.status();
                println!(
                    "{:<20} {:<9} {:>4} {:>8}  {:>10}",
                    b.name,
                    s.state.to_string(),
                    spec.cpus,
                    host::human(spec.memory_bytes() as f64),
                    uptime(&s)
                );
                if s.state == VmState::Crashed {
                    for line in b.log_tail(5) {
                        println!("    | {line}");
                    }
                }
            }
            Err(e) => println!("{:<20} invalid   {e}", b.name),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn start(args: NameArg) -> CliResult {
    let home = home()?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::usage(format!("cannot find the vessel binary: {e}")))?;
    let status = manager::monitor::start(&home, &args.name, &exe)?;
    println!(
        "started {} (monitor pid {})",
        args.name,
        status.pid.unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}

/// The API client for a VM that must be running (or paused).
fn client(bundle: &Bundle, doing: &str) -> Result<api::Client, Failure> {
    let state = bundle.status().state;
    if !matches!(state, VmState::Running | VmState::Paused) {
        return Err(ManagerError::WrongState {
            name: bundle.name.clone(),
            state: state.to_string(),
            what: format!("cannot {doing}"),
        }
        .into());
    }
    Ok(api::Client::new(bundle.control_socket()))
}

fn post_action(bundle: &Bundle, action: Action) -> Result<StateBody, Failure> {
    post_action_within(bundle, action, None)
}

/// [`post_action`] with a deadline for the answer, if given.
fn post_action_within(
    bundle: &Bundle,
    action: Action,
    deadline: Option<Duration>,
) -> Result<StateBody, Failure> {
    let verb = serde_json::to_value(action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut c = client(bundle, &verb)?;
    if let Some(d) = deadline {
        c = c.with_timeout(d);
    }
    Ok(c.post(
        &format!("/v1/vms/{}/actions", bundle.name),
        &ActionRequest::new(action),
    )?)
}

pub fn action(args: NameArg, action: Action) -> CliResult {
    let (_, bundle) = open(&args.name)?;
    if action == Action::Kill {
        kill(&bundle)?;
        println!("{} is stopped", bundle.name);
        return Ok(ExitCode::SUCCESS);
    }
    let state = post_action(&bundle, action)?;
    match action {
        Action::Reboot => println!("{} is rebooting", bundle.name),
        _ => println!("{} is {}", bundle.name, state.state),
    }
    Ok(ExitCode::SUCCESS)
}

/// Ends a running VM's monitor: asked through its API first; a monitor that cannot
/// answer or does not end within 30 s (its main thread stuck) is killed outright.
fn kill(bundle: &Bundle) -> Result<(), Failure> {
    // A kill is answered at once by a monitor that can answer at all.
    let asked = post_action_within(bundle, Action::Kill, Some(Duration::from_secs(5)));
    let live = matches!(bundle.status().state, VmState::Running | VmState::Paused);
    match asked {
        Err(e) if !live => Err(e),
        Ok(_) if wait_stopped(bundle, Duration::from_secs(30))? => Ok(()),
        _ => kill_outright(bundle),
    }
}

/// SIGKILL to the monitor the status names (if that process still runs); the status
/// then says the VM was killed.
fn kill_outright(bundle: &Bundle) -> Result<(), Failure> {
    let mut status = bundle.status();
    if let (Some(pid), Some(start)) = (status.pid, status.pid_start) {
        let same = || manager::status::process_start_time(pid) == Some(start);
        if same() {
            // SAFETY: kill(2) on the monitor's pid, checked above to be that process.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while same() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    status.state = VmState::Stopped;
    status.pid = None;
    status.pid_start = None;
    status.last_exit = Some("killed: the monitor did not end when asked".into());
    status.write(&bundle.status_path())?;
    Ok(())
}

/// Waits until the monitor has gone: the status says stopped (or crashed) and its
/// processes, with what they take down after it (its cgroup, TAPs), have ended.
fn wait_stopped(bundle: &Bundle, timeout: Duration) -> Result<bool, Failure> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !matches!(bundle.status().state, VmState::Running | VmState::Paused) {
            let left = deadline.saturating_duration_since(Instant::now());
            return Ok(manager::lock::wait_free(&bundle.monitor_lock(), left));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
}

pub fn stop(args: StopArgs) -> CliResult {
    let (_, bundle) = open(&args.name)?;
    let action = match args.button {
        true => Action::PowerButton,
        false => Action::Shutdown,
    };
    post_action(&bundle, action)?;
    if wait_stopped(&bundle, Duration::from_secs(args.timeout))? {
        println!("{} powered off", bundle.name);
        return Ok(ExitCode::SUCCESS);
    }
    if !args.force {
        return Err(Failure::refused(format!(
            "{} did not power off within {}s (use --force to kill it)",
            bundle.name, args.timeout
        )));
    }
    kill(&bundle)?;
    println!(
        "{} did not power off within {}s: killed",
        bundle.name, args.timeout
    );
    Ok(ExitCode::SUCCESS)
}

/// `vessel ssh NAME [-- CMD...]`: OpenSSH to the guest through the loopback port its NIC
/// forwards to port 22, with vessel's key, as the user the image's first boot made.
pub fn ssh(args: SshArgs) -> CliResult {
    use std::os::unix::process::CommandExt;
    let (home, bundle) = open(&args.name)?;
    let c = client(&bundle, "ssh to it")?;
    let info: VmInfo = c.get(&format!("/v1/vms/{}", bundle.name))?;
    let at: std::net::SocketAddr = info.ssh.and_then(|a| a.parse().ok()).ok_or_else(|| {
        Failure::refused(format!(
            "{} forwards no port to SSH (a NIC with user,ssh=on; VMs made from images have one)",
            bundle.name
        ))
    })?;
    let key = manager::ssh::vessel_key(&home)?.ok_or_else(|| {
        Failure::usage("ssh-keygen not found: install the Debian package openssh-client")
    })?;
    let ssh = manager::ssh::find("ssh").ok_or_else(|| {
        Failure::usage("ssh not found: install the Debian package openssh-client")
    })?;
    let known = bundle.dir.join("known_hosts");
    let err = std::process::Command::new(ssh)
        .arg("-i")
        .arg(&key)
        .args(["-p", &at.port().to_string()])
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "LogLevel=ERROR"])
        .arg(format!("{}@{}", manager::ssh::user_name(), at.ip()))
        .args(&args.command)
        .exec();
    Err(Failure::usage(format!("ssh: {err}")))
}

pub fn logs(args: LogsArgs) -> CliResult {
    let (_, bundle) = open(&args.name)?;
    let path = bundle.serial_log();
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(Failure::usage(format!("{}: {e}", path.display()))),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        file.read_to_end(&mut buf)
            .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
        let _ = out.write_all(&buf);
        let _ = out.flush();
        if !args.follow || !matches!(bundle.status().state, VmState::Running | VmState::Paused) {
            // One more read after the VM stopped, for its last words.
            if args.follow {
                buf.clear();
                let _ = file.read_to_end(&mut buf);
                let _ = out.write_all(&buf);
            }
            return Ok(ExitCode::SUCCESS);
        }
        let _ = file.stream_position();
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn set(args: SetArgs) -> CliResult {
    let (home, bundle) = open(&args.name)?;
    if bundle.suspended_dir().exists() {
        return Err(Failure::refused(format!(
            "VM {} is suspended: its saved state holds the old settings; start it and stop it first",
            bundle.name
        )));
    }
    let status = bundle.status();
    let live = matches!(status.state, VmState::Running | VmState::Paused);
    let mut spec = bundle.spec()?;
    for kv in &args.settings {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("{kv:?} is not key=value")))?;
        if live
            && !manager::resources::is_live_key(k)
            && manager::spec::balloon_size(k, v).is_none()
        {
            return Err(Failure::refused(format!(
                "VM {} is {}: only {}, diskN.* and netN.* rate limits change while it runs; {k} when it is stopped",
                bundle.name,
                status.state,
                manager::resources::LIVE_KEYS.join(", ")
            )));
        }
        if let Some(size) = manager::spec::balloon_size(k, v) {
            // Memory taken from a running guest: not a setting kept in vm.toml.
            let size = size.map_err(Failure::usage)?;
            if !live {
                return Err(Failure::refused(format!(
                    "VM {} is {}: balloon={v} takes memory from a running VM (on a stopped one: balloon=on|off)",
                    bundle.name, status.state
                )));
            }
            manager::spec::check_balloon(&spec, size).map_err(Failure::refused)?;
            continue;
        }
        let v = match k {
            "kernel" | "initrd" if !v.is_empty() && v != KIT => absolute(&PathBuf::from(v))?,
            _ => v.to_string(),
        };
        spec.set(k, &v).map_err(Failure::usage)?;
    }
    if live {
        // Checked here first, so a refusal reads the same whether the VM runs or not.
        // The CPU policy is the host's to apply (admission, cgroups: out of a jailed
        // monitor's reach); the monitor applies the rest in its devices. Each writes
        // what it applied to vm.toml (the monitor reads it afresh).
        for device in manager::resources::devices_named(&args.settings) {
            if spec.device_limits(device).is_none() {
                return Err(Failure::usage(format!("the VM has no {device}")));
            }
        }
        let (cpu, rest): (Vec<String>, Vec<String>) =
            args.settings.iter().cloned().partition(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, _)| manager::resources::LIVE_KEYS.contains(&k))
            });
        if !cpu.is_empty() {
            let pid = status
                .pid
                .ok_or_else(|| Failure::refused("the monitor is gone"))?;
            manager::resources::set_live(&home, &bundle.name, pid, &spec.cpu)?;
            let mut saved = bundle.spec()?;
            for kv in &cpu {
                if let Some((k, v)) = kv.split_once('=') {
                    saved.set(k, v).map_err(Failure::usage)?;
                }
            }
            bundle.save_spec(&saved)?;
        }
        if !rest.is_empty() {
            let req = api::model::SettingsRequest { settings: rest };
            client(&bundle, "change the settings of")?.post::<_, api::model::StateBody>(
                &format!("/v1/vms/{}/settings", bundle.name),
                &req,
            )?;
        }
    } else {
        bundle.save_spec(&spec)?;
    }
    println!("{} updated", bundle.name);
    Ok(ExitCode::SUCCESS)
}

pub fn remove(args: NameArg) -> CliResult {
    let (home, bundle) = open(&args.name)?;
    let state = bundle.status().state;
    if matches!(state, VmState::Running | VmState::Paused) {
        return Err(Failure::refused(format!(
            "VM {} is {state}: stop or kill it first",
            bundle.name
        )));
    }
    let name = bundle.name.clone();
    bundle.remove()?;
    if let Ok(h) = Host::load(&home) {
        manager::resources::remove(&home, &h, &name);
    }
    println!("removed {name}");
    Ok(ExitCode::SUCCESS)
}

pub fn monitor(args: NameArg) -> CliResult {
    let home = home()?;
    manager::monitor::run(&home, &args.name)?;
    Ok(ExitCode::SUCCESS)
}
