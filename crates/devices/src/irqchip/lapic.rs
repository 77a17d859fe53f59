//! One local APIC in xAPIC mode: the register file at 0xFEE00000, interrupt priority
//! (IRR/ISR/TPR/PPR), EOI, the ICR, the LVTs and the timer (one-shot, periodic,
//! TSC-deadline) counting the 1 GHz guest clock. Plain data; time is passed in, and
//! what must leave the APIC (an IPI, an EOI to broadcast) is returned as an [`Effect`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::delivery::{DeliveryMode, Message};

pub const MSR_APIC_BASE: u32 = 0x1b;
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Version 0x14 (integrated APIC), six LVT entries (max LVT index 5), no EOI suppression.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// Register offsets in the xAPIC page.
pub mod reg {
    pub const ID: u32 = 0x20;
    pub const VERSION: u32 = 0x30;
    pub const TPR: u32 = 0x80;
    pub const APR: u32 = 0x90;
    pub const PPR: u32 = 0xa0;
    pub const EOI: u32 = 0xb0;
    pub const RRD: u32 = 0xc0;
    pub const LDR: u32 = 0xd0;
    pub const DFR: u32 = 0xe0;
    pub const SVR: u32 = 0xf0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
}

pub const SVR_ENABLE: u32 = 1 << 8;
pub const LVT_MASKED: u32 = 1 << 16;
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
/// Writable bits per LVT (timer, thermal, perf, LINT0, LINT1, error).
const LVT_WRITABLE: [u32; LVT_COUNT] = [0x700ff, 0x107ff, 0x107ff, 0x1a7ff, 0x1a7ff, 0x100ff];
/// Vector, delivery mode, destination mode, level, trigger mode, shorthand.
const ICR_WRITABLE: u32 = 0x000c_cfff;
/// A periodic timer faster than this would keep an interpreted vCPU busy taking
/// interrupts; KVM clamps too (to 200 µs).
pub const MIN_PERIOD_NS: u64 = 50_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LapicError {
    #[error("MSR {0:#x} is not a local APIC MSR")]
    UnknownMsr(u32),
    #[error("IA32_APIC_BASE value {0:#x} is not supported (x2APIC or reserved bits)")]
    UnsupportedApicBase(u64),
}

/// Where a vCPU is in its life, as the interrupt controllers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    /// In HLT (set by the vCPU loop); any deliverable event ends it.
    Halted,
    /// After INIT (and at power-on for application processors): only a SIPI starts it.
    WaitForSipi,
    /// A SIPI arrived: the vCPU starts in real mode at CS = vector << 8, IP = 0.
    Startup {
        vector: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// What a register write asks the rest of the interrupt system to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// EOI of a level-triggered vector: broadcast to the IOAPIC.
    EoiLevel(u8),
    /// An IPI written to the ICR.
    Send(Message),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    id: u8,
    apic_base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    /// Errors since the last ESR write (the ESR shows them after the next write).
    esr_pending: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    timer_initial: u32,
    timer_divide: u32,
    /// Next expiry (guest ns) of a running one-shot or periodic count.
    timer_next: Option<u64>,
    timer_period: u64,
    tsc_deadline: u64,
    nmi_pending: bool,
    run_state: RunState,
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i * 32 + 31 - bits[i].leading_zeros() as usize) as u8)
}

fn set_bit(bits: &mut [u32; 8], vector: u8, on: bool) {
    let (i, mask) = (usize::from(vector >> 5), 1u32 << (vector & 31));
    if on {
        bits[i] |= mask;
    } else {
        bits[i] &= !mask;
    }
}

