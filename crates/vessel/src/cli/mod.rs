//! Subcommands and their arguments. Every failure is one line on stderr: exit code 2
//! for bad input (arguments, names, files), 1 for a refusal (a VM in the wrong state,
//! a host without room).

mod console;
mod disks;
mod guest;
mod host;
mod images;
mod manage;
mod migrate;
mod net;
mod run;
mod snapshot;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "A virtual machine monitor for Linux hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM in the foreground, its serial console on this terminal
    /// (Ctrl-A x quits). With no --kernel, boots the default guest (the kit).
    Run(run::RunArgs),
    /// Build (or find) the default guest kit from Debian's packages and print its paths.
    Kit(run::KitArgs),
    /// Define a VM (a bundle under the state directory); it starts with `vessel start`.
    Create(manage::CreateArgs),
    /// List the VMs.
    Ls(manage::ListArgs),
    /// Start a VM in the background (after admission control).
    Start(manage::NameArg),
    /// Attach to a VM's serial console (Ctrl-] detaches; the VM keeps running).
    Console(manage::NameArg),
    /// Shut a VM down cleanly (through its guest agent, else the ACPI power button) and
    /// wait for it to power off.
    Stop(manage::StopArgs),
    /// End a VM at once.
    Kill(manage::NameArg),
    /// Reset a VM (it boots again).
    Reboot(manage::NameArg),
    /// Stop a VM's vCPUs (its memory and devices stay).
    Pause(manage::NameArg),
    /// Let a paused VM's vCPUs run again.
    Resume(manage::NameArg),
    /// Show a VM's configuration and, while it runs, its live figures.
    Info(manage::InfoArgs),
    /// Save a running VM to its folder and stop it; `vessel start` continues it.
    Suspend(manage::NameArg),
    /// Take a snapshot of a VM (running: memory and devices too; stopped: its disks),
    /// or: snapshot ls|restore|rm.
    Snapshot(snapshot::SnapshotArgs),
    /// Copy a VM (or one of its snapshots) into a new VM with new MAC addresses.
    Clone(snapshot::CloneArgs),
    /// Move a running VM to a `vessel receive` (another host or home) while it runs.
    Migrate(migrate::MigrateArgs),
    /// Take in a VM that a `vessel migrate` sends, and run it here.
    Receive(migrate::ReceiveArgs),
    /// Run a command in a VM through its guest agent: `vessel exec NAME -- CMD...`
    /// (stdin, stdout and stderr streamed; its exit code is vessel's).
    Exec(guest::ExecArgs),
    /// Copy a file between the host and a VM through its guest agent:
    /// `vessel cp NAME:PATH LOCAL` or `vessel cp LOCAL NAME:PATH`.
    Cp(guest::CpArgs),
    /// Open an SSH session to a VM made from an image (or run a command: -- CMD...).
    Ssh(manage::SshArgs),
    /// Print a VM's serial console log.
    Logs(manage::LogsArgs),
    /// Change a stopped VM's settings: cpus, memory, kernel, initrd, cmdline, accel, restart.
    Set(manage::SetArgs),
    /// Delete a stopped VM and its folder.
    Rm(manage::NameArg),
    /// Show the host's CPUs and memory and what running VMs hold, or drive its page
    /// merging: `vessel host ksm on|off|status`.
    Host(host::HostArgs),
    /// Guest images: bootable root disks built from Debian's packages.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Disk images: create, info, convert (and import), snapshot.
    #[command(subcommand)]
    Disk(disks::DiskCommand),
    /// Networks between VMs.
    #[command(subcommand)]
    Net(net::NetCommand),
    /// The switch process of a named network (started by the first VM on it).
    #[command(name = "__switch", hide = true)]
    Switch { dir: std::path::PathBuf },
    /// The monitor process behind a started VM (used by `vessel start`).
    #[command(name = "__monitor", hide = true)]
    Monitor(manage::NameArg),
    /// A monitor's launcher: starts, for the monitor, the helper programs its policy
    /// names with the arguments the policy allows (`KEY=PATH` each).
    #[command(name = "__launcher", hide = true)]
    Launcher { policy: Vec<std::ffi::OsString> },
}

