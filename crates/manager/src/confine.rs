//! Confining the process that runs a VM (a monitor, or `vessel run`): its launcher may
//! start vessel itself (a network's switch), passt and virtiofsd, and nothing else;
//! then its threads are held to their seccomp lists (see the sandbox crate).

use devices::virtio::net::Attachment;

use crate::ManagerError;

/// Confines this process as `mode` says, from the calling (main) thread, for a VM
/// configured as `config` (whose helper programs, if it has any, then start through a
/// launcher).
pub fn confine(mode: sandbox::Mode, config: &vmm::VmConfig) -> Result<(), ManagerError> {
    let exe = std::env::current_exe()
        .map_err(|e| ManagerError::Other(format!("cannot find vessel's own program: {e}")))?;
    let helpers = !config.shares.is_empty()
        || config
            .nets
            .iter()
            .any(|n| matches!(n.attach, Attachment::User { .. } | Attachment::Network(_)));
    // A KVM VM's launcher also keeps the VM for its teardown after vessel exits.
    let launcher = helpers || config.accel == vmm::Accel::Kvm;
    let programs: Vec<_> = if launcher && mode != sandbox::Mode::Off {
        [Some(exe.clone())]
            .into_iter()
            .chain([
                network::passt::find_passt().ok(),
                devices::virtio::fs::find_virtiofsd(),
            ])
            .flatten()
            .collect()
    } else {
        Vec::new()
    };
    sandbox::confine(mode, &exe, &programs)
        .map_err(|e| ManagerError::Other(format!("seccomp: {e}")))
}
