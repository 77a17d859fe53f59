//! A `vessel receive` run by a test, the other end of a live migration.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::home::Home;

/// A `vessel receive` listening in `home` on a port of its own.
pub struct Receiver {
    pub child: Child,
    pub addr: String,
}

impl Receiver {
    pub fn start(home: &Home, extra: &[&str]) -> Receiver {
        let mut cmd = super::vessel();
        cmd.args(["receive", "--listen", "tcp:127.0.0.1:0"])
            .args(extra)
            .env("VESSEL_HOME", home.path());
        Self::spawn(cmd)
    }

    /// Runs `cmd` (a `vessel receive`) and waits for the address it listens on.
    pub fn spawn(mut cmd: Command) -> Receiver {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("vessel receive said {line:?}"))
            .to_string();
        Receiver { child, addr }
    }

    /// Waits for it to end; returns whether it succeeded and what it printed.
    pub fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                let _ =
                    std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out);
                let _ =
                    std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut out);
                return (status.success(), out);
            }
            assert!(Instant::now() < deadline, "vessel receive never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