/// The VM options shared by `run` and `create`.
#[derive(Args, Clone)]
pub struct VmArgs {
    /// Boot a copy of an image (`vessel image ls`): its disk, kernel and initramfs, with
    /// this VM's hostname, the user's name and SSH keys set on first boot.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["kernel", "initrd"])]
    image: Option<String>,
    /// With --image: the SSH public key to install (default: ~/.ssh/id_*.pub, plus
    /// vessel's own key for `vessel ssh`).
    #[arg(long, value_name = "FILE", requires = "image")]
    ssh_key: Option<std::path::PathBuf>,
    /// Linux kernel: a bzImage or an ELF vmlinux with a PVH note (default: the kit's).
    #[arg(long, value_name = "PATH")]
    kernel: Option<std::path::PathBuf>,
    /// Initial ramdisk (default with the kit: the kit's initramfs).
    #[arg(long, value_name = "PATH")]
    initrd: Option<std::path::PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-255).
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u16,
    /// Guest memory, e.g. 256M or 2G.
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    memory: String,
    /// CPU backend: kvm, emu (vessel's software CPU), or auto (kvm with VT-x/AMD-V,
    /// emu otherwise).
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// A virtio-blk disk (raw image): `path=FILE[,readonly=on][,id=NAME]`. Repeatable;
    /// the first is /dev/vda.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,
    /// A NIC (repeatable; default: one `user` NIC): `user[,hostfwd=tcp:[ADDR]:PORT-:PORT]
    /// [,dns=ADDR]` (NAT through passt, no root), `network=NAME` (a network shared with
    /// other VMs), `bridge=BR` (a TAP on a Linux bridge, root), `tap=NAME`, each with
    /// `[,mac=MAC]`; or `none`.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<String>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: `[cid=N][,socket=PATH]` (guest CID, default 3). Host
    /// programs connect to the socket and write `CONNECT <port>`; guest connections to
    /// host port P go to `PATH_P`. Managed VMs have one (socket `vsock.sock` in their
    /// folder) unless given `off`.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    vsock: Option<String>,
    /// A host directory in the guest over virtio-fs (repeatable):
    /// `HOSTDIR[,tag=T][,readonly=on]`; the guest mounts it with `mount -t virtiofs T DIR`
    /// (the kit mounts the first, tag `share` by default, at /mnt/share). Needs
    /// virtiofsd; makes guest memory shared.
    #[arg(long = "share", value_name = "SPEC")]
    shares: Vec<String>,
    /// A virtio-balloon device: `vessel set NAME balloon=SIZE` then takes that much
    /// memory back from the running guest (and `balloon=0` gives it back); the guest's
    /// freed pages go back to the host as it frees them (free page reporting).
    #[arg(long)]
    balloon: bool,
    /// Memory guaranteed to the VM (default: none): admission never promises more than
    /// the host's memory in all, and under memory pressure the balloon may take back
    /// what lies above it (with --balloon).
    #[arg(long, value_name = "SIZE")]
    memory_min: Option<String>,
    /// Weight against other VMs when memory is taken back under pressure (2-262144;
    /// default 1024): a VM with twice the shares gives half as fast.
    #[arg(long, value_name = "N")]
    memory_shares: Option<String>,
    /// Offer the guest's memory to the host's page merging (KSM: `vessel host ksm on`).
    #[arg(long)]
    memory_merge: bool,
    /// Keep the guest's cold pages compressed (lz4), brought back on touch: `on` (the
    /// default), `auto` (only when the memory governor asks, after the balloon), or a
    /// resident size to stop at (e.g. 256M).
    #[arg(long, value_name = "on|auto|SIZE", num_args = 0..=1, default_missing_value = "on")]
    memory_compress: Option<String>,
    /// Guest RAM backing: private (default) or shared (a memfd; implied by --share).
    #[arg(long, value_name = "KIND", value_parser = ["private", "shared"])]
    memory_backing: Option<String>,
    /// The monitor's seccomp filters: on (the default: a thread that makes a system call
    /// outside its list stops the monitor, with a line naming both), log (the kernel
    /// logs it and lets it through: to find what a list misses) or off.
    #[arg(long, value_name = "MODE", value_parser = ["on", "log", "off"])]
    seccomp: Option<String>,
    /// The monitor's jail: a PID and mount namespace holding only this VM's files and
    /// devices, as an unprivileged user with no capabilities (through a user namespace
    /// when not root). `vessel start`: on by default when root starts it; `vessel run`:
    /// off unless given (`--sandbox` alone is on).
    #[arg(long, value_name = "on|off", num_args = 0..=1, default_missing_value = "on",
          value_parser = ["on", "off"])]
    sandbox: Option<String>,
    /// The CPU the guest sees: host (everything the backend can give), portable (only
    /// what both backends give: a VM that can move between them), or an x86-64 ISA
    /// level: v1 (the baseline) or v2 (SSE3 to SSE4.2, POPCNT, CX16, LAHF).
    #[arg(long, value_name = "MODEL", value_parser = ["host", "portable", "v1", "v2", "x86-64-v1", "x86-64-v2"])]
    cpu_model: Option<String>,
    /// A virtio console (the guest's hvc0): `stdio` (the console on this terminal
    /// instead of the serial port; boot with console=hvc0) or `socket=PATH`.
    #[arg(long, value_name = "SPEC")]
    hvc: Option<String>,
    /// CPU weight against other VMs (2-262144; default 1024): with 700 and 300, two
    /// busy VMs on one host CPU get 70% and 30% of it.
    #[arg(long, value_name = "N")]
    cpu_shares: Option<String>,
    /// At most this many host CPUs of time (e.g. 0.5 or 1.5), however idle the host.
    #[arg(long, value_name = "CPUS")]
    cpu_limit: Option<String>,
    /// Host CPUs guaranteed to this VM: the host starts no VM whose reservation does not
    /// fit beside the running ones' (managed VMs).
    #[arg(long, value_name = "CPUS")]
    cpu_reservation: Option<String>,
    /// The host CPUs the VM's threads run on, e.g. `0` or `0,2-3`.
    #[arg(long, value_name = "LIST")]
    cpu_affinity: Option<String>,
}

