//! Which guest pages changed since the last look: KVM's own log of its vCPUs' writes
//! (on KVM) joined with the code map's log of every write vessel makes itself (the
//! software CPU's, the KVM fallback interpreter's, the devices' through vm-memory).

use std::sync::Arc;

use cpu::kvm::KvmDirtyLog;
use x86::CodeMap;

pub struct DirtyLog {
    pub(crate) code: Arc<CodeMap>,
    pub(crate) kvm: Option<KvmDirtyLog>,
}

impl DirtyLog {
    /// Turns logging on or off (every page clean). The caller has the vCPUs parked.
    pub fn set(&self, on: bool) -> Result<(), String> {
        if let Some(k) = &self.kvm {
            k.set(on).map_err(|e| e.to_string())?;
        }
        self.code.set_dirty_logging(on);
        Ok(())
    }

    /// The pages written since the last call, sorted, each once; the log starts clean.
    /// The caller has the vCPUs parked.
    pub fn take(&self) -> Result<Vec<u64>, String> {
        let mut pages = self.code.take_dirty();
        if let Some(k) = &self.kvm {
            pages.extend(k.take().map_err(|e| e.to_string())?);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}
