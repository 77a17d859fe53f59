//! 32-bit test kernels as QEMU's `-kernel` takes them: an i386 ELF with a PVH note, a
//! multiboot ELF, and a multiboot binary that gives its load addresses. Each loads at
//! 1 MiB and starts in 32-bit protected mode: the ELFs at [`ENTRY32`], the binary
//! after its header, at [`MULTIBOOT_BINARY_ENTRY`].

/// Where the ELF test kernels load and start (their code is assembled for it).
pub const ENTRY32: u64 = 0x10_0000;
/// The bytes before the code in a multiboot binary: its header, padded.
pub const MULTIBOOT_HEADER_LEN: usize = 0x40;
/// Where a multiboot binary's code starts (it loads, header first, at 1 MiB).
pub const MULTIBOOT_BINARY_ENTRY: u64 = ENTRY32 + MULTIBOOT_HEADER_LEN as u64;

const EHDR: usize = 52;
const PHDR: usize = 32;

/// The multiboot header: page-aligned modules and memory information asked for, and
/// (for a binary) the load addresses of `code_len` bytes of code after the header,
/// with a page of bss.
fn multiboot_header(addresses: bool, code_len: usize) -> Vec<u8> {
    const MAGIC: u32 = 0x1bad_b002;
    let flags: u32 = 3 | if addresses { 1 << 16 } else { 0 };
    let mut words = vec![MAGIC, flags, 0u32.wrapping_sub(MAGIC).wrapping_sub(flags)];
    if addresses {
        let load = ENTRY32 as u32;
        let end = MULTIBOOT_BINARY_ENTRY as u32 + code_len as u32;
        words.extend([load, load, end, end + 0x1000, MULTIBOOT_BINARY_ENTRY as u32]);
    }
    let mut h: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    h.resize(MULTIBOOT_HEADER_LEN, 0);
    h
}

/// An i386 ELF loading `code32` at [`ENTRY32`], entered there; a PVH note if `pvh`,
/// and `extra` bytes (a multiboot header) before the code in the file.
fn elf32(code32: &[u8], pvh: bool, extra: &[u8]) -> Vec<u8> {
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(ENTRY32 as u32).to_le_bytes());
    let phnum = if pvh { 2 } else { 1 };
    let note_at = EHDR + phnum * PHDR;
    let extra_at = note_at + if pvh { note.len() } else { 0 };
    let code_at = (extra_at + extra.len()).next_multiple_of(16);
    let mut e = b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&3u16.to_le_bytes()); // EM_386
    // A PVH kernel's ELF entry is not where it starts (its note says where).
    let e_entry = if pvh {
        ENTRY32 as u32 + 0x800
    } else {
        ENTRY32 as u32
    };
    for v in [1u32, e_entry, EHDR as u32, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    for v in [EHDR, PHDR, phnum, 40, 0, 0] {
        e.extend_from_slice(&(v as u16).to_le_bytes());
    }
    let len = code32.len() as u32;
    let ph = |e: &mut Vec<u8>, v: [u32; 8]| v.iter().for_each(|w| e.extend(w.to_le_bytes()));
    let addr = ENTRY32 as u32;
    ph(
        &mut e,
        [1, code_at as u32, addr, addr, len, len + 0x1000, 7, 16],
    );
    if pvh {
        let n = note.len() as u32;
        ph(&mut e, [4, note_at as u32, 0, 0, n, n, 4, 4]);
        e.extend_from_slice(&note);
    }
    e.extend_from_slice(extra);
    e.resize(code_at, 0);
    e.extend_from_slice(code32);
    e
}

/// An i386 ELF with a PVH note.
pub fn pvh_elf32(code32: &[u8]) -> Vec<u8> {
    elf32(code32, true, &[])
}

/// An i386 ELF with a multiboot header (no PVH note): a multiboot kernel.
pub fn multiboot_elf(code32: &[u8]) -> Vec<u8> {
    elf32(code32, false, &multiboot_header(false, 0))
}

/// A flat binary: the multiboot header with load addresses, then `code32` (assembled
/// for [`MULTIBOOT_BINARY_ENTRY`]).
pub fn multiboot_binary(code32: &[u8]) -> Vec<u8> {
    let mut b = multiboot_header(true, code32.len());
    b.extend_from_slice(code32);
    b
}
