//! The vCPU's full architectural state between KVM and vessel's [`x86::CpuState`]:
//! registers, segments and control registers, the XSAVE image (x87, SSE, AVX, AVX-512,
//! PKRU, at the offsets CPUID leaf 0xD gives), XCR0 and the MSRs instructions touch.
//! The KVM structures read are kept, so writing back touches only what changed.

use arch::cpuid::CpuidEntry;
use kvm_bindings::{
    Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcr, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use x86::{CpuState, DescriptorTable, SegReg, Segment};

use super::{KvmError, ioctl};

/// MSRs the interpreter's state owns, in the order of `msr_values`.
const STATE_MSRS: [u32; 12] = [
    x86::msr::STAR,
    x86::msr::LSTAR,
    x86::msr::CSTAR,
    x86::msr::SFMASK,
    x86::msr::KERNEL_GS_BASE,
    x86::msr::TSC_AUX,
    x86::msr::SYSENTER_CS,
    x86::msr::SYSENTER_ESP,
    x86::msr::SYSENTER_EIP,
    x86::msr::PAT,
    x86::msr::XSS,
    x86::msr::MISC_ENABLE,
];

/// What was read from KVM, to write back only what the interpreter changed.
pub struct KvmState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcr0: u64,
    /// MSR values as read (None where KVM refused one: e.g. XSS without XSAVES).
    pub msrs: [Option<u64>; STATE_MSRS.len()],
}

fn segment_from(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        attr: u32::from(s.type_ & 0xf)
            | u32::from(s.s) << 4
            | u32::from(s.dpl & 3) << 5
            | u32::from(s.present) << 7
            | u32::from(s.avl) << 12
            | u32::from(s.l) << 13
            | u32::from(s.db) << 14
            | u32::from(s.g) << 15
            | u32::from(s.unusable) << 16,
    }
}

fn segment_to(s: &Segment) -> kvm_segment {
    let bit = |n: u32| ((s.attr >> n) & 1) as u8;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (s.attr & 0xf) as u8,
        present: bit(7),
        dpl: ((s.attr >> 5) & 3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: bit(16),
        padding: 0,
    }
}

/// Where XSAVE component `n` lives in the standard (non-compacted) image.
fn component_offset(cpuid: &[CpuidEntry], n: u32) -> Option<usize> {
    cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == n && e.eax != 0)
        .map(|e| e.ebx as usize)
}

fn bytes(x: &kvm_xsave) -> &[u8] {
    // SAFETY: the region is 1024 initialised u32s; viewing them as 4096 bytes is sound.
    unsafe { std::slice::from_raw_parts(x.region.as_ptr().cast::<u8>(), 4096) }
}

fn bytes_mut(x: &mut kvm_xsave) -> &mut [u8] {
    // SAFETY: as above, and the exclusive borrow makes the byte view exclusive too.
    unsafe { std::slice::from_raw_parts_mut(x.region.as_mut_ptr().cast::<u8>(), 4096) }
}

fn read_u128(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().unwrap_or([0; 16]))
}

const XSTATE_BV: usize = 512;
/// x87 and SSE components (the legacy region).
const LEGACY: u64 = 0b11;
const AVX: u32 = 2;
const OPMASK: u32 = 5;
const ZMM_HI256: u32 = 6;
const HI16_ZMM: u32 = 7;
const PKRU: u32 = 9;

fn fpu_from(x: &kvm_xsave, cpuid: &[CpuidEntry], f: &mut x86::FpuState) {
    let b = bytes(x);
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    f.fcw = u16_at(0);
    f.fsw = u16_at(2);
    f.ftw = b[4];
    f.fop = u16_at(6);
    f.fip = u64_at(8);
    f.fdp = u64_at(16);
    f.mxcsr = u32::from_le_bytes(b[24..28].try_into().unwrap_or([0; 4]));
    for i in 0..8 {
        f.st[i] = read_u128(b, 32 + 16 * i) & ((1u128 << 80) - 1);
    }
    for i in 0..16 {
        f.xmm[i] = read_u128(b, 160 + 16 * i);
    }
    let bv = u64_at(XSTATE_BV);
    let present = |n: u32| bv & (1 << n) != 0;
    let at = |n: u32| component_offset(cpuid, n).filter(|_| present(n));
    f.ymm_hi = [0; 16];
    if let Some(o) = at(AVX) {
        for i in 0..16 {
            f.ymm_hi[i] = read_u128(b, o + 16 * i);
        }
    }
    f.opmask = [0; 8];
    if let Some(o) = at(OPMASK) {
        for i in 0..8 {
            f.opmask[i] = u64_at(o + 8 * i);
        }
    }
    f.zmm_hi256 = [[0; 2]; 16];
    if let Some(o) = at(ZMM_HI256) {
        for i in 0..16 {
            f.zmm_hi256[i] = [read_u128(b, o + 32 * i), read_u128(b, o + 32 * i + 16)];
        }
    }
    f.hi16_zmm = [[0; 4]; 16];
    if let Some(o) = at(HI16_ZMM) {
        for i in 0..16 {
            for j in 0..4 {
                f.hi16_zmm[i][j] = read_u128(b, o + 64 * i + 16 * j);
            }
        }
    }
    f.pkru = at(PKRU).map_or(0, |o| {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
    });
}

