//! Kernel loading as `vessel run --kernel K --initrd I` does it: format detection,
//! the bzImage boot protocol (setup header, 64-bit entry, zero page, e820), the ELF
//! PVH loader (program headers, the PVH note, start_info), 32-bit kernels (i386 ELF
//! with a PVH note, multiboot ELF or binary: header, load addresses, multiboot
//! information), the command line and the initrd placed below the top of low RAM. The kernel and initrd are memfds reached
//! through /proc/self/fd, so nothing is written to the file system.
//!
//! Checked on every load that succeeds: the format is the one the file's magic says;
//! everything landed intact (the command line and its NUL, the initrd where the loader
//! says, page-aligned, inside low RAM and above the kernel, the bzImage's
//! protected-mode code at 1 MiB, every ELF segment at its physical address), so no
//! boot structure overwrote another; the entry state is the protocol's.
//!
//! Input: flags (bit 0 an initrd, bits 1-2 guest RAM of 2, 8, 32 or 64 MiB), command
//! line length (u8) and bytes, initrd length (u16) and bytes, then the kernel.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use arch::boot::{self, BootSpec, KernelFormat};
use arch::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ops::Ops;

const MIB: u64 = 1 << 20;

/// A file in memory, and the path that opens it.
pub(crate) struct MemFile {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
}

pub(crate) fn memfd(bytes: &[u8]) -> MemFile {
    // SAFETY: a NUL-terminated name and valid flags; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"vessel-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes).expect("writing a memfd");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    MemFile { file, path }
}

fn memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

fn holds(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> bool {
    let mut back = vec![0u8; bytes.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).is_ok() && back == bytes
}

fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(b.get(at..at + n)?);
    Some(u64::from_le_bytes(v))
}

/// Whether the file's (first) multiboot header gives load addresses: then those, not
/// an ELF's segments, say what is loaded.
fn multiboot_addresses(k: &[u8]) -> bool {
    let word = |at: usize| le(k, at, 4).unwrap_or(0) as u32;
    (0..k.len().min(8192).saturating_sub(11))
        .step_by(4)
        .find(|&at| {
            word(at) == 0x1bad_b002
                && word(at)
                    .wrapping_add(word(at + 4))
                    .wrapping_add(word(at + 8))
                    == 0
        })
        .is_some_and(|at| word(at + 4) & 1 << 16 != 0)
}

/// The PT_LOAD segments with file content: (file offset, physical address, size), of
/// a 64-bit ELF or (`wide` false) a 32-bit one.
/// The loadable segments, in the file's order (those without file content too: their
/// zeros lie over earlier ones): (offset, physical address, file size, memory size).
fn elf_segments(k: &[u8], wide: bool) -> Vec<(usize, u64, usize, u64)> {
    let (w, phoff, phnum, size) = if wide {
        (8, le(k, 0x20, 8), le(k, 0x38, 2), 56)
    } else {
        (4, le(k, 0x1c, 4), le(k, 0x2c, 2), 32)
    };
    let (Some(phoff), Some(phnum)) = (phoff, phnum) else {
        return Vec::new();
    };
    // Field offsets: p_offset, p_paddr, p_filesz, p_memsz.
    let fields = if wide {
        [8, 24, 32, 40]
    } else {
        [4, 12, 16, 20]
    };
    (0..phnum as usize)
        .filter_map(|i| {
            let at = (phoff as usize).checked_add(size * i)?;
            let kind = le(k, at, 4)?;
            let (offset, paddr, filesz, memsz) = (
                le(k, at + fields[0], w)?,
                le(k, at + fields[1], w)?,
                le(k, at + fields[2], w)?,
                le(k, at + fields[3], w)?,
            );
            (kind == 1).then_some((offset as usize, paddr, filesz as usize, memsz))
        })
        .collect()
}

pub fn kernel_loader(data: &[u8]) {
    kernel_loads(data);
}

