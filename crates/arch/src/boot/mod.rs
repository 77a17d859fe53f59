//! Loading a kernel straight into guest memory, detected by content: a bzImage (x86
//! boot protocol, 64-bit entry), an ELF vmlinux with a PVH entry note, or a 32-bit
//! kernel: an i386 ELF with a PVH note or a multiboot (v1) kernel, as QEMU loads them.

mod bzimage;
pub mod elf32;
mod kernel32;
pub mod paging;
mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::entry::EntryState;
use crate::layout;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0}: not a kernel (neither a bzImage, an x86 ELF, nor a file with a multiboot header)"
    )]
    NotAKernel(PathBuf),
    #[error(
        "{0}: ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) nor multiboot header; use its bzImage"
    )]
    NoPvhEntry(PathBuf),
    #[error("{0}: not an x86 ELF kernel (x86-64 or i386, little-endian)")]
    NotX86Elf(PathBuf),
    #[error("{path}: a 32-bit kernel of {mib} MiB is larger than guest memory")]
    Kernel32TooBig { path: PathBuf, mib: u64 },
    #[error("{path}: bzImage boot protocol {version:#x} has no 64-bit entry (needs 2.12 or later)")]
    NoLongModeEntry { path: PathBuf, version: u16 },
    #[error("{path}: kernel does not load into guest memory: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error(
        "kernel needs {needed_mib} MiB of memory from its load address; the guest has {have_mib} MiB"
    )]
    KernelTooBig { needed_mib: u64, have_mib: u64 },
    #[error(
        "initrd of {size_mib} MiB does not fit in guest memory (room for {room_mib} MiB below {limit:#x}); give the guest more --memory"
    )]
    InitrdTooBig {
        size_mib: u64,
        room_mib: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("guest memory too small for the boot structures")]
    NoRoomForBootStructures,
}

/// How a kernel wants to be entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// bzImage, entered at its 64-bit entry in long mode with boot_params in RSI.
    BzImage,
    /// ELF vmlinux, entered at its PVH entry in 32-bit protected mode with start_info in EBX.
    PvhElf,
    /// An i386 ELF with a PVH note, entered as `PvhElf` is.
    PvhElf32,
    /// A multiboot (v1) kernel: 32-bit protected mode, the magic in EAX, the multiboot
    /// information in EBX.
    Multiboot,
}

/// What a kernel needs from vessel to start.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub ram_size: u64,
    /// Physical address of the ACPI RSDP, passed along so the kernel need not scan.
    pub rsdp: Option<u64>,
}

/// Where everything landed, for logs and tests.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: EntryState,
    pub initrd: Option<(u64, u64)>,
}

/// What the start of a kernel file says it is.
enum Kind {
    BzImage,
    Elf64,
    /// An i386 ELF or a file with a multiboot header: read whole, parsed then.
    Kernel32,
}

/// Reads enough of `path` to tell which kind of kernel it is.
fn detect(path: &Path) -> Result<Kind, BootError> {
    let mut file = open_kernel(path)?;
    let mut head = vec![0u8; elf32::MULTIBOOT_SEARCH];
    let n = read_up_to(&mut file, &mut head).map_err(|source| BootError::ReadKernel {
        path: path.into(),
        source,
    })?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        // e_ident[EI_CLASS] = 2 (64-bit), e_machine = 62 (x86-64).
        if head.len() >= 20 && head[4] == 2 && u16::from_le_bytes([head[18], head[19]]) == 62 {
            return Ok(Kind::Elf64);
        }
        if elf32::is_elf32(head) {
            return Ok(Kind::Kernel32);
        }
        return Err(BootError::NotX86Elf(path.into()));
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(Kind::BzImage);
    }
    if elf32::find_multiboot(head).is_some() {
        return Ok(Kind::Kernel32);
    }
    Err(BootError::NotAKernel(path.into()))
}

/// Loads kernel, command line and initrd into `mem` and returns the entry state.
pub fn load<M: GuestMemoryBackend>(mem: &M, spec: &BootSpec) -> Result<LoadedKernel, BootError> {
    let kind = detect(spec.kernel)?;
    write_cmdline(mem, spec.cmdline)?;
    let initrd = match spec.initrd {
        Some(path) => Some(read_initrd(path)?),
        None => None,
    };
    match kind {
        Kind::BzImage => bzimage::load(mem, spec, initrd.as_deref()),
        Kind::Elf64 => pvh::load(mem, spec, initrd.as_deref()),
        Kind::Kernel32 => {
            let file = read_kernel32(spec)?;
            kernel32::load(mem, spec, initrd.as_deref(), &file)
        }
    }
}

/// A 32-bit kernel's whole file (no larger than guest memory).
fn read_kernel32(spec: &BootSpec) -> Result<Vec<u8>, BootError> {
    let err = |source| BootError::ReadKernel {
        path: spec.kernel.into(),
        source,
    };
    let file = open_kernel(spec.kernel)?;
    let size = file.metadata().map_err(err)?.len();
    if size > spec.ram_size {
        return Err(BootError::Kernel32TooBig {
            path: spec.kernel.into(),
            mib: size.div_ceil(1 << 20),
        });
    }
    // (Read no further than guest memory, whatever the file grows to meanwhile.)
    let mut data = Vec::with_capacity(size as usize);
    file.take(spec.ram_size + 1)
        .read_to_end(&mut data)
        .map_err(err)?;
    if data.len() as u64 > spec.ram_size {
        return Err(BootError::Kernel32TooBig {
            path: spec.kernel.into(),
            mib: spec.ram_size.div_ceil(1 << 20),
        });
    }
    Ok(data)
}

fn open_kernel(path: &Path) -> Result<File, BootError> {
    let file = File::open(path).map_err(|source| BootError::ReadKernel {
        path: path.into(),
        source,
    })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(BootError::ReadKernel {
            path: path.into(),
            source: std::io::Error::from(std::io::ErrorKind::IsADirectory),
        });
    }
    Ok(file)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_initrd(path: &Path) -> Result<Vec<u8>, BootError> {
    let err = |source| BootError::ReadInitrd {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    if file.metadata().map_err(err)?.is_dir() {
        return Err(err(std::io::Error::from(std::io::ErrorKind::IsADirectory)));
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(err)?;
    Ok(data)
}

fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|_| BootError::NoRoomForBootStructures)
}

/// Places the initrd as high as possible below `limit` and above `floor`, page-aligned
/// (what bootloaders do, so the kernel's own decompression never runs into it).
fn place_initrd<M: GuestMemoryBackend>(
    mem: &M,
    data: &[u8],
    floor: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = data.len() as u64;
    let too_big = || BootError::InitrdTooBig {
        size_mib: size.div_ceil(1 << 20),
        room_mib: limit.saturating_sub(floor) >> 20,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < floor {
        return Err(too_big());
    }
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| too_big())?;
    Ok((addr, size))
}

/// The top of low RAM, where initrds go.
fn low_ram_end(ram_size: u64) -> u64 {
    layout::ram_ranges(ram_size)[0].end()
}
