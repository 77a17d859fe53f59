//! `vessel`: the command line. Parses arguments, calls the library, prints one line.

mod cli;
mod log;

use std::process::ExitCode;

fn main() -> ExitCode {
    vmm::mark_process_start();
    log::init();
    cli::main()
}
