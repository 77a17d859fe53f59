//! Landlock, where the kernel has it: inside the jail, files only under the bound
//! paths (read-only ones read-only), the jail's /dev and its /proc (read-only); no
//! abstract UNIX socket outside the monitor and no signal to a process outside it.
//! What the kernel does not know is left out (best effort), and said.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, path_beneath_rules,
};

use super::{Jail, JailError};

/// How much of the ruleset the kernel enforces.
pub(super) fn restrict(jail: &Jail) -> Result<RulesetStatus, JailError> {
    let abi = ABI::V6;
    let fail = |e: landlock::RulesetError| JailError::Setup {
        what: "Landlock".into(),
        source: std::io::Error::other(e),
    };
    let (rw, ro): (Vec<_>, Vec<_>) = jail.binds.iter().partition(|b| b.writable);
    let rw: Vec<PathBuf> = rw
        .iter()
        .map(|b| b.path.clone())
        .chain([PathBuf::from("/dev")])
        .collect();
    let ro: Vec<PathBuf> = ro
        .iter()
        .map(|b| b.path.clone())
        .chain([PathBuf::from("/proc")])
        .collect();
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::AbstractUnixSocket | Scope::Signal))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&rw, AccessFs::from_all(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&ro, AccessFs::from_read(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(fail)?;
    Ok(status.ruleset)
}