fn test_bit(bits: &[u32; 8], vector: u8) -> bool {
    bits[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

impl LapicState {
    /// The power-on state of vCPU `index` (APIC ID = index): the BSP runs, the others
    /// wait for a SIPI.
    pub fn new(index: usize) -> Self {
        let bsp = if index == 0 { APIC_BASE_BSP } else { 0 };
        let mut s = LapicState {
            id: index as u8,
            apic_base: arch::layout::LAPIC_START | APIC_BASE_ENABLE | bsp,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [0; LVT_COUNT],
            timer_initial: 0,
            timer_divide: 0,
            timer_next: None,
            timer_period: 0,
            tsc_deadline: 0,
            nmi_pending: false,
            run_state: if index == 0 {
                RunState::Running
            } else {
                RunState::WaitForSipi
            },
        };
        s.reset_registers();
        s
    }

    /// Everything but the APIC ID and IA32_APIC_BASE back to the reset values.
    fn reset_registers(&mut self) {
        let keep = (self.id, self.apic_base, self.run_state);
        *self = LapicState {
            id: keep.0,
            apic_base: keep.1,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            timer_initial: 0,
            timer_divide: 0,
            timer_next: None,
            timer_period: 0,
            tsc_deadline: 0,
            nmi_pending: false,
            run_state: keep.2,
        };
    }

    /// The xAPIC register page (1 KiB, the architectural layout, which KVM's
    /// `kvm_lapic_state` also uses): how a local APIC moves to another backend.
    pub fn register_page(&self, now: u64) -> Vec<u8> {
        let mut page = vec![0u8; 1024];
        for offset in (0..1024u32).step_by(16) {
            let v = self.read(offset, now);
            page[offset as usize..offset as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        page
    }

    /// A local APIC from a register page (see `register_page`) and IA32_APIC_BASE; the
    /// timer counts on from the page's current count at guest time `now`.
    pub fn from_register_page(
        index: usize,
        apic_base: u64,
        page: &[u8],
        run_state: RunState,
        now: u64,
    ) -> Self {
        let reg = |o: u32| -> u32 {
            let o = o as usize;
            page.get(o..o + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let bits = |base: u32| -> [u32; 8] { std::array::from_fn(|i| reg(base + 16 * i as u32)) };
        let mut s = LapicState::new(index);
        s.apic_base = apic_base;
        s.run_state = run_state;
        s.id = (reg(reg::ID) >> 24) as u8;
        s.tpr = reg(reg::TPR) & 0xff;
        s.ldr = reg(reg::LDR);
        s.dfr = reg(reg::DFR);
        s.svr = reg(reg::SVR);
        s.isr = bits(reg::ISR);
        s.tmr = bits(reg::TMR);
        s.irr = bits(reg::IRR);
        s.esr = reg(reg::ESR);
        s.icr = u64::from(reg(reg::ICR_LOW)) | (u64::from(reg(reg::ICR_HIGH)) << 32);
        for (i, o) in [
            reg::LVT_TIMER,
            reg::LVT_THERMAL,
            reg::LVT_PERF,
            reg::LVT_LINT0,
            reg::LVT_LINT1,
            reg::LVT_ERROR,
        ]
        .into_iter()
        .enumerate()
        {
            s.lvt[i] = reg(o) & LVT_WRITABLE[i];
        }
        s.timer_divide = reg(reg::TIMER_DIVIDE) & 0xb;
        s.timer_initial = reg(reg::TIMER_INITIAL);
        let current = u64::from(reg(reg::TIMER_CURRENT));
        if s.timer_initial != 0 && current != 0 && s.timer_mode() != TimerMode::TscDeadline {
            s.timer_next = Some(now + current * s.divisor());
            s.timer_period = (u64::from(s.timer_initial) * s.divisor()).max(MIN_PERIOD_NS);
        }
        s
    }

    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// An INIT: registers reset, the vCPU waits for a SIPI.
    pub fn init(&mut self) {
        self.reset_registers();
        self.run_state = RunState::WaitForSipi;
    }

    pub fn id(&self) -> u8 {
        self.id
    }
    pub fn ldr(&self) -> u32 {
        self.ldr
    }
    pub fn dfr(&self) -> u32 {
        self.dfr
    }
    pub fn tpr(&self) -> u32 {
        self.tpr
    }
    pub fn set_tpr(&mut self, tpr: u32) {
        self.tpr = tpr & 0xff;
    }
    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    pub fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    pub fn sw_enabled(&self) -> bool {
        self.hw_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// Whether the PIC's INTR reaches the CPU through LINT0 (ExtINT, unmasked) or
    /// directly (APIC globally disabled).
    pub fn extint_enabled(&self) -> bool {
        let lvt0 = self.lvt[LVT_LINT0];
        !self.hw_enabled()
            || (lvt0 & LVT_MASKED == 0
                && DeliveryMode::from_bits(lvt0 >> 8) == DeliveryMode::ExtInt)
    }

    pub fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the CPU would take now: the highest IRR above the processor priority.
    pub fn deliverable(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        highest(&self.irr).filter(|&v| u32::from(v) & 0xf0 > self.ppr() & 0xf0)
    }

    /// The CPU takes the interrupt: IRR -> ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        set_bit(&mut self.irr, v, false);
        set_bit(&mut self.isr, v, true);
        Some(v)
    }

    /// A fixed interrupt arrives. Dropped while software-disabled (as KVM does).
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.sw_enabled() {
            return false;
        }
        if vector < 16 {
            self.report_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        set_bit(&mut self.irr, vector, true);
        set_bit(&mut self.tmr, vector, level_triggered);
        true
    }

    fn report_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 && lvt as u8 >= 16 {
            set_bit(&mut self.irr, lvt as u8, true);
            set_bit(&mut self.tmr, lvt as u8, false);
        }
    }

    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }
    pub fn set_nmi(&mut self) {
        self.nmi_pending = true;
    }
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// A STARTUP IPI: only a vCPU waiting for one takes it.
    pub fn sipi(&mut self, vector: u8) -> bool {
        let waiting = self.run_state == RunState::WaitForSipi;
        if waiting {
            self.run_state = RunState::Startup { vector };
        }
        waiting
    }

    /// The vCPU loop has seen the SIPI: it runs from now on.
    pub fn take_startup(&mut self) -> Option<u8> {
        match self.run_state {
            RunState::Startup { vector } => {
                self.run_state = RunState::Running;
                Some(vector)
            }
            _ => None,
        }
    }

    /// HLT: Running -> Halted (an INIT that came first wins).
    pub fn set_halted(&mut self) {
        if self.run_state == RunState::Running {
            self.run_state = RunState::Halted;
        }
    }

    /// The end of HLT: Halted -> Running.
    pub fn set_running(&mut self) {
        if self.run_state == RunState::Halted {
            self.run_state = RunState::Running;
        }
    }

    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    fn divisor(&self) -> u64 {
        let v = (self.timer_divide & 3) | ((self.timer_divide & 8) >> 1);
        if v == 7 { 1 } else { 2 << v }
    }

    /// When the timer next needs `poll_timer` (guest ns).
    pub fn timer_deadline(&self) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            _ => self.timer_next,
        }
    }

    /// Fires the timer if it has expired by `now`; true if an interrupt was raised.
    /// Periods missed while nobody polled are coalesced into one interrupt.
    pub fn poll_timer(&mut self, now: u64) -> bool {
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                if self.tsc_deadline == 0 || now < self.tsc_deadline {
                    return false;
                }
                self.tsc_deadline = 0;
            }
            mode => {
                let Some(next) = self.timer_next.filter(|&n| now >= n) else {
                    return false;
                };
                self.timer_next = match mode {
                    TimerMode::Periodic => {
                        let p = self.timer_period.max(1);
                        Some(next + ((now - next) / p + 1) * p)
                    }
                    _ => None,
                };
            }
        }
        let lvt = self.lvt[LVT_TIMER];
        lvt & LVT_MASKED == 0 && self.accept(lvt as u8, false)
    }

    fn current_count(&self, now: u64) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let Some(next) = self.timer_next else {
            return 0;
        };
        let remaining = if now < next {
            next - now
        } else if self.timer_mode() == TimerMode::Periodic {
            let p = self.timer_period.max(1);
            p - (now - next) % p
        } else {
            0
        };
        (remaining / self.divisor()).min(u64::from(self.timer_initial)) as u32
    }

    fn start_timer(&mut self, count: u32, now: u64) {
        self.timer_initial = count;
        if count == 0 {
            self.timer_next = None;
            return;
        }
        let ns = u64::from(count) * self.divisor();
        self.timer_period = match self.timer_mode() {
            TimerMode::Periodic => ns.max(MIN_PERIOD_NS),
            _ => ns,
        };
        self.timer_next = Some(now + self.timer_period);
    }

    fn set_divide(&mut self, value: u32, now: u64) {
        let count = u64::from(self.current_count(now));
        self.timer_divide = value & 0xb;
        if self.timer_next.is_none() || self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        // The count carries on from where it was, at the new rate.
        let div = self.divisor();
        if self.timer_mode() == TimerMode::Periodic {
            self.timer_period = (u64::from(self.timer_initial) * div).max(MIN_PERIOD_NS);
        }
        self.timer_next = Some(now + (count * div).max(1));
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut v = value & LVT_WRITABLE[index];
        if !self.sw_enabled() {
            v |= LVT_MASKED;
        }
        let old_mode = self.timer_mode();
        self.lvt[index] = v;
        if index == LVT_TIMER && self.timer_mode() != old_mode {
            // A mode change disarms the timer (as KVM does).
            self.timer_initial = 0;
            self.timer_next = None;
            self.tsc_deadline = 0;
        }
    }

    pub fn read(&self, offset: u32, now: u64) -> u32 {
        if !self.hw_enabled() {
            return 0;
        }
        let index = |base: u32| ((offset - base) >> 4) as usize;
        match offset {
            reg::ID => u32::from(self.id) << 24,
            reg::VERSION => LAPIC_VERSION,
            reg::TPR => self.tpr,
            reg::PPR => self.ppr(),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            o if (reg::ISR..reg::TMR).contains(&o) => self.isr[index(reg::ISR)],
            o if (reg::TMR..reg::IRR).contains(&o) => self.tmr[index(reg::TMR)],
            o if (reg::IRR..reg::IRR + 0x80).contains(&o) => self.irr[index(reg::IRR)],
            reg::ESR => self.esr,
            // Delivery is synchronous: the delivery-status bit always reads idle.
            reg::ICR_LOW => self.icr as u32,
            reg::ICR_HIGH => (self.icr >> 32) as u32,
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) => self.lvt[index(reg::LVT_TIMER)],
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer_divide,
            // APR, RRD, EOI and the reserved slots read 0.
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u32, value: u32, now: u64) -> Effect {
        if !self.hw_enabled() {
            return Effect::None;
        }
        match offset {
            reg::TPR => self.tpr = value & 0xff,
            reg::EOI => return self.eoi(),
            reg::LDR => self.ldr = value & 0xff00_0000,
            reg::DFR => self.dfr = value | 0x0fff_ffff,
            reg::SVR => {
                self.svr = value & 0x3ff;
                if !self.sw_enabled() {
                    self.lvt.iter_mut().for_each(|l| *l |= LVT_MASKED);
                }
            }
            reg::ESR => self.esr = std::mem::take(&mut self.esr_pending),
            reg::ICR_HIGH => {
                self.icr = (self.icr & 0xffff_ffff) | u64::from(value & 0xff00_0000) << 32;
            }
            reg::ICR_LOW => {
                self.icr = (self.icr & !0xffff_ffff) | u64::from(value & ICR_WRITABLE);
                return self.send_ipi();
            }
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) && o & 0xf == 0 => {
                self.write_lvt(((o - reg::LVT_TIMER) >> 4) as usize, value);
            }
            reg::TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.start_timer(value, now);
                }
            }
            reg::TIMER_DIVIDE => self.set_divide(value, now),
            _ => tracing::trace!("lapic {}: write {value:#x} to {offset:#x} ignored", self.id),
        }
        Effect::None
    }

    fn eoi(&mut self) -> Effect {
        let Some(v) = highest(&self.isr) else {
            return Effect::None;
        };
        set_bit(&mut self.isr, v, false);
        if test_bit(&self.tmr, v) {
            Effect::EoiLevel(v)
        } else {
            Effect::None
        }
    }

    fn send_ipi(&mut self) -> Effect {
        let msg = Message::from_icr(self.icr, usize::from(self.id));
        let fixed = matches!(msg.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority);
        if fixed && msg.vector < 16 {
            self.report_error(ESR_SEND_ILLEGAL_VECTOR);
            return Effect::None;
        }
        Effect::Send(msg)
    }

    /// An access to the xAPIC page (`offset` inside it). Registers are 32 bits on
    /// 16-byte boundaries; narrower reads see their bytes.
    pub fn read_mmio(&self, offset: u64, data: &mut [u8], now: u64) {
        let value = self.read((offset & 0xff0) as u32, now);
        let shift = (offset & 0xf) as usize;
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    /// A write to the xAPIC page; only aligned 32-bit writes reach registers.
    pub fn write_mmio(&mut self, offset: u64, data: &[u8], now: u64) -> Effect {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::trace!(
                "lapic {}: {}-byte write at {offset:#x}",
                self.id,
                data.len()
            );
            return Effect::None;
        };
        if offset & 0xf != 0 || offset >= 0x1000 {
            return Effect::None;
        }
        self.write(offset as u32, u32::from_le_bytes(bytes), now)
    }

    pub fn rdmsr(&self, msr: u32) -> Result<u64, LapicError> {
        match msr {
            MSR_APIC_BASE => Ok(self.apic_base),
            MSR_TSC_DEADLINE => Ok(match self.timer_mode() {
                TimerMode::TscDeadline => self.tsc_deadline,
                _ => 0,
            }),
            _ => Err(LapicError::UnknownMsr(msr)),
        }
    }

    pub fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), LapicError> {
        match msr {
            MSR_APIC_BASE => {
                const RESERVED: u64 = 0xff | 1 << 9 | APIC_BASE_X2APIC | !0xf_ffff_ffff;
                if value & RESERVED != 0 {
                    return Err(LapicError::UnsupportedApicBase(value));
                }
                if value & !0xfff != arch::layout::LAPIC_START {
                    crate::guest_warn!("lapic {}: relocation to {value:#x} ignored", self.id);
                }
                let enable = value & APIC_BASE_ENABLE;
                if enable != self.apic_base & APIC_BASE_ENABLE {
                    // Disabling or re-enabling the APIC leaves it in its reset state.
                    self.reset_registers();
                }
                self.apic_base = (self.apic_base & !APIC_BASE_ENABLE) | enable;
                Ok(())
            }
            MSR_TSC_DEADLINE => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline = value;
                }
                Ok(())
            }
            _ => Err(LapicError::UnknownMsr(msr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> LapicState {
        let mut l = LapicState::new(0);
        assert_eq!(l.write(reg::SVR, SVR_ENABLE | 0xff, 0), Effect::None);
        l
    }

    #[test]
    fn reset_values_as_linux_reads_them() {
        let l = LapicState::new(1);
        assert_eq!(l.read(reg::ID, 0), 1 << 24);
        assert_eq!(l.read(reg::VERSION, 0), 0x50014);
        assert_eq!(l.read(reg::SVR, 0), 0xff);
        assert_eq!(l.read(reg::DFR, 0), 0xffff_ffff);
        assert_eq!(l.read(reg::LVT_LINT0, 0), LVT_MASKED);
        assert_eq!(l.run_state(), RunState::WaitForSipi);
        assert_eq!(l.rdmsr(MSR_APIC_BASE), Ok(0xfee0_0800));
        let bsp = LapicState::new(0);
        assert_eq!(bsp.rdmsr(MSR_APIC_BASE), Ok(0xfee0_0900));
        assert_eq!(bsp.run_state(), RunState::Running);
    }

    #[test]
    fn software_disabled_apic_drops_fixed_and_masks_lvts() {
        let mut l = LapicState::new(0);
        assert!(!l.accept(0x40, false));
        l.write(reg::LVT_TIMER, 0xef, 0);
        assert_eq!(l.read(reg::LVT_TIMER, 0), 0xef | LVT_MASKED);
        l.write(reg::SVR, SVR_ENABLE | 0xff, 0);
        l.write(reg::LVT_TIMER, 0xef, 0);
        assert_eq!(l.read(reg::LVT_TIMER, 0), 0xef);
        assert!(l.accept(0x40, false));
        // Clearing the enable bit masks every LVT again.
        l.write(reg::SVR, 0xff, 0);
        assert_eq!(l.read(reg::LVT_TIMER, 0), 0xef | LVT_MASKED);
    }

    #[test]
    fn priority_tpr_ppr_and_eoi() {
        let mut l = enabled();
        l.accept(0x31, false);
        l.accept(0x52, false);
        l.accept(0x51, false);
        assert_eq!(l.read(reg::IRR + 0x20, 0), (1 << 0x12) | (1 << 0x11));
        assert_eq!(l.read(reg::IRR + 0x10, 0), 1 << 0x11);
        // TPR class 5 blocks 0x52 and below.
        l.write(reg::TPR, 0x50, 0);
        assert_eq!(l.read(reg::PPR, 0), 0x50);
        assert_eq!(l.deliverable(), None);
        l.write(reg::TPR, 0x40, 0);
        assert_eq!(l.acknowledge(), Some(0x52));
        assert_eq!(l.read(reg::ISR + 0x20, 0), 1 << 0x12);
        // In service 0x52 raises PPR to its class: 0x51 waits for the EOI.
        assert_eq!(l.read(reg::PPR, 0), 0x50);
        assert_eq!(l.acknowledge(), None);
        assert_eq!(l.write(reg::EOI, 0, 0), Effect::None);
        assert_eq!(l.read(reg::PPR, 0), 0x40);
        assert_eq!(l.acknowledge(), Some(0x51));
        l.write(reg::TPR, 0, 0);
        // A higher class nests over one in service.
        l.accept(0x61, false);
        assert_eq!(l.acknowledge(), Some(0x61));
        l.write(reg::EOI, 0, 0);
        l.write(reg::EOI, 0, 0);
        assert_eq!(l.acknowledge(), Some(0x31));
        assert_eq!(l.read(reg::PPR, 0), 0x30);
        l.write(reg::EOI, 0, 0);
        assert_eq!(l.read(reg::PPR, 0), 0);
        assert_eq!(l.read(reg::ISR + 0x10, 0), 0);
    }

    #[test]
    fn eoi_of_a_level_vector_asks_for_broadcast() {
        let mut l = enabled();
        l.accept(0x41, true);
        assert_eq!(l.read(reg::TMR + 0x20, 0), 1 << 1);
        assert_eq!(l.acknowledge(), Some(0x41));
        assert_eq!(l.write(reg::EOI, 0, 0), Effect::EoiLevel(0x41));
    }

    #[test]
    fn esr_write_then_read() {
        let mut l = enabled();
        l.accept(3, false);
        assert_eq!(
            l.read(reg::ESR, 0),
            0,
            "errors show only after an ESR write"
        );
        l.write(reg::ESR, 0, 0);
        assert_eq!(l.read(reg::ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        l.write(reg::ESR, 0, 0);
        assert_eq!(l.read(reg::ESR, 0), 0);
        // Sending an illegal vector: no IPI, the error is latched.
        l.write(reg::ICR_HIGH, 1 << 24, 0);
        assert_eq!(l.write(reg::ICR_LOW, 0x4002, 0), Effect::None);
        l.write(reg::ESR, 0, 0);
        assert_eq!(l.read(reg::ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
    }

    #[test]
    fn icr_write_sends_and_reads_back_idle() {
        let mut l = enabled();
        l.write(reg::ICR_HIGH, 0x0300_0000, 0);
        let e = l.write(reg::ICR_LOW, 0x4000 | 0xf3, 0);
        let Effect::Send(m) = e else { panic!("{e:?}") };
        assert_eq!((m.dest, m.vector, m.mode), (3, 0xf3, DeliveryMode::Fixed));
        assert_eq!(l.read(reg::ICR_LOW, 0) & (1 << 12), 0);
        assert_eq!(l.read(reg::ICR_HIGH, 0), 0x0300_0000);
    }

    #[test]
    fn one_shot_timer_counts_down_and_fires_once() {
        let mut l = enabled();
        l.write(reg::TIMER_DIVIDE, 0b0011, 0); // divide by 16
        l.write(reg::LVT_TIMER, 0xec, 0);
        l.write(reg::TIMER_INITIAL, 1000, 100);
        assert_eq!(l.timer_deadline(), Some(100 + 16_000));
        assert_eq!(l.read(reg::TIMER_CURRENT, 100), 1000);
        assert_eq!(l.read(reg::TIMER_CURRENT, 100 + 1600), 900);
        assert!(!l.poll_timer(100 + 15_999));
        assert!(l.poll_timer(100 + 16_000));
        assert_eq!(l.read(reg::TIMER_CURRENT, 100 + 16_000), 0);
        assert_eq!(l.timer_deadline(), None);
        assert!(!l.poll_timer(1_000_000));
        assert_eq!(l.acknowledge(), Some(0xec));
    }

    #[test]
    fn periodic_timer_reloads_and_coalesces_missed_periods() {
        let mut l = enabled();
        l.write(reg::TIMER_DIVIDE, 0b1011, 0); // divide by 1
        l.write(reg::LVT_TIMER, (1 << 17) | 0xec, 0);
        l.write(reg::TIMER_INITIAL, 100_000, 0);
        assert!(l.poll_timer(100_000));
        assert_eq!(l.timer_deadline(), Some(200_000));
        assert_eq!(l.read(reg::TIMER_CURRENT, 150_000), 50_000);
        // Five periods pass unseen: one interrupt, the next period stays on the grid.
        assert!(l.poll_timer(650_000));
        assert_eq!(l.timer_deadline(), Some(700_000));
        assert_eq!(l.read(reg::TIMER_CURRENT, 650_000), 50_000);
        // Masked: the count goes on, no interrupt.
        l.write(reg::LVT_TIMER, (1 << 17) | LVT_MASKED | 0xec, 700_000);
        assert!(!l.poll_timer(700_000));
        assert_eq!(l.timer_deadline(), Some(800_000));
        // Initial count 0 stops it.
        l.write(reg::TIMER_INITIAL, 0, 710_000);
        assert_eq!(l.timer_deadline(), None);
        assert_eq!(l.read(reg::TIMER_CURRENT, 710_000), 0);
    }

    #[test]
    fn divide_configuration() {
        let mut l = enabled();
        l.write(reg::LVT_TIMER, 0xec, 0);
        for (dcr, div) in [(0b0000, 2), (0b0001, 4), (0b1010, 128), (0b1011, 1)] {
            l.write(reg::TIMER_DIVIDE, dcr, 0);
            assert_eq!(l.read(reg::TIMER_DIVIDE, 0), dcr);
            l.write(reg::TIMER_INITIAL, 10, 0);
            assert_eq!(l.timer_deadline(), Some(10 * div), "dcr {dcr:#b}");
        }
        // Changing the divider mid-count keeps the count and changes the rate.
        l.write(reg::TIMER_DIVIDE, 0b0000, 0);
        l.write(reg::TIMER_INITIAL, 100, 0);
        assert_eq!(l.read(reg::TIMER_CURRENT, 100), 50);
        l.write(reg::TIMER_DIVIDE, 0b0001, 100);
        assert_eq!(l.read(reg::TIMER_CURRENT, 100), 50);
        assert_eq!(l.timer_deadline(), Some(100 + 200));
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut l = enabled();
        // Not in TSC-deadline mode: the MSR is ignored and reads 0.
        l.wrmsr(MSR_TSC_DEADLINE, 5000).unwrap();
        assert_eq!(l.rdmsr(MSR_TSC_DEADLINE), Ok(0));
        l.write(reg::LVT_TIMER, (2 << 17) | 0xec, 0);
        // The initial count register does not start anything in this mode.
        l.write(reg::TIMER_INITIAL, 10, 0);
        assert_eq!(l.timer_deadline(), None);
        l.wrmsr(MSR_TSC_DEADLINE, 5000).unwrap();
        assert_eq!(l.rdmsr(MSR_TSC_DEADLINE), Ok(5000));
        assert_eq!(l.timer_deadline(), Some(5000));
        assert!(!l.poll_timer(4999));
        assert!(l.poll_timer(5000));
        assert_eq!(l.rdmsr(MSR_TSC_DEADLINE), Ok(0));
        assert_eq!(l.acknowledge(), Some(0xec));
        // Writing 0 disarms; a deadline in the past fires at the next poll.
        l.wrmsr(MSR_TSC_DEADLINE, 9000).unwrap();
        l.wrmsr(MSR_TSC_DEADLINE, 0).unwrap();
        assert!(!l.poll_timer(10_000));
        l.wrmsr(MSR_TSC_DEADLINE, 1).unwrap();
        assert!(l.poll_timer(10_000));
        // Leaving the mode disarms.
        l.wrmsr(MSR_TSC_DEADLINE, 20_000).unwrap();
        l.write(reg::LVT_TIMER, 0xec, 10_000);
        assert_eq!(l.timer_deadline(), None);
    }

    #[test]
    fn apic_base_msr() {
        let mut l = enabled();
        assert!(l.wrmsr(MSR_APIC_BASE, 0xfee0_0d00).is_err(), "x2APIC");
        assert_eq!(l.wrmsr(0x10, 0), Err(LapicError::UnknownMsr(0x10)));
        l.wrmsr(MSR_APIC_BASE, 0xfee0_0100).unwrap();
        assert!(!l.hw_enabled());
        assert!(l.extint_enabled(), "a disabled APIC passes the PIC through");
        assert_eq!(l.read(reg::ID, 0), 0);
        l.wrmsr(MSR_APIC_BASE, 0xfee0_0900).unwrap();
        assert_eq!(l.read(reg::SVR, 0), 0xff, "re-enabled in the reset state");
        assert_eq!(l.rdmsr(MSR_APIC_BASE), Ok(0xfee0_0900));
    }

    #[test]
    fn mmio_access_sizes() {
        let mut l = enabled();
        l.write_mmio(0x80, &0x20u32.to_le_bytes(), 0);
        let mut b = [0u8; 1];
        l.read_mmio(0x80, &mut b, 0);
        assert_eq!(b, [0x20]);
        let mut w = [0u8; 4];
        l.read_mmio(0x30, &mut w, 0);
        assert_eq!(u32::from_le_bytes(w), LAPIC_VERSION);
        l.read_mmio(0x34, &mut w, 0);
        assert_eq!(w, [0; 4]);
        l.write_mmio(0x80, &[0x30], 0);
        assert_eq!(l.tpr(), 0x20, "byte writes are dropped");
    }

    #[test]
    fn init_and_sipi_run_states() {
        let mut l = LapicState::new(1);
        assert!(l.sipi(0x9a));
        assert!(!l.sipi(0x10), "a second SIPI is ignored");
        assert_eq!(l.run_state(), RunState::Startup { vector: 0x9a });
        assert_eq!(l.take_startup(), Some(0x9a));
        assert_eq!(l.run_state(), RunState::Running);
        l.set_halted();
        assert_eq!(l.run_state(), RunState::Halted);
        l.write(reg::SVR, 0x1ff, 0);
        l.write(reg::TPR, 0x20, 0);
        l.init();
        assert_eq!(l.run_state(), RunState::WaitForSipi);
        assert_eq!((l.tpr(), l.read(reg::SVR, 0)), (0, 0xff));
        assert_eq!(l.read(reg::ID, 0), 1 << 24);
        l.set_running();
        assert_eq!(l.run_state(), RunState::WaitForSipi);
    }
}
