//! What one VM is made of, validated before anything is built.

use std::path::PathBuf;

use thiserror::Error;

pub const MIN_MEMORY: u64 = 32 << 20;
pub const MAX_VCPUS: u16 = 255;

/// Which CPU backend runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Linux KVM: hardware-assisted where the host has VT-x/AMD-V.
    Kvm,
    /// vessel's software CPU: full virtualization by emulation.
    Emu,
}

/// `--accel auto`: KVM where the host has VT-x/AMD-V and /dev/kvm can be opened, the
/// software CPU otherwise (without them KVM emulates every instruction, far slower
/// than vessel's interpreter). Returns the choice and why, in a line.
pub fn choose_accel() -> (Accel, String) {
    let hardware = cpu::kvm::host_has_hardware_virtualization();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match (hardware, kvm) {
        (true, Ok(_)) => (Accel::Kvm, "kvm (VT-x/AMD-V and /dev/kvm available)".into()),
        (true, Err(e)) => (Accel::Emu, format!("emu (/dev/kvm: {e})")),
        (false, Ok(_)) => (
            Accel::Emu,
            "emu (no VT-x/AMD-V: KVM here would emulate every instruction)".into(),
        ),
        (false, Err(_)) => (Accel::Emu, "emu (no VT-x/AMD-V, no /dev/kvm)".into()),
    }
}

/// What CPU the guest is shown on KVM (the software CPU always shows its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuModel {
    /// Everything KVM can give (and, on hosts without VT-x/AMD-V, what vessel's
    /// interpreter runs for it).
    #[default]
    Host,
    /// Only what both backends can give: a VM that can move between KVM and the
    /// software CPU.
    Portable,
    /// The x86-64 psABI's baseline: no ISA extension past SSE2.
    V1,
    /// x86-64-v2: CX16, LAHF/SAHF, POPCNT, SSE3 to SSE4.2 (the software CPU runs them
    /// all); nothing of v3 (AVX, BMI, MOVBE, ...).
    V2,
}

impl CpuModel {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuModel::Host),
            "portable" => Ok(CpuModel::Portable),
            "v1" | "x86-64-v1" => Ok(CpuModel::V1),
            "v2" | "x86-64-v2" => Ok(CpuModel::V2),
            other => Err(format!(
                "unknown CPU model {other:?} (use host, portable, v1 or v2)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Host => "host",
            CpuModel::Portable => "portable",
            CpuModel::V1 => "v1",
            CpuModel::V2 => "v2",
        }
    }

    /// The ISA level the model fixes, if it fixes one.
    pub fn isa_level(self) -> Option<arch::cpuid::IsaLevel> {
        match self {
            CpuModel::V1 => Some(arch::cpuid::IsaLevel::V1),
            CpuModel::V2 => Some(arch::cpuid::IsaLevel::V2),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u16,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub accel: Accel,
    /// virtio-blk devices, in order (/dev/vda, /dev/vdb, ...).
    pub disks: Vec<devices::virtio::block::BlockConfig>,
    /// virtio-net devices: TAP, user-mode NAT (passt), named networks, bridges.
    pub nets: Vec<devices::virtio::net::NetConfig>,
    /// Where named networks' switches live (`<vessel home>/networks`).
    pub networks: PathBuf,
    pub cpu_model: CpuModel,
    /// The VM generation ID the guest reads through ACPI (VMGENID): new for every
    /// clone.
    pub vmgenid: [u8; 16],
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: bool,
    /// A virtio-vsock device and its host socket.
    pub vsock: Option<devices::virtio::vsock::VsockConfig>,
    /// Host directories shared with the guest (virtio-fs, each served by a virtiofsd).
    pub shares: Vec<devices::virtio::fs::ShareConfig>,
    /// Where the virtiofsd sockets go (`virtiofs-<pid>-<tag>.sock`: two `vessel run`s
    /// sharing a runtime directory never meet).
    pub runtime_dir: PathBuf,
    /// Guest RAM in a shared memfd rather than private memory (forced by `shares`).
    pub shared_memory: bool,
    /// A virtio-balloon device (the host can ask the guest for memory back).
    pub balloon: bool,
    /// Guest RAM marked for the host's page merging (KSM); needs private memory.
    pub memory_merge: bool,
    /// A compression cache for the guest's cold pages; needs private memory.
    pub memory_compress: Option<crate::compress::CompressConfig>,
    /// A virtio-console (the guest's hvc0) and where it goes.
    pub hvc: Option<Hvc>,
    /// Run instructions KVM cannot emulate in vessel's interpreter (on by default);
    /// off, the VM stops there as under other VMMs.
    pub kvm_fallback: bool,
    /// QEMU's isa-debug-exit port (0xf4): the guest can end the VM with a status.
    pub debug_exit: bool,
}

/// Where the guest's virtio console (hvc0) goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hvc {
    /// This process's stdin and stdout: hvc0 instead of the serial port as the console
    /// (boot the guest with `console=hvc0`).
    Stdio,
    /// A Unix socket vessel listens on; one client at a time is the console.
    Socket(PathBuf),
}

