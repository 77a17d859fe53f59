//! `Shutdown` and `SetTime`.
//!
//! A shutdown is answered first, then carried out a moment later on a thread of its own,
//! the init system's way where there is one ([`halt_plan`]), with the reboot system
//! call as the last resort.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use std::io::Read;

use super::{Connection, GuestError, Receiver, Sender, io_text, log};
use crate::protocol::Message;

/// The longest wait between the answer and the shutdown, for the answer to get out
/// (the host closing the connection ends the wait sooner).
const ANSWER_DELAY: Duration = Duration::from_millis(100);
/// How long a `poweroff` that said yes gets before the system call is used.
const COMMAND_GRACE: Duration = Duration::from_secs(30);

/// How the machine is brought down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HaltStep {
    /// `systemctl poweroff|reboot`: systemd goes down in its own time.
    Systemd,
    /// `/sbin/vessel-halt poweroff|reboot`: the kit's clean halt, which does not return.
    KitHalt,
    /// `poweroff`/`reboot` from PATH (busybox's signals init), with a grace period.
    Command,
    /// sync(2) and reboot(2).
    SystemCall,
}

/// The ways to try, in order (the last is always [`HaltStep::SystemCall`]).
pub type HaltPlan = Vec<HaltStep>;

/// The path of the kit's halt script.
const KIT_HALT: &str = "/sbin/vessel-halt";

/// Chooses how to halt from what the guest has: systemd running, `/proc/1/comm`, the
/// kit's halt script being executable, a `poweroff` (or `reboot`) command in PATH.
pub fn halt_plan(
    systemd_running: bool,
    pid1_comm: &str,
    kit_halt_executable: bool,
    command_in_path: bool,
) -> HaltPlan {
    let mut plan = Vec::new();
    let pid1_is_systemd = pid1_comm.trim() == "systemd";
    if kit_halt_executable && !pid1_is_systemd {
        plan.push(HaltStep::KitHalt);
    }
    if systemd_running {
        plan.push(HaltStep::Systemd);
    } else if command_in_path {
        plan.push(HaltStep::Command);
    }
    plan.push(HaltStep::SystemCall);
    plan
}

pub(crate) fn shutdown<C: Connection>(
    reboot: bool,
    mut receiver: Receiver<C>,
    sender: &Sender<C>,
) -> Result<(), GuestError> {
    sender.message(&Message::Done)?;
    // The host has the answer once it closes the connection (or has had the time).
    receiver.get_ref().set_read_timeout(Some(ANSWER_DELAY))?;
    let _ = receiver.read(&mut [0u8; 1]);
    thread::spawn(move || halt(reboot));
    Ok(())
}

fn current_plan(reboot: bool) -> HaltPlan {
    let command = if reboot { "reboot" } else { "poweroff" };
    halt_plan(
        Path::new("/run/systemd/system").is_dir(),
        &std::fs::read_to_string("/proc/1/comm").unwrap_or_default(),
        is_executable(Path::new(KIT_HALT)),
        in_path(command),
    )
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn in_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(name)))
}

/// Brings the machine down; returns only if every way failed.
fn halt(reboot: bool) {
    if cfg!(test) {
        // The tests run on the host: it is not theirs to stop.
        return;
    }
    let verb = if reboot { "reboot" } else { "poweroff" };
    for step in current_plan(reboot) {
        let outcome = match step {
            HaltStep::Systemd => run("systemctl", &[verb]),
            HaltStep::KitHalt => run(KIT_HALT, &[verb]),
            HaltStep::Command => run(verb, &[]).map(|()| thread::sleep(COMMAND_GRACE)),
            HaltStep::SystemCall => system_call(reboot),
        };
        match outcome {
            // systemd stops the machine in its own time.
            Ok(()) if step == HaltStep::Systemd => return,
            Ok(()) => log(format!("{verb}: {step:?} returned; trying the next way")),
            Err(e) => log(format!("{verb}: {step:?}: {e}")),
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| io_text(&e))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} failed: {status}"))
    }
}

fn system_call(reboot: bool) -> Result<(), String> {
    let how = if reboot {
        libc::RB_AUTOBOOT
    } else {
        libc::RB_POWER_OFF
    };
    // SAFETY: sync(2) and reboot(2) take no pointers.
    let r = unsafe {
        libc::sync();
        libc::reboot(how)
    };
    if r < 0 {
        return Err(io_text(&std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) fn set_time<C: Connection>(unix_ns: i64, sender: &Sender<C>) -> Result<(), GuestError> {
    let ts = libc::timespec {
        tv_sec: unix_ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: unix_ns.rem_euclid(1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime(2) reads one timespec, which lives across the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(GuestError::Failed(format!(
            "cannot set the clock: {}",
            io_text(&e)
        )));
    }
    sender.message(&Message::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::testing::round_trip;
    use crate::protocol::{Frame, Message};

    #[test]
    fn the_plan_prefers_the_init_systems_way() {
        use HaltStep::*;
        // The kit: busybox sh as PID 1, its halt script.
        assert_eq!(
            halt_plan(false, "init\n", true, true),
            [KitHalt, Command, SystemCall]
        );
        // A systemd distribution (the kit's script is not for it).
        assert_eq!(
            halt_plan(true, "systemd\n", true, true),
            [Systemd, SystemCall]
        );
        assert_eq!(
            halt_plan(true, "systemd\n", false, true),
            [Systemd, SystemCall]
        );
        // Another init with busybox or sysvinit tools.
        assert_eq!(halt_plan(false, "init", false, true), [Command, SystemCall]);
        // Nothing at all.
        assert_eq!(halt_plan(false, "", false, false), [SystemCall]);
    }

    #[test]
    fn shutdown_is_answered_but_not_carried_out_in_tests() {
        let (frames, result) = round_trip(&Message::Shutdown { reboot: false });
        result.unwrap();
        assert_eq!(frames, [Frame::Message(Message::Done)]);
        std::thread::sleep(ANSWER_DELAY * 2);
    }
}
