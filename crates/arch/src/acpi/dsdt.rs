//! The DSDT: the \_S5 sleep type for power-off and the devices a kernel should find
//! through ACPI (COM1, the CMOS RTC, the PCI root bridge, the VM generation ID).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt, Name, Package,
    ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::{AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID, to_bytes};
use crate::layout::{self, ports};

/// SLP_TYP value the guest writes to PM1a_CNT to enter S5 (soft off).
pub const SLEEP_TYPE_S5: u8 = 5;

/// AML already serialized, to nest inside a scope.
struct RawAml(Vec<u8>);
impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&to_bytes(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&SLEEP_TYPE_S5, &SLEEP_TYPE_S5, &0u8, &0u8]),
    )));
    let devices = [com1(), rtc(), pci_root(cfg.ram_size), vmgenid()];
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    dsdt.append_slice(&to_bytes(&Scope::new("\\_SB_".into(), children)));
    dsdt.as_slice().to_vec()
}

fn com1() -> RawAml {
    let io = IO::new(ports::COM1, ports::COM1, 1, 8);
    let irq = Interrupt::new(true, true, false, false, ports::COM1_IRQ);
    RawAml(to_bytes(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &1u8),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq])),
        ],
    )))
}

/// The VM generation ID device (Microsoft's VMGENID, which Linux's vmgenid driver and
/// Windows read): ADDR is where the 16-byte ID lives; a clone gets a new one, and a
/// guest that sees it change reseeds its random pool.
fn vmgenid() -> RawAml {
    let addr = layout::VMGENID_ADDR;
    let (low, high) = (addr as u32, (addr >> 32) as u32);
    RawAml(to_bytes(&Device::new(
        "VGEN".into(),
        vec![
            &Name::new("_HID".into(), &"VMGENCTR"),
            &Name::new("_CID".into(), &"VM_GEN_COUNTER"),
            &Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &Name::new("_STA".into(), &0x0fu8),
            &Name::new("ADDR".into(), &Package::new(vec![&low, &high])),
        ],
    )))
}

fn rtc() -> RawAml {
    let io = IO::new(ports::CMOS, ports::CMOS, 1, 2);
    let irq = Interrupt::new(true, true, false, false, 8);
    RawAml(to_bytes(&Device::new(
        "RTC_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0B00")),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq])),
        ],
    )))
}

/// The PCI root bridge and the windows the kernel may assign to its devices.
fn pci_root(ram_size: u64) -> RawAml {
    let bus = AddressSpace::<u16>::new_bus_number(0, (layout::PCI_ECAM_BUSES - 1) as u16);
    let cfg_io = IO::new(ports::PCI_CONFIG_ADDRESS, ports::PCI_CONFIG_ADDRESS, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0, ports::PCI_CONFIG_ADDRESS - 1, None);
    let io_high = AddressSpace::<u16>::new_io(ports::PCI_CONFIG_ADDRESS + 8, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64_start = layout::pci_mmio64_start(ram_size);
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + layout::PCI_MMIO64_SIZE - 1,
        None,
    );
    RawAml(to_bytes(&Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &0u8),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_BBN".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mmio32, &mmio64]),
            ),
        ],
    )))
}
