//! The VM's virtio devices on the PCI root complex: BARs from the 32-bit window,
//! MSI-X through the backend's sink, queue notifications as ioeventfds where the
//! backend has them.

use std::sync::{Arc, Mutex};

use cpu::GuestMemory;
use devices::pci::{BarAllocator, PciDevice, PciRoot};
use devices::virtio::block::VirtioBlock;
use devices::virtio::net::{VirtioNet, generated_mac};
use devices::virtio::rng::VirtioRng;
use devices::virtio::{VirtioDevice, VirtioPciDevice};
use devices::{Bus, BusDevice};

use super::Backend;
use crate::config::VmConfig;
use crate::error::VmError;

/// Opens the config's devices: disk images, TAP interfaces, the entropy source.
pub(super) fn devices(
    config: &VmConfig,
) -> Result<Vec<Box<dyn VirtioDevice<GuestMemory>>>, VmError> {
    let mut out: Vec<Box<dyn VirtioDevice<GuestMemory>>> = Vec::new();
    for disk in &config.disks {
        let dev = VirtioBlock::new(disk)
            .map_err(|e| VmError::Device(format!("disk {}: {e}", disk.path.display())))?;
        out.push(Box::new(dev));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let mac = generated_mac(net.tap.as_bytes(), index as u32);
        let dev = VirtioNet::open(net, mac).map_err(|e| VmError::Device(e.to_string()))?;
        out.push(Box::new(dev));
    }
    if config.rng {
        out.push(Box::new(VirtioRng::new()));
    }
    Ok(out)
}

/// Puts `devices` on the root complex and the MMIO bus.
pub(super) fn attach(
    devices: Vec<Box<dyn VirtioDevice<GuestMemory>>>,
    mem: &GuestMemory,
    root: &Mutex<PciRoot>,
    mmio: &mut Bus,
    backend: &Backend,
) -> Result<(), VmError> {
    let mut bars = BarAllocator::mmio32();
    for device in devices {
        let pci = VirtioPciDevice::new(device, mem.clone(), &mut bars, backend.msi.clone(), None)
            .map_err(|e| VmError::Device(e.to_string()))?;
        let (base, len) = pci.bar_window();
        for (gpa, event) in pci.notify_events() {
            (backend.notify)(gpa, event)?;
        }
        let pci = Arc::new(Mutex::new(pci));
        devices::bus::lock(root)
            .add_next(pci.clone() as Arc<Mutex<dyn PciDevice>>)
            .map_err(|e| VmError::Device(e.to_string()))?;
        mmio.insert(base, len, pci as Arc<Mutex<dyn BusDevice>>)?;
    }
    Ok(())
}
