//! A copy of a VM that is a VM of its own: every file it needs copied into its folder
//! (disks sparse or reflinked, kernel, initramfs), and new MAC addresses. A linked
//! clone of a snapshot copies no disk: each of its disks is a qcow2 overlay on the
//! snapshot's (which never change), as VirtualBox's linked clones are.

use std::path::Path;

use devices::virtio::block::BlockConfig;
use devices::virtio::net::{NetConfig, generated_mac};

use crate::error::ManagerError;
use crate::spec::{KIT, VmSpec};

fn copy(from: &Path, to: &Path) -> Result<(), ManagerError> {
    disk::copy_image(from, to).map_err(|e| ManagerError::Other(e.to_string()))
}

/// The name of the file in a snapshot's folder that lists the VMs whose disks are
/// overlays on the snapshot's (one folder per clone).
pub const LINKED_CLONES: &str = "linked-clones";

/// Copies the VM described by `spec` (relative paths resolved against `from`) into
/// `into`, the new VM `name`'s folder; returns the new VM's spec. `linked`: the disks
/// become qcow2 overlays on those in `from` (a snapshot's folder, whose disks stay as
/// they are) instead of copies.
pub fn copy_vm(
    spec: &VmSpec,
    from: &Path,
    into: &Path,
    name: &str,
    linked: bool,
) -> Result<VmSpec, ManagerError> {
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            from.join(p)
        }
    };
    let mut out = spec.clone();
    if spec.kernel != KIT {
        let k = resolve(&spec.kernel);
        let dest = k
            .file_name()
            .map_or("kernel".into(), |n| n.to_string_lossy().into_owned());
        copy(&k, &into.join(&dest))?;
        out.kernel = dest;
    }
    if let Some(i) = spec.initrd.as_deref().filter(|i| *i != KIT) {
        let p = resolve(i);
        let dest = p
            .file_name()
            .map_or("initrd".into(), |n| n.to_string_lossy().into_owned());
        copy(&p, &into.join(&dest))?;
        out.initrd = Some(dest);
    }
    out.disks.clear();
    for (i, d) in spec.disks.iter().enumerate() {
        let mut c =
            BlockConfig::parse(d).map_err(|e| ManagerError::Other(format!("disk {d:?}: {e}")))?;
        let src = resolve(&c.path.to_string_lossy());
        let dest = if linked {
            let dest = format!("disk{i}.qcow2");
            let base = disk::Backing {
                path: src.clone(),
                format: c.format,
            };
            let opts = disk::CreateOptions {
                format: disk::Format::Qcow2,
                size: None,
                backing: Some(base),
                cluster_size: None,
            };
            disk::create(&into.join(&dest), &opts)
                .map_err(|e| ManagerError::Other(e.to_string()))?;
            c.format = Some(disk::Format::Qcow2);
            dest
        } else {
            let dest = match src.extension() {
                Some(ext) => format!("disk{i}.{}", ext.to_string_lossy()),
                None => format!("disk{i}"),
            };
            copy(&src, &into.join(&dest))?;
            dest
        };
        // The guest keeps seeing the serials it knew.
        c.id = Some(c.serial());
        c.path = dest.into();
        out.disks.push(c.to_spec());
    }
    out.vmgenid = Some(vmm::vmgenid_hex(&vmm::new_vmgenid()));
    let seed = format!("{name}-{:?}", std::time::SystemTime::now());
    out.nets = spec
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut c =
                NetConfig::parse(n).map_err(|e| ManagerError::Other(format!("net {n:?}: {e}")))?;
            c.mac = Some(generated_mac(seed.as_bytes(), i as u32));
            Ok(c.to_spec())
        })
        .collect::<Result<_, ManagerError>>()?;
    Ok(out)
}
