//! The monitor: the process behind one running VM. It builds and runs the VM, serves
//! the control API on `control.sock`, the serial console on `console.sock` and in
//! `serial.log`, restarts the guest when it reboots (per the restart policy), and keeps
//! `status.json` current. [`start`] is the CLI's side: admission, spawn, wait until
//! the API answers.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use api::model::{
    Action, ActionRequest, MigrateRequest, RecoverRequest, SettingsRequest, StateBody, VmInfo,
};
use api::{Method, Request, Response};
use vmm::{Console, ControlError, RunState, VmHandle, VmOutcome};

use crate::bundle::Bundle;
use crate::error::ManagerError;
use crate::guest_agent::GuestAgent;
use crate::home::Home;
use crate::host::{self, Allocation, Host};
use crate::lock::FileLock;
use crate::resources;
use crate::snapshots;
use crate::spec::{Restart, VmSpec};
use crate::status::{self, Status, VmState};

/// How long `start` waits for a monitor to answer on its control socket.
mod console;
mod jailed;
mod migrate;

use console::{ConsoleHub, HubWriter, serve_console};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The descriptor number a migration's link is handed down on.
const LINK_FD: i32 = 3;
const LINK_ENV: &str = "VESSEL_MIGRATION_FD";

/// The migration link `vessel receive` handed this monitor, if it did.
fn inherited_link() -> Option<std::fs::File> {
    let fd: i32 = std::env::var(LINK_ENV).ok()?.parse().ok()?;
    if fd != LINK_FD {
        return None;
    }
    // SAFETY: the descriptor the parent placed at LINK_FD for this process, owned by
    // nobody else here (the variable is read once: the File takes it).
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: removing a variable before other threads read the environment.
    unsafe { std::env::remove_var(LINK_ENV) };
    Some(f)
}

/// Starts `name` in a detached monitor process (`exe __monitor NAME`) after admission
/// control, and waits until its control API answers.
pub fn start(home: &Home, name: &str, exe: &Path) -> Result<Status, ManagerError> {
    start_with_link(home, name, exe, None)
}

