//! ACPI tables, built with `acpi_tables`: RSDP → XSDT → FADT (→ FACS, DSDT), MADT, MCFG.
//! Full (not hardware-reduced) ACPI with fixed PM registers, so a stock kernel finds its
//! CPUs, powers off through \_S5, resets through the FADT reset register and gets the
//! fixed-feature power button.

mod dsdt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::{Aml, AmlSink, facs::FACS, rsdp::Rsdp, xsdt::XSDT};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{self, ports};

pub use dsdt::SLEEP_TYPE_S5;

const OEM_ID: [u8; 6] = *b"VESSEL";
const OEM_TABLE_ID: [u8; 8] = *b"VESSELVM";
const OEM_REVISION: u32 = 1;
/// The CMOS register holding the century (FADT "century" field).
pub const CMOS_CENTURY: u8 = 0x32;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooBig(usize),
    #[error("cannot write ACPI tables to guest memory")]
    Write,
}

/// What the tables describe.
pub struct AcpiConfig {
    pub cpus: u8,
    pub ram_size: u64,
    /// The VM generation ID (a GUID's 16 bytes) the VMGENID device shows.
    pub vmgenid: [u8; 16],
}

struct AmlBytes(Vec<u8>);
impl AmlSink for AmlBytes {
    fn byte(&mut self, byte: u8) {
        self.0.push(byte);
    }
}

pub(super) fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut sink = AmlBytes(Vec::new());
    table.to_aml_bytes(&mut sink);
    sink.0
}

/// Lays the tables out from `layout::ACPI_START` and returns them with their addresses.
pub struct AcpiTables {
    pub rsdp_addr: u64,
    /// (address, bytes) of every table, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// Written at `layout::VMGENID_ADDR`.
    pub vmgenid: [u8; 16],
}

impl AcpiTables {
    pub fn build(cfg: &AcpiConfig) -> Result<Self, AcpiError> {
        let mut next = layout::ACPI_START + 64; // the RSDP goes first, at ACPI_START
        let mut place = |len: usize, align: u64| {
            let addr = next.next_multiple_of(align);
            next = addr + len as u64;
            addr
        };
        let dsdt = dsdt::build(cfg);
        let dsdt_addr = place(dsdt.len(), 16);
        let facs = to_bytes(&FACS::new());
        let facs_addr = place(facs.len(), 64);
        let fadt = to_bytes(&fadt(dsdt_addr, facs_addr));
        let fadt_addr = place(fadt.len(), 16);
        let madt = to_bytes(&madt(cfg.cpus));
        let madt_addr = place(madt.len(), 16);
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(
            layout::PCI_ECAM_START,
            0,
            0,
            (layout::PCI_ECAM_BUSES - 1) as u8,
        );
        let mcfg = to_bytes(&mcfg);
        let mcfg_addr = place(mcfg.len(), 16);
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for addr in [fadt_addr, madt_addr, mcfg_addr] {
            xsdt.add_entry(addr);
        }
        let xsdt = to_bytes(&xsdt);
        let xsdt_addr = place(xsdt.len(), 16);
        if next > layout::VMGENID_ADDR {
            return Err(AcpiError::TooBig((next - layout::ACPI_START) as usize));
        }
        let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
        Ok(AcpiTables {
            rsdp_addr: layout::ACPI_START,
            blobs: vec![
                (layout::ACPI_START, rsdp),
                (xsdt_addr, xsdt),
                (fadt_addr, fadt),
                (facs_addr, facs),
                (dsdt_addr, dsdt),
                (madt_addr, madt),
                (mcfg_addr, mcfg),
            ],
            vmgenid: cfg.vmgenid,
        })
    }

    pub fn write<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u64, AcpiError> {
        for (addr, bytes) in &self.blobs {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|_| AcpiError::Write)?;
        }
        mem.write_slice(&self.vmgenid, GuestAddress(layout::VMGENID_ADDR))
            .map_err(|_| AcpiError::Write)?;
        Ok(self.rsdp_addr)
    }

    /// The table with this 4-byte signature (tests and diagnostics).
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        self.blobs
            .iter()
            .map(|(_, b)| b.as_slice())
            .find(|b| b.starts_with(signature))
    }
}

fn io_gas(port: u16, bytes: u8) -> GAS {
    let access = match bytes {
        1 => AccessSize::ByteAccess,
        2 => AccessSize::WordAccess,
        _ => AccessSize::DwordAccess,
    };
    GAS::new(
        AddressSpace::SystemIo,
        bytes * 8,
        0,
        access,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> acpi_tables::fadt::FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::TmrValExt);
    // The 32-bit pointers too (both tables lie below 4 GiB), as QEMU gives them: an
    // OSPM of ACPI 6 takes the 64-bit ones, older ones and test suites read these.
    f.dsdt = (dsdt_addr as u32).into();
    f.firmware_ctrl = (facs_addr as u32).into();
    f.sci_int = (ports::ACPI_SCI_IRQ as u16).into();
    // SMI_CMD = 0: there is no SMM; the platform is always in ACPI mode (SCI_EN reads 1).
    f.pm1a_evt_blk = u32::from(ports::ACPI_PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(ports::ACPI_PM1A_CNT).into();
    f.pm_tmr_blk = u32::from(ports::ACPI_PM_TMR).into();
    f.pm1_evt_len = ports::ACPI_PM1A_EVT_LEN;
    f.pm1_cnt_len = ports::ACPI_PM1A_CNT_LEN;
    f.pm_tmr_len = ports::ACPI_PM_TMR_LEN;
    f.x_pm1a_evt_blk = io_gas(ports::ACPI_PM1A_EVT, ports::ACPI_PM1A_EVT_LEN);
    f.x_pm1a_cnt_blk = io_gas(ports::ACPI_PM1A_CNT, ports::ACPI_PM1A_CNT_LEN);
    f.x_pm_tmr_blk = io_gas(ports::ACPI_PM_TMR, ports::ACPI_PM_TMR_LEN);
    f.reset_reg = io_gas(ports::RESET_CONTROL, 1);
    f.reset_value = ports::RESET_VALUE;
    f.century = CMOS_CENTURY;
    // IA-PC boot architecture: no VGA; no 8042 advertised, so Linux skips probing a
    // keyboard controller (its reset command still works: reboot=k writes port 0x64).
    f.iapc_boot_arch = (1u16 << 2).into();
    f.finalize()
}

/// ACPI MADT "Interrupt Source Override" (type 2): an ISA IRQ's trigger and polarity.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn madt(cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    // The SCI is level-triggered, active high (as QEMU and the KVM IOAPIC model it).
    madt.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: ports::ACPI_SCI_IRQ as u8,
        gsi: ports::ACPI_SCI_IRQ,
        flags: 0b1101,
    });
    madt
}

#[cfg(test)]
mod tests;
