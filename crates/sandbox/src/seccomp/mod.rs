//! Seccomp filters per thread class, compiled with seccompiler. A confined monitor's
//! main thread enters the VMM class first (before it builds anything from the VM's
//! configuration); every thread it makes then enters its own class before it touches
//! guest-controlled data, on top of the VMM filter it inherits. A call outside a
//! thread's list stops the monitor with one log line naming the thread and the call
//! (`--seccomp on`), is allowed and logged by the kernel (`log`, to find what a list
//! misses), or nothing is filtered (`off`).
//!
//! Two narrower rules ride along as filters of their own (the kernel applies the
//! strictest answer): `clone3` fails with ENOSYS everywhere (its flags sit in memory a
//! filter cannot read, so glibc falls back to `clone`, whose flags must include
//! CLONE_THREAD), and threads of the narrow classes get EACCES when they open a file
//! (glibc's malloc reads two files in a new thread, and copes without them).

pub mod lists;
mod report;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// What a thread does, which decides what it may ask the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadClass {
    /// The monitor's main and API threads, the console server, helpers' supervisors.
    Vmm,
    /// A virtual CPU (KVM or the software CPU) and the device registers it emulates.
    Vcpu,
    /// Device workers, one class per kind.
    Block,
    Net,
    Rng,
    Balloon,
    Vsock,
    /// virtio-fs: kicks and calls forwarded to virtiofsd, or answered with EIO.
    Fs,
    /// Console input and output threads.
    Console,
    /// The compression cache's fault and scanner threads.
    Memory,
}

