//! `vm.toml`: what a VM is. Paths are relative to the bundle (so copying the folder
//! copies the VM); `kernel = "kit"` means the default guest kit, found at start time.

use std::path::{Path, PathBuf};

use cgroup::CpuPolicy;
use devices::virtio::block::BlockConfig;
use devices::virtio::fs::ShareConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::VsockConfig;
use serde::{Deserialize, Serialize};
use vmm::io_limits::DeviceLimits;
use vmm::{Accel, VmConfig};

use crate::error::ManagerError;

pub const KIT: &str = "kit";
/// The VM's vsock socket in its folder: host programs reach the guest through it.
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// What a guest-initiated reboot does to a managed VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Boot again (as a physical machine would).
    #[default]
    OnReboot,
    /// Stop.
    Never,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub cpus: u16,
    /// Guest RAM, e.g. "512M" or "2G".
    pub memory: String,
    /// A bzImage or PVH vmlinux, or "kit".
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default = "default_accel")]
    pub accel: String,
    #[serde(default)]
    pub restart: Restart,
    /// virtio-blk disks: `path=FILE[,readonly=on][,id=NAME]` (paths relative to the bundle).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// virtio-net devices: `tap=NAME[,mac=MAC]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    /// A virtio-rng device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rng: bool,
    /// The virtio-vsock device: `cid=N`, or `off`; every VM has one unless it says off
    /// (guest CID 3, the host side at `<bundle>/vsock.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<String>,
    /// Host directories shared with the guest over virtio-fs:
    /// `HOSTDIR[,tag=T][,readonly=on]` (the first one's tag is `share` by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<String>,
    /// Guest RAM backing: `private` (default) or `shared` (implied by shares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<String>,
    /// A virtio-balloon device (`vessel set NAME balloon=SIZE` while it runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub balloon: bool,
    /// Guest RAM offered to the host's page merging (KSM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_merge: bool,
    /// Memory guaranteed to the VM (default: none); what lies above may be taken back
    /// (balloon) under host memory pressure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_min: Option<String>,
    /// Weight against other VMs when the governor takes memory back (default 1024):
    /// a VM with twice the shares gives half as fast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_shares: Option<u64>,
    /// A compression cache for cold guest pages: `on`, `auto` (engaged by the governor
    /// after the balloon), or the resident size to aim for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_compress: Option<String>,
    /// The monitor's seccomp filters: `on` (the default), `log` or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<String>,
    /// The monitor's jail (see the sandbox crate): `on` or `off`; by default on when
    /// root starts the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The CPU KVM shows the guest: host (default) or portable (what both backends
    /// give, for a VM that moves between them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// The VM generation ID (32 hex digits) the guest reads through ACPI; a clone gets
    /// a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<String>,
    /// Its share of the host's CPUs (`[cpu]`: shares, limit, reservation, affinity),
    /// applied through its cgroup by the host layer.
    #[serde(default, skip_serializing_if = "CpuPolicy::is_empty")]
    pub cpu: CpuPolicy,
}

fn default_accel() -> String {
    "auto".into()
}

/// Command line for kernels other than the kit, when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

