//! Boot protocol layout: what a kernel finds in memory, checked at the byte offsets the
//! Linux boot protocol and the PVH ABI document (not through our own structs).

use arch::boot::{self, BootError, BootSpec, KernelFormat};
use arch::{e820, layout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

fn memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn u32_at(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}
fn u64_at(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn spec<'a>(kernel: &'a std::path::Path, initrd: Option<&'a std::path::Path>) -> BootSpec<'a> {
    BootSpec {
        kernel,
        initrd,
        cmdline: "console=ttyS0 hello",
        ram_size: 64 * MIB,
        rsdp: Some(layout::ACPI_START),
    }
}

#[test]
fn bzimage_zero_page_follows_the_boot_protocol() {
    let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp $-1
    let (_k, kernel) = testguest::temp_path(&testguest::bzimage(&code));
    let initrd_bytes = vec![0x5a; 3 * MIB as usize + 17];
    let (_i, initrd) = testguest::temp_path(&initrd_bytes);
    let mem = memory(64 * MIB);
    let loaded = boot::load(&mem, &spec(&kernel, Some(&initrd))).unwrap();
    assert_eq!(loaded.format, KernelFormat::BzImage);

    let zp = layout::ZERO_PAGE_START;
    assert_eq!(&u32_at(&mem, zp + 0x202).to_le_bytes(), b"HdrS");
    let mut loader = [0u8; 1];
    mem.read_slice(&mut loader, GuestAddress(zp + 0x210))
        .unwrap();
    assert_eq!(loader[0], 0xff, "type_of_loader");
    assert_eq!(u32_at(&mem, zp + 0x228) as u64, layout::CMDLINE_START);
    assert_eq!(u32_at(&mem, zp + 0x238), "console=ttyS0 hello".len() as u32);
    let (rd_addr, rd_size) = (u32_at(&mem, zp + 0x218) as u64, u32_at(&mem, zp + 0x21c));
    assert_eq!(rd_size as usize, initrd_bytes.len());
    assert_eq!(rd_addr % 4096, 0);
    assert!(rd_addr + rd_size as u64 <= 64 * MIB);
    let mut back = vec![0u8; initrd_bytes.len()];
    mem.read_slice(&mut back, GuestAddress(rd_addr)).unwrap();
    assert_eq!(back, initrd_bytes);
    assert_eq!(
        u64_at(&mem, zp + 0x070),
        layout::ACPI_START,
        "acpi_rsdp_addr"
    );

    let map = e820::memory_map(64 * MIB);
    let mut count = [0u8; 1];
    mem.read_slice(&mut count, GuestAddress(zp + 0x1e8))
        .unwrap();
    assert_eq!(count[0] as usize, map.len());
    for (i, e) in map.iter().enumerate() {
        let at = zp + 0x2d0 + 20 * i as u64;
        assert_eq!(u64_at(&mem, at), e.addr);
        assert_eq!(u64_at(&mem, at + 8), e.size);
        assert_eq!(u32_at(&mem, at + 16), e.kind as u32);
    }

    let mut cmdline = vec![0u8; 20];
    mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 hello\0");
    let mut entry = [0u8; 3];
    mem.read_slice(&mut entry, GuestAddress(testguest::BZIMAGE_ENTRY64))
        .unwrap();
    assert_eq!(entry, code);
    let s = &loaded.entry;
    assert_eq!(s.rip, testguest::BZIMAGE_ENTRY64);
    assert_eq!(s.rsi, zp);
    assert!(s.cs.l && s.efer & 0x500 == 0x500 && s.cr0 & (1 << 31) != 0);
}

#[test]
fn pvh_start_info_follows_the_abi() {
    let code = [0xf4u8];
    let (_k, kernel) = testguest::temp_path(&testguest::pvh_elf(&code));
    let (_i, initrd) = testguest::temp_path(&[1, 2, 3, 4, 5]);
    let mem = memory(64 * MIB);
    let loaded = boot::load(&mem, &spec(&kernel, Some(&initrd))).unwrap();
    assert_eq!(loaded.format, KernelFormat::PvhElf);

    let si = layout::PVH_INFO_START;
    assert_eq!(u32_at(&mem, si), 0x336e_c578, "magic");
    assert_eq!(u32_at(&mem, si + 4), 1, "version");
    assert_eq!(u32_at(&mem, si + 12), 1, "nr_modules");
    let modlist = u64_at(&mem, si + 16);
    assert_eq!(u64_at(&mem, si + 24), layout::CMDLINE_START);
    assert_eq!(u64_at(&mem, si + 32), layout::ACPI_START, "rsdp_paddr");
    let memmap = u64_at(&mem, si + 40);
    let entries = u32_at(&mem, si + 48);
    let map = e820::memory_map(64 * MIB);
    assert_eq!(entries as usize, map.len());
    for (i, e) in map.iter().enumerate() {
        let at = memmap + 24 * i as u64;
        assert_eq!((u64_at(&mem, at), u64_at(&mem, at + 8)), (e.addr, e.size));
        assert_eq!(u32_at(&mem, at + 16), e.kind as u32);
    }
    let (rd_addr, rd_size) = (u64_at(&mem, modlist), u64_at(&mem, modlist + 8));
    assert_eq!(rd_size, 5);
    let mut back = [0u8; 5];
    mem.read_slice(&mut back, GuestAddress(rd_addr)).unwrap();
    assert_eq!(back, [1, 2, 3, 4, 5]);

    let s = &loaded.entry;
    assert_eq!(s.rip, testguest::PVH_ENTRY);
    assert_eq!(s.rbx, si);
    assert_eq!(s.cr0 & 1, 1);
    assert_eq!(s.cr0 & (1 << 31), 0, "paging off");
    assert!(s.cs.db && !s.cs.l);
    assert_eq!(s.tr.kind, 0xb, "busy 32-bit TSS");
}

/// The multiboot information at the offsets the multiboot 0.6.96 specification gives:
/// flags, memory sizes, command line, the module, the memory map, the loader's name.
#[test]
fn multiboot_information_follows_the_specification() {
    use testguest::kernel32;
    let code = [0xf4u8; 32];
    let (_i, initrd) = testguest::temp_path(&[9, 8, 7]);
    for (kernel, entry) in [
        (kernel32::multiboot_elf(&code), kernel32::ENTRY32),
        (
            kernel32::multiboot_binary(&code),
            kernel32::MULTIBOOT_BINARY_ENTRY,
        ),
    ] {
        let (_k, path) = testguest::temp_path(&kernel);
        let mem = memory(64 * MIB);
        let loaded = boot::load(&mem, &spec(&path, Some(&initrd))).unwrap();
        assert_eq!(loaded.format, KernelFormat::Multiboot);
        let s = &loaded.entry;
        assert_eq!((s.rip, s.rax), (entry, 0x2bad_b002));
        assert!(s.cs.db && !s.cs.l && s.cr0 & (1 << 31) == 0);
        let mut code_back = [0u8; 32];
        mem.read_slice(&mut code_back, GuestAddress(entry)).unwrap();
        assert_eq!(code_back, code, "the code where it runs");
        let mbi = s.rbx;
        let flags = u32_at(&mem, mbi);
        // mem, cmdline, mods, mmap, boot_loader_name.
        assert_eq!(flags, 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9);
        assert_eq!(u32_at(&mem, mbi + 4), 639, "mem_lower (KiB)");
        assert_eq!(u32_at(&mem, mbi + 8), 63 * 1024, "mem_upper (KiB)");
        let cmdline = u32_at(&mem, mbi + 16);
        let mut line = [0u8; 20];
        mem.read_slice(&mut line, GuestAddress(cmdline.into()))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 hello\0");
        assert_eq!(u32_at(&mem, mbi + 20), 1, "mods_count");
        let module = u64::from(u32_at(&mem, mbi + 24));
        let (start, end) = (u32_at(&mem, module), u32_at(&mem, module + 4));
        assert_eq!(end - start, 3);
        assert_eq!(start % 4096, 0, "page-aligned, as the header asks");
        let mut back = [0u8; 3];
        mem.read_slice(&mut back, GuestAddress(start.into()))
            .unwrap();
        assert_eq!(back, [9, 8, 7]);
        let mut string = initrd.to_string_lossy().into_owned().into_bytes();
        string.push(0);
        let mut string_back = vec![0u8; string.len()];
        let at = u32_at(&mem, module + 8);
        mem.read_slice(&mut string_back, GuestAddress(at.into()))
            .unwrap();
        assert_eq!(string_back, string, "the module's string: its path");
        let (mmap_len, mmap) = (u32_at(&mem, mbi + 44), u32_at(&mem, mbi + 48));
        let map = e820::memory_map(64 * MIB);
        assert_eq!(mmap_len as usize, 24 * map.len());
        for (i, e) in map.iter().enumerate() {
            let at = u64::from(mmap) + 24 * i as u64;
            assert_eq!(u32_at(&mem, at), 20, "the entry's size field");
            assert_eq!(
                (u64_at(&mem, at + 4), u64_at(&mem, at + 12)),
                (e.addr, e.size)
            );
            assert_eq!(u32_at(&mem, at + 20), e.kind as u32);
        }
        let name = u32_at(&mem, mbi + 64);
        let mut loader = [0u8; 7];
        mem.read_slice(&mut loader, GuestAddress(name.into()))
            .unwrap();
        assert_eq!(&loader, b"vessel\0");
    }
}

/// An i386 ELF is entered at its PVH note's address, not at its ELF entry.
#[test]
fn an_i386_elf_starts_at_its_pvh_note() {
    let (_k, path) = testguest::temp_path(&testguest::kernel32::pvh_elf32(&[0xf4]));
    let mem = memory(64 * MIB);
    let loaded = boot::load(&mem, &spec(&path, None)).unwrap();
    assert_eq!(loaded.format, KernelFormat::PvhElf32);
    assert_eq!(loaded.entry.rip, testguest::kernel32::ENTRY32);
    assert_eq!(loaded.entry.rbx, layout::PVH_INFO_START);
    assert_eq!(u32_at(&mem, layout::PVH_INFO_START), 0x336e_c578);
}

#[test]
fn detection_rejects_what_is_not_a_kernel() {
    let mem = memory(64 * MIB);
    let load = |bytes: &[u8]| {
        let (_t, p) = testguest::temp_path(bytes);
        boot::load(&mem, &spec(&p, None)).map(|_| ())
    };
    assert!(matches!(load(b""), Err(BootError::NotAKernel(_))));
    assert!(matches!(load(&[0x90; 4096]), Err(BootError::NotAKernel(_))));
    let mut elf32 = testguest::pvh_elf(&[0xf4]);
    elf32[4] = 1;
    assert!(matches!(load(&elf32), Err(BootError::NotX86Elf(_))));
    let mut no_note = testguest::pvh_elf(&[0xf4]);
    let note_type = 64 + 2 * 56 + 8;
    no_note[note_type] = 17;
    assert!(matches!(load(&no_note), Err(BootError::NoPvhEntry(_))));
    let mut old = testguest::bzimage(&[0xf4]);
    old[0x206] = 0x0b; // protocol 2.11
    assert!(matches!(load(&old), Err(BootError::NoLongModeEntry { .. })));
    let missing = std::path::Path::new("/nonexistent/vmlinuz");
    assert!(matches!(
        boot::load(&mem, &spec(missing, None)),
        Err(BootError::ReadKernel { .. })
    ));
    let dir = std::env::temp_dir();
    assert!(matches!(
        boot::load(&mem, &spec(&dir, None)),
        Err(BootError::ReadKernel { .. })
    ));
    // Truncated images never panic.
    let full = testguest::pvh_elf(&[0xf4]);
    for cut in [16, 64, 100, 150, 180] {
        assert!(load(&full[..cut]).is_err(), "cut at {cut}");
    }
}

/// linux-loader checks only an ELF's entry point: vessel refuses a segment below
/// 1 MiB (over the command line and start_info) and one shorter in memory than in the
/// file (the initrd goes above the in-memory end, over the rest).
#[test]
fn elf_segments_that_collide_are_refused() {
    let mem = memory(64 * MIB);
    let load = |bytes: &[u8]| {
        let (_t, p) = testguest::temp_path(bytes);
        boot::load(&mem, &spec(&p, None)).map(|_| ())
    };
    let load_segment = 64; // the first program header: PT_LOAD
    let mut low = testguest::pvh_elf(&[0xf4]);
    let paddr = load_segment + 24;
    low[paddr..paddr + 8].copy_from_slice(&layout::CMDLINE_START.to_le_bytes());
    let err = load(&low).unwrap_err();
    assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
    assert!(err.to_string().contains("below 0x100000"), "{err}");
    let mut short = testguest::pvh_elf(&[0xf4, 0xf4]);
    let memsz = load_segment + 40;
    short[memsz..memsz + 8].copy_from_slice(&1u64.to_le_bytes());
    let err = load(&short).unwrap_err();
    assert!(err.to_string().contains("in memory"), "{err}");
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    let (_k, kernel) = testguest::temp_path(&testguest::bzimage(&[0xf4]));
    let (_i, initrd) = testguest::temp_path(&vec![0; 40 * MIB as usize]);
    let mem = memory(32 * MIB);
    let mut s = spec(&kernel, Some(&initrd));
    s.ram_size = 32 * MIB;
    let err = boot::load(&mem, &s).unwrap_err();
    assert!(
        matches!(err, BootError::InitrdTooBig { size_mib: 40, .. }),
        "{err}"
    );
}

#[test]
fn overlong_command_line_is_refused() {
    let (_k, kernel) = testguest::temp_path(&testguest::bzimage(&[0xf4]));
    let mem = memory(64 * MIB);
    let long = "x".repeat(3000);
    let mut s = spec(&kernel, None);
    s.cmdline = &long;
    assert!(matches!(
        boot::load(&mem, &s),
        Err(BootError::CmdlineTooLong { len: 3000, .. })
    ));
}