impl ThreadClass {
    pub const ALL: [ThreadClass; 10] = [
        ThreadClass::Vmm,
        ThreadClass::Vcpu,
        ThreadClass::Block,
        ThreadClass::Net,
        ThreadClass::Rng,
        ThreadClass::Balloon,
        ThreadClass::Vsock,
        ThreadClass::Fs,
        ThreadClass::Console,
        ThreadClass::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vmm => "vmm",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::Block => "block",
            ThreadClass::Net => "net",
            ThreadClass::Rng => "rng",
            ThreadClass::Balloon => "balloon",
            ThreadClass::Vsock => "vsock",
            ThreadClass::Fs => "fs",
            ThreadClass::Console => "console",
            ThreadClass::Memory => "memory",
        }
    }

    fn from_name(s: &str) -> Option<ThreadClass> {
        ThreadClass::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// `--seccomp on|log|off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Nothing filtered (also what a process that never configured seccomp gets).
    #[default]
    Off,
    /// A call outside the list stops the monitor.
    On,
    /// A call outside the list goes through and the kernel logs it.
    Log,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("seccomp {s:?}: on, log or off")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::On => "on",
            Mode::Log => "log",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {class} filter: {reason}")]
    Build { class: &'static str, reason: String },
    #[error("cannot install the {class} filter: {reason}")]
    Install { class: &'static str, reason: String },
    #[error("cannot catch the filter's signal: {0}")]
    Signal(std::io::Error),
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// The class whose threads make a forbidden call right after entering it (tests).
static SELFTEST: AtomicU8 = AtomicU8::new(u8::MAX);

/// The environment variable naming a thread class whose threads, once confined, make a
/// call no list allows: how the tests see a violation end a monitor.
pub const SELFTEST_ENV: &str = "VESSEL_SECCOMP_SELFTEST";

fn encode(mode: Mode) -> u8 {
    match mode {
        Mode::Off => 0,
        Mode::On => 1,
        Mode::Log => 2,
    }
}

/// The mode this process confines its threads in.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        1 => Mode::On,
        2 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Sets the process's mode (once, before any thread enters a class) and, for `on`,
/// catches the filters' signal to say which thread made which call.
pub fn configure(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::On {
        report::install().map_err(SeccompError::Signal)?;
    }
    if let Some(class) = std::env::var(SELFTEST_ENV)
        .ok()
        .and_then(|c| ThreadClass::from_name(&c))
    {
        SELFTEST.store(class as u8, Ordering::Release);
    }
    MODE.store(encode(mode), Ordering::Release);
    Ok(())
}

/// Confines the calling thread to `class` (nothing when the mode is off).
pub fn enter(class: ThreadClass) -> Result<(), SeccompError> {
    let action = match mode() {
        Mode::Off => return Ok(()),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    report::set_thread(class);
    for filter in compiled(class, action)?.iter() {
        seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install {
            class: class.name(),
            reason: e.to_string(),
        })?;
    }
    if SELFTEST.load(Ordering::Acquire) == class as u8 {
        // SAFETY: syslog(SYSLOG_ACTION_SIZE_BUFFER) only reads a size; no list allows
        // it, so the filter stops the monitor here.
        unsafe { libc::syscall(libc::SYS_syslog, 10, 0, 0) };
    }
    Ok(())
}

/// `class`'s filters, compiled once per process (every vCPU and worker of a class
/// installs the same ones).
fn compiled(
    class: ThreadClass,
    action: SeccompAction,
) -> Result<std::sync::Arc<Vec<BpfProgram>>, SeccompError> {
    type Cache = std::sync::Mutex<BTreeMap<ThreadClass, std::sync::Arc<Vec<BpfProgram>>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = cache.get(&class) {
        return Ok(f.clone());
    }
    let f = std::sync::Arc::new(filters(class, action)?);
    cache.insert(class, f.clone());
    Ok(f)
}

/// The filters of `class`: its allow-list (anything else gets `mismatch`), clone3
/// refused with ENOSYS, and for narrow classes files refused with EACCES.
pub fn filters(
    class: ThreadClass,
    mismatch: SeccompAction,
) -> Result<Vec<BpfProgram>, SeccompError> {
    let build = |rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch, on_match| {
        SeccompFilter::new(rules, mismatch, on_match, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| SeccompError::Build {
                class: class.name(),
                reason: e.to_string(),
            })
    };
    let mut allow = BTreeMap::new();
    for s in lists::allowed(class) {
        if s == Sysno::ioctl && lists::ioctls(class).is_some_and(|t| t.is_empty()) {
            continue; // an empty rule list would allow any request
        }
        allow.insert(s.id() as i64, rules_for(class, s)?);
    }
    // The allow-list goes in last: installing a filter takes prctl and seccomp, which
    // a narrow list does not allow.
    let only = |s: Sysno| BTreeMap::from([(s.id() as i64, Vec::new())]);
    let mut out = vec![build(
        only(Sysno::clone3),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?];
    if !lists::opens_files(class) {
        out.push(build(
            only(Sysno::openat),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?);
    }
    out.push(build(allow, mismatch, SeccompAction::Allow)?);
    Ok(out)
}

/// Argument rules for one allowed call (empty: any arguments).
fn rules_for(class: ThreadClass, s: Sysno) -> Result<Vec<SeccompRule>, SeccompError> {
    let bad = |e: seccompiler::BackendError| SeccompError::Build {
        class: class.name(),
        reason: e.to_string(),
    };
    let cond = |arg, op, value| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value);
    match s {
        Sysno::clone => Ok(vec![
            SeccompRule::new(vec![
                cond(
                    0,
                    SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )
                .map_err(bad)?,
            ])
            .map_err(bad)?,
        ]),
        Sysno::ioctl => match lists::ioctls(class) {
            None => Ok(Vec::new()),
            Some(allowed) => allowed
                .iter()
                .map(|i| {
                    let c = match *i {
                        lists::Ioctl::Type(t) => {
                            cond(1, SeccompCmpOp::MaskedEq(0xff00), u64::from(t) << 8)
                        }
                        lists::Ioctl::Request(r) => cond(1, SeccompCmpOp::Eq, u64::from(r)),
                    };
                    SeccompRule::new(vec![c.map_err(bad)?]).map_err(bad)
                })
                .collect(),
        },
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles() {
        for c in ThreadClass::ALL {
            let f = filters(c, SeccompAction::Trap).unwrap();
            assert!(f.len() >= 2, "{c:?}");
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in ["on", "log", "off"] {
            assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
        }
        assert!(
            "maybe"
                .parse::<Mode>()
                .unwrap_err()
                .contains("on, log or off")
        );
    }
}
