//! A VESSEL_HOME of its own for one test, driven through the real CLI; the monitors
//! still running when the test ends are killed.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::Finished;

pub struct Home {
    dir: tempfile::TempDir,
    /// How long one `vessel` command may take.
    deadline: Duration,
}

impl Home {
    pub fn new() -> Self {
        Self::with_deadline(Duration::from_secs(120))
    }

    pub fn with_deadline(deadline: Duration) -> Self {
        Home {
            dir: tempfile::tempdir().unwrap(),
            deadline,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn vessel(&self, args: &[&str]) -> Finished {
        let mut cmd = super::vessel();
        cmd.args(args).env("VESSEL_HOME", self.path());
        super::run_with_deadline(cmd, self.deadline)
    }

    /// `vessel create NAME` of the kit's Linux on the software CPU (256 MiB, no NIC)
    /// running `script`, with `extra` arguments.
    pub fn create_kit_vm(&self, name: &str, kit: &kit::Kit, script: &str, extra: &[&str]) {
        self.create_kit_vm_of(name, kit, "256M", script, extra);
    }

    /// [`Self::create_kit_vm`] with `memory`.
    pub fn create_kit_vm_of(
        &self,
        name: &str,
        kit: &kit::Kit,
        memory: &str,
        script: &str,
        extra: &[&str],
    ) {
        let (kernel, initrd) = (
            kit.vmlinux.display().to_string(),
            kit.initrd.display().to_string(),
        );
        let cmdline = kit::cmdline("", Some(script));
        let mut args = vec![
            "create",
            name,
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            &cmdline,
            "--memory",
            memory,
            "--accel",
            "emu",
            "--net",
            "none",
        ];
        args.extend(extra);
        self.ok(&args);
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.vessel(args);
        assert_eq!(r.code, Some(0), "vessel {args:?}: {}", r.dump());
        r.stdout
    }

    /// A refusal: the exit code, and the one line said.
    pub fn refused(&self, args: &[&str]) -> (Option<i32>, String) {
        let r = self.vessel(args);
        assert_ne!(r.code, Some(0), "vessel {args:?} should fail: {}", r.dump());
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.dump());
        (r.code, r.stderr)
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.path().join("vms").join(name)
    }

    /// The VM's serial log so far, without carriage returns.
    pub fn log(&self, name: &str) -> String {
        let bytes = std::fs::read(self.vm_dir(name).join("serial.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// Waits up to 90 s for `what` in the serial log after byte `from`; returns the log.
    pub fn wait_log(&self, name: &str, from: usize, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = self.log(name);
            if log.get(from..).is_some_and(|l| l.contains(what)) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} in:\n{}",
                &log[from.min(log.len())..]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last count a `snippets` counting guest printed.
    pub fn count(&self, name: &str) -> u32 {
        testguest::snippets::last_count(&self.log(name)).unwrap_or(0)
    }

    pub fn wait_count(&self, name: &str, at_least: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count(name) < at_least {
            assert!(
                Instant::now() < deadline,
                "{name} never counted to {at_least}: {}",
                self.log(name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.vm_dir(name).join("status.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    pub fn pid(&self, name: &str) -> i32 {
        self.status(name)["pid"].as_i64().unwrap() as i32
    }

    pub fn ls(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["ls", "--json"])).unwrap()
    }

    pub fn state_in_ls(&self, name: &str) -> String {
        let ls = self.ls();
        ls.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["state"].as_str().unwrap().to_string())
            .unwrap()
    }

    /// SIGKILL the monitor and wait until its process is gone.
    pub fn kill_monitor(&self, name: &str) {
        let pid = self.pid(name);
        // SAFETY: kill(2) of the monitor process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Types `text` on the VM's serial console.
    pub fn type_text(&self, name: &str, text: &str) {
        let mut s = UnixStream::connect(self.vm_dir(name).join("console.sock")).unwrap();
        s.write_all(text.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.path().join("vms")) else {
            return;
        };
        for e in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path().join("status.json"))
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(pid) = v["pid"].as_i64()
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