impl VmArgs {
    fn memory_shares(&self) -> Result<Option<u64>, Failure> {
        self.memory_shares
            .as_deref()
            .map(manager::spec::parse_memory_shares)
            .transpose()
            .map_err(|e| {
                Failure::usage(format!(
                    "--{}",
                    e.replacen('_', "-", 1).replacen('=', " ", 1)
                ))
            })
    }

    /// `vessel run`'s vsock device: only when asked for, its socket by default in the
    /// runtime directory, named after this process.
    fn run_vsock(&self) -> Result<Option<devices::virtio::vsock::VsockConfig>, Failure> {
        let Some(spec) = self.vsock.as_deref().filter(|s| *s != "off") else {
            return Ok(None);
        };
        let socket = run::runtime_dir().join(format!("vessel-{}.vsock", sandbox::jail::host_pid()));
        devices::virtio::vsock::VsockConfig::parse(spec, &socket)
            .map(Some)
            .map_err(|e| Failure::usage(format!("--vsock {e}")))
    }

    /// The --share specs with absolute host directories, checked.
    fn share_specs(&self) -> Result<Vec<String>, Failure> {
        let shares = manager::spec::parse_shares(&self.shares)
            .map_err(|e| Failure::usage(format!("--{e}")))?;
        shares
            .into_iter()
            .map(|mut s| {
                s.dir = std::fs::canonicalize(&s.dir)
                    .map_err(|e| Failure::usage(format!("--share {}: {e}", s.dir.display())))?;
                if !s.dir.is_dir() {
                    return Err(Failure::usage(format!(
                        "--share {}: not a directory",
                        s.dir.display()
                    )));
                }
                Ok(s.to_spec())
            })
            .collect()
    }

    /// A managed VM's vsock spec for vm.toml (None: the default device).
    fn spec_vsock(&self) -> Result<Option<String>, Failure> {
        match self.vsock.as_deref() {
            None | Some("") => Ok(None),
            Some("off") => Ok(Some("off".into())),
            Some(spec) => {
                let socket = std::path::Path::new(manager::spec::VSOCK_SOCKET);
                let c = devices::virtio::vsock::VsockConfig::parse(spec, socket)
                    .map_err(|e| Failure::usage(format!("--vsock {e}")))?;
                if c.socket != socket {
                    return Err(Failure::usage(
                        "--vsock: a managed VM's socket is vsock.sock in its folder; give only cid=N",
                    ));
                }
                Ok(Some(format!("cid={}", c.cid)))
            }
        }
    }

    /// The --cpu-* options, checked against the host.
    fn cpu_policy(&self) -> Result<cgroup::CpuPolicy, Failure> {
        let mut p = cgroup::CpuPolicy::default();
        for (key, value) in [
            ("cpu_shares", &self.cpu_shares),
            ("cpu_limit", &self.cpu_limit),
            ("cpu_reservation", &self.cpu_reservation),
            ("cpu_affinity", &self.cpu_affinity),
        ] {
            if let Some(v) = value {
                let flag = format!("--{}", key.replace('_', "-"));
                p.set(key, v)
                    .map_err(|e| Failure::usage(format!("{flag}: {e}")))?;
            }
        }
        p.validate(manager::host::online_cpus())
            .map_err(|e| Failure::usage(e.to_string()))?;
        Ok(p)
    }