/// [`start`], handing the monitor a migration's link (post-copy goes on over it).
pub fn start_with_link(
    home: &Home,
    name: &str,
    exe: &Path,
    link: Option<&std::fs::File>,
) -> Result<Status, ManagerError> {
    let _admission = FileLock::acquire(&home.admission_lock())?;
    let bundle = Bundle::open(home, name)?;
    // A monitor that has just said it stopped may still be taking its cgroup down.
    crate::lock::wait_free(&bundle.monitor_lock(), Duration::from_secs(10));
    let state = bundle.status().state;
    if matches!(state, VmState::Running | VmState::Paused) {
        return Err(ManagerError::WrongState {
            name: name.into(),
            state: state.to_string(),
            what: "it is already started".into(),
        });
    }
    let spec = bundle.spec()?;
    let host = Host::load(home)?;
    let held = host::allocations(home)?;
    let want = Allocation::of(name, &spec);
    host.admit(&held, &want)
        .map_err(|missing| ManagerError::Admission {
            name: name.into(),
            missing,
        })?;
    let mut placement = resources::prepare(home, &host, name, &spec.cpu)?;

    let log_path = bundle.monitor_log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(ManagerError::io(&log_path))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(exe);
    cmd.arg("__monitor")
        .arg(name)
        .env("VESSEL_HOME", home.root())
        // One byte once it is in its cgroup: a jailed monitor forks only then.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log);
    let policy = spec.cpu.clone();
    let link_fd = link.map(std::os::fd::AsRawFd::as_raw_fd);
    if link_fd.is_some() {
        cmd.env(LINK_ENV, LINK_FD.to_string());
    }
    // setsid detaches the monitor from our session and terminal, so it outlives the CLI
    // and never receives its terminal's signals; the affinity is inherited by every
    // thread the monitor makes. A migration's link goes to LINK_FD, kept across exec.
    // SAFETY: only async-signal-safe system calls (setsid, dup2, fcntl,
    // sched_setaffinity) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = link_fd {
                if fd == LINK_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                } else if libc::dup2(fd, LINK_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            resources::pin_before_exec(&policy)
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        ManagerError::Other(format!("cannot start the monitor {}: {e}", exe.display()))
    })?;
    // The whole process moves, whichever threads it has made by now.
    // The VM's last monitor may still be removing its cgroup as we take it (a jailed
    // one's first process does, once the monitor has ended): made again, it is ours.
    let mut tries = 0;
    while let Err(e) = placement.admit(name, child.id()) {
        tries += 1;
        let again = if tries < 5 {
            std::thread::sleep(Duration::from_millis(20));
            resources::prepare(home, &host, name, &spec.cpu)
        } else {
            Err(e)
        };
        match again {
            Ok(p) => placement = p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
    }
    if let Some(mut admitted) = child.stdin.take() {
        let _ = admitted.write_all(b"1");
    }
    if let resources::Placement::Without(why) = &placement {
        let _ = writeln!(
            OpenOptions::new()
                .append(true)
                .open(&log_path)
                .map_err(ManagerError::io(&log_path))?,
            "vessel: {name} runs without cgroup controls: {why}"
        );
    }
    let client = api::Client::new(bundle.control_socket()).with_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(exit)) = child.try_wait() {
            // A guest that booted and ended at once (a reset with restart = never): the
            // start worked, and the VM has already stopped.
            let status = bundle.status();
            if exit.success() && status.boots > 0 && status.state == VmState::Stopped {
                return Ok(status);
            }
            let why = last_line_since(&log_path, log_start)
                .unwrap_or_else(|| "the monitor exited".into());
            let why = why
                .strip_prefix("vessel: error: ")
                .unwrap_or(&why)
                .to_string();
            return Err(ManagerError::Other(format!(
                "{name} failed to start: {why}"
            )));
        }
        if client
            .get::<StateBody>(&format!("/v1/vms/{name}/state"))
            .is_ok()
        {
            return Ok(bundle.status());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(ManagerError::Other(format!(
                "{name} did not answer on its control socket within {}s",
                READY_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn last_line_since(path: &Path, offset: u64) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let mut s = String::new();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).ok()?;
    f.read_to_string(&mut s).ok()?;
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_string)
}

/// What the API, the console and the boot loop share.
struct Monitor {
    name: String,
    home: Home,
    bundle: Bundle,
    spec: VmSpec,
    agent: GuestAgent,
    handle: Mutex<Option<VmHandle>>,
    boots: AtomicU64,
    started: Instant,
    started_unix: u64,
    /// This process as the host sees it (in a jail it is PID 1 of its own namespace).
    pid: u32,
    /// In a jail: the host's files (admission, cgroups, other VMs) are out of reach.
    jailed: bool,
    pid_start: Option<u64>,
    /// The host asked for a reboot: boot again whatever the restart policy.
    reboot_requested: AtomicBool,
    /// The host asked to kill the VM: never boot it again.
    kill_requested: AtomicBool,
    /// The VM was saved to `suspended/`: it ends as suspended.
    suspended: AtomicBool,
    /// A migration is under way (one at a time); `migration_cancel` ends it.
    migrating: AtomicBool,
    migration_cancel: AtomicBool,
    /// Where the VM went: it ends as migrated.
    migrated_to: Mutex<Option<String>>,
    status_lock: Mutex<()>,
}

impl Monitor {
    fn write_status(&self, state: VmState, last_exit: Option<String>) {
        let _g = lock(&self.status_lock);
        let alive = matches!(state, VmState::Running | VmState::Paused);
        let s = Status {
            state,
            pid: alive.then_some(self.pid),
            pid_start: if alive { self.pid_start } else { None },
            started_unix: Some(self.started_unix),
            boots: self.boots.load(Ordering::Relaxed),
            last_exit,
        };
        if let Err(e) = s.write(&self.bundle.status_path()) {
            tracing::warn!("{e}");
        }
    }

    fn state_name(&self) -> &'static str {
        match lock(&self.handle).as_ref().map(VmHandle::state) {
            Some(RunState::Paused) => "paused",
            Some(RunState::Stopping) => "stopping",
            _ => "running",
        }
    }

    fn info(&self) -> VmInfo {
        let (vcpu_seconds, nics, ssh, throttled) = lock(&self.handle)
            .as_ref()
            .map(|h| {
                let m = h.metrics();
                (m.vcpu_seconds(), m.nics(), m.ssh(), m.throttled())
            })
            .unwrap_or_default();
        VmInfo {
            name: self.name.clone(),
            state: self.state_name().into(),
            pid: self.pid,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            boots: self.boots.load(Ordering::Relaxed),
            cpus: self.spec.cpus,
            memory_mib: self.spec.memory_bytes() >> 20,
            accel: self.spec.accel.clone(),
            kernel: self.spec.kernel.clone(),
            cmdline: self.spec.cmdline.clone().unwrap_or_default(),
            vcpu_seconds,
            monitor_rss_kib: crate::memory::rss_kib(),
            nics,
            ssh: ssh.map(|a| a.to_string()),
            throttled,
            memory: crate::memory::info(lock(&self.handle).as_ref()),
        }
    }

    /// Saves the VM as snapshot `req.name` (or the next free `snapN`) and lets it run on.
    fn snapshot(&self, req: &ActionRequest) -> Response {
        let Some(handle) = lock(&self.handle).clone() else {
            return Response::error(409, format!("VM {} is rebooting; try again", self.name));
        };
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| self.bundle.next_snapshot_name());
        let dest = match self.bundle.new_snapshot_dir(&name) {
            Ok(d) => d,
            Err(e) => return Response::error(409, e.to_string()),
        };
        let meta = snapshots::SnapshotMeta {
            name: name.clone(),
            parent: self.bundle.head(),
            description: req.description.clone().unwrap_or_default(),
            created_unix: status::now_unix(),
            live: true,
            disks: Vec::new(),
        };
        let fill = |tmp: &Path| {
            snapshots::fill(&self.bundle, &self.spec, &meta, tmp).map_err(|e| e.to_string())
        };
        // The disks are taken with the guest's file systems frozen (when an agent
        // answers): consistent on their own, with no journal to replay.
        let frozen = self.agent.freeze();
        let taken = handle.snapshot(&dest, &fill);
        if let Some(f) = frozen
            && let Err(e) = f.thaw()
        {
            tracing::warn!("guest agent: thaw after the snapshot: {e}");
        }
        match taken {
            Ok(c) => {
                if let Err(e) = self.bundle.set_head(Some(&name)) {
                    tracing::warn!("{e}");
                }
                Response::json(200, &snapshot_body(name, &c))
            }
            Err(e) => snapshot_error(&e),
        }
    }

    /// Saves the VM to `suspended/` and ends it; the next start continues it.
    fn suspend(&self) -> Response {
        let Some(handle) = lock(&self.handle).clone() else {
            return Response::error(409, format!("VM {} is rebooting; try again", self.name));
        };
        let dest = self.bundle.suspended_dir();
        let _ = std::fs::remove_dir_all(&dest);
        match handle.snapshot(&dest, &|_: &Path| Ok(())) {
            Ok(c) => {
                self.suspended.store(true, Ordering::SeqCst);
                self.kill_requested.store(true, Ordering::SeqCst);
                handle.kill();
                Response::json(200, &snapshot_body("suspended".into(), &c))
            }
            Err(e) => snapshot_error(&e),
        }
    }

    /// What `vessel set` does to a running VM, through the API: CPU policy (through
    /// the host layer's admission and the VM's cgroup) and I/O limits, in force at once
    /// and kept in vm.toml; nothing changes when one setting is refused.
    fn change_settings(&self, req: &SettingsRequest) -> Response {
        let Some(handle) = lock(&self.handle).clone() else {
            return Response::error(409, format!("VM {} is rebooting; try again", self.name));
        };
        let mut spec = match self.bundle.spec() {
            Ok(s) => s,
            Err(e) => return Response::error(500, e.to_string()),
        };
        let mut balloon = None;
        for kv in &req.settings {
            let Some((k, v)) = kv.split_once('=') else {
                return Response::error(400, format!("{kv:?} is not key=value"));
            };
            if let Some(size) = crate::spec::balloon_size(k, v) {
                let checked = size.and_then(|s| crate::spec::check_balloon(&spec, s).map(|()| s));
                match (checked, handle.balloon()) {
                    (Ok(s), Some(b)) => balloon = Some((b.clone(), s)),
                    (Ok(_), None) => {
                        return Response::error(
                            409,
                            "the VM runs without a balloon (it was created before --balloon was set)",
                        );
                    }
                    (Err(e), _) => return Response::error(409, e),
                }
                continue;
            }
            if !resources::is_live_key(k) {
                return Response::error(409, format!("{k} changes only when the VM is stopped"));
            }
            if let Err(e) = spec.set(k, v) {
                return Response::error(400, e);
            }
        }
        let cpu = req.settings.iter().any(|kv| {
            kv.split_once('=')
                .is_some_and(|(k, _)| resources::LIVE_KEYS.contains(&k))
        });
        if cpu && self.jailed {
            // Admission and cgroups belong to the host: a jailed monitor reaches neither.
            return Response::error(
                409,
                format!(
                    "the CPU policy of {} (jailed) changes through `vessel set`, not its monitor",
                    self.name
                ),
            );
        }
        if cpu && let Err(e) = resources::set_live(&self.home, &self.name, self.pid, &spec.cpu) {
            return Response::error(409, e.to_string());
        }
        for device in resources::devices_named(&req.settings) {
            let set = match spec.device_limits(device) {
                Some(limits) => handle.io_limits().set(device, &limits),
                None => Err(format!("the VM has no {device}")),
            };
            if let Err(e) = set {
                return Response::error(400, e);
            }
        }
        if let Some((b, size)) = balloon {
            tracing::info!("balloon: asking the guest for {} MiB", size >> 20);
            b.set_target(size);
        }
        match self.bundle.save_spec(&spec) {
            Ok(()) => Response::json(
                200,
                &StateBody {
                    state: self.state_name().into(),
                },
            ),
            Err(e) => Response::error(500, e.to_string()),
        }
    }

    fn act(&self, req: &ActionRequest) -> Response {
        let action = req.action;
        // A migration pauses, saves and hands over the VM itself; only a kill may cut in.
        if action != Action::Kill && self.migrating.load(Ordering::SeqCst) {
            return Response::error(
                409,
                format!(
                    "VM {} is migrating (vessel migrate {} --cancel stops it)",
                    self.name, self.name
                ),
            );
        }
        match action {
            Action::Snapshot => return self.snapshot(req),
            Action::Suspend => return self.suspend(),
            _ => {}
        }
        if action == Action::Kill {
            self.kill_requested.store(true, Ordering::SeqCst);
        }
        let Some(handle) = lock(&self.handle).clone() else {
            // Between two boots: a kill or reboot takes effect there; the rest must wait.
            return match action {
                Action::Kill | Action::Reboot => Response::json(
                    200,
                    &StateBody {
                        state: "running".into(),
                    },
                ),
                _ => Response::error(409, format!("VM {} is rebooting; try again", self.name)),
            };
        };
        let conflict = |e: ControlError| Response::error(409, format!("VM {} is {e}", self.name));
        let result = match action {
            Action::Pause => handle
                .pause()
                .map(|()| self.write_status(VmState::Paused, None)),
            Action::Resume => handle.resume().map(|()| {
                self.write_status(VmState::Running, None);
                // The guest's clock stood still while it was paused.
                self.agent.sync_time_soon(Duration::from_secs(5));
            }),
            Action::Shutdown if self.agent.shutdown() => Ok(()),
            Action::Shutdown | Action::PowerButton => handle.press_power_button(),
            Action::Reboot => {
                self.reboot_requested.store(true, Ordering::SeqCst);
                handle.reset();
                Ok(())
            }
            Action::Kill => {
                handle.kill();
                Ok(())
            }
            Action::Snapshot | Action::Suspend => Ok(()),
        };
        match result {
            Ok(()) => Response::json(
                200,
                &StateBody {
                    state: self.state_name().into(),
                },
            ),
            Err(e) => conflict(e),
        }
    }

    fn handle_request(&self, r: &Request) -> Response {
        let Some(rest) = r.path.strip_prefix("/v1/vms/") else {
            return Response::error(404, format!("no such resource {}", r.path));
        };
        let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
        if name != self.name {
            return Response::error(
                404,
                format!("no VM named {name} here (this monitor runs {})", self.name),
            );
        }
        match (r.method, sub) {
            (Method::Get, "") => Response::json(200, &self.info()),
            (Method::Get, "state") => Response::json(
                200,
                &StateBody {
                    state: self.state_name().into(),
                },
            ),
            (Method::Post, "actions") => match serde_json::from_slice::<ActionRequest>(&r.body) {
                Ok(req) => self.act(&req),
                Err(e) => Response::error(400, format!("invalid action request: {e}")),
            },
            (Method::Post, "settings") => {
                match serde_json::from_slice::<SettingsRequest>(&r.body) {
                    Ok(req) => self.change_settings(&req),
                    Err(e) => Response::error(400, format!("invalid settings request: {e}")),
                }
            }
            (Method::Post, "migrate") => match serde_json::from_slice::<MigrateRequest>(&r.body) {
                Ok(req) => self.migrate(&req),
                Err(e) => Response::error(400, format!("invalid migrate request: {e}")),
            },
            (Method::Post, "migrate/recover") => {
                match serde_json::from_slice::<RecoverRequest>(&r.body) {
                    Ok(req) => self.listen_for_recovery(&req),
                    Err(e) => Response::error(400, format!("invalid recover request: {e}")),
                }
            }
            (Method::Post, "migrate/cancel") => {
                if !self.migrating.load(Ordering::SeqCst) {
                    return Response::error(409, format!("{} is not migrating", self.name));
                }
                self.migration_cancel.store(true, Ordering::SeqCst);
                Response::json(
                    200,
                    &StateBody {
                        state: self.state_name().into(),
                    },
                )
            }
            (Method::Get, "metrics") => {
                let mut text = lock(&self.handle)
                    .as_ref()
                    .map(|h| h.metrics().prometheus(&self.name))
                    .unwrap_or_default();
                text += &resources::prometheus(&self.name);
                let memory = crate::memory::info(lock(&self.handle).as_ref());
                text += &crate::memory::prometheus(&self.name, &memory);
                Response::text(200, "text/plain; version=0.0.4", text)
            }
            (_, "" | "state" | "actions" | "metrics" | "settings") => {
                Response::error(405, "method not allowed")
            }
            (_, other) => Response::error(404, format!("no such resource {other:?}")),
        }
    }
}

