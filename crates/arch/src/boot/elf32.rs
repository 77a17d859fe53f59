//! The 32-bit kernels QEMU's `-kernel` takes and linux-loader does not: an i386 ELF
//! entered at its PVH note (hvm_start_info in EBX), or a multiboot (version 1)
//! kernel, an ELF or a binary whose header gives its load addresses, entered with the
//! multiboot magic in EAX and the multiboot information in EBX. Test kernels and
//! small operating systems are built this way. The parsers here take the file's bytes
//! and check every offset, size and address in them before anything is loaded.

/// One piece of the file to load: `filesz` bytes from `offset` at `paddr`, zeros to
/// `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// What an i386 ELF file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Elf32 {
    pub entry: u32,
    pub loads: Vec<Load>,
    /// XEN_ELFNOTE_PHYS32_ENTRY, if a note gives one.
    pub pvh_entry: Option<u32>,
}

const EHDR: usize = 52;
const PHDR: usize = 32;
const MAX_PHDRS: usize = 64;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Whether `head` starts an i386 ELF file (class 32, little-endian, EM_386).
pub fn is_elf32(head: &[u8]) -> bool {
    head.len() >= 20
        && head.starts_with(b"\x7fELF")
        && head[4] == 1
        && head[5] == 1
        && u16_at(head, 18) == Some(3)
}

/// Reads an i386 ELF executable's entry, loadable segments and PVH note.
pub fn parse_elf32(file: &[u8]) -> Result<Elf32, String> {
    if !is_elf32(file) || file.len() < EHDR {
        return Err("not an i386 ELF file".into());
    }
    let short = || "the ELF header is cut short".to_string();
    let entry = u32_at(file, 24).ok_or_else(short)?;
    let phoff = u32_at(file, 28).ok_or_else(short)? as usize;
    let phentsize = usize::from(u16_at(file, 42).ok_or_else(short)?);
    let phnum = usize::from(u16_at(file, 44).ok_or_else(short)?);
    if phentsize != PHDR || phnum == 0 || phnum > MAX_PHDRS {
        return Err(format!(
            "{phnum} program headers of {phentsize} bytes (want 1 to {MAX_PHDRS} of {PHDR})"
        ));
    }
    let table = file
        .get(phoff..phoff + phnum * PHDR)
        .ok_or("the program headers lie past the end of the file")?;
    let mut loads = Vec::new();
    let mut pvh_entry = None;
    for ph in table.chunks_exact(PHDR) {
        let field = |i: usize| u32_at(ph, 4 * i).expect("a whole header");
        let (kind, offset, paddr, filesz, memsz) =
            (field(0), field(1), field(3), field(4), field(5));
        let in_file = (offset as usize)
            .checked_add(filesz as usize)
            .is_some_and(|end| end <= file.len());
        match kind {
            PT_LOAD if memsz > 0 => {
                if !in_file {
                    return Err(format!(
                        "the segment at {paddr:#x} lies past the end of the file"
                    ));
                }
                if memsz < filesz {
                    return Err(format!(
                        "the segment at {paddr:#x} has {filesz:#x} bytes in the file but {memsz:#x} in memory"
                    ));
                }
                loads.push(Load {
                    offset: offset.into(),
                    paddr: paddr.into(),
                    filesz: filesz.into(),
                    memsz: memsz.into(),
                });
            }
            PT_NOTE if in_file => {
                let notes = &file[offset as usize..offset as usize + filesz as usize];
                pvh_entry = pvh_entry.or_else(|| pvh_note(notes));
            }
            _ => {}
        }
    }
    if loads.is_empty() {
        return Err("no loadable segment".into());
    }
    Ok(Elf32 {
        entry,
        loads,
        pvh_entry,
    })
}