/// How guest RAM is backed: `private` (anonymous memory, what page merging and
/// reclaim work on; the default) or `shared` (a memfd another process can map).
pub fn parse_memory_backing(s: &str) -> Result<bool, String> {
    match s {
        "private" => Ok(false),
        "shared" => Ok(true),
        _ => Err(format!("memory backing {s:?}: use private or shared")),
    }
}

impl VmConfig {
    /// Whether guest RAM is a shared memfd.
    pub fn memory_is_shared(&self) -> bool {
        self.shared_memory || !self.shares.is_empty()
    }
}

impl Hvc {
    /// `stdio` or `socket=PATH`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec.split_once('=') {
            None if spec == "stdio" => Ok(Hvc::Stdio),
            Some(("socket", path)) if !path.is_empty() => Ok(Hvc::Socket(path.into())),
            _ => Err(format!("{spec:?}: use stdio or socket=PATH")),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u16),
    #[error(
        "--memory-merge needs private guest memory: a VM with shared folders (or --memory-backing shared) cannot have its pages merged"
    )]
    MergeShared,
    #[error(
        "--memory-compress needs private guest memory: a VM with shared folders (or --memory-backing shared) cannot have its pages compressed"
    )]
    CompressShared,
    #[error("--memory {0} MiB is below the 32 MiB minimum")]
    MemoryTooSmall(u64),
    #[error("--memory {asked_mib} MiB is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { asked_mib: u64, host_mib: u64 },
    #[error(
        "invalid memory size {0:?}: use a number with an optional K, M, G or T suffix (e.g. 512M, 2G)"
    )]
    BadSize(String),
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory >> 20));
        }
        if self.memory_merge && self.memory_is_shared() {
            return Err(ConfigError::MergeShared);
        }
        if self.memory_compress.is_some() && self.memory_is_shared() {
            return Err(ConfigError::CompressShared);
        }
        if let Some(host) = host_memory_bytes()
            && self.memory > host
        {
            return Err(ConfigError::MemoryTooLarge {
                asked_mib: self.memory >> 20,
                host_mib: host >> 20,
            });
        }
        Ok(())
    }
}

/// Parses sizes like `512M`, `2G`, `1.5G`, `65536K`, `268435456` (plain numbers are MiB,
/// as with QEMU's -m).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    devices::virtio::options::parse_size(text, 20)
        .ok_or_else(|| ConfigError::BadSize(text.to_string()))
}

/// The host's RAM (MemTotal), if /proc/meminfo says.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// A fresh VM generation ID (random, from the host's getrandom).
pub fn new_vmgenid() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // No getrandom: the time and the PID still make clones differ.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    id
}

/// A VM generation ID as 32 hex digits (vm.toml), and back.
pub fn vmgenid_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_vmgenid(s: &str) -> Result<[u8; 16], String> {
    let bad = || format!("vmgenid {s:?} is not 32 hex digits");
    // Byte slicing below needs ASCII, and from_str_radix would take a sign.
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_size("512"), Ok(512 << 20));
        for bad in ["", "M", "12Q", "-5M", "1e3M", "0", "lots", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    fn config(cpus: u16, memory: u64) -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            cpus,
            memory,
            accel: Accel::Kvm,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            shares: Vec::new(),
            runtime_dir: PathBuf::new(),
            shared_memory: false,
            balloon: false,
            memory_merge: false,
            memory_compress: None,
            hvc: None,
            kvm_fallback: true,
            debug_exit: false,
            networks: PathBuf::new(),
            cpu_model: CpuModel::Host,
            vmgenid: [0; 16],
        }
    }

    #[test]
    fn hvc_specs() {
        assert_eq!(Hvc::parse("stdio"), Ok(Hvc::Stdio));
        assert_eq!(
            Hvc::parse("socket=/tmp/c"),
            Ok(Hvc::Socket("/tmp/c".into()))
        );
        for bad in ["", "tty", "socket=", "file=/x"] {
            assert!(Hvc::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(config(0, 64 << 20).validate(), Err(ConfigError::Cpus(0)));
        assert_eq!(
            config(256, 64 << 20).validate(),
            Err(ConfigError::Cpus(256))
        );
        assert_eq!(
            config(1, 16 << 20).validate(),
            Err(ConfigError::MemoryTooSmall(16))
        );
        assert!(matches!(
            config(1, 1 << 50).validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert_eq!(config(255, 32 << 20).validate(), Ok(()));
    }
}
