//! The PVH boot protocol: an ELF vmlinux entered at its XEN_ELFNOTE_PHYS32_ENTRY in
//! 32-bit protected mode, paging off, with hvm_start_info in EBX.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{Elf, KernelLoader, elf::PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{BootError, BootSpec, KernelFormat, LoadedKernel, paging, place_initrd};
use crate::e820;
use crate::entry::*;
use crate::layout;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const PT_LOAD: u32 = 1;

pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    initrd: Option<&[u8]>,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(spec.kernel).map_err(|source| BootError::ReadKernel {
        path: spec.kernel.into(),
        source,
    })?;
    check_segments(&mut file).map_err(|reason| BootError::KernelLoad {
        path: spec.kernel.into(),
        reason,
    })?;
    let loaded = Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| BootError::KernelLoad {
        path: spec.kernel.into(),
        reason: e.to_string(),
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhEntry(spec.kernel.into()));
    };
    let low_end = super::low_ram_end(spec.ram_size);
    if loaded.kernel_end > low_end {
        return Err(BootError::KernelTooBig {
            needed_mib: loaded.kernel_end.div_ceil(1 << 20),
            have_mib: spec.ram_size >> 20,
        });
    }

    let initrd = match initrd {
        Some(data) => Some(place_initrd(mem, data, loaded.kernel_end, low_end)?),
        None => None,
    };
    write_start_info(mem, spec, initrd)?;
    paging::write_gdt(mem, &paging::GDT_PROTECTED_MODE)?;
    Ok(LoadedKernel {
        format: KernelFormat::PvhElf,
        entry: protected_mode_entry(entry.0),
        initrd,
    })
}

/// hvm_start_info with the memory map, the command line (already at CMDLINE_START),
/// the RSDP and the initrd as the one module.
pub(super) fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|&(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .collect();
    let memmap: Vec<hvm_memmap_table_entry> = e820::memory_map(spec.ram_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: layout::PVH_MODLIST_START,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: spec.rsdp.unwrap_or(0),
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem)
        .map_err(|_| BootError::NoRoomForBootStructures)
}

/// What linux-loader does not check (only the entry point): every segment it loads
/// lies at or above 1 MiB, clear of the boot structures below, and is no larger in the
/// file than in memory (the initrd goes above the in-memory end). The program headers
/// are read as linux-loader reads them, 56 bytes apart; an unreadable one is left to
/// it to report.
fn check_segments(file: &mut File) -> Result<(), String> {
    let mut read_at = |at: u64, buf: &mut [u8]| {
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.read_exact(buf))
            .is_ok()
    };
    let mut ehdr = [0u8; 64];
    if !read_at(0, &mut ehdr) {
        return Ok(());
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let (phoff, phnum) = (
        u64_at(&ehdr, 0x20),
        u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]),
    );
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        let Some(at) = phoff.checked_add(56 * i) else {
            return Ok(());
        };
        if !read_at(at, &mut ph) {
            return Ok(());
        }
        let (kind, paddr) = (
            u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]),
            u64_at(&ph, 24),
        );
        let (filesz, memsz) = (u64_at(&ph, 32), u64_at(&ph, 40));
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        if paddr < layout::HIMEM_START {
            return Err(format!(
                "a segment loads at {paddr:#x}, below {:#x}, over the boot structures",
                layout::HIMEM_START
            ));
        }
        if memsz < filesz {
            return Err(format!(
                "the segment at {paddr:#x} has {filesz:#x} bytes in the file but {memsz:#x} in memory"
            ));
        }
    }
    Ok(())
}

/// 32-bit flat protected mode, paging off, start_info in EBX (the PVH contract).
pub fn protected_mode_entry(rip: u64) -> EntryState {
    let gdt = &paging::GDT_PROTECTED_MODE;
    let data = Segment::from_descriptor(2, gdt[2]);
    EntryState {
        rip,
        rbx: layout::PVH_INFO_START,
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
        cr0: CR0_PE | CR0_ET,
        ..Default::default()
    }
}