impl VmSpec {
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ManagerError> {
        let spec: VmSpec = toml::from_str(text).map_err(|e| ManagerError::BadConfig {
            path: path.into(),
            reason: e.message().to_string(),
        })?;
        spec.validate().map_err(|reason| ManagerError::BadConfig {
            path: path.into(),
            reason,
        })?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks what can be checked without touching files.
    pub fn validate(&self) -> Result<(), String> {
        let memory = vmm::parse_size(&self.memory).map_err(|e| e.to_string())?;
        self.accel()?;
        for d in &self.disks {
            BlockConfig::parse(d).map_err(|e| format!("disk {d:?}: {e}"))?;
        }
        for n in &self.nets {
            NetConfig::parse(n).map_err(|e| format!("net {n:?}: {e}"))?;
        }
        let config = VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
            cpus: self.cpus,
            memory,
            accel: Accel::Kvm,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            shares: Vec::new(),
            runtime_dir: PathBuf::new(),
            shared_memory: self.memory_backing.as_deref() == Some("shared"),
            balloon: self.balloon,
            memory_merge: self.memory_merge,
            memory_compress: self.compress_config()?,
            hvc: None,
            kvm_fallback: true,
            debug_exit: false,
            networks: PathBuf::new(),
            cpu_model: self.cpu_model()?,
            vmgenid: [0; 16],
        };
        if let Some(v) = &self.vmgenid {
            vmm::parse_vmgenid(v)?;
        }
        self.vsock_config(Path::new(VSOCK_SOCKET))?;
        if let Some(m) = &self.memory_min {
            let min = vmm::parse_size(m).map_err(|e| format!("memory_min: {e}"))?;
            if min > memory {
                return Err(format!(
                    "memory_min {} MiB is more than the VM's {} MiB",
                    min >> 20,
                    memory >> 20
                ));
            }
        }
        if let Some(s) = self.memory_shares {
            check_memory_shares(s)?;
        }
        self.seccomp_mode()?;
        self.sandbox_on()?;
        self.share_configs()?;
        if let Some(b) = &self.memory_backing {
            vmm::parse_memory_backing(b)?;
        }
        let shared = !self.shares.is_empty() || self.memory_backing.as_deref() == Some("shared");
        if self.memory_merge && shared {
            return Err(vmm::ConfigError::MergeShared.to_string());
        }
        if self.memory_compress.is_some() && shared {
            return Err(vmm::ConfigError::CompressShared.to_string());
        }
        self.cpu
            .validate(crate::host::online_cpus())
            .map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())
    }

    /// The vsock device, its host socket at `socket`; None when the spec says off.
    pub fn vsock_config(&self, socket: &Path) -> Result<Option<VsockConfig>, String> {
        match self.vsock.as_deref() {
            Some("off") => Ok(None),
            spec => VsockConfig::parse(spec.unwrap_or(""), socket)
                .map(Some)
                .map_err(|e| format!("vsock: {e}")),
        }
    }

    /// The compression cache's settings, if the VM has one.
    pub fn compress_config(&self) -> Result<Option<vmm::compress::CompressConfig>, String> {
        self.memory_compress
            .as_deref()
            .map(vmm::compress::CompressConfig::parse)
            .transpose()
    }

    /// The shares, parsed (each tag used once).
    pub fn share_configs(&self) -> Result<Vec<ShareConfig>, String> {
        parse_shares(&self.shares)
    }

    /// Whether the monitor runs in a jail: as set, else when root starts it.
    pub fn sandbox_on(&self) -> Result<bool, String> {
        parse_sandbox(self.sandbox.as_deref())
    }

    /// The mode the monitor confines its threads in.
    pub fn seccomp_mode(&self) -> Result<sandbox::Mode, String> {
        self.seccomp.as_deref().unwrap_or("on").parse()
    }

    /// The governor: what it may act on and how much this VM weighs; None when the VM
    /// has neither a balloon nor a governed compression cache.
    pub fn governor(&self) -> Option<crate::governor::Governor> {
        let levers = crate::governor::Levers {
            balloon: self.balloon,
            compression: self
                .compress_config()
                .ok()
                .flatten()
                .is_some_and(|c| c.governed),
        };
        (levers.balloon || levers.compression).then(|| {
            crate::governor::Governor::new(
                self.memory_bytes(),
                self.memory_min_bytes(),
                self.memory_shares
                    .unwrap_or(crate::governor::DEFAULT_SHARES),
                levers,
            )
        })
    }

    /// The memory guaranteed to the VM: `memory_min`, else none (as ESXi's default
    /// reservation).
    pub fn memory_min_bytes(&self) -> u64 {
        self.memory_min
            .as_deref()
            .and_then(|m| vmm::parse_size(m).ok())
            .unwrap_or(0)
            .min(self.memory_bytes())
    }

    pub fn memory_bytes(&self) -> u64 {
        vmm::parse_size(&self.memory).unwrap_or(0)
    }

    fn cpu_model(&self) -> Result<vmm::CpuModel, String> {
        self.cpu_model
            .as_deref()
            .map_or(Ok(vmm::CpuModel::Host), vmm::CpuModel::parse)
    }

    fn accel(&self) -> Result<Accel, String> {
        match self.accel.as_str() {
            "kvm" => Ok(Accel::Kvm),
            "emu" => Ok(Accel::Emu),
            "auto" => Ok(vmm::choose_accel().0),
            other => Err(format!("unknown accel {other:?} (use kvm, emu or auto)")),
        }
    }

    /// Sets one `key=value` (what `vessel set` does); on error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let mut next = self.clone();
        next.set_unchecked(key, value)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn set_unchecked(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "cpus" => {
                self.cpus = value
                    .parse()
                    .map_err(|_| format!("cpus: not a number: {value:?}"))?
            }
            "memory" => self.memory = value.to_string(),
            "memory_min" => self.memory_min = (!value.is_empty()).then(|| value.to_string()),
            "seccomp" => {
                value.parse::<sandbox::Mode>()?;
                self.seccomp = (value != "on").then(|| value.to_string());
            }
            "sandbox" => {
                parse_sandbox(Some(value))?;
                self.sandbox = (!value.is_empty()).then(|| value.to_string());
            }
            "memory_shares" => {
                self.memory_shares = match value {
                    "" => None,
                    v => Some(parse_memory_shares(v)?),
                }
            }
            "kernel" => self.kernel = value.to_string(),
            "initrd" => self.initrd = (!value.is_empty()).then(|| value.to_string()),
            "cmdline" => self.cmdline = (!value.is_empty()).then(|| value.to_string()),
            "accel" => self.accel = value.to_string(),
            "cpu_model" => self.cpu_model = (!value.is_empty()).then(|| value.to_string()),
            "restart" => {
                self.restart = match value {
                    "on-reboot" => Restart::OnReboot,
                    "never" => Restart::Never,
                    _ => return Err(format!("restart: {value:?} is not on-reboot or never")),
                }
            }
            "balloon" if balloon_size(key, value).is_some() => {
                return Err(format!(
                    "balloon={value}: the balloon takes memory from a running VM; on a stopped one, balloon=on|off"
                ));
            }
            "balloon" => self.balloon = value == "on",
            "memory_merge" => self.memory_merge = on_off("memory_merge", value)?,
            "memory_compress" => {
                self.memory_compress = match value {
                    "off" | "" => None,
                    v => Some(v.to_string()),
                }
            }
            k if k.starts_with("cpu_") => self.cpu.set(k, value).map_err(|e| e.to_string())?,
            k if k.contains('.') => self.set_device_option(k, value)?,
            _ => {
                return Err(format!(
                    "unknown setting {key:?} (cpus, memory, kernel, initrd, cmdline, accel, cpu_model, restart, seccomp, sandbox, balloon, memory_min, memory_shares, memory_merge, memory_compress, cpu_shares, cpu_limit, cpu_reservation, cpu_affinity, diskN.bw|iops..., netN.rx_bw|tx_bw...)"
                ));
            }
        }
        Ok(())
    }

    /// `disk0.bw=20M`, `net0.rx_bw=1M`: a rate limit option of one disk or NIC (its
    /// spec in vm.toml rewritten).
    fn set_device_option(&mut self, key: &str, value: &str) -> Result<(), String> {
        let (device, option) = key.split_once('.').unwrap_or_default();
        let index = |prefix: &str| {
            device
                .strip_prefix(prefix)
                .and_then(|n| n.parse::<usize>().ok())
        };
        let bad = |what: String| format!("{key}={value}: {what}");
        if let Some(i) = index("disk") {
            let spec = self
                .disks
                .get_mut(i)
                .ok_or_else(|| bad(format!("the VM has no disk{i}")))?;
            let mut c = BlockConfig::parse(spec)?;
            if !c.limits.parse_option(option, value).map_err(bad)? {
                return Err(bad("a disk takes bw, iops, bw_burst, iops_burst".into()));
            }
            c.limits.validate().map_err(bad)?;
            *spec = c.to_spec();
        } else if let Some(i) = index("net") {
            let spec = self
                .nets
                .get_mut(i)
                .ok_or_else(|| bad(format!("the VM has no net{i}")))?;
            let mut c = NetConfig::parse(spec)?;
            let known = c.rx.parse_prefixed("rx_", option, value).map_err(bad)?
                || c.tx.parse_prefixed("tx_", option, value).map_err(bad)?;
            if !known {
                return Err(bad(
                    "a NIC takes rx_bw, tx_bw, rx_iops, tx_iops and their _burst".into(),
                ));
            }
            c.rx.validate().map_err(|e| bad(format!("rx_{e}")))?;
            c.tx.validate().map_err(|e| bad(format!("tx_{e}")))?;
            *spec = c.to_spec();
        } else {
            return Err(bad("devices are disk0, disk1... and net0, net1...".into()));
        }
        Ok(())
    }

    /// The limits of device `name` (`disk0`, `net0`).
    pub fn device_limits(&self, name: &str) -> Option<DeviceLimits> {
        if let Some(i) = name
            .strip_prefix("disk")
            .and_then(|n| n.parse::<usize>().ok())
        {
            let c = BlockConfig::parse(self.disks.get(i)?).ok()?;
            return Some(DeviceLimits::Disk(c.limits));
        }
        let i = name.strip_prefix("net")?.parse::<usize>().ok()?;
        let c = NetConfig::parse(self.nets.get(i)?).ok()?;
        Some(DeviceLimits::Nic { rx: c.rx, tx: c.tx })
    }

    /// The VM as the monitor builds it; `dir` is the bundle.
    pub fn to_vm_config(&self, dir: &Path) -> Result<VmConfig, ManagerError> {
        let resolve = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { dir.join(p) }
        };
        let (kernel, initrd, cmdline) = if self.kernel == KIT {
            let kit = default_kit()?;
            let initrd = match self.initrd.as_deref() {
                None | Some(KIT) => Some(kit.initrd),
                Some(p) => Some(resolve(p)),
            };
            let cmdline = self
                .cmdline
                .clone()
                .unwrap_or_else(|| kit::DEFAULT_CMDLINE.to_string());
            (kit.vmlinux, initrd, cmdline)
        } else {
            (
                resolve(&self.kernel),
                self.initrd.as_deref().map(resolve),
                self.cmdline
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            )
        };
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let mut c = BlockConfig::parse(d)
                    .map_err(|e| ManagerError::Other(format!("disk {d:?}: {e}")))?;
                c.path = resolve(&c.path.to_string_lossy());
                Ok(c)
            })
            .collect::<Result<_, ManagerError>>()?;
        let nets = self
            .nets
            .iter()
            .map(|n| {
                NetConfig::parse(n).map_err(|e| ManagerError::Other(format!("net {n:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(VmConfig {
            kernel,
            initrd,
            cmdline,
            cpus: self.cpus,
            memory: self.memory_bytes(),
            accel: self.accel().map_err(ManagerError::Other)?,
            disks,
            nets,
            rng: self.rng,
            vsock: self
                .vsock_config(&dir.join(VSOCK_SOCKET))
                .map_err(ManagerError::Other)?,
            shares: self.share_configs().map_err(ManagerError::Other)?,
            runtime_dir: dir.to_path_buf(),
            shared_memory: match &self.memory_backing {
                Some(b) => vmm::parse_memory_backing(b).map_err(ManagerError::Other)?,
                None => false,
            },
            balloon: self.balloon,
            memory_merge: self.memory_merge,
            memory_compress: self.compress_config().map_err(ManagerError::Other)?,
            hvc: None,
            kvm_fallback: true,
            debug_exit: false,
            cpu_model: self.cpu_model().map_err(ManagerError::Other)?,
            vmgenid: match &self.vmgenid {
                Some(v) => vmm::parse_vmgenid(v).map_err(ManagerError::Other)?,
                None => [0; 16],
            },
            // <home>/vms/NAME -> <home>/networks
            networks: dir
                .parent()
                .and_then(Path::parent)
                .map(|home| home.join("networks"))
                .unwrap_or_default(),
        })
    }
}

/// `sandbox=on|off`; unset: on when root starts the VM.
pub fn parse_sandbox(v: Option<&str>) -> Result<bool, String> {
    match v {
        None => Ok(sandbox::jail::is_root()),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(format!("sandbox: {other:?} is not on or off")),
    }
}

/// `memory_shares=N`: a whole number from 2 to 262144, as cpu_shares.
pub fn parse_memory_shares(v: &str) -> Result<u64, String> {
    let n = v
        .parse::<u64>()
        .map_err(|_| format!("memory_shares={v}: not a whole number"))?;
    check_memory_shares(n)?;
    Ok(n)
}

fn check_memory_shares(n: u64) -> Result<(), String> {
    if (2..=262_144).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "memory_shares={n}: must be 2 to 262144 (default {})",
            crate::governor::DEFAULT_SHARES
        ))
    }
}

