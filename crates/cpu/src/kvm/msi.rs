//! Message-signalled interrupts into KVM's in-kernel local APICs, through irqfd and
//! GSI routes. Each distinct message (address, data) a device sends gets a GSI above
//! the irqchip's pins, an MSI route for it and an eventfd registered as that GSI's
//! irqfd; from then on sending it is one eventfd write. The routes are made on first
//! use, keyed by the message itself, so a driver that reprograms an MSI-X entry simply
//! gets a new route. A guest can make only [`MAX_MSI_ROUTES`] of them; past that (or if
//! KVM refuses a route table) messages go through KVM_SIGNAL_MSI, which delivers the
//! same interrupt with one ioctl.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The IOAPIC's pins, GSIs 0-23; MSI routes take the GSIs after them.
const IOAPIC_PINS: u32 = 24;
/// The most MSI routes one VM gets (KVM allows 4096 routing entries in all).
pub const MAX_MSI_ROUTES: usize = 512;

/// MSIs into KVM's in-kernel local APICs: what virtio devices' MSI-X vectors raise.
pub struct KvmMsi {
    vm: Arc<VmFd>,
    routes: Mutex<MsiRoutes>,
}

#[derive(Default)]
struct MsiRoutes {
    /// The irqfd that raises each message routed so far.
    irqfds: HashMap<(u64, u32), EventFd>,
    /// The MSI routes, in GSI order from [`IOAPIC_PINS`].
    msi: Vec<kvm_irq_routing_entry>,
    /// No more routes: the table is full or KVM refused one.
    closed: bool,
}

impl KvmMsi {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMsi {
            vm,
            routes: Mutex::new(MsiRoutes::default()),
        }
    }

    /// How many messages have a route and an irqfd.
    pub fn routed(&self) -> usize {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .irqfds
            .len()
    }

    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            // EPERM: no local APIC accepted the message (a guest may aim one at an APIC
            // ID it does not have); on the bus that is a write nobody claims, as an
            // irqfd route drops it too.
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EPERM => Ok(()),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

impl devices::interrupt::MsiSink for KvmMsi {
    fn send(&self, address: u64, data: u32) -> io::Result<()> {
        {
            let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(irqfd) = routes.irqfds.get(&(address, data)) {
                return irqfd.write(1);
            }
            if !routes.closed {
                match routes.add(&self.vm, address, data) {
                    Ok(irqfd) => return irqfd.write(1),
                    Err(e) => {
                        tracing::warn!("MSI routing stopped, using KVM_SIGNAL_MSI: {e}");
                        routes.closed = true;
                    }
                }
            }
        }
        self.signal_msi(address, data)
    }
}

impl MsiRoutes {
    /// Routes the message through a new GSI and irqfd.
    fn add(&mut self, vm: &VmFd, address: u64, data: u32) -> io::Result<&EventFd> {
        if self.msi.len() >= MAX_MSI_ROUTES {
            return Err(io::Error::other(format!(
                "the guest used {MAX_MSI_ROUTES} distinct MSI messages"
            )));
        }
        let gsi = IOAPIC_PINS + self.msi.len() as u32;
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = address as u32;
        entry.u.msi.address_hi = (address >> 32) as u32;
        entry.u.msi.data = data;
        self.msi.push(entry);
        if let Err(e) = self.install(vm) {
            self.msi.pop();
            return Err(e);
        }
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        vm.register_irqfd(&irqfd, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(self.irqfds.entry((address, data)).or_insert(irqfd))
    }

    /// Replaces KVM's routing table with the irqchip's own routes (as KVM sets them up
    /// when it creates the irqchip: the legacy lines stay wired) plus the MSI routes.
    fn install(&self, vm: &VmFd) -> io::Result<()> {
        let mut entries = irqchip_routes();
        entries.extend_from_slice(&self.msi);
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        vm.set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// KVM's default routes: GSI n to IOAPIC pin n for every pin, and GSIs 0-15 also to
/// the 8259 pair (master pins 0-7, slave pins 8-15).
fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let route = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_PINS {
        routes.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(route(gsi, chip, gsi % 8));
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_irqchip_routes_cover_every_pin_once_per_chip() {
        let routes = irqchip_routes();
        assert_eq!(routes.len(), 24 + 16);
        let pins: Vec<(u32, u32, u32)> = routes
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
                // SAFETY: an irqchip route, so `u.irqchip` is the union's live field.
                unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) }
            })
            .collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(
            !pins
                .iter()
                .any(|&(gsi, chip, _)| gsi >= 16 && chip != KVM_IRQCHIP_IOAPIC)
        );
    }

    /// A VM with KVM's irqchip, or None (a skip) where /dev/kvm cannot be opened and
    /// VESSEL_REQUIRE_KVM is not 1.
    fn vm_with_irqchip() -> Option<Arc<VmFd>> {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                let required = std::env::var("VESSEL_REQUIRE_KVM").is_ok_and(|v| v == "1");
                assert!(!required, "VESSEL_REQUIRE_KVM=1 but /dev/kvm: {e}");
                eprintln!("skipped: /dev/kvm: {e}");
                return None;
            }
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        Some(Arc::new(vm))
    }

    #[test]
    fn each_distinct_message_gets_one_route_and_irqfd() {
        use devices::interrupt::MsiSink;
        let Some(vm) = vm_with_irqchip() else { return };
        let msi = KvmMsi::new(vm);
        msi.send(0xfee0_0000, 0x41).unwrap();
        msi.send(0xfee0_0000, 0x41).unwrap();
        assert_eq!(msi.routed(), 1);
        // The driver moved the vector to another CPU: a second route.
        msi.send(0xfee0_1000, 0x41).unwrap();
        assert_eq!(msi.routed(), 2);
    }

    #[test]
    fn a_guest_that_cycles_messages_runs_out_of_routes_not_interrupts() {
        use devices::interrupt::MsiSink;
        let Some(vm) = vm_with_irqchip() else { return };
        let msi = KvmMsi::new(vm);
        for data in 0..MAX_MSI_ROUTES as u32 + 40 {
            msi.send(0xfee0_0000, 0x20 + (data % 200) + (data / 200) * 0x1000)
                .unwrap();
        }
        assert_eq!(msi.routed(), MAX_MSI_ROUTES);
        // Past the limit, messages still go out (KVM_SIGNAL_MSI; this VM has no vCPU
        // to take them, which is not the sender's error).
        msi.send(0xfee0_0000, 0xffff_0000).unwrap();
        assert_eq!(msi.routed(), MAX_MSI_ROUTES);
    }
}
