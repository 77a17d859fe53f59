//! Tiny guest kernels for tests: code assembled with iced-x86, wrapped as a bzImage
//! (entered at its 64-bit entry), as an ELF with a PVH note (entered in 32-bit
//! protected mode), or as the 32-bit kernels of [`kernel32`], so tests exercise
//! vessel's real kernel detection and boot path.

use std::io::Write;
use std::path::PathBuf;

pub mod hostile;
pub mod kernel32;
pub mod qemu_img;
pub mod report;
pub mod snippets;
pub mod timing;

pub use iced_x86::code_asm;
use iced_x86::code_asm::CodeAssembler;

/// Where the protected-mode part of a bzImage loads (the boot protocol's 1 MiB).
pub const BZIMAGE_LOAD: u64 = 0x10_0000;
/// Where the 64-bit entry of a bzImage is: 0x200 into the protected-mode part.
pub const BZIMAGE_ENTRY64: u64 = BZIMAGE_LOAD + 0x200;
/// Where PVH test kernels load and start.
pub const PVH_ENTRY: u64 = 0x10_0000;

/// Assembles `build`'s instructions for `bitness` at `ip`.
pub fn assemble(bitness: u32, ip: u64, build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("valid bitness");
    build(&mut a);
    a.assemble(ip).expect("test guest assembles")
}

/// A bzImage whose 64-bit entry runs `code64` (assembled for `BZIMAGE_ENTRY64`).
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    const SETUP_SECTS: u8 = 1;
    let setup_len = (SETUP_SECTS as usize + 1) * 512;
    let mut img = vec![0u8; setup_len];
    let put = |img: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        img[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut img, 0x1f1, &[SETUP_SECTS]);
    put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &0x020fu16.to_le_bytes()); // boot protocol 2.15
    put(&mut img, 0x211, &[0x01]); // LOADED_HIGH
    put(&mut img, 0x214, &(BZIMAGE_LOAD as u32).to_le_bytes());
    put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut img, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut img, 0x236, &0x0001u16.to_le_bytes()); // XLF_KERNEL_64
    put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    let mut kernel = vec![0u8; 0x200];
    kernel.extend_from_slice(code64);
    put(
        &mut img,
        0x260,
        &(kernel.len() as u32 + 0x1000).to_le_bytes(),
    ); // init_size
    img.extend_from_slice(&kernel);
    img
}

/// An ELF64 executable loading `code32` at `PVH_ENTRY` with a Xen PVH entry note.
pub fn pvh_elf(code32: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(PVH_ENTRY as u32).to_le_bytes());
    let code_off = (note_off + note.len()).next_multiple_of(16);

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&PVH_ENTRY.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR, PHDR, 2, 64, 0, 0] {
        elf.extend_from_slice(&(half as u16).to_le_bytes());
    }
    let phdr = |elf: &mut Vec<u8>, kind: u32, off: usize, addr: u64, len: usize| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
        for v in [off as u64, addr, addr, len as u64, len as u64, 4] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut elf, 1, code_off, PVH_ENTRY, code32.len()); // PT_LOAD
    phdr(&mut elf, 4, note_off, 0, note.len()); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.resize(code_off, 0);
    elf.extend_from_slice(code32);
    elf
}

/// Writes `bytes` to a temporary file that lives as long as the returned handle.
pub fn temp_file(bytes: &[u8]) -> tempfile::TempPath {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write temp file");
    f.into_temp_path()
}

/// A 64-bit guest assembled into a bzImage in a temp file; the path as a string, for
/// command lines.
pub fn bzimage_file(build: impl FnOnce(&mut CodeAssembler)) -> (tempfile::TempPath, String) {
    let code = assemble(64, BZIMAGE_ENTRY64, build);
    let (t, p) = temp_path(&bzimage(&code));
    (t, p.display().to_string())
}

/// Path of a temp file for the duration of a test.
pub fn temp_path(bytes: &[u8]) -> (tempfile::TempPath, PathBuf) {
    let t = temp_file(bytes);
    let p = t.to_path_buf();
    (t, p)
}
