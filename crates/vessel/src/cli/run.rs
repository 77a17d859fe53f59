//! `vessel run` and `vessel kit`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vmm::{VmConfig, VmOutcome};

use super::{CliResult, Failure, VmArgs};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// At exit, print vCPU exits by reason, the instructions vessel's interpreter ran
    /// for KVM by mnemonic, and what the software CPU did.
    #[arg(long)]
    stats: bool,
    /// Stop the VM where KVM cannot emulate an instruction, as other VMMs do, instead
    /// of running it in vessel's interpreter (to compare how far a guest gets).
    #[arg(long)]
    no_kvm_fallback: bool,
    /// QEMU's isa-debug-exit at port 0xf4: a value V the guest writes there ends the
    /// VM, and vessel exits with status (V << 1) | 1 (test kernels end runs this way).
    #[arg(long)]
    debug_exit: bool,
    /// Continue a VM saved in a snapshot folder (`vessel snapshot`, `vessel suspend`):
    /// its config is the folder's vm.toml, on the --accel given.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["image", "kernel", "initrd"])]
    restore: Option<PathBuf>,
}

#[derive(Args)]
pub struct KitArgs {
    /// Rebuild even if a complete kit is cached.
    #[arg(long)]
    force: bool,
    /// Cache directory (default: $VESSEL_KIT_DIR, else ~/.cache/vessel/kit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("vessel-run-{}", std::process::id()));
    if args.vm.sandbox.as_deref() == Some("on") {
        // The VM runs as PID 1 of a namespace of its own; this process waits outside
        // it, then removes what a jailed VM could not (its folder is a mount there).
        let outside = sandbox::jail::fork_into_pid_namespace().map_err(Failure::usage)?;
        if let Some(code) = outside {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
    }
    if let Some(dir) = &args.restore {
        return run_restored(&args, dir);
    }
    let Some(name) = args.vm.image.clone() else {
        return run_vm(&args, None);
    };
    // A throw-away VM: its own copy of the image in a temporary folder, gone at exit.
    let image = super::images::open(&name)?;
    std::fs::create_dir_all(&dir).map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?;
    let result = (|| {
        let home = manager::Home::from_env()?;
        let hostname = image.name.replace('.', "-");
        let p = super::images::provision(&home, &image, &dir, &hostname, args.vm.ssh_key.as_ref())?;
        run_vm(&args, Some((&dir, &p)))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the VM; with an image, from the copy provisioned in `dir`.
fn run_vm(
    args: &RunArgs,
    from_image: Option<(&std::path::Path, &image::Provisioned)>,
) -> CliResult {
    let a = &args.vm;
    let memory = vmm::parse_size(&a.memory).map_err(Failure::usage)?;
    let (kernel, initrd, cmdline) = match (from_image, a.kernel.clone()) {
        (Some((dir, p)), _) => (
            dir.join(p.kernel),
            Some(dir.join(p.initrd)),
            a.cmdline.clone().unwrap_or_else(|| image::CMDLINE.into()),
        ),
        (None, kernel) => match kernel {
            Some(kernel) => (
                kernel,
                a.initrd.clone(),
                a.cmdline
                    .clone()
                    .unwrap_or_else(|| manager::spec::DEFAULT_CMDLINE.into()),
            ),
            None => {
                let kit = default_kit()?;
                (
                    kit.vmlinux,
                    a.initrd.clone().or(Some(kit.initrd)),
                    a.cmdline
                        .clone()
                        .unwrap_or_else(|| kit::DEFAULT_CMDLINE.into()),
                )
            }
        },
    };
    let (mut disks, nets) = a.devices()?;
    if let Some((dir, p)) = from_image {
        disks = super::images::disks(p, Some(dir), &a.disks)
            .iter()
            .map(|d| devices::virtio::block::BlockConfig::parse(d).map_err(Failure::usage))
            .collect::<Result<_, _>>()?;
    }
    let (accel, why) = a.accel.resolve();
    let policy = a.cpu_policy()?;
    if let Some(set) = &policy.affinity {
        cgroup::pin_current_thread(set)
            .map_err(|e| Failure::usage(format!("--cpu-affinity {set}: {e}")))?;
    }
    let home = manager::Home::from_env()?;
    // host.toml is read only when there is a cgroup to place (it names the parent).
    let _cgroup = if policy.needs_cgroup() {
        let parent = manager::host::Host::load(&home)?.cgroup_parent;
        manager::resources::OwnCgroup::join(&parent, &policy).map_err(Failure::usage)?
    } else {
        None
    };
    let config = VmConfig {
        kernel,
        initrd,
        cmdline,
        cpus: a.cpus,
        memory,
        accel,
        disks,
        nets,
        rng: a.rng,
        vsock: a.run_vsock()?,
        shares: manager::spec::parse_shares(&a.share_specs()?).map_err(Failure::usage)?,
        runtime_dir: runtime_dir(),
        shared_memory: a.memory_backing.as_deref() == Some("shared"),
        balloon: a.balloon,
        memory_merge: a.memory_merge,
        memory_compress: a
            .memory_compress
            .as_deref()
            .map(vmm::compress::CompressConfig::parse)
            .transpose()
            .map_err(Failure::usage)?,
        hvc: a
            .hvc
            .as_deref()
            .map(vmm::Hvc::parse)
            .transpose()
            .map_err(|e| Failure::usage(format!("--hvc {e}")))?,
        kvm_fallback: !args.no_kvm_fallback,
        debug_exit: args.debug_exit,
        networks: network::switch::networks_dir(home.root()),
        cpu_model: vmm::CpuModel::parse(a.cpu_model.as_deref().unwrap_or("host"))
            .map_err(Failure::usage)?,
        vmgenid: vmm::new_vmgenid(),
    };
    confine(a, &config, from_image.map(|(dir, _)| dir))?;
    // Said once the VM is built, so that a bad argument is still the only line.
    let run = vmm::run(&config, || {
        if let Some(why) = &why {
            eprintln!("vessel: {why}");
        }
    })
    .map_err(Failure::usage);
    vmm::builder::release_taps();
    let (outcome, metrics) = run?;
    eprintln!("vessel: {outcome}");
    if args.stats {
        for line in metrics.summary().lines() {
            eprintln!("vessel: stats: {line}");
        }
    }
    Ok(exit_code(&outcome))
}

/// The cached kit, built on first use (and again when the guest agent beside vessel is
/// not the one in it).
fn default_kit() -> Result<kit::Kit, Failure> {
    let dir = kit::default_cache_dir().map_err(Failure::usage)?;
    if kit::locate(&dir).is_none() {
        eprintln!(
            "vessel: building the default guest kit in {} (first run)",
            dir.display()
        );
    }
    kit::build(&kit::KitOptions::default()).map_err(Failure::usage)
}

pub fn kit(args: KitArgs) -> CliResult {
    let kit = kit::build(&kit::KitOptions {
        cache_dir: args.dir,
        force: args.force,
        agent: None,
    })
    .map_err(Failure::usage)?;
    println!("kernel   {}", kit.bzimage.display());
    println!("vmlinux  {}", kit.vmlinux.display());
    println!("initrd   {}", kit.initrd.display());
    println!("version  {}", kit.kernel_version);
    match &kit.agent {
        Some(id) => println!("agent    {} ({id})", kit::AGENT_NAME),
        None => println!(
            "agent    none (build {} and run vessel kit again)",
            kit::AGENT_NAME
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Confines `vessel run` as its options say: seccomp on unless told, the jail (with
/// `dir`, the VM's own files, if it has any) only when asked.
fn confine(
    a: &VmArgs,
    config: &vmm::VmConfig,
    dir: Option<&std::path::Path>,
) -> Result<(), Failure> {
    let seccomp = a
        .seccomp
        .as_deref()
        .unwrap_or("on")
        .parse()
        .map_err(Failure::usage)?;
    let jail = match a.sandbox.as_deref() {
        Some("on") => {
            let mount_point = manager::Home::from_env()?.root().join("jail");
            Some(manager::confine::prepare_jail(
                config,
                dir,
                &mount_point,
                false,
            )?)
        }
        _ => None,
    };
    manager::confine::confine(seccomp, config, jail.as_ref())?;
    Ok(())
}

/// Where `vessel run` puts its sockets: `$XDG_RUNTIME_DIR`, else the temporary directory.
pub fn runtime_dir() -> std::path::PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// `vessel run --restore DIR`: the snapshot's VM, continued in the foreground.
fn run_restored(args: &RunArgs, dir: &std::path::Path) -> CliResult {
    let state = vmm::snapshot::read_state(dir).map_err(Failure::usage)?;
    if dir.join("meta.json").is_file() {
        manager::snapshots::check_disks(dir)?;
    }
    let toml = dir.join("vm.toml");
    let text = std::fs::read_to_string(&toml)
        .map_err(|e| Failure::usage(format!("{}: {e}", toml.display())))?;
    let mut spec = manager::VmSpec::from_toml(&toml, &text)?;
    if args.vm.accel.name() != "auto" {
        spec.accel = args.vm.accel.name().into();
    }
    let mut config = spec.to_vm_config(dir)?;
    config.networks = network::switch::networks_dir(manager::Home::from_env()?.root());
    config.debug_exit = args.debug_exit;
    let restore = vmm::builder::Restore {
        state,
        memory: dir.join(vmm::snapshot::file::MEMORY),
        postcopy: None,
    };
    confine(&args.vm, &config, Some(dir))?;
    let mut vm = vmm::builder::build_from(&config, vmm::Console::Stdio, Some(&restore))
        .map_err(Failure::usage)?;
    vm.detach_teardown();
    let outcome = vm.run().map_err(Failure::usage)?;
    eprintln!("vessel: {outcome}");
    Ok(exit_code(&outcome))
}

/// What `vessel run` exits with after `outcome`.
fn exit_code(outcome: &VmOutcome) -> ExitCode {
    match outcome {
        VmOutcome::Crashed { .. } => ExitCode::from(1),
        VmOutcome::DebugExit(status) => ExitCode::from(*status),
        _ => ExitCode::SUCCESS,
    }
}