/// `balloon=SIZE`: how much memory a running VM's balloon is to hold (None for any other
/// setting, `balloon=on|off` included).
pub fn balloon_size(key: &str, value: &str) -> Option<Result<u64, String>> {
    if key != "balloon" || matches!(value, "on" | "off") {
        return None;
    }
    Some(match value {
        "0" => Ok(0),
        _ => vmm::parse_size(value).map_err(|e| format!("balloon: {e}")),
    })
}

/// Whether a running VM of `spec` can hold `size` in its balloon.
pub fn check_balloon(spec: &VmSpec, size: u64) -> Result<(), String> {
    if !spec.balloon {
        return Err("the VM has no balloon (create it with --balloon, or set balloon=on while it is stopped)".into());
    }
    if size >= spec.memory_bytes() {
        return Err(format!(
            "balloon={}: the guest has {} MiB in all",
            size >> 20,
            spec.memory_bytes() >> 20
        ));
    }
    Ok(())
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    devices::virtio::options::on_off(key, value)
}

/// `--share` specs, parsed with their default tags; a tag used twice is an error.
pub fn parse_shares(specs: &[String]) -> Result<Vec<ShareConfig>, String> {
    let mut out: Vec<ShareConfig> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let s = ShareConfig::parse(spec, &ShareConfig::default_tag(i))
            .map_err(|e| format!("share {spec:?}: {e}"))?;
        if out.iter().any(|o| o.tag == s.tag) {
            return Err(format!("share {spec:?}: tag {} is used twice", s.tag));
        }
        out.push(s);
    }
    Ok(out)
}

