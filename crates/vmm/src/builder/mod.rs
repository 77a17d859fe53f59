//! Assembles a VM from its config: guest memory, ACPI, the kernel, the backend, the
//! device model on its buses, and the vCPUs.

mod emu;
mod kvm;
mod nic;
pub use nic::{prepare_taps, prepared_taps, release_leftover_taps, release_taps};
mod virtio;

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use arch::acpi::{AcpiConfig, AcpiTables};
use arch::boot::{self, BootSpec};
use arch::layout::{self, ports};
use cpu::{GuestMemory, Vcpu};
use devices::bus::SharedDevice;
use devices::interrupt::MsiSink;
use devices::legacy::{BootTimer, Cmos, I8042, ResetControl, Serial};
use devices::pci::{ConfigAddressPort, Ecam, PciRoot};
use devices::{Bus, GuestRequest, IrqLine, RequestSink, acpi_pm::AcpiPm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;
use x86::CodeMap;

use crate::config::{Accel, VmConfig};
use crate::error::VmError;
use crate::metrics::Metrics;
use crate::vm::{Vm, VmEvent, VmParts};

/// Where the guest's serial console goes.
pub enum Console {
    /// This process's stdin and stdout (stdin in raw mode when it is a terminal).
    Stdio,
    /// Output to a writer (a log, console clients); input through `VmHandle::console_input`.
    Output(Box<dyn std::io::Write + Send>),
}

/// Counts console bytes on their way out.
struct CountingOutput {
    out: Box<dyn std::io::Write + Send>,
    metrics: Arc<Metrics>,
}

impl std::io::Write for CountingOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.metrics
            .console_out_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Guest RAM laid out around the 32-bit MMIO hole, with the map of which pages hold
/// code the software CPU decoded (every write through vm-memory is reported to it).
pub fn guest_memory(size: u64, shared: bool) -> Result<(GuestMemory, Arc<CodeMap>), VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let code = Arc::new(CodeMap::new(&ranges));
    let mem = match shared {
        true => x86::guest_memory_shared(&ranges, &code),
        false => x86::guest_memory(&ranges, &code),
    };
    let mem = mem.map_err(|e| VmError::Memory {
        mib: size >> 20,
        reason: e.to_string(),
    })?;
    // Guest RAM never goes to a forked child (as QEMU does): forks stay cheap and a
    // child never shares the guest's memory.
    advise(&mem, libc::MADV_DONTFORK);
    Ok((mem, code))
}

