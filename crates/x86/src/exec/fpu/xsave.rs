//! xsave/xsaveopt/xsavec/xsaves and xrstor/xrstors: standard and compacted images, with
//! the layout from the guest's CPUID leaf 0xD.

use super::{
    FX_SIZE, HEADER, HELD, XSAVE_MAX, area, get, gp, init_x87, mxcsr_mask, put, read_area,
    read_x87, u32_at, u64_at, write_area, write_x87, xmm_count, xsave_ok,
};
use crate::decode::Insn;
use crate::machine::{Machine, R};
use crate::state::FpuState;

/// Offset, size and 64-byte-alignment flag of component `c` (CPUID 0xD).
fn component(m: &mut Machine, c: u32) -> (usize, usize, bool) {
    let r = m.platform(|p| p.cpuid(0xd, c));
    (r[1] as usize, r[0] as usize, r[2] & 2 != 0)
}

/// Whether component `c` is in its initial configuration (XINUSE[c] = 0).
fn is_init(f: &FpuState, c: u32) -> bool {
    match c {
        0 => {
            f.fcw == 0x37f
                && f.fsw == 0
                && f.ftw == 0
                && f.fop == 0
                && f.fip == 0
                && f.fdp == 0
                && f.st.iter().all(|&x| x == 0)
        }
        // MXCSR counts as SSE state for the compacted forms.
        1 => f.xmm.iter().all(|&x| x == 0) && f.mxcsr == 0x1f80,
        2 => f.ymm_hi.iter().all(|&x| x == 0),
        5 => f.opmask.iter().all(|&x| x == 0),
        6 => f.zmm_hi256.iter().all(|x| x.iter().all(|&y| y == 0)),
        7 => f.hi16_zmm.iter().all(|x| x.iter().all(|&y| y == 0)),
        9 => f.pkru == 0,
        _ => true,
    }
}

/// Bytes of component `c` this interpreter reads or writes.
fn held_size(c: u32) -> usize {
    match c {
        2 => 256,
        5 => 64,
        6 => 512,
        7 => 1024,
        9 => 4,
        _ => 0,
    }
}

/// Serialises extended component `c` (2 and up).
fn save_component(f: &FpuState, c: u32, out: &mut [u8]) {
    // A CPUID that reports a smaller component than the architecture defines gets
    // nothing rather than a panic.
    if out.len() < held_size(c) {
        return;
    }
    match c {
        2 => {
            for (k, v) in f.ymm_hi.iter().enumerate() {
                put(out, 16 * k, &v.to_le_bytes());
            }
        }
        5 => {
            for (k, v) in f.opmask.iter().enumerate() {
                put(out, 8 * k, &v.to_le_bytes());
            }
        }
        6 => {
            for (k, v) in f.zmm_hi256.iter().enumerate() {
                for (j, w) in v.iter().enumerate() {
                    put(out, 32 * k + 16 * j, &w.to_le_bytes());
                }
            }
        }
        7 => {
            for (k, v) in f.hi16_zmm.iter().enumerate() {
                for (j, w) in v.iter().enumerate() {
                    put(out, 64 * k + 16 * j, &w.to_le_bytes());
                }
            }
        }
        9 => put(out, 0, &f.pkru.to_le_bytes()),
        _ => {}
    }
}

fn restore_component(f: &mut FpuState, c: u32, data: Option<&[u8]>) {
    let data = data.filter(|d| d.len() >= held_size(c));
    let b16 = |d: &[u8], o: usize| u128::from_le_bytes(get::<16>(d, o));
    match c {
        2 => {
            for k in 0..16 {
                f.ymm_hi[k] = data.map_or(0, |d| b16(d, 16 * k));
            }
        }
        5 => {
            for k in 0..8 {
                f.opmask[k] = data.map_or(0, |d| u64_at(d, 8 * k));
            }
        }
        6 => {
            for k in 0..16 {
                for j in 0..2 {
                    f.zmm_hi256[k][j] = data.map_or(0, |d| b16(d, 32 * k + 16 * j));
                }
            }
        }
        7 => {
            for k in 0..16 {
                for j in 0..4 {
                    f.hi16_zmm[k][j] = data.map_or(0, |d| b16(d, 64 * k + 16 * j));
                }
            }
        }
        9 => f.pkru = data.map_or(0, |d| u32_at(d, 0)),
        _ => {}
    }
}

