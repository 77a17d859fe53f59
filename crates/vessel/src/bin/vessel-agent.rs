//! `vessel-agent`: vessel's guest agent, run inside the VM (see `agent::guest`).

use std::process::ExitCode;

fn main() -> ExitCode {
    agent::guest::main()
}