/// Gives the kernel `advice` on all of guest RAM (best effort: a refusal is logged).
fn advise(mem: &GuestMemory, advice: libc::c_int) {
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
            // SAFETY: advising on a mapping vm-memory owns, for its whole length.
            let r = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
            if r != 0 {
                tracing::warn!(
                    "madvise({advice}) on guest RAM: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// A snapshot to start from instead of booting the kernel.
pub struct Restore {
    pub state: crate::snapshot::VmSnapshot,
    /// The snapshot's memory file.
    pub memory: std::path::PathBuf,
    /// Post-copy: the link to the migration's source, which still has the pages the
    /// folder's stale list names (see [`crate::migration::postcopy`]).
    pub postcopy: Option<crate::migration::postcopy::PostcopyLink>,
}

/// The CPUID a VM of `config` would show its guest (what a migration or restore
/// checks a guest's features against).
pub fn cpuid_offered(config: &VmConfig) -> Result<Vec<arch::cpuid::CpuidEntry>, VmError> {
    match config.accel {
        Accel::Kvm => kvm::cpuid_offered(config),
        Accel::Emu => Ok(cpu::emu::cpuid(
            0,
            config.cpus as u8,
            config.cpu_model.isa_level(),
        )),
    }
}

/// Builds a ready-to-run VM.
pub fn build(config: &VmConfig, console: Console) -> Result<Vm, VmError> {
    build_from(config, console, None)
}

/// Builds a VM, booting its kernel or, with `restore`, continuing a snapshot.
pub fn build_from(
    config: &VmConfig,
    console: Console,
    restore: Option<&Restore>,
) -> Result<Vm, VmError> {
    config.validate()?;
    // What a snapshot held is restored whole or not at all: every vCPU it saved.
    if let Some(r) = restore
        && (r.state.cpus != config.cpus || r.state.vcpus.len() != usize::from(config.cpus))
    {
        return Err(VmError::Device(format!(
            "the snapshot has {} vCPUs, this VM {}",
            r.state.cpus, config.cpus
        )));
    }
    let mut incoming = None;
    let (mem, code) = match restore {
        None => guest_memory(config.memory, config.memory_is_shared())?,
        Some(r) => {
            let (mem, code) = restored_memory(config, r)?;
            if let Some(link) = &r.postcopy {
                let dir = r.memory.parent().unwrap_or(std::path::Path::new("."));
                incoming = Some(
                    crate::migration::postcopy::start(&mem, dir, link)
                        .map_err(|e| VmError::Device(e.to_string()))?,
                );
            }
            (mem, code)
        }
    };
    // A restored VM has its ACPI tables, kernel and everything else in its memory.
    let entry = match restore {
        Some(_) => arch::entry::EntryState::default(),
        None => boot_image(config, &mem)?,
    };
    // A snapshot from the other backend is converted: for the software CPU before its
    // clock is made (the clock goes on from the snapshot's TSC), for KVM once KVM says
    // which CPUID it gives.
    let mut state = restore.map(|r| r.state.clone());
    let convert = |s: &mut crate::snapshot::VmSnapshot, to, cpuid: &[arch::cpuid::CpuidEntry]| {
        crate::snapshot::convert::to_backend(s, to, cpuid)
            .map_err(|e| VmError::Device(format!("cannot restore on {to}: {e}")))
    };
    if config.accel == Accel::Emu
        && let Some(s) = state.as_mut()
    {
        let cpuid = cpu::emu::cpuid(0, config.cpus as u8, config.cpu_model.isa_level());
        convert(s, crate::snapshot::SnapshotBackend::Emu, &cpuid)?;
    }
    let clock_start = state
        .as_ref()
        .map(|s| s.guest_ns + crate::snapshot::now_unix_ns().saturating_sub(s.saved_unix_ns));
    let mut backend = match config.accel {
        Accel::Kvm => kvm::backend(config, &mem, &entry)?,
        Accel::Emu => emu::backend(config, &mem, &code, &entry, clock_start)?,
    };
    if let Some(s) = state.as_mut() {
        convert(s, backend.kind, &backend.cpuid)?;
    }
    let (events_tx, events_rx) = mpsc::channel();
    let metrics = Arc::new(Metrics::new());
    let (stdio_console, output): (bool, Box<dyn std::io::Write + Send>) = match console {
        Console::Stdio => (true, Box::new(std::io::stdout())),
        Console::Output(out) => (false, out),
    };
    let output = Box::new(CountingOutput {
        out: output,
        metrics: metrics.clone(),
    });
    if config.memory_merge {
        // KSM may merge the guest's identical pages with other VMs' (copy on write).
        advise(&mem, libc::MADV_MERGEABLE);
    }
    let virtio = virtio::devices(config, &mem)?;
    let stdio_hvc = virtio.stdio_hvc.clone();
    for (label, counters) in virtio.nic_counters {
        metrics.add_nic(label, counters);
    }
    for (device, t) in virtio.throttling {
        metrics.add_throttled(device, t);
    }
    metrics.set_ssh(virtio.ssh);
    let io_limits = Arc::new(virtio.io_limits);
    let (mut platform, interrupts) = Platform::new(
        events_tx.clone(),
        output,
        &mut backend,
        virtio.devices,
        &mem,
        config.debug_exit,
    )?;
    for (index, cell) in virtio.link_interrupts {
        if let Some(i) = interrupts.get(index) {
            let _ = cell.set(i.clone());
        }
    }
    if let Some((index, b)) = &virtio.balloon
        && let Some(i) = interrupts.get(*index)
    {
        b.attach(i.clone());
    }
    let mut helpers = virtio.helpers;
    if let Some(c) = config.memory_compress {
        if restore.is_some() {
            tracing::warn!(
                "memory compression is off for a VM continued from a snapshot (its memory is mapped from the file)"
            );
        } else {
            let stats = Arc::new(crate::compress::CompressStats::default());
            let compressor = crate::compress::Compressor::start(&mem, c, stats.clone())
                .map_err(|e| VmError::Device(format!("memory compression: {e}")))?;
            if let Some(r) = &virtio.reclaimer {
                r.set_forget(compressor.forget_hook());
            }
            metrics.set_compression(stats);
            helpers.push(Box::new(compressor));
        }
    }
    platform.stdio_hvc = stdio_hvc;
    let mut vcpus = (backend.vcpus)(&platform)?;
    let persist = Arc::new(crate::snapshot::Persist {
        backend: backend.kind,
        cpus: config.cpus,
        memory_bytes: config.memory,
        cpuid: backend.cpuid.clone(),
        mem: mem.clone(),
        serial: platform.serial.clone(),
        cmos: platform.cmos.clone(),
        pm: platform.pm.clone(),
        virtio: platform.virtio.clone(),
        irq: std::mem::replace(&mut backend.irq, Box::new(NoIrqPersist)),
        dirty: crate::migration::dirty::DirtyLog {
            code: code.clone(),
            kvm: backend.dirty_log.take(),
        },
        unfinished_postcopy: Mutex::new(None),
        anonymous_memory: restore.is_none()
            && !config.memory_is_shared()
            && config.memory_compress.is_none(),
        handed_over: std::sync::atomic::AtomicBool::new(false),
    });
    if let Some(s) = &state {
        for (vcpu, saved) in vcpus.iter_mut().zip(&s.vcpus) {
            vcpu.restore(saved)
                .map_err(|e| VmError::Device(format!("restoring vCPU {}: {e}", saved.index)))?;
        }
        persist
            .restore_platform(s)
            .map_err(|e| VmError::Device(e.to_string()))?;
    }
    Ok(Vm::new(VmParts {
        stdio_console,
        vcpus,
        platform,
        metrics,
        events_tx,
        events_rx,
        backing: backend.backing,
        vm_fd: backend.vm_fd,
        mem,
        kvm_fallback: config.kvm_fallback,
        helpers,
        persist,
        io_limits,
        balloon: virtio.balloon.map(|(_, b)| b),
        incoming,
    }))
}

/// Loads the kernel (and initrd and ACPI tables) into fresh guest memory.
fn boot_image(config: &VmConfig, mem: &GuestMemory) -> Result<arch::entry::EntryState, VmError> {
    let acpi = AcpiTables::build(&AcpiConfig {
        cpus: config.cpus as u8,
        ram_size: config.memory,
        vmgenid: config.vmgenid,
    })?;
    let rsdp = acpi.write(mem)?;
    let loaded = boot::load(
        mem,
        &BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &config.cmdline,
            ram_size: config.memory,
            rsdp: Some(rsdp),
        },
    )?;
    tracing::debug!(
        "kernel {:?} ({:?}) entry {:#x}, initrd {:?}",
        config.kernel,
        loaded.format,
        loaded.entry.rip,
        loaded.initrd
    );
    Ok(loaded.entry)
}

/// Guest memory mapped from a snapshot's memory file, after checking it has the same
/// layout as this VM's.
fn restored_memory(config: &VmConfig, r: &Restore) -> Result<(GuestMemory, Arc<CodeMap>), VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(config.memory)
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let saved: Vec<(GuestAddress, usize)> = r
        .state
        .memory
        .iter()
        .map(|m| (GuestAddress(m.guest), m.len as usize))
        .collect();
    if ranges != saved {
        return Err(VmError::Device(format!(
            "the snapshot's memory ({} MiB) does not match this VM's ({} MiB)",
            r.state.memory_bytes >> 20,
            config.memory >> 20
        )));
    }
    if r.postcopy.is_some() {
        // Fresh memory that the post-copy fills as the guest touches it.
        return guest_memory(config.memory, false);
    }
    let file = std::fs::File::open(&r.memory).map_err(|e| VmError::Memory {
        mib: config.memory >> 20,
        reason: format!("{}: {e}", r.memory.display()),
    })?;
    let code = Arc::new(CodeMap::new(&ranges));
    let mem = x86::guest_memory_from_file(&ranges, &code, &file).map_err(|e| VmError::Memory {
        mib: config.memory >> 20,
        reason: e.to_string(),
    })?;
    Ok((mem, code))
}

/// A backend's interrupt state already moved into the VM's `Persist`.
struct NoIrqPersist;

impl crate::snapshot::capture::IrqPersist for NoIrqPersist {
    fn save(&self) -> Result<crate::snapshot::IrqState, String> {
        Err("no interrupt state".into())
    }
    fn restore(&self, _: &crate::snapshot::IrqState, _: u64) -> Result<(), String> {
        Err("no interrupt state".into())
    }
    fn guest_ns(&self) -> u64 {
        0
    }
}

/// Where a device sits: port I/O or MMIO, base, length.
pub enum Placement {
    Io(u16, u64),
    Mmio(u64, u64),
}

/// Makes the vCPUs once the device model exists.
pub(crate) type MakeVcpus = Box<dyn FnOnce(&Platform) -> Result<Vec<Box<dyn Vcpu>>, VmError>>;

/// See [`Backend::notify`].
pub(crate) type NotifyHook = Box<dyn Fn(u64, &EventFd) -> Result<(), VmError>>;

/// What a CPU backend contributes to a VM: how devices raise interrupts, devices of
/// its own (the software CPU's interrupt controllers and timer), and its vCPUs.
pub(crate) struct Backend {
    pub com1_irq: Arc<dyn IrqLine>,
    pub sci: Arc<dyn IrqLine>,
    pub devices: Vec<(Placement, SharedDevice)>,
    /// Where devices' MSI-X messages go.
    pub msi: Arc<dyn MsiSink>,
    /// Registers a virtio queue notify address with the backend (KVM ioeventfd), or
    /// does nothing where MMIO writes reach the device anyway.
    pub notify: NotifyHook,
    pub vcpus: MakeVcpus,
    /// Kept alive until every vCPU has stopped (the KVM VM, the interrupt controllers).
    pub backing: Box<dyn std::any::Any + Send>,
    /// A KVM VM descriptor, whose teardown may be left to a child process.
    pub vm_fd: Option<std::os::fd::RawFd>,
    pub kind: crate::snapshot::SnapshotBackend,
    /// CPUID as vCPU 0 sees it.
    pub cpuid: Vec<arch::cpuid::CpuidEntry>,
    /// Saves and loads the backend's interrupt controllers and timers.
    pub irq: Box<dyn crate::snapshot::capture::IrqPersist>,
    /// KVM's log of the pages its vCPUs write.
    pub dirty_log: Option<cpu::kvm::KvmDirtyLog>,
}

/// The device model and the two buses it sits on.
pub struct Platform {
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<Serial>>,
    pub cmos: Arc<Mutex<Cmos>>,
    /// The virtio functions, in PCI order.
    pub virtio: Vec<Arc<Mutex<devices::virtio::VirtioPciDevice<GuestMemory>>>>,
    pub pm: Arc<Mutex<AcpiPm>>,
    pub boot_timer: Arc<Mutex<Vec<devices::legacy::boot_timer::BootMark>>>,
    /// When hvc0 is the terminal's console, console input goes there, not to COM1.
    pub stdio_hvc: Option<devices::virtio::console::ConsoleInput>,
}

impl Platform {
    fn new(
        events: Sender<VmEvent>,
        console: Box<dyn std::io::Write + Send>,
        backend: &mut Backend,
        virtio: Vec<Box<dyn devices::virtio::VirtioDevice<GuestMemory>>>,
        mem: &GuestMemory,
        debug_exit: bool,
    ) -> Result<(Self, Vec<Arc<devices::virtio::VirtioInterrupt>>), VmError> {
        let events = Mutex::new(events);
        let requests: RequestSink = Arc::new(move |r: GuestRequest| {
            let _ = devices::bus::lock(&events).send(VmEvent::Guest(r));
        });
        let mut io = Bus::new();
        let mut mmio = Bus::new();

        let serial = Arc::new(Mutex::new(Serial::new(backend.com1_irq.clone(), console)));
        io.insert(u64::from(ports::COM1), 8, serial.clone())?;
        let (kbd_data, kbd_cmd) = I8042::ports(requests.clone());
        io.insert(
            u64::from(ports::I8042_DATA),
            1,
            Arc::new(Mutex::new(kbd_data)),
        )?;
        io.insert(
            u64::from(ports::I8042_COMMAND),
            1,
            Arc::new(Mutex::new(kbd_cmd)),
        )?;
        let cmos = Arc::new(Mutex::new(Cmos::new()));
        io.insert(u64::from(ports::CMOS), 2, cmos.clone())?;
        let pm = Arc::new(Mutex::new(AcpiPm::new(
            backend.sci.clone(),
            requests.clone(),
        )));
        io.insert(
            u64::from(ports::ACPI_PM1A_EVT),
            devices::acpi_pm::WINDOW_LEN,
            pm.clone(),
        )?;
        let timer = BootTimer::new(crate::process_start());
        let boot_timer = timer.marks();
        io.insert(u64::from(ports::BOOT_TIMER), 1, Arc::new(Mutex::new(timer)))?;

        if debug_exit {
            use devices::legacy::debug_exit::{DebugExit, LEN, PORT};
            let port = Arc::new(Mutex::new(DebugExit::new(requests.clone())));
            io.insert(u64::from(PORT), LEN, port)?;
        }
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let reset = Box::new(ResetControl::new(requests));
        let config_port = ConfigAddressPort::new(root.clone()).with_reset_control(reset);
        io.insert(
            u64::from(ports::PCI_CONFIG_ADDRESS),
            8,
            Arc::new(Mutex::new(config_port)),
        )?;
        mmio.insert(
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
            Arc::new(Mutex::new(Ecam::new(root.clone()))),
        )?;
        let (virtio, interrupts) = virtio::attach(virtio, mem, &root, &mut mmio, backend)?;
        for (placement, device) in std::mem::take(&mut backend.devices) {
            match placement {
                Placement::Io(port, len) => io.insert(u64::from(port), len, device)?,
                Placement::Mmio(base, len) => mmio.insert(base, len, device)?,
            }
        }
        Ok((
            Platform {
                io: Arc::new(io),
                mmio: Arc::new(mmio),
                serial,
                cmos,
                virtio,
                pm,
                boot_timer,
                stdio_hvc: None,
            },
            interrupts,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot restored into a VM with another vCPU count is refused. Before, the
    /// software CPU restored a state of 2 vCPUs (and 1 local APIC) into a VM of 1,
    /// dropping the second vCPU's state; on KVM nothing compared the counts at all.
    #[test]
    fn a_snapshot_of_another_vcpu_count_is_refused() {
        // The kit guest captured on the software CPU, as the fuzz corpus has it, given a
        // second vCPU and 32 MiB of memory.
        let bytes = include_bytes!("../../../../fuzz/corpus/state_file/emu-kit");
        let mut state =
            crate::snapshot::file::decode_state(std::path::Path::new("state"), bytes).unwrap();
        let mut second = state.vcpus[0].clone();
        second.index = 1;
        state.vcpus.push(second);
        state.cpus = 2;
        state.memory_bytes = 32 << 20;
        state.memory = vec![crate::snapshot::MemoryRange {
            guest: 0,
            len: 32 << 20,
            file_offset: 0,
        }];
        let memory =
            std::env::temp_dir().join(format!("vessel-test-memory-{}", std::process::id()));
        std::fs::File::create(&memory)
            .and_then(|f| f.set_len(32 << 20))
            .unwrap();
        let config = VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 32 << 20,
            accel: Accel::Emu,
            disks: Vec::new(),
            nets: Vec::new(),
            networks: std::path::PathBuf::new(),
            cpu_model: crate::config::CpuModel::Host,
            vmgenid: [0; 16],
            rng: false,
            vsock: None,
            shares: Vec::new(),
            runtime_dir: std::path::PathBuf::new(),
            shared_memory: false,
            balloon: false,
            memory_merge: false,
            memory_compress: None,
            hvc: None,
            kvm_fallback: true,
            debug_exit: false,
        };
        let restore = Restore {
            state,
            memory: memory.clone(),
            postcopy: None,
        };
        let refused = build_from(
            &config,
            Console::Output(Box::new(std::io::sink())),
            Some(&restore),
        );
        let _ = std::fs::remove_file(&memory);
        let e = refused.err().expect("2 vCPUs restored into 1").to_string();
        assert!(e.contains("the snapshot has 2 vCPUs, this VM 1"), "{e}");
    }
}
