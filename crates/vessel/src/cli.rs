//! Subcommands and their arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmm::{Accel, VmConfig, VmOutcome};

/// Command line used for kernels given with --kernel when --cmdline is not.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

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
    Run(RunArgs),
    /// Build (or find) the default guest kit from Debian's packages and print its paths.
    Kit(KitArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Linux kernel: a bzImage or an ELF vmlinux with a PVH note (default: the kit's).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (default with the kit: the kit's initramfs).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-255).
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u16,
    /// Guest memory, e.g. 256M or 2G.
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    memory: String,
    /// CPU backend.
    #[arg(long, value_enum, default_value_t = AccelArg::Kvm)]
    accel: AccelArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    /// Linux KVM (/dev/kvm).
    Kvm,
}

#[derive(Args)]
struct KitArgs {
    /// Rebuild even if a complete kit is cached.
    #[arg(long)]
    force: bool,
    /// Cache directory (default: $VESSEL_KIT_DIR, else ~/.cache/vessel/kit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// A failure the user can act on: one line, exit code 2.
struct UsageError(String);

impl<E: std::fmt::Display> From<E> for UsageError {
    fn from(e: E) -> Self {
        UsageError(e.to_string())
    }
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
        Command::Run(args) => run(args),
        Command::Kit(args) => kit(args),
    };
    match result {
        Ok(code) => code,
        Err(UsageError(message)) => {
            eprintln!("vessel: error: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode, UsageError> {
    let memory = vmm::parse_size(&args.memory)?;
    let (kernel, initrd, cmdline) = match args.kernel {
        Some(kernel) => (
            kernel,
            args.initrd,
            args.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
        ),
        None => {
            let kit = default_kit()?;
            (
                kit.vmlinux,
                args.initrd.or(Some(kit.initrd)),
                args.cmdline.unwrap_or_else(|| kit::DEFAULT_CMDLINE.into()),
            )
        }
    };
    let config = VmConfig {
        kernel,
        initrd,
        cmdline,
        cpus: args.cpus,
        memory,
        accel: match args.accel {
            AccelArg::Kvm => Accel::Kvm,
        },
    };
    let outcome = vmm::run(&config)?;
    eprintln!("vessel: {outcome}");
    Ok(match outcome {
        VmOutcome::Crashed { .. } => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

/// The cached kit, built on first use.
fn default_kit() -> Result<kit::Kit, UsageError> {
    let dir = kit::default_cache_dir()?;
    if let Some(kit) = kit::locate(&dir) {
        return Ok(kit);
    }
    eprintln!(
        "vessel: building the default guest kit in {} (first run)",
        dir.display()
    );
    Ok(kit::build(&kit::KitOptions::default())?)
}

fn kit(args: KitArgs) -> Result<ExitCode, UsageError> {
    let kit = kit::build(&kit::KitOptions {
        cache_dir: args.dir,
        force: args.force,
    })?;
    println!("kernel   {}", kit.bzimage.display());
    println!("vmlinux  {}", kit.vmlinux.display());
    println!("initrd   {}", kit.initrd.display());
    println!("version  {}", kit.kernel_version);
    Ok(ExitCode::SUCCESS)
}
