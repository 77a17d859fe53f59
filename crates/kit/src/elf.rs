//! A small bounds-checked ELF64 little-endian reader: just what the kit needs to look at
//! a kernel's notes and a module's `.modinfo`, without trusting any offset in the file.

use crate::KitError;

pub(crate) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const PT_NOTE: u32 = 4;
const SHT_NOBITS: u32 = 8;

/// Reads a little-endian integer of `N` bytes at `off`, or `None` past the end.
fn le<const N: usize>(data: &[u8], off: u64) -> Option<[u8; N]> {
    let start = usize::try_from(off).ok()?;
    data.get(start..start.checked_add(N)?)?.try_into().ok()
}
pub(crate) fn u16_at(data: &[u8], off: u64) -> Option<u16> {
    le(data, off).map(u16::from_le_bytes)
}
pub(crate) fn u32_at(data: &[u8], off: u64) -> Option<u32> {
    le(data, off).map(u32::from_le_bytes)
}
pub(crate) fn u64_at(data: &[u8], off: u64) -> Option<u64> {
    le(data, off).map(u64::from_le_bytes)
}

/// The `len` bytes at `off`, or `None` if any of them lies outside `data`.
pub(crate) fn slice(data: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    data.get(start..end)
}

pub(crate) struct ProgramHeader {
    pub p_type: u32,
    pub offset: u64,
    pub filesz: u64,
}

pub(crate) struct Note<'a> {
    pub name: &'a [u8],
    pub n_type: u32,
    pub desc: &'a [u8],
}

pub(crate) struct Section<'a> {
    pub name: &'a [u8],
    pub sh_type: u32,
    pub offset: u64,
    pub size: u64,
}