    /// The --disk and --net specs, parsed.
    fn devices(
        &self,
    ) -> Result<
        (
            Vec<devices::virtio::block::BlockConfig>,
            Vec<devices::virtio::net::NetConfig>,
        ),
        Failure,
    > {
        let disks = self
            .disks
            .iter()
            .map(|d| {
                devices::virtio::block::BlockConfig::parse(d)
                    .map_err(|e| Failure::usage(format!("--disk {d:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let nets = self
            .net_specs()?
            .iter()
            .map(|n| {
                devices::virtio::net::NetConfig::parse(n)
                    .map_err(|e| Failure::usage(format!("--net {n:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok((disks, nets))
    }

    /// The --net specs to use: as given, none for `--net none`, else one NAT NIC when
    /// passt is there to give it (saying so once when it is not).
    fn net_specs(&self) -> Result<Vec<String>, Failure> {
        match self.nets.as_slice() {
            [] => match network::passt::find_passt() {
                Ok(_) => Ok(vec!["user".into()]),
                Err(e) => {
                    eprintln!("vessel: no network: {e} (--net none to say so)");
                    Ok(Vec::new())
                }
            },
            [one] if one == "none" => Ok(Vec::new()),
            many if many.iter().any(|n| n == "none") => {
                Err(Failure::usage("--net none goes alone"))
            }
            many => Ok(many.to_vec()),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    /// Linux KVM (/dev/kvm).
    Kvm,
    /// vessel's software CPU (no hardware virtualization needed).
    Emu,
    /// KVM with VT-x/AMD-V, the software CPU otherwise.
    Auto,
}

impl AccelArg {
    fn name(self) -> &'static str {
        match self {
            AccelArg::Kvm => "kvm",
            AccelArg::Emu => "emu",
            AccelArg::Auto => "auto",
        }
    }

    /// The backend to use, and for `auto` the line that says which and why.
    fn resolve(self) -> (vmm::Accel, Option<String>) {
        match self {
            AccelArg::Kvm => (vmm::Accel::Kvm, None),
            AccelArg::Emu => (vmm::Accel::Emu, None),
            AccelArg::Auto => {
                let (accel, why) = vmm::choose_accel();
                (accel, Some(format!("accel: {why}")))
            }
        }
    }
}

/// A failure: one line, and the exit code it deserves.
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// Bad input: exit code 2.
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            message: message.to_string(),
            code: 2,
        }
    }

    /// A refusal (wrong state, no room): exit code 1.
    pub fn refused(message: impl std::fmt::Display) -> Self {
        Failure {
            message: message.to_string(),
            code: 1,
        }
    }
}

impl From<manager::ManagerError> for Failure {
    fn from(e: manager::ManagerError) -> Self {
        use manager::ManagerError as E;
        match &e {
            E::WrongState { .. } | E::Admission { .. } | E::Cgroup { .. } => Failure::refused(e),
            E::Api(api::ClientError::Status { status: 409, .. }) => Failure::refused(e),
            _ => Failure::usage(e),
        }
    }
}

impl From<api::ClientError> for Failure {
    fn from(e: api::ClientError) -> Self {
        manager::ManagerError::Api(e).into()
    }
}

pub type CliResult = Result<ExitCode, Failure>;

/// `--json` output: pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) -> CliResult {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(Failure::usage)?
    );
    Ok(ExitCode::SUCCESS)
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // clap's message, without its usage block: one line, like every error.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("vessel: error: {first} (see vessel --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Kit(args) => run::kit(args),
        Command::Create(args) => manage::create(args),
        Command::Ls(args) => manage::list(args),
        Command::Start(args) => manage::start(args),
        Command::Console(args) => console::attach(args),
        Command::Stop(args) => manage::stop(args),
        Command::Kill(args) => manage::action(args, api::model::Action::Kill),
        Command::Reboot(args) => manage::action(args, api::model::Action::Reboot),
        Command::Pause(args) => manage::action(args, api::model::Action::Pause),
        Command::Resume(args) => manage::action(args, api::model::Action::Resume),
        Command::Info(args) => manage::info(args),
        Command::Logs(args) => manage::logs(args),
        Command::Ssh(args) => manage::ssh(args),
        Command::Exec(args) => guest::exec(args),
        Command::Cp(args) => guest::cp(args),
        Command::Suspend(args) => snapshot::suspend(args.name()),
        Command::Snapshot(args) => snapshot::main(args),
        Command::Clone(args) => snapshot::clone(args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::Receive(args) => migrate::receive(args),
        Command::Set(args) => manage::set(args),
        Command::Rm(args) => manage::remove(args),
        Command::Host(args) => host::host(args),
        Command::Image(cmd) => images::main(cmd),
        Command::Disk(cmd) => disks::main(cmd),
        Command::Net(cmd) => net::main(cmd),
        Command::Switch { dir } => network::switch::run(&dir)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Failure::usage),
        Command::Monitor(args) => manage::monitor(args),
        Command::Launcher { policy } => sandbox::launcher::Policy::from_args(&policy)
            .map_err(std::io::Error::other)
            .and_then(sandbox::launcher::serve)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| Failure::usage(format!("launcher: {e}"))),
    };
    match result {
        Ok(code) => code,
        Err(Failure { message, code }) => {
            eprintln!("vessel: error: {message}");
            ExitCode::from(code)
        }
    }
}