/// The PVH entry in a PT_NOTE segment's notes (name "Xen", type 18, a 32- or 64-bit
/// address; only its low half is used, as the entry is in 32-bit mode).
fn pvh_note(mut notes: &[u8]) -> Option<u32> {
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (u32_at(notes, 0)?, u32_at(notes, 4)?, u32_at(notes, 8)?);
        let name_end = 12usize.checked_add((namesz as usize).next_multiple_of(4))?;
        let desc_end = name_end.checked_add((descsz as usize).next_multiple_of(4))?;
        let name = notes.get(12..12 + namesz as usize)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
            return u32_at(notes, name_end);
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// The multiboot (version 1) header: where it is, what it asks, and the load
/// addresses of a kernel that gives them (flag 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    pub offset: usize,
    pub flags: u32,
    pub addresses: Option<MultibootAddresses>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootAddresses {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

pub const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// In EAX at the entry.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies in the first 8 KiB, 4-byte aligned.
pub const MULTIBOOT_SEARCH: usize = 8192;
/// Flags a loader must honour or refuse the kernel: 0 (modules page-aligned) and 1
/// (memory information) are given; 2 (a video mode) is not, and is refused.
const MB_PAGE_ALIGN: u32 = 1;
const MB_MEMORY_INFO: u32 = 1 << 1;
const MB_ADDRESSES: u32 = 1 << 16;

/// The multiboot header in the first 8 KiB of `head`, if there is one (its magic, with
/// flags and checksum summing to zero); an error if it asks what vessel cannot give.
pub fn find_multiboot(head: &[u8]) -> Option<Result<MultibootHeader, String>> {
    let head = &head[..head.len().min(MULTIBOOT_SEARCH)];
    let offset = (0..head.len().saturating_sub(11)).step_by(4).find(|&at| {
        let word = |i: usize| u32_at(head, at + 4 * i).unwrap_or(0);
        word(0) == MULTIBOOT_MAGIC && word(0).wrapping_add(word(1)).wrapping_add(word(2)) == 0
    })?;
    let flags = u32_at(head, offset + 4)?;
    let required = flags & 0xffff;
    if required & !(MB_PAGE_ALIGN | MB_MEMORY_INFO) != 0 {
        return Some(Err(format!(
            "the multiboot header asks for what vessel does not give (flags {required:#x}: a video mode?)"
        )));
    }
    if flags & MB_ADDRESSES == 0 {
        return Some(Ok(MultibootHeader {
            offset,
            flags,
            addresses: None,
        }));
    }
    let word = |i: usize| u32_at(head, offset + 12 + 4 * i);
    let addresses = (|| {
        Some(MultibootAddresses {
            header_addr: word(0)?,
            load_addr: word(1)?,
            load_end_addr: word(2)?,
            bss_end_addr: word(3)?,
            entry_addr: word(4)?,
        })
    })();
    Some(
        addresses
            .map(|a| MultibootHeader {
                offset,
                flags,
                addresses: Some(a),
            })
            .ok_or_else(|| "the multiboot header's addresses are cut short".into()),
    )
}

/// What a multiboot header's addresses load from a file of `file_len` bytes.
pub fn multiboot_load(
    h: &MultibootHeader,
    a: &MultibootAddresses,
    file_len: usize,
) -> Result<Load, String> {
    let bad = |why: &str| Err(format!("multiboot load addresses: {why}"));
    let Some(into) = a.header_addr.checked_sub(a.load_addr) else {
        return bad("the header lies below the load address");
    };
    let Some(offset) = (h.offset as u64).checked_sub(u64::from(into)) else {
        return bad("the load address lies before the file's start");
    };
    let Some(rest) = (file_len as u64).checked_sub(offset) else {
        return bad("the load address lies past the end of the file");
    };
    let end = match a.load_end_addr {
        0 => u64::from(a.load_addr) + rest,
        e => u64::from(e),
    };
    let Some(filesz) = end.checked_sub(u64::from(a.load_addr)) else {
        return bad("the load end lies below the load address");
    };
    if offset + filesz > file_len as u64 {
        return bad("the load end lies past the end of the file");
    }
    let memsz = match a.bss_end_addr {
        0 => filesz,
        b if u64::from(b) < end => return bad("the bss ends below the load end"),
        b => u64::from(b) - u64::from(a.load_addr),
    };
    Ok(Load {
        offset,
        paddr: a.load_addr.into(),
        filesz,
        memsz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, addresses: &[u32]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        let mut words = vec![
            MULTIBOOT_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_MAGIC).wrapping_sub(flags),
        ];
        words.extend_from_slice(addresses);
        for w in words {
            h.extend_from_slice(&w.to_le_bytes());
        }
        h.resize(4096, 0x90);
        h
    }

    #[test]
    fn a_multiboot_header_is_found_and_its_addresses_checked() {
        let file = header(
            MB_ADDRESSES | MB_MEMORY_INFO,
            &[0x10_0040, 0x10_0000, 0, 0x10_2000, 0x10_0100],
        );
        let h = find_multiboot(&file).unwrap().unwrap();
        assert_eq!(h.offset, 64);
        let a = h.addresses.unwrap();
        let load = multiboot_load(&h, &a, file.len()).unwrap();
        assert_eq!(
            load,
            Load {
                offset: 0,
                paddr: 0x10_0000,
                filesz: 4096,
                memsz: 0x2000
            }
        );
        // A video mode is refused; a wrong checksum is no header.
        assert!(find_multiboot(&header(1 << 2, &[])).unwrap().is_err());
        let mut bad = header(0, &[]);
        bad[72] ^= 1;
        assert!(find_multiboot(&bad).is_none());
        // The header address below the load address, the load end past the file.
        let h = find_multiboot(&header(MB_ADDRESSES, &[0x10_0000, 0x10_0040, 0, 0, 0]))
            .unwrap()
            .unwrap();
        assert!(multiboot_load(&h, &h.addresses.unwrap(), 4096).is_err());
        let h = find_multiboot(&header(
            MB_ADDRESSES,
            &[0x10_0040, 0x10_0000, 0x20_0000, 0, 0],
        ))
        .unwrap()
        .unwrap();
        assert!(multiboot_load(&h, &h.addresses.unwrap(), 4096).is_err());
    }

    #[test]
    fn an_elf32_with_a_pvh_note_gives_its_entry() {
        let elf = testguest_like_elf32(true);
        let e = parse_elf32(&elf).unwrap();
        assert_eq!(e.pvh_entry, Some(0x10_0000));
        assert_eq!(e.loads.len(), 1);
        assert_eq!(
            parse_elf32(&testguest_like_elf32(false)).unwrap().pvh_entry,
            None
        );
        let mut cut = elf.clone();
        cut.truncate(60);
        assert!(parse_elf32(&cut).is_err());
    }

    /// An i386 ELF: one PT_LOAD of 16 bytes at 1 MiB, and a PVH note if asked.
    fn testguest_like_elf32(note: bool) -> Vec<u8> {
        let mut e = b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        e.extend_from_slice(&2u16.to_le_bytes());
        e.extend_from_slice(&3u16.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        for v in [0x10_0000u32, EHDR as u32, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        for v in [EHDR, PHDR, 2, 40, 0, 0] {
            e.extend_from_slice(&(v as u16).to_le_bytes());
        }
        let notes_at = (EHDR + 2 * PHDR) as u32;
        let code_at = notes_at + 20;
        for v in [PT_LOAD, code_at, 0x10_0000, 0x10_0000, 16, 16, 7, 4] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        for v in [PT_NOTE, notes_at, 0, 0, 20, 20, 4, 4] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        for v in [4u32, 4, if note { 18 } else { 17 }] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        e.extend_from_slice(b"Xen\0");
        e.extend_from_slice(&0x10_0000u32.to_le_bytes());
        e.extend_from_slice(&[0xf4; 16]);
        e
    }
}
