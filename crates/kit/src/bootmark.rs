//! `vessel-boot-mark`: a tiny static program that tells the VMM, through I/O port 0x440,
//! that user space has started. Assembled here, so the kit needs no compiler.

use iced_x86::code_asm::*;

use crate::KitError;

/// The I/O port whose writes the VMM logs with the time since its start.
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// Where the boot-mark program lives in the guest.
pub const BOOT_MARK_PATH: &str = "/bin/vessel-boot-mark";

/// Load address of the boot-mark program; any canonical user address would do.
const BOOT_MARK_BASE: u64 = 0x40_0000;
const ELF_HEADER_SIZE: u64 = 64;
const PROGRAM_HEADER_SIZE: u64 = 56;

/// The machine code: `iopl(3)`, `out 0x440, byte`, `exit(0)`; `exit(1)` if iopl fails.
/// The byte is 1, or the first character of argv[1] when given.
fn boot_mark_code(entry: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut have_byte = a.create_label();
    let mut fail = a.create_label();
    a.mov(ebx, 1)?;
    a.mov(rcx, qword_ptr(rsp))?; // argc
    a.cmp(rcx, 2)?;
    a.jb(have_byte)?;
    a.mov(rsi, qword_ptr(rsp + 16))?; // argv[1]
    a.movzx(ebx, byte_ptr(rsi))?;
    a.set_label(&mut have_byte)?;
    a.mov(eax, 172)?; // iopl
    a.mov(edi, 3)?;
    a.syscall()?;
    a.test(eax, eax)?;
    a.jnz(fail)?;
    a.mov(eax, ebx)?;
    a.mov(edx, i32::from(BOOT_TIMER_PORT))?;
    a.out(dx, al)?;
    a.mov(eax, 60)?; // exit
    a.xor(edi, edi)?;
    a.syscall()?;
    a.set_label(&mut fail)?;
    a.mov(eax, 60)?;
    a.mov(edi, 1)?;
    a.syscall()?;
    a.assemble(entry)
}

/// A complete static x86-64 ELF executable: header, one PT_LOAD segment, the code.
pub(crate) fn boot_mark_elf() -> Result<Vec<u8>, KitError> {
    let code_offset = ELF_HEADER_SIZE + PROGRAM_HEADER_SIZE;
    let entry = BOOT_MARK_BASE + code_offset;
    let code = boot_mark_code(entry).map_err(|e| KitError::Assemble(e.to_string()))?;
    let size = code_offset + code.len() as u64;

    let mut elf = Vec::with_capacity(size as usize);
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, SysV
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&ELF_HEADER_SIZE.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [ELF_HEADER_SIZE, PROGRAM_HEADER_SIZE, 1, 64, 0, 0] {
        elf.extend_from_slice(&(half as u16).to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    for word in [0, BOOT_MARK_BASE, BOOT_MARK_BASE, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes()); // offset vaddr paddr filesz memsz align
    }
    elf.extend_from_slice(&code);
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::{Elf, PT_LOAD, u16_at, u32_at, u64_at};
    use iced_x86::{Code, Decoder, DecoderOptions};

    #[test]
    fn boot_mark_is_a_well_formed_static_executable() {
        let elf = boot_mark_elf().unwrap();
        let parsed = Elf::parse(&elf).unwrap();
        assert_eq!(u16_at(&elf, 0x10), Some(2), "ET_EXEC");
        assert_eq!(u16_at(&elf, 0x12), Some(0x3e), "x86-64");
        assert_eq!(u32_at(&elf, 0x14), Some(1));
        assert_eq!(u16_at(&elf, 0x34), Some(64));
        let phs = parsed.program_headers().unwrap();
        assert_eq!(phs.len(), 1);
        assert_eq!(
            (phs[0].p_type, phs[0].offset, phs[0].filesz),
            (PT_LOAD, 0, elf.len() as u64)
        );
        assert_eq!(u32_at(&elf, 64 + 4), Some(5), "readable and executable");
        assert_eq!(u64_at(&elf, 64 + 16), Some(BOOT_MARK_BASE));
        assert_eq!(u64_at(&elf, 64 + 40), Some(elf.len() as u64), "memsz");
        assert_eq!(parsed.file_extent().unwrap(), elf.len() as u64);
        let entry = u64_at(&elf, 0x18).unwrap();
        assert_eq!(entry, BOOT_MARK_BASE + 120);
        assert!(parsed.sections().unwrap().is_empty());
    }

    #[test]
    fn boot_mark_code_does_iopl_out_and_exit() {
        let elf = boot_mark_elf().unwrap();
        let entry = u64_at(&elf, 0x18).unwrap();
        let code = &elf[(entry - BOOT_MARK_BASE) as usize..];
        let decoded: Vec<_> = Decoder::with_ip(64, code, entry, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert!(decoded.iter().all(|i| !i.is_invalid()));
        assert_eq!(
            decoded.last().unwrap().next_ip(),
            BOOT_MARK_BASE + elf.len() as u64
        );
        let codes: Vec<Code> = decoded.iter().map(|i| i.code()).collect();
        assert_eq!(codes.iter().filter(|c| **c == Code::Syscall).count(), 3);
        let out = codes
            .iter()
            .position(|c| *c == Code::Out_DX_AL)
            .expect("out dx, al");
        let iopl = decoded
            .iter()
            .position(|i| i.code() == Code::Mov_r32_imm32 && i.immediate32() == 172)
            .expect("mov eax, 172");
        assert!(iopl < out, "iopl before the port write");
        assert!(
            decoded
                .iter()
                .any(|i| i.code() == Code::Mov_r32_imm32 && i.immediate32() == 0x440)
        );
    }
}
