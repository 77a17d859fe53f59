//! The x86 Linux boot protocol, 64-bit entry: the protected-mode kernel at 1 MiB,
//! boot_params (the "zero page") in RSI, identity-mapped long mode.

use std::fs::File;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{BootError, BootSpec, KernelFormat, LoadedKernel, paging, place_initrd};
use crate::e820;
use crate::entry::*;
use crate::layout;

/// Boot protocol 2.12 introduced xloadflags and with it the advertised 64-bit entry.
const MIN_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// "Undefined" boot loader ID, as Firecracker and Cloud Hypervisor use.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The 64-bit entry sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    initrd: Option<&[u8]>,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(spec.kernel).map_err(|source| BootError::ReadKernel {
        path: spec.kernel.into(),
        source,
    })?;
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(layout::HIMEM_START)),
        &mut file,
        None,
    )
    .map_err(|e| BootError::KernelLoad {
        path: spec.kernel.into(),
        reason: e.to_string(),
    })?;
    let mut hdr = loaded.setup_header.ok_or_else(|| BootError::KernelLoad {
        path: spec.kernel.into(),
        reason: "no setup header".into(),
    })?;
    if hdr.version < MIN_PROTOCOL || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NoLongModeEntry {
            path: spec.kernel.into(),
            version: hdr.version,
        });
    }

    // The kernel decompresses and runs in place: it owns init_size bytes from 1 MiB.
    let low_end = super::low_ram_end(spec.ram_size);
    let kernel_end = (layout::HIMEM_START + u64::from(hdr.init_size)).max(loaded.kernel_end);
    if kernel_end > low_end {
        return Err(BootError::KernelTooBig {
            needed_mib: kernel_end.div_ceil(1 << 20),
            have_mib: spec.ram_size >> 20,
        });
    }

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    hdr.cmdline_size = spec.cmdline.len() as u32;
    let initrd = match initrd {
        Some(data) => {
            let limit = (u64::from(hdr.initrd_addr_max) + 1).min(low_end);
            let (addr, size) = place_initrd(mem, data, kernel_end, limit)?;
            hdr.ramdisk_image = addr as u32;
            hdr.ramdisk_size = size as u32;
            Some((addr, size))
        }
        None => None,
    };

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: spec.rsdp.unwrap_or(0),
        ..Default::default()
    };
    let map = e820::memory_map(spec.ram_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|_| BootError::NoRoomForBootStructures)?;

    paging::write_gdt(mem, &paging::GDT_LONG_MODE)?;
    let cr3 = paging::write_identity_page_tables(mem)?;
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: long_mode_entry(layout::HIMEM_START + STARTUP_64_OFFSET, cr3),
        initrd,
    })
}

/// Long mode with paging on, flat segments from the boot GDT, boot_params in RSI.
pub fn long_mode_entry(rip: u64, cr3: u64) -> EntryState {
    let gdt = &paging::GDT_LONG_MODE;
    let data = Segment::from_descriptor(2, gdt[2]);
    EntryState {
        rip,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        rflags: RFLAGS_RESERVED,
        cs: Segment::from_descriptor(1, gdt[1]),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment::from_descriptor(3, gdt[3]),
        gdt: DescriptorTable {
            base: layout::GDT_START,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: layout::IDT_START,
            limit: 7,
        },
        cr0: CR0_PE | CR0_ET | CR0_PG,
        cr3,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        ..Default::default()
    }
}