fn fpu_to(f: &x86::FpuState, cpuid: &[CpuidEntry], x: &mut kvm_xsave) {
    let b = bytes_mut(x);
    let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(b, 0, &f.fcw.to_le_bytes());
    put(b, 2, &f.fsw.to_le_bytes());
    b[4] = f.ftw;
    put(b, 6, &f.fop.to_le_bytes());
    put(b, 8, &f.fip.to_le_bytes());
    put(b, 16, &f.fdp.to_le_bytes());
    put(b, 24, &f.mxcsr.to_le_bytes());
    for i in 0..8 {
        put(b, 32 + 16 * i, &f.st[i].to_le_bytes());
    }
    for i in 0..16 {
        put(b, 160 + 16 * i, &f.xmm[i].to_le_bytes());
    }
    let mut bv =
        u64::from_le_bytes(b[XSTATE_BV..XSTATE_BV + 8].try_into().unwrap_or([0; 8])) | LEGACY;
    let mut component = |n: u32, data: Vec<u8>| {
        if let Some(o) = component_offset(cpuid, n)
            && o + data.len() <= 4096
        {
            b[o..o + data.len()].copy_from_slice(&data);
            bv |= 1 << n;
        }
    };
    component(AVX, f.ymm_hi.iter().flat_map(|v| v.to_le_bytes()).collect());
    if f.opmask != [0; 8] {
        component(
            OPMASK,
            f.opmask.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
    }
    if f.zmm_hi256 != [[0; 2]; 16] {
        component(
            ZMM_HI256,
            f.zmm_hi256
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
    }
    if f.hi16_zmm != [[0; 4]; 16] {
        component(
            HI16_ZMM,
            f.hi16_zmm
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
    }
    if f.pkru != 0 {
        component(PKRU, f.pkru.to_le_bytes().to_vec());
    }
    b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
}

fn msrs(indices: &[u32], values: &[u64]) -> Result<Msrs, KvmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .zip(values.iter().chain(std::iter::repeat(&0)))
        .map(|(&index, &data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| KvmError::MissingCapability("MSR table size"))
}

/// Reads the whole state of `fd`.
pub fn read(fd: &VcpuFd, cpuid: &[CpuidEntry]) -> Result<(CpuState, KvmState), KvmError> {
    let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let xsave = Box::new(fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?);
    let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let xcr0 = xcrs.xcrs[..xcrs.nr_xcrs.min(16) as usize]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value);
    // One MSR at a time: KVM stops a batch at the first MSR it refuses.
    let mut values = [None; STATE_MSRS.len()];
    for (slot, &index) in values.iter_mut().zip(STATE_MSRS.iter()) {
        let mut one = msrs(&[index], &[])?;
        if fd.get_msrs(&mut one).map_err(ioctl("KVM_GET_MSRS"))? == 1 {
            *slot = Some(one.as_slice()[0].data);
        }
    }

    let mut s = CpuState::default();
    let r = &regs;
    s.gpr = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    s.rip = r.rip;
    s.rflags = r.rflags;
    for (reg, seg) in [
        (SegReg::Es, &sregs.es),
        (SegReg::Cs, &sregs.cs),
        (SegReg::Ss, &sregs.ss),
        (SegReg::Ds, &sregs.ds),
        (SegReg::Fs, &sregs.fs),
        (SegReg::Gs, &sregs.gs),
    ] {
        s.seg[reg as usize] = segment_from(seg);
    }
    s.ldtr = segment_from(&sregs.ldt);
    s.tr = segment_from(&sregs.tr);
    s.gdtr = DescriptorTable {
        base: sregs.gdt.base,
        limit: sregs.gdt.limit,
    };
    s.idtr = DescriptorTable {
        base: sregs.idt.base,
        limit: sregs.idt.limit,
    };
    s.cr0 = sregs.cr0;
    s.cr2 = sregs.cr2;
    s.cr3 = sregs.cr3;
    s.cr4 = sregs.cr4;
    s.cr8 = sregs.cr8;
    s.efer = sregs.efer;
    s.xcr0 = xcr0;
    let v = |i: usize| values[i].unwrap_or(0);
    s.msr = x86::Msrs {
        star: v(0),
        lstar: v(1),
        cstar: v(2),
        sfmask: v(3),
        kernel_gs_base: v(4),
        tsc_aux: v(5),
        sysenter_cs: v(6),
        sysenter_esp: v(7),
        sysenter_eip: v(8),
        pat: v(9),
        xss: v(10),
        misc_enable: v(11),
    };
    fpu_from(&xsave, cpuid, &mut s.fpu);
    Ok((
        s,
        KvmState {
            regs,
            sregs,
            xsave,
            xcr0,
            msrs: values,
        },
    ))
}

/// Writes `s` back to `fd`, touching only what differs from `old` (what `read` saw).
pub fn write(
    fd: &VcpuFd,
    cpuid: &[CpuidEntry],
    s: &CpuState,
    old: &mut KvmState,
) -> Result<(), KvmError> {
    let g = &s.gpr;
    let regs = kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: s.rip,
        rflags: s.rflags,
    };
    fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;

    let mut sregs = old.sregs;
    sregs.es = segment_to(&s.seg[SegReg::Es as usize]);
    sregs.cs = segment_to(&s.seg[SegReg::Cs as usize]);
    sregs.ss = segment_to(&s.seg[SegReg::Ss as usize]);
    sregs.ds = segment_to(&s.seg[SegReg::Ds as usize]);
    sregs.fs = segment_to(&s.seg[SegReg::Fs as usize]);
    sregs.gs = segment_to(&s.seg[SegReg::Gs as usize]);
    sregs.ldt = segment_to(&s.ldtr);
    sregs.tr = segment_to(&s.tr);
    sregs.gdt.base = s.gdtr.base;
    sregs.gdt.limit = s.gdtr.limit;
    sregs.idt.base = s.idtr.base;
    sregs.idt.limit = s.idtr.limit;
    sregs.cr0 = s.cr0;
    sregs.cr2 = s.cr2;
    sregs.cr3 = s.cr3;
    sregs.cr4 = s.cr4;
    sregs.cr8 = s.cr8;
    sregs.efer = s.efer;
    // kvm_sregs has no PartialEq; compare its bytes.
    if as_bytes(&sregs) != as_bytes(&old.sregs) {
        fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        old.sregs = sregs;
    }

    let mut before = x86::FpuState::default();
    fpu_from(&old.xsave, cpuid, &mut before);
    if before != s.fpu {
        fpu_to(&s.fpu, cpuid, &mut old.xsave);
        // SAFETY: a complete XSAVE image derived from the one KVM gave us.
        unsafe { fd.set_xsave(&old.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    }
    if s.xcr0 != old.xcr0 {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0] = kvm_xcr {
            xcr: 0,
            value: s.xcr0,
            ..Default::default()
        };
        fd.set_xcrs(&xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    let m = &s.msr;
    let now = [
        m.star,
        m.lstar,
        m.cstar,
        m.sfmask,
        m.kernel_gs_base,
        m.tsc_aux,
        m.sysenter_cs,
        m.sysenter_esp,
        m.sysenter_eip,
        m.pat,
        m.xss,
        m.misc_enable,
    ];
    for (i, (&index, &value)) in STATE_MSRS.iter().zip(now.iter()).enumerate() {
        if old.msrs[i].is_some_and(|v| v != value) {
            let set = fd
                .set_msrs(&msrs(&[index], &[value])?)
                .map_err(ioctl("KVM_SET_MSRS"))?;
            if set != 1 {
                tracing::warn!("KVM refused MSR {index:#x} = {value:#x} from the interpreter");
            }
        }
    }
    Ok(())
}

fn as_bytes(s: &kvm_sregs) -> &[u8] {
    // SAFETY: kvm_sregs is a plain repr(C) struct of integers; any byte view is valid.
    unsafe {
        std::slice::from_raw_parts(
            (s as *const kvm_sregs).cast::<u8>(),
            std::mem::size_of::<kvm_sregs>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_through_the_access_rights_layout() {
        let k = kvm_segment {
            base: 0x1234,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 1,
            unusable: 0,
            padding: 0,
        };
        let s = segment_from(&k);
        assert_eq!(s.dpl(), 3);
        assert!(s.long() && s.present() && !s.db());
        let back = segment_to(&s);
        assert_eq!(
            (
                back.base,
                back.limit,
                back.selector,
                back.type_,
                back.present,
                back.dpl,
                back.db,
                back.s,
                back.l,
                back.g,
                back.avl,
                back.unusable
            ),
            (
                k.base, k.limit, k.selector, k.type_, k.present, k.dpl, k.db, k.s, k.l, k.g, k.avl,
                k.unusable
            )
        );
    }

    #[test]
    fn fpu_round_trips_through_an_xsave_image() {
        let cpuid = vec![
            CpuidEntry {
                function: 0xd,
                index: 2,
                eax: 256,
                ebx: 576,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xd,
                index: 5,
                eax: 64,
                ebx: 1088,
                ..Default::default()
            },
        ];
        let mut f = x86::FpuState::default();
        f.xmm[3] = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        f.ymm_hi[15] = 7;
        f.st[2] = (1u128 << 79) | 5;
        f.opmask[1] = 0xff;
        f.mxcsr = 0x1fa0;
        let mut x = kvm_xsave::default();
        fpu_to(&f, &cpuid, &mut x);
        let mut back = x86::FpuState::default();
        fpu_from(&x, &cpuid, &mut back);
        assert_eq!(back, f);
    }
}
