//! Commands served by the guest agent: `vessel exec` and `vessel cp`, and the guest's
//! facts for `vessel info`. They reach the agent through the VM's vsock socket.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agent::host::{self, ClientError, Command, Stdio};
use clap::Args;
use manager::{Bundle, VmState};

use super::{CliResult, Failure};

#[derive(Args)]
pub struct ExecArgs {
    name: String,
    /// Run the command on a terminal in the guest (stdin is this terminal, raw).
    #[arg(short, long)]
    tty: bool,
    /// Seconds to wait for the agent to answer.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    timeout: u64,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
pub struct CpArgs {
    /// `NAME:PATH` (a file in the VM) or a local file.
    src: String,
    /// `NAME:PATH` or a local path (a directory takes the source's name).
    dst: String,
    /// Seconds to wait for the agent to answer.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    timeout: u64,
}

/// The vsock socket of a running VM.
fn agent_socket(name: &str) -> Result<PathBuf, Failure> {
    let home = manager::Home::from_env()?;
    let bundle = Bundle::open(&home, name)?;
    let state = bundle.status().state;
    if !matches!(state, VmState::Running | VmState::Paused) {
        return Err(Failure::refused(format!(
            "VM {name} is {state}: no guest agent to ask"
        )));
    }
    let spec = bundle.spec()?;
    match manager::guest_agent::GuestAgent::of(&bundle, &spec).socket() {
        Some(s) => Ok(s.to_path_buf()),
        None => Err(Failure::refused(format!(
            "VM {name} has no vsock device (vsock = \"off\"): no guest agent to ask"
        ))),
    }
}

fn agent_failure(name: &str, e: ClientError) -> Failure {
    match e {
        ClientError::Guest(m) => Failure::refused(format!("{name}: {m}")),
        ClientError::Local(e) => Failure::usage(e),
        e => Failure::refused(format!("{name}: {e}")),
    }
}

pub fn exec(args: ExecArgs) -> CliResult {
    let socket = agent_socket(&args.name)?;
    let tty = args.tty.then(|| terminal_size().unwrap_or((24, 80)));
    let raw = (args.tty && std::io::stdin().is_terminal()).then(vmm::console::RawTerminal::enter);
    let cmd = Command {
        argv: args.command,
        tty,
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let status = host::exec(
        &socket,
        &cmd,
        Stdio {
            stdin: Box::new(std::io::stdin()),
            stdout: &mut stdout,
            stderr: &mut stderr,
        },
        Duration::from_secs(args.timeout),
    );
    drop(raw);
    let status = status.map_err(|e| agent_failure(&args.name, e))?;
    let _ = stdout.flush();
    Ok(ExitCode::from(status.shell_code().clamp(0, 255) as u8))
}

/// rows and columns of this terminal.
fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize we pass; stdout is a descriptor we hold.
    let r = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// `NAME:PATH` → (NAME, PATH); a local path (no colon, or a slash before it) → None.
fn guest_path(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (!name.is_empty() && !name.contains('/')).then_some((name, path))
}

fn base_name(path: &str) -> Option<&str> {
    Path::new(path).file_name()?.to_str()
}

pub fn cp(args: CpArgs) -> CliResult {
    let timeout = Duration::from_secs(args.timeout);
    match (guest_path(&args.src), guest_path(&args.dst)) {
        (Some((name, from)), None) => copy_out(name, from, Path::new(&args.dst), timeout),
        (None, Some((name, to))) => copy_in(Path::new(&args.src), name, to, timeout),
        (Some(_), Some(_)) => Err(Failure::usage(
            "vessel cp copies between the host and one VM: one side is NAME:PATH, the other local",
        )),
        (None, None) => Err(Failure::usage(
            "vessel cp: name the VM's side as NAME:PATH (e.g. vm1:/etc/hostname)",
        )),
    }
}

fn copy_out(name: &str, from: &str, to: &Path, timeout: Duration) -> CliResult {
    let socket = agent_socket(name)?;
    let dest = match base_name(from) {
        Some(base) if to.is_dir() => to.join(base),
        _ => to.to_path_buf(),
    };
    // Written beside the destination and renamed over it: a failed copy leaves
    // nothing half-written.
    let tmp = dest.with_file_name(format!(
        ".{}.vessel-cp-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Failure::usage(format!("{}: {e}", dest.display())))?;
    let result = host::read_file(&socket, from, &mut file, timeout)
        .map_err(|e| agent_failure(name, e))
        .and_then(|mode| {
            file.flush()
                .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
                .and_then(|()| std::fs::rename(&tmp, &dest))
                .map_err(|e| Failure::usage(format!("{}: {e}", dest.display())))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| ExitCode::SUCCESS)
}

fn copy_in(from: &Path, name: &str, to: &str, timeout: Duration) -> CliResult {
    let mut file =
        File::open(from).map_err(|e| Failure::usage(format!("{}: {e}", from.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| Failure::usage(format!("{}: {e}", from.display())))?;
    if !meta.is_file() {
        return Err(Failure::usage(format!(
            "{}: not a regular file",
            from.display()
        )));
    }
    let socket = agent_socket(name)?;
    let dest = match (to.ends_with('/'), from.file_name().and_then(|n| n.to_str())) {
        (true, Some(base)) => format!("{to}{base}"),
        _ => to.to_string(),
    };
    let mode = meta.permissions().mode() & 0o7777;
    host::write_file(&socket, &dest, mode, &mut file, timeout)
        .map_err(|e| agent_failure(name, e))?;
    Ok(ExitCode::SUCCESS)
}

/// What the guest says about itself and how far its clock is from the host's, when an
/// agent answers within a second.
pub fn facts(
    bundle: &Bundle,
    spec: &manager::VmSpec,
) -> Option<(agent::protocol::GuestFacts, f64)> {
    let agent = manager::guest_agent::GuestAgent::of(bundle, spec);
    let socket = agent.socket()?;
    let before = now_ns();
    let facts = host::facts(socket, Duration::from_secs(1)).ok()?;
    let after = now_ns();
    let host_ns = before + (after - before) / 2;
    let offset = (facts.clock_unix_ns as i128 - host_ns) as f64 / 1e9;
    Some((facts, offset))
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_side_of_a_copy_is_name_colon_path() {
        assert_eq!(
            guest_path("vm1:/etc/hostname"),
            Some(("vm1", "/etc/hostname"))
        );
        assert_eq!(guest_path("vm1:rel"), Some(("vm1", "rel")));
        assert_eq!(guest_path("./a:b"), None);
        assert_eq!(guest_path("/tmp/x"), None);
        assert_eq!(guest_path(":x"), None);
    }
}