/// Save flavours.
pub(super) const XSAVE: u8 = 0;
pub(super) const XSAVEC: u8 = 1;
pub(super) const XSAVES: u8 = 2;

/// xsave/xsaveopt (standard format), xsavec, xsaves (compacted). WIDE: REX.W form.
pub(super) fn xsave<const KIND: u8, const WIDE: bool>(m: &mut Machine, i: &Insn) -> R {
    xsave_ok(m)?;
    if KIND == XSAVES && m.cpu.cpl() != 0 {
        return Err(gp());
    }
    let req = (m.regs[2] << 32) | (m.regs[0] & 0xffff_ffff);
    let enabled = if KIND == XSAVES {
        m.cpu.xcr0 | m.cpu.msr.xss
    } else {
        m.cpu.xcr0
    };
    let rfbm = enabled & req;
    let compacted = KIND != XSAVE;
    // Layout: (component, offset, size) for every requested extended component.
    let mut layout = [(0u32, 0usize, 0usize); 64];
    let mut n = 0;
    let mut end = HEADER + 64;
    for c in 2..63u32 {
        if rfbm & (1 << c) == 0 {
            continue;
        }
        let (std_off, size, align64) = component(m, c);
        let off = if compacted {
            if align64 {
                end = end.next_multiple_of(64);
            }
            end
        } else {
            std_off
        };
        if off + size > XSAVE_MAX {
            continue;
        }
        end = end.max(off + size);
        layout[n] = (c, off, size);
        n += 1;
    }
    let layout = &layout[..n];
    let lin = area(m, i, 64, end, true)?;
    let mut storage = [0u8; XSAVE_MAX];
    let buf = &mut storage[..end];
    read_area(m, lin, buf)?;
    let mask = mxcsr_mask(m);
    let f = m.cpu.fpu.clone();
    let mut inuse = 0u64;
    for c in 0..63u32 {
        if rfbm & (1 << c) != 0 && HELD & (1 << c) != 0 && !is_init(&f, c) {
            inuse |= 1 << c;
        }
    }
    // A compacted save stores only components in use; the standard one stores all.
    let store = |c: u32| rfbm & (1 << c) != 0 && (!compacted || inuse & (1 << c) != 0);
    if store(0) {
        let mut legacy = buf[..FX_SIZE].to_vec();
        write_x87(&f, &mut legacy, WIDE);
        buf[..160].copy_from_slice(&legacy[..160]);
    }
    // The standard form writes MXCSR for SSE or AVX requests; the compacted form only
    // with the SSE component.
    let save_mxcsr = if compacted {
        store(1)
    } else {
        rfbm & 0b110 != 0
    };
    if save_mxcsr {
        put(buf, 24, &f.mxcsr.to_le_bytes());
        put(buf, 28, &mask.to_le_bytes());
    }
    if store(1) {
        for k in 0..xmm_count(m) {
            put(buf, 160 + 16 * k, &f.xmm[k].to_le_bytes());
        }
    }
    for &(c, off, size) in layout {
        if store(c) {
            save_component(&f, c, &mut buf[off..off + size]);
        }
    }
    let old_bv = u64_at(buf, HEADER);
    let bv = if compacted {
        inuse & rfbm
    } else {
        (old_bv & !rfbm) | (inuse & rfbm)
    };
    put(buf, HEADER, &bv.to_le_bytes());
    if compacted {
        let xcomp = (1u64 << 63) | rfbm;
        put(buf, HEADER + 8, &xcomp.to_le_bytes());
    }
    write_area(m, lin, buf)
}

