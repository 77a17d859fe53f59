//! `vessel console NAME`: the VM's serial console on this terminal. Ctrl-] detaches;
//! the VM keeps running.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use manager::VmState;

use super::manage::NameArg;
use super::{CliResult, Failure};

const CTRL_RIGHT_BRACKET: u8 = 0x1d;

pub fn attach(args: NameArg) -> CliResult {
    let home = manager::Home::from_env()?;
    let bundle = manager::Bundle::open(&home, args.name())?;
    let state = bundle.status().state;
    if !matches!(state, VmState::Running | VmState::Paused) {
        return Err(Failure::refused(format!(
            "VM {} is {state}: no console to attach to",
            bundle.name
        )));
    }
    let socket = UnixStream::connect(bundle.console_socket())
        .map_err(|e| Failure::usage(format!("{}: {e}", bundle.console_socket().display())))?;
    eprintln!("vessel: attached to {} (Ctrl-] detaches)", bundle.name);
    let _raw = vmm::console::RawTerminal::enter();
    let mut from_vm = socket.try_clone().map_err(Failure::usage)?;
    let mut to_vm = socket;
    // Guest output to the terminal until the VM goes away.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        // The VM stopped: nothing more to attach to.
        std::process::exit(0);
    });
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(at) = chunk.iter().position(|&b| b == CTRL_RIGHT_BRACKET) {
            let _ = to_vm.write_all(&chunk[..at]);
            break;
        }
        if to_vm.write_all(chunk).is_err() {
            break;
        }
    }
    drop(_raw);
    eprintln!("\r\nvessel: detached from {}", bundle.name);
    Ok(ExitCode::SUCCESS)
}