/// Runs an input; whether the kernel loaded (for the corpus test).
pub fn kernel_loads(data: &[u8]) -> bool {
    let mut ops = Ops::new(data);
    let flags = ops.u8();
    let ram = [2, 8, 32, 64][usize::from(flags >> 1 & 3)] * MIB;
    let n = usize::from(ops.u8());
    let cmdline = String::from_utf8_lossy(ops.bytes(n)).into_owned();
    let m = usize::from(ops.u16());
    let initrd_bytes = ops.bytes(m).to_vec();
    let kernel_bytes = ops.bytes(usize::MAX);
    let kernel = memfd(kernel_bytes);
    let initrd = (flags & 1 != 0).then(|| memfd(&initrd_bytes));
    let mem = memory(ram);
    let spec = BootSpec {
        kernel: &kernel.path,
        initrd: initrd.as_ref().map(|i| i.path.as_path()),
        cmdline: &cmdline,
        ram_size: ram,
        rsdp: Some(layout::ACPI_START),
    };
    let Ok(loaded) = boot::load(&mem, &spec) else {
        return false;
    };
    let elf = kernel_bytes.starts_with(b"\x7fELF");
    let class = kernel_bytes.get(4).copied();
    let bzimage = kernel_bytes.get(0x202..0x206) == Some(b"HdrS");
    let expected: &[KernelFormat] = match (elf, class) {
        (true, Some(2)) => &[KernelFormat::PvhElf],
        (true, _) => &[KernelFormat::PvhElf32, KernelFormat::Multiboot],
        (false, _) if bzimage => &[KernelFormat::BzImage],
        (false, _) => &[KernelFormat::Multiboot],
    };
    assert!(
        expected.contains(&loaded.format),
        "the format the magic says: {:?}",
        loaded.format
    );
    let mut line = cmdline.into_bytes();
    line.push(0);
    assert!(
        holds(&mem, layout::CMDLINE_START, &line),
        "the command line was overwritten"
    );
    let low_end = layout::ram_ranges(ram)[0].end();
    let mut kernel_end = layout::HIMEM_START;
    match loaded.format {
        KernelFormat::BzImage => {
            let setup_sects = match kernel_bytes.get(0x1f1) {
                Some(0) | None => 4,
                Some(&s) => usize::from(s),
            };
            let code = kernel_bytes
                .get((setup_sects + 1) * 512..)
                .unwrap_or_default();
            assert!(
                holds(&mem, layout::HIMEM_START, code),
                "the kernel was overwritten"
            );
            let init_size = le(kernel_bytes, 0x260, 4).unwrap_or(0);
            kernel_end =
                (layout::HIMEM_START + init_size).max(layout::HIMEM_START + code.len() as u64);
            assert_eq!(loaded.entry.rip, layout::HIMEM_START + 0x200);
            assert_eq!(loaded.entry.rsi, layout::ZERO_PAGE_START);
        }
        KernelFormat::PvhElf | KernelFormat::PvhElf32 | KernelFormat::Multiboot
            if elf
                && !(loaded.format == KernelFormat::Multiboot
                    && multiboot_addresses(kernel_bytes)) =>
        {
            let segments = elf_segments(kernel_bytes, class == Some(2));
            for (i, &(offset, paddr, size, _)) in segments.iter().enumerate() {
                let Some(content) = kernel_bytes.get(offset..offset.saturating_add(size)) else {
                    continue;
                };
                // Segments load in the file's order: where a later one lies over this
                // one (its file bytes or the zeros up to its memory size), it wins.
                let later = &segments[i + 1..];
                let covered = |a: u64| {
                    later
                        .iter()
                        .any(|&(_, p, f, m)| a >= p && a - p < m.max(f as u64))
                };
                let mut back = vec![0u8; size];
                assert!(mem.read_slice(&mut back, GuestAddress(paddr)).is_ok());
                let kept = (0..size).all(|j| covered(paddr + j as u64) || back[j] == content[j]);
                assert!(kept, "the segment at {paddr:#x}+{size:#x} was overwritten");
                kernel_end = kernel_end.max(paddr + size as u64);
            }
            assert_eq!(loaded.entry.rbx, layout::PVH_INFO_START);
        }
        // A multiboot binary: whatever its header loads lies in low RAM above 1 MiB
        // (its end is only known from the header, so the initrd is checked against
        // 1 MiB).
        _ => {}
    }
    if loaded.format == KernelFormat::Multiboot {
        assert_eq!(loaded.entry.rax, 0x2bad_b002, "the multiboot magic");
        assert_eq!(loaded.entry.rbx, layout::PVH_INFO_START);
        let mut info = [0u8; 12];
        mem.read_slice(&mut info, GuestAddress(layout::PVH_INFO_START))
            .expect("the multiboot information");
        let upper = u32::from_le_bytes(info[8..12].try_into().expect("4 bytes"));
        assert_eq!(
            u64::from(upper) << 10,
            low_end - layout::HIMEM_START,
            "mem_upper"
        );
    }
    match (loaded.initrd, initrd) {
        (None, None) => {}
        (Some((addr, size)), Some(_)) => {
            assert_eq!(size, initrd_bytes.len() as u64);
            assert_eq!(addr % 4096, 0, "initrd not page-aligned");
            assert!(
                addr >= kernel_end && addr + size <= low_end,
                "initrd at {addr:#x}"
            );
            assert!(
                holds(&mem, addr, &initrd_bytes),
                "the initrd was overwritten"
            );
        }
        (placed, given) => panic!("initrd {placed:?} for {:?}", given.map(|g| g.path)),
    }
    drop(kernel.file);
    true
}

/// An input for [`kernel_loader`].
pub fn kernel_input(flags: u8, cmdline: &str, initrd: &[u8], kernel: &[u8]) -> Vec<u8> {
    let mut v = vec![flags, cmdline.len() as u8];
    v.extend_from_slice(cmdline.as_bytes());
    v.extend_from_slice(&(initrd.len() as u16).to_le_bytes());
    v.extend_from_slice(initrd);
    v.extend_from_slice(kernel);
    v
}
