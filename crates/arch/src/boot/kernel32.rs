//! Loading a 32-bit kernel ([`elf32`](super::elf32) parses it): a multiboot header makes
//! it a multiboot kernel; otherwise an i386 ELF with a PVH note gets PVH's start_info,
//! as a 64-bit one does (QEMU's order). Both are entered in 32-bit flat protected mode
//! with paging off.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::elf32::{self, Load, MULTIBOOT_BOOTLOADER_MAGIC};
use super::{BootError, BootSpec, KernelFormat, LoadedKernel, paging, place_initrd, pvh};
use crate::e820;
use crate::layout;

/// Where the multiboot information goes (PVH's start_info place: one or the other).
const MBI: u64 = layout::PVH_INFO_START;
const MBI_MODULE: u64 = MBI + 0x60;
const MBI_LOADER_NAME: u64 = MBI + 0x70;
const MBI_MMAP: u64 = layout::PVH_MEMMAP_START;
/// The module's string (its file's path, as GRUB and QEMU give it), to the zero page.
const MBI_MODULE_STRING: u64 = MBI + 0x400;
const MODULE_STRING_MAX: usize = (layout::ZERO_PAGE_START - MBI_MODULE_STRING) as usize - 1;
const LOADER_NAME: &[u8] = b"vessel\0";

/// multiboot_info flags: mem_lower/upper, cmdline, mods, mmap, boot_loader_name.
const MBI_MEM: u32 = 1;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP_FLAG: u32 = 1 << 6;
const MBI_LOADER: u32 = 1 << 9;

pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    initrd: Option<&[u8]>,
    file: &[u8],
) -> Result<LoadedKernel, BootError> {
    let refuse = |reason: String| BootError::KernelLoad {
        path: spec.kernel.into(),
        reason,
    };
    // QEMU's order: a multiboot header first (its load addresses, when it gives them,
    // even in an ELF file), then an ELF's PVH note.
    let (loads, entry, pvh) = match elf32::find_multiboot(file) {
        Some(header) => {
            let header = header.map_err(refuse)?;
            match header.addresses {
                Some(addresses) => {
                    let load =
                        elf32::multiboot_load(&header, &addresses, file.len()).map_err(refuse)?;
                    (vec![load], addresses.entry_addr, false)
                }
                None if elf32::is_elf32(file) => {
                    let elf = elf32::parse_elf32(file).map_err(refuse)?;
                    (elf.loads, elf.entry, false)
                }
                None => {
                    return Err(refuse(
                        "a multiboot kernel that is not an ELF file must give its load addresses"
                            .into(),
                    ));
                }
            }
        }
        None if elf32::is_elf32(file) => {
            let elf = elf32::parse_elf32(file).map_err(refuse)?;
            let entry = elf
                .pvh_entry
                .ok_or_else(|| BootError::NoPvhEntry(spec.kernel.into()))?;
            (elf.loads, entry, true)
        }
        None => return Err(BootError::NotAKernel(spec.kernel.into())),
    };
    let kernel_end = place(mem, spec, file, &loads)?;
    let low_end = super::low_ram_end(spec.ram_size);
    let initrd = match initrd {
        Some(data) => Some(place_initrd(mem, data, kernel_end, low_end)?),
        None => None,
    };
    paging::write_gdt(mem, &paging::GDT_PROTECTED_MODE)?;
    let mut state = pvh::protected_mode_entry(entry.into());
    let format = if pvh {
        pvh::write_start_info(mem, spec, initrd)?;
        KernelFormat::PvhElf32
    } else {
        write_multiboot_info(mem, spec, initrd)?;
        state.rax = MULTIBOOT_BOOTLOADER_MAGIC.into();
        state.rbx = MBI;
        KernelFormat::Multiboot
    };
    Ok(LoadedKernel {
        format,
        entry: state,
        initrd,
    })
}

/// Copies each segment into guest RAM (zeros after its file bytes); they must lie
/// between 1 MiB and the end of low RAM. Returns the end of the highest.
fn place<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    file: &[u8],
    loads: &[Load],
) -> Result<u64, BootError> {
    let low_end = super::low_ram_end(spec.ram_size);
    let mut kernel_end = layout::HIMEM_START;
    for l in loads {
        if l.paddr < layout::HIMEM_START {
            return Err(BootError::KernelLoad {
                path: spec.kernel.into(),
                reason: format!(
                    "a segment loads at {:#x}, below {:#x}, over the boot structures",
                    l.paddr,
                    layout::HIMEM_START
                ),
            });
        }
        let end = l.paddr + l.memsz;
        if end > low_end {
            return Err(BootError::KernelTooBig {
                needed_mib: end.div_ceil(1 << 20),
                have_mib: spec.ram_size >> 20,
            });
        }
        let bytes = &file[l.offset as usize..(l.offset + l.filesz) as usize];
        mem.write_slice(bytes, GuestAddress(l.paddr))
            .map_err(|_| BootError::NoRoomForBootStructures)?;
        // The bss, a chunk at a time (its size is the file's to say).
        const CHUNK: [u8; 4096] = [0; 4096];
        let mut at = l.paddr + l.filesz;
        while at < end {
            let n = (end - at).min(CHUNK.len() as u64) as usize;
            mem.write_slice(&CHUNK[..n], GuestAddress(at))
                .map_err(|_| BootError::NoRoomForBootStructures)?;
            at += n as u64;
        }
        kernel_end = kernel_end.max(end);
    }
    Ok(kernel_end)
}

/// The multiboot information: memory sizes and map, the command line (already at
/// CMDLINE_START), the initrd as the one module, and vessel's name.
fn write_multiboot_info<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = e820::memory_map(spec.ram_size);
    let mut mmap = Vec::new();
    for e in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    let low_end = super::low_ram_end(spec.ram_size);
    let mut info = [0u32; 22];
    info[0] = MBI_MEM | MBI_CMDLINE | MBI_MODS | MBI_MMAP_FLAG | MBI_LOADER;
    info[1] = (layout::EBDA_START >> 10) as u32;
    info[2] = ((low_end - layout::HIMEM_START) >> 10) as u32;
    info[4] = layout::CMDLINE_START as u32;
    if let Some((addr, size)) = initrd {
        info[5] = 1;
        info[6] = MBI_MODULE as u32;
        // mod_start, mod_end, string, reserved.
        let module = [
            addr as u32,
            (addr + size) as u32,
            MBI_MODULE_STRING as u32,
            0,
        ];
        write_words(mem, MBI_MODULE, &module)?;
        let path = spec.initrd.map(|p| p.to_string_lossy().into_owned());
        let mut string = path.unwrap_or_default().into_bytes();
        string.truncate(MODULE_STRING_MAX);
        string.push(0);
        mem.write_slice(&string, GuestAddress(MBI_MODULE_STRING))
            .map_err(|_| BootError::NoRoomForBootStructures)?;
    }
    info[11] = mmap.len() as u32;
    info[12] = MBI_MMAP as u32;
    info[16] = MBI_LOADER_NAME as u32;
    write_words(mem, MBI, &info)?;
    mem.write_slice(LOADER_NAME, GuestAddress(MBI_LOADER_NAME))
        .and_then(|()| mem.write_slice(&mmap, GuestAddress(MBI_MMAP)))
        .map_err(|_| BootError::NoRoomForBootStructures)
}

fn write_words<M: GuestMemoryBackend>(mem: &M, at: u64, words: &[u32]) -> Result<(), BootError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at))
        .map_err(|_| BootError::NoRoomForBootStructures)
}