/// The cached kit, built on first use (and again when the guest agent beside vessel is
/// not the one in it).
pub fn default_kit() -> Result<kit::Kit, ManagerError> {
    kit::build(&kit::KitOptions::default()).map_err(|e| ManagerError::Other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 2,
            memory: "1G".into(),
            kernel: "vmlinuz".into(),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            accel: "kvm".into(),
            restart: Restart::OnReboot,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            shares: Vec::new(),
            memory_backing: None,
            balloon: false,
            memory_merge: false,
            memory_min: None,
            memory_shares: None,
            seccomp: None,
            sandbox: None,
            memory_compress: None,
            cpu_model: None,
            vmgenid: None,
            cpu: Default::default(),
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let s = spec();
        let text = s.to_toml();
        assert_eq!(VmSpec::from_toml(Path::new("vm.toml"), &text).unwrap(), s);
        assert!(text.contains("restart = \"on-reboot\""), "{text}");
    }

    #[test]
    fn invalid_configs_are_reported_not_skipped() {
        let p = Path::new("/b/vm.toml");
        for (text, needle) in [
            (
                "cpus = 1\nmemory = \"1G\"\nkernel = \"k\"\ncolour = \"red\"\n",
                "unknown field `colour`",
            ),
            (
                "cpus = 0\nmemory = \"1G\"\nkernel = \"k\"\n",
                "--cpus must be between",
            ),
            (
                "cpus = 1\nmemory = \"lots\"\nkernel = \"k\"\n",
                "invalid memory size",
            ),
            (
                "cpus = 1\nmemory = \"1G\"\nkernel = \"k\"\naccel = \"warp\"\n",
                "unknown accel",
            ),
            ("cpus = 1\nkernel = \"k\"\n", "missing field `memory`"),
            ("this is not toml", ""),
        ] {
            let err = VmSpec::from_toml(p, text).unwrap_err().to_string();
            assert!(
                err.starts_with("/b/vm.toml: ") && err.contains(needle),
                "{err}"
            );
        }
    }

    #[test]
    fn set_validates() {
        let mut s = spec();
        s.set("cpus", "4").unwrap();
        assert_eq!(s.cpus, 4);
        assert!(s.set("cpus", "0").is_err());
        assert_eq!(s.cpus, 4, "a refused setting changes nothing");
        assert!(s.set("memory", "12Q").is_err());
        assert!(
            s.set("colour", "red")
                .unwrap_err()
                .contains("unknown setting")
        );
        s.set("restart", "never").unwrap();
        assert_eq!(s.restart, Restart::Never);
    }

    #[test]
    fn relative_paths_resolve_inside_the_bundle() {
        let mut s = spec();
        s.initrd = Some("/abs/initrd".into());
        let c = s.to_vm_config(Path::new("/home/vms/a")).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/home/vms/a/vmlinuz"));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(c.memory, 1 << 30);
    }
}