/// A validated view of an ELF64 little-endian file.
pub(crate) struct Elf<'a> {
    data: &'a [u8],
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, KitError> {
        if data.get(..4) != Some(ELF_MAGIC.as_slice()) {
            return Err(KitError::Elf("no ELF magic"));
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            return Err(KitError::Elf("not a 64-bit little-endian ELF file"));
        }
        if data.len() < 64 {
            return Err(KitError::Elf("truncated ELF header"));
        }
        Ok(Elf { data })
    }

    fn field16(&self, off: u64) -> u16 {
        u16_at(self.data, off).unwrap_or(0)
    }
    fn field64(&self, off: u64) -> u64 {
        u64_at(self.data, off).unwrap_or(0)
    }

    pub fn program_headers(&self) -> Result<Vec<ProgramHeader>, KitError> {
        let (phoff, entsize, num) = (self.field64(0x20), self.field16(0x36), self.field16(0x38));
        if num == 0 {
            return Ok(Vec::new());
        }
        if entsize < 56 {
            return Err(KitError::Elf("program header entries too small"));
        }
        (0..u64::from(num))
            .map(|i| {
                let base = phoff
                    .checked_add(i * u64::from(entsize))
                    .ok_or(KitError::Elf("program header offset overflows"))?;
                let ph = slice(self.data, base, 56)
                    .ok_or(KitError::Elf("program header outside the file"))?;
                Ok(ProgramHeader {
                    p_type: u32_at(ph, 0).unwrap_or(0),
                    offset: u64_at(ph, 8).unwrap_or(0),
                    filesz: u64_at(ph, 32).unwrap_or(0),
                })
            })
            .collect()
    }

    pub fn sections(&self) -> Result<Vec<Section<'a>>, KitError> {
        let (shoff, entsize, num) = (self.field64(0x28), self.field16(0x3a), self.field16(0x3c));
        let strndx = self.field16(0x3e);
        if num == 0 {
            return Ok(Vec::new());
        }
        if entsize < 64 {
            return Err(KitError::Elf("section header entries too small"));
        }
        let header = |i: u64| -> Result<&'a [u8], KitError> {
            let base = shoff
                .checked_add(i * u64::from(entsize))
                .ok_or(KitError::Elf("section header offset overflows"))?;
            slice(self.data, base, 64).ok_or(KitError::Elf("section header outside the file"))
        };
        let strtab = header(u64::from(strndx))?;
        let (str_off, str_size) = (
            u64_at(strtab, 24).unwrap_or(0),
            u64_at(strtab, 32).unwrap_or(0),
        );
        let names = slice(self.data, str_off, str_size)
            .ok_or(KitError::Elf("section name table outside the file"))?;
        (0..u64::from(num))
            .map(|i| {
                let sh = header(i)?;
                let name_off = u32_at(sh, 0).unwrap_or(0) as usize;
                let name = names
                    .get(name_off..)
                    .and_then(|n| n.split(|&b| b == 0).next())
                    .ok_or(KitError::Elf("section name outside the name table"))?;
                Ok(Section {
                    name,
                    sh_type: u32_at(sh, 4).unwrap_or(0),
                    offset: u64_at(sh, 24).unwrap_or(0),
                    size: u64_at(sh, 32).unwrap_or(0),
                })
            })
            .collect()
    }

    /// The contents of the section called `name`, if it exists and lies inside the file.
    pub fn section_data(&self, name: &str) -> Result<Option<&'a [u8]>, KitError> {
        let Some(sec) = self
            .sections()?
            .into_iter()
            .find(|s| s.name == name.as_bytes())
        else {
            return Ok(None);
        };
        slice(self.data, sec.offset, sec.size)
            .map(Some)
            .ok_or(KitError::Elf("section contents outside the file"))
    }

    /// Every note in every PT_NOTE segment (names without their NUL).
    pub fn notes(&self) -> Result<Vec<Note<'a>>, KitError> {
        let mut notes = Vec::new();
        for ph in self
            .program_headers()?
            .iter()
            .filter(|p| p.p_type == PT_NOTE)
        {
            let seg = slice(self.data, ph.offset, ph.filesz)
                .ok_or(KitError::Elf("note segment outside the file"))?;
            let mut off = 0u64;
            while off + 12 <= seg.len() as u64 {
                let namesz = u64::from(u32_at(seg, off).unwrap_or(0));
                let descsz = u64::from(u32_at(seg, off + 4).unwrap_or(0));
                let n_type = u32_at(seg, off + 8).unwrap_or(0);
                let name_off = off + 12;
                let desc_off = name_off + namesz.next_multiple_of(4);
                let name =
                    slice(seg, name_off, namesz).ok_or(KitError::Elf("note name truncated"))?;
                let desc =
                    slice(seg, desc_off, descsz).ok_or(KitError::Elf("note body truncated"))?;
                let name = name.strip_suffix(&[0]).unwrap_or(name);
                notes.push(Note { name, n_type, desc });
                off = desc_off + descsz.next_multiple_of(4);
            }
        }
        Ok(notes)
    }

    /// The length of the ELF file proper: headers, segments and sections; anything the
    /// buffer holds after that (the kernel's relocation table, for one) is not part of it.
    pub fn file_extent(&self) -> Result<u64, KitError> {
        let table_end = |off: u64, entsize: u64, num: u64| match num {
            0 => 0,
            _ => off.saturating_add(entsize * num),
        };
        let ph_end = table_end(
            self.field64(0x20),
            self.field16(0x36).into(),
            self.field16(0x38).into(),
        );
        let sh_end = table_end(
            self.field64(0x28),
            self.field16(0x3a).into(),
            self.field16(0x3c).into(),
        );
        let mut end = ph_end.max(sh_end).max(64);
        for ph in self.program_headers()? {
            end = end.max(ph.offset.saturating_add(ph.filesz));
        }
        for sec in self.sections()?.iter().filter(|s| s.sh_type != SHT_NOBITS) {
            end = end.max(sec.offset.saturating_add(sec.size));
        }
        if end > self.data.len() as u64 {
            return Err(KitError::Elf("file is shorter than its headers say"));
        }
        Ok(end)
    }
}
