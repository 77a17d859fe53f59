//! Getting the ELF vmlinux out of a bzImage, so the PVH entry (and the emu backend) can
//! boot the very kernel Debian ships without a second download.

use crate::KitError;
use crate::elf::{self, Elf};

/// The legacy LZ4 frame magic (`lz4 -l`), as the kernel build writes it.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Each legacy-frame block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Xen ELF note type announcing the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The compressed kernel inside a bzImage, located by the boot protocol's setup header.
pub fn payload(bzimage: &[u8]) -> Result<&[u8], KitError> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err(KitError::BzImage("no \"HdrS\" setup header magic at 0x202"));
    }
    let setup_sects = match bzimage.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => u64::from(n),
        None => return Err(KitError::BzImage("truncated setup header")),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = elf::u32_at(bzimage, 0x248).ok_or(KitError::BzImage("truncated setup header"))?;
    let length = elf::u32_at(bzimage, 0x24c).ok_or(KitError::BzImage("truncated setup header"))?;
    if length == 0 {
        return Err(KitError::BzImage(
            "payload_length is 0 (boot protocol older than 2.08?)",
        ));
    }
    elf::slice(bzimage, pm_start + u64::from(offset), length.into())
        .ok_or(KitError::BzImage("payload lies outside the file"))
}

/// Decompresses an LZ4 legacy frame: magic, then `[u32 LE size][block]` until the data
/// ends; a lone trailing u32 (the uncompressed size the kernel build appends) is allowed.
pub fn decompress_lz4_legacy(data: &[u8]) -> Result<Vec<u8>, KitError> {
    if elf::u32_at(data, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(KitError::Lz4(
            "no legacy LZ4 frame magic (02 21 4c 18)".into(),
        ));
    }
    let mut out = Vec::new();
    let mut block_out = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut rest = &data[4..];
    while rest.len() >= 4 {
        let size = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if size == LZ4_LEGACY_MAGIC {
            rest = &rest[4..];
            continue;
        }
        let Some(block) = rest.get(4..4 + size as usize) else {
            if rest.len() == 4 && u64::from(size) == out.len() as u64 & 0xffff_ffff {
                rest = &[]; // the appended uncompressed size
                break;
            }
            return Err(KitError::Lz4(format!(
                "block of {size} bytes at offset {} runs past the end",
                data.len() - rest.len()
            )));
        };
        if size == 0 {
            return Err(KitError::Lz4("empty block".into()));
        }
        let n = lz4_flex::block::decompress_into(block, &mut block_out).map_err(|e| {
            KitError::Lz4(format!("block at offset {}: {e}", data.len() - rest.len()))
        })?;
        out.extend_from_slice(&block_out[..n]);
        rest = &rest[4 + size as usize..];
    }
    if !rest.is_empty() {
        return Err(KitError::Lz4(format!(
            "{} stray bytes at the end",
            rest.len()
        )));
    }
    if out.is_empty() {
        return Err(KitError::Lz4("frame holds no data".into()));
    }
    Ok(out)
}

/// The PVH entry point announced by the kernel's Xen `PHYS32_ENTRY` ELF note.
pub fn pvh_entry(vmlinux: &[u8]) -> Result<u32, KitError> {
    let elf = Elf::parse(vmlinux)?;
    elf.notes()?
        .into_iter()
        .find(|n| n.name == b"Xen" && n.n_type == XEN_ELFNOTE_PHYS32_ENTRY)
        .and_then(|n| elf::u32_at(n.desc, 0))
        .ok_or(KitError::Vmlinux(
            "no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)",
        ))
}

/// The ELF vmlinux inside a bzImage, trimmed to the ELF file proper and checked to carry
/// the PVH entry note.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, KitError> {
    let mut vmlinux = decompress_lz4_legacy(payload(bzimage)?)?;
    if !vmlinux.starts_with(elf::ELF_MAGIC) {
        return Err(KitError::Vmlinux("decompressed payload is not an ELF file"));
    }
    let elf = Elf::parse(&vmlinux)?;
    if !elf
        .program_headers()?
        .iter()
        .any(|p| p.p_type == elf::PT_LOAD)
    {
        return Err(KitError::Vmlinux("no loadable segment"));
    }
    let extent = elf.file_extent()?;
    pvh_entry(&vmlinux)?;
    vmlinux.truncate(extent as usize);
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy frame of `data` cut into blocks of `block` bytes, plus the appended size.
    fn frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 7) ^ (i >> 9)) as u8).collect()
    }

    #[test]
    fn legacy_frame_round_trips_over_several_blocks() {
        let data = sample(300_000);
        assert_eq!(decompress_lz4_legacy(&frame(&data, 65536)).unwrap(), data);
    }

    #[test]
    fn legacy_frame_without_trailing_size_and_with_repeated_magic() {
        let data = sample(5000);
        let mut f = frame(&data[..2000], 1000);
        f.truncate(f.len() - 4);
        f.extend_from_slice(&frame(&data[2000..], 1000));
        f.truncate(f.len() - 4);
        assert_eq!(decompress_lz4_legacy(&f).unwrap(), data);
    }

    #[test]
    fn truncated_or_garbage_frames_are_errors() {
        let f = frame(&sample(100_000), 40_000);
        for cut in [0, 3, 4, 7, 8, 50, f.len() / 2, f.len() - 5] {
            assert!(decompress_lz4_legacy(&f[..cut]).is_err(), "cut at {cut}");
        }
        // A wrong trailing size is not mistaken for the appended one.
        let mut bad = f.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(decompress_lz4_legacy(&bad).is_err());
        let mut garbage = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        garbage.extend_from_slice(&16u32.to_le_bytes());
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(decompress_lz4_legacy(&garbage).is_err());
        assert!(decompress_lz4_legacy(b"\x04\x22\x4d\x18 modern frame").is_err());
    }

    #[test]
    fn every_byte_flip_is_handled_without_panic() {
        let f = frame(&sample(4000), 1500);
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0xa5;
            let _ = decompress_lz4_legacy(&g);
        }
    }

    /// A bzImage skeleton: setup sectors, the setup header fields we read, a payload.
    fn bzimage(setup_sects: u8, payload_offset: u32, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let pm = (sects + 1) * 512;
        let mut img = vec![0u8; pm + payload_offset as usize];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0xcc; 100]);
        img
    }

    #[test]
    fn payload_is_found_relative_to_the_protected_mode_code() {
        assert_eq!(payload(&bzimage(0, 0x30, b"PAYLOAD")).unwrap(), b"PAYLOAD");
        assert_eq!(payload(&bzimage(27, 0x1234, b"xyz")).unwrap(), b"xyz");
        let mut img = bzimage(2, 0, b"abc");
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(payload(&img).is_err());
        assert!(payload(&img[..0x210]).is_err());
        assert!(payload(b"not a kernel").is_err());
    }

    #[test]
    fn a_payload_that_is_not_an_elf_kernel_is_refused() {
        let img = bzimage(
            4,
            0x100,
            &frame(b"definitely not an ELF kernel image", 1 << 20),
        );
        assert!(matches!(extract_vmlinux(&img), Err(KitError::Vmlinux(_))));
    }
}