/// A snapshot that failed: a VM that cannot be saved is a refusal (409), anything
/// else the monitor's failure (500).
fn snapshot_error(e: &vmm::snapshot::SnapshotError) -> Response {
    match e {
        vmm::snapshot::SnapshotError::Unsaveable(_) => Response::error(409, e.to_string()),
        _ => Response::error(500, e.to_string()),
    }
}

fn bind(path: &Path) -> Result<UnixListener, ManagerError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(ManagerError::io(path))
}

/// The monitor process's main: runs `name` until it stops. Returns the exit code.
pub fn run(home: &Home, name: &str) -> Result<(), ManagerError> {
    let bundle = Bundle::open(home, name)?;
    let spec = bundle.spec()?;
    let jailed = spec.sandbox_on().map_err(ManagerError::Other)?;
    // Held until this process (and, jailed, the one outside the jail) has gone.
    let _alive = FileLock::acquire(&bundle.monitor_lock())?;
    if jailed {
        jailed::supervise(home, name)?;
    }
    let log_path = bundle.serial_log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(ManagerError::io(&log_path))?;
    let hub = Arc::new(ConsoleHub {
        log: Mutex::new(log),
        client: Mutex::new(None),
    });
    // Build the first boot before announcing ourselves, so configuration errors reach
    // `vessel start` (through monitor.log) and the VM never shows as running. A
    // suspended VM continues from its saved state.
    let config = spec.to_vm_config(&bundle.dir)?;
    let suspended = bundle.suspended_dir();
    let restore = if suspended.join(vmm::snapshot::file::STATE).is_file() {
        let state = vmm::snapshot::read_state(&suspended)
            .map_err(|e| ManagerError::Other(e.to_string()))?;
        // A VM received by post-copy: the rest of its memory comes over the link
        // `vessel receive` handed down.
        let postcopy = match suspended
            .join(vmm::migration::receive::STALE)
            .is_file()
            .then(inherited_link)
            .flatten()
        {
            Some(link) => Some(
                vmm::migration::postcopy::PostcopyLink::new(link)
                    .map_err(|e| ManagerError::Other(e.to_string()))?,
            ),
            None => None,
        };
        Some(vmm::builder::Restore {
            state,
            memory: suspended.join(vmm::snapshot::file::MEMORY),
            postcopy,
        })
    } else {
        None
    };
    // Who we are on the host, known before a jail's /proc hides it.
    let pid = sandbox::jail::host_pid();
    let pid_start = status::process_start_time(pid);
    let jail = if jailed {
        let jail = crate::confine::prepare_jail(
            &config,
            Some(&bundle.dir),
            &home.root().join("jail"),
            spec.governor().is_some(),
        );
        // Whatever was made, even if preparing failed after it.
        jailed::report_made_taps();
        Some(jail?)
    } else {
        None
    };
    // Confined from here: every boot reuses this configuration (the kit, if it had to
    // be built again, was built above).
    crate::confine::confine(
        spec.seccomp_mode().map_err(ManagerError::Other)?,
        &config,
        jail.as_ref(),
    )?;
    let mut vm = Some(
        vmm::builder::build_from(
            &config,
            Console::Output(Box::new(HubWriter(hub.clone()))),
            restore.as_ref(),
        )
        .map_err(|e| ManagerError::Other(e.to_string()))?,
    );
    if let Some(vm) = &vm {
        vm.postcopy_running()
            .map_err(|e| ManagerError::Other(e.to_string()))?;
    }
    let restored = restore.is_some();
    if restored {
        // The saved memory is mapped privately: the file can go, the mapping stays.
        let _ = std::fs::remove_dir_all(&suspended);
    }
    let monitor = Arc::new(Monitor {
        name: name.to_string(),
        home: home.clone(),
        bundle: bundle.clone(),
        spec: spec.clone(),
        agent: GuestAgent::of(&bundle, &spec),
        handle: Mutex::new(None),
        boots: AtomicU64::new(0),
        started: Instant::now(),
        started_unix: status::now_unix(),
        pid,
        jailed,
        pid_start,
        reboot_requested: AtomicBool::new(false),
        kill_requested: AtomicBool::new(false),
        suspended: AtomicBool::new(false),
        migrating: AtomicBool::new(false),
        migration_cancel: AtomicBool::new(false),
        migrated_to: Mutex::new(None),
        status_lock: Mutex::new(()),
    });
    if restored {
        // The guest's clock stopped when it was saved.
        monitor.agent.sync_time_soon(Duration::from_secs(60));
    }
    if let Some(governor) = spec.governor() {
        let m = monitor.clone();
        std::thread::Builder::new()
            .name("memory-governor".into())
            .spawn(move || {
                crate::governor::run(
                    &m.name,
                    governor,
                    || lock(&m.handle).clone(),
                    || !m.kill_requested.load(Ordering::SeqCst),
                )
            })
            .map_err(|e| ManagerError::Other(e.to_string()))?;
    }
    let control = bind(&bundle.control_socket())?;
    let console = bind(&bundle.console_socket())?;
    let in_flight = api::InFlight::default();
    {
        let m = monitor.clone();
        let handler = move |r: &Request| m.handle_request(r);
        let in_flight = in_flight.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || api::serve(control, Arc::new(handler), in_flight))
            .map_err(|e| ManagerError::Other(e.to_string()))?;
        let (hub, m) = (hub.clone(), monitor.clone());
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || serve_console(console, hub, m))
            .map_err(|e| ManagerError::Other(e.to_string()))?;
    }

    let last_exit = loop {
        if monitor.kill_requested.load(Ordering::SeqCst) {
            break VmOutcome::Killed.to_string();
        }
        let this = match vm.take() {
            Some(vm) => vm,
            None => {
                match vmm::builder::build(
                    &config,
                    Console::Output(Box::new(HubWriter(hub.clone()))),
                ) {
                    Ok(vm) => vm,
                    Err(e) => break format!("could not boot again: {e}"),
                }
            }
        };
        *lock(&monitor.handle) = Some(this.handle());
        monitor.boots.fetch_add(1, Ordering::Relaxed);
        monitor.write_status(VmState::Running, None);
        let outcome = this.run();
        *lock(&monitor.handle) = None;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => break e.to_string(),
        };
        tracing::info!("{outcome}");
        let reboot = monitor.reboot_requested.swap(false, Ordering::SeqCst);
        if monitor.kill_requested.load(Ordering::SeqCst) {
            break VmOutcome::Killed.to_string();
        }
        match outcome {
            VmOutcome::Reset if reboot || spec.restart == Restart::OnReboot => continue,
            other => break other.to_string(),
        }
    };
    vmm::builder::release_taps();
    let _ = std::fs::remove_file(bundle.control_socket());
    let _ = std::fs::remove_file(bundle.console_socket());
    // Answer the request that ended the VM (a kill) before going away.
    in_flight.drain(Duration::from_secs(2));
    // Before the status says stopped: a start that follows makes the cgroup anew (a
    // jailed monitor's cgroup is left by its first process, outside the jail).
    sandbox::launcher::stop();
    if !jailed {
        resources::leave(home, name);
    }
    if let Some(to) = lock(&monitor.migrated_to).take() {
        monitor.write_status(VmState::Stopped, Some(format!("migrated to {to}")));
    } else if monitor.suspended.load(Ordering::SeqCst) {
        monitor.write_status(VmState::Suspended, Some("suspended".into()));
    } else {
        monitor.write_status(VmState::Stopped, Some(last_exit));
    }
    Ok(())
}

fn snapshot_body(name: String, c: &vmm::snapshot::capture::Captured) -> api::model::SnapshotBody {
    api::model::SnapshotBody {
        snapshot: name,
        seconds: c.seconds,
        memory_bytes: c.state.memory_bytes,
    }
}
