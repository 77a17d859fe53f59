//! A VM's `vm.toml`, as every vessel command that opens a VM reads it: the TOML, the
//! checks behind it (sizes, CPU policy, every disk's and NIC's options), and what is
//! written back. A folder copied from elsewhere is a file vessel did not write.

use std::path::Path;

use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use manager::VmSpec;

pub fn vm_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("vm.toml");
    let Ok(spec) = VmSpec::from_toml(path, text) else {
        return;
    };
    // What loads is written back as it was read.
    let again = VmSpec::from_toml(path, &spec.to_toml()).expect("vm.toml round trip");
    assert_eq!(again, spec);
    for (i, d) in spec.disks.iter().enumerate() {
        let c = BlockConfig::parse(d).expect("a checked disk spec parses");
        assert_eq!(BlockConfig::parse(&c.to_spec()).as_ref(), Ok(&c));
        let _ = spec.device_limits(&format!("disk{i}"));
    }
    for (i, n) in spec.nets.iter().enumerate() {
        let c = NetConfig::parse(n).expect("a checked NIC spec parses");
        assert_eq!(NetConfig::parse(&c.to_spec()).as_ref(), Ok(&c));
        let _ = spec.device_limits(&format!("net{i}"));
    }
    // `vessel set` on what loaded: refused or applied, never a panic.
    let mut s = spec.clone();
    for kv in [
        "cpu_limit=0.5",
        "disk0.bw=1M",
        "net0.rx_iops=none",
        "cpu_affinity=0-1",
    ] {
        let (k, v) = kv.split_once('=').unwrap_or_default();
        let _ = s.set(k, v);
    }
}