/// xrstor (standard or compacted image) / xrstors (compacted, CPL 0).
pub(super) fn xrstor<const SUPERVISOR: bool, const WIDE: bool>(m: &mut Machine, i: &Insn) -> R {
    xsave_ok(m)?;
    if SUPERVISOR && m.cpu.cpl() != 0 {
        return Err(gp());
    }
    let lin = m.ea(i);
    if lin & 63 != 0 {
        return Err(gp());
    }
    let mut header = [0u8; 64];
    m.read_bytes(lin.wrapping_add(HEADER as u64), &mut header)?;
    let bv = u64_at(&header, 0);
    let xcomp = u64_at(&header, 8);
    let compacted = xcomp >> 63 != 0;
    let enabled = if SUPERVISOR {
        m.cpu.xcr0 | m.cpu.msr.xss
    } else {
        m.cpu.xcr0
    };
    let req = (m.regs[2] << 32) | (m.regs[0] & 0xffff_ffff);
    let rfbm = enabled & req;
    let reserved_nonzero = header[16..].iter().any(|&b| b != 0);
    if SUPERVISOR && !compacted {
        return Err(gp());
    }
    if compacted {
        let comp = xcomp & !(1 << 63);
        if comp & !enabled != 0 || bv & !comp != 0 || reserved_nonzero {
            return Err(gp());
        }
    } else if bv & !enabled != 0 || xcomp != 0 || header[16..].iter().any(|&b| b != 0) {
        return Err(gp());
    }
    // Locate each extended component present in the image.
    let mut layout = [(0u32, 0usize, 0usize); 64];
    let mut n = 0;
    let mut end = HEADER + 64;
    for c in 2..63u32 {
        let present = if compacted {
            xcomp & (1 << c) != 0
        } else {
            rfbm & (1 << c) != 0
        };
        if !present {
            continue;
        }
        let (std_off, size, align64) = component(m, c);
        let off = if compacted {
            if align64 {
                end = end.next_multiple_of(64);
            }
            end
        } else {
            std_off
        };
        if off + size > XSAVE_MAX {
            continue;
        }
        end = end.max(off + size);
        layout[n] = (c, off, size);
        n += 1;
    }
    let layout = &layout[..n];
    let mut storage = [0u8; XSAVE_MAX];
    let buf = &mut storage[..end];
    read_area(m, lin, buf)?;
    let mask = mxcsr_mask(m);
    // The standard form loads MXCSR whenever SSE or AVX state is requested; the compacted
    // form treats it as part of SSE state (initialised when XSTATE_BV[1] is clear).
    let load_mxcsr = if compacted {
        rfbm & bv & 2 != 0
    } else {
        rfbm & 0b110 != 0
    };
    let init_mxcsr = compacted && rfbm & 2 != 0 && bv & 2 == 0;
    let mxcsr = u32_at(buf, 24);
    if load_mxcsr && mxcsr & !mask != 0 {
        return Err(gp());
    }
    let n = xmm_count(m);
    let f = &mut m.cpu.fpu;
    if rfbm & 1 != 0 {
        if bv & 1 != 0 {
            read_x87(f, buf, WIDE);
        } else {
            init_x87(f);
        }
    }
    if load_mxcsr {
        f.mxcsr = mxcsr;
    } else if init_mxcsr {
        f.mxcsr = 0x1f80;
    }
    if rfbm & 2 != 0 {
        for k in 0..n {
            f.xmm[k] = if bv & 2 != 0 {
                u128::from_le_bytes(get::<16>(buf, 160 + 16 * k))
            } else {
                0
            };
        }
    }
    for c in 2..63u32 {
        if rfbm & (1 << c) == 0 || HELD & (1 << c) == 0 {
            continue;
        }
        let data = if bv & (1 << c) != 0 {
            layout
                .iter()
                .find(|e| e.0 == c)
                .map(|&(_, off, size)| &buf[off..off + size])
        } else {
            None
        };
        restore_component(f, c, data);
    }
    Ok(())
}
