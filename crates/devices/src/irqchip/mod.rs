//! The interrupt system of the software CPU backend, in user space: one local APIC
//! per vCPU, the IOAPIC, the 8259 pair, the guest clock, and the wake-up primitive
//! that gets a vCPU thread's attention. (On KVM all of this lives in the kernel.)
//! Devices raise interrupts through the same [`IrqLine`] and [`MsiSink`] as on KVM.
//!
//! # Locks
//! Order: any bus device's own lock (PIT, serial...) -> PIC -> IOAPIC -> one LAPIC;
//! a vCPU's `VcpuWake` mutex is taken with no other chip lock held. A LAPIC lock is a
//! leaf: what a LAPIC write sends out (an IPI, an EOI broadcast) leaves after its lock
//! is dropped, and reaching another LAPIC takes one LAPIC lock at a time. The PIC and
//! IOAPIC locks are never held together. The chip never takes a bus device's lock.
//!
//! # The vCPU loop, step by step
//! With `chip: Arc<IrqChip>` and `lapic = chip.lapic(i)`:
//! 1. Between instruction blocks, poll `lapic.wake().attention()` (one atomic load)
//!    and, every block or every few, `lapic.poll_timers()` (one clock read when
//!    nothing is due; fires the LAPIC timer and the PIT when due).
//! 2. On attention, `take_attention()`, then look at the VMM's own requests (pause,
//!    stop), then `lapic.run_state()`: `WaitForSipi` means an INIT arrived — reset
//!    the architectural state to the INIT state and go to step 6; `Startup` means
//!    INIT and SIPI both arrived — reset and start as in step 6.
//! 3. NMI: if `lapic.nmi_pending()` and the CPU is not already in an NMI handler,
//!    `lapic.take_nmi()` and deliver vector 2.
//! 4. Maskable interrupts: at an instruction boundary with RFLAGS.IF = 1 and no
//!    interrupt shadow, `if let Some(v) = lapic.ack_interrupt()` deliver `v` through
//!    the IDT. `ack_interrupt` does the PIC's INTA cycle for ExtINT and moves IRR to
//!    ISR otherwise. `lapic.has_interrupt()` is the lock-free check (two atomics);
//!    check it whenever IF may have become 1 (STI, POPF, IRET), not only on attention.
//! 5. HLT: `lapic.set_halted()`, then
//!    `while !lapic.halt_ends(if_flag) && !vmm_wants_out { lapic.wait(); }`, then
//!    `lapic.set_running()`. `wait` sleeps until a notify or the next timer deadline
//!    (LAPIC or PIT) and polls the timers.
//! 6. Wait for SIPI: `while lapic.run_state() == RunState::WaitForSipi { lapic.wait() }`
//!    (leaving for VMM requests too); then `lapic.take_startup()` gives the vector:
//!    real mode, CS selector = vector << 8, CS base = vector << 12, IP = 0.
//! 7. MMIO to 0xFEE00000..0xFEE00FFF: `lapic.mmio_read/mmio_write(offset, data)`.
//!    RDMSR/WRMSR of IA32_APIC_BASE (0x1B) and IA32_TSC_DEADLINE (0x6E0):
//!    `lapic.rdmsr/wrmsr`; `Err(UnknownMsr)` means "not mine", other errors are #GP.
//!    MOV to/from CR8: `lapic.set_cr8/cr8`. RDTSC: `chip.clock().tsc()`.
//!
//! The VMM kicks a vCPU with `chip.wake(i).notify()` after setting its own flag.

mod clock;
mod delivery;
mod ioapic;
mod lapic;
mod pic;
mod wake;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::{BusDevice, le_value, lock, put_le};
use crate::interrupt::{IrqLine, MsiSink};

pub use clock::{Deadline, GuestClock, TSC_HZ, earliest};
pub use delivery::{DeliveryMode, MSI_ADDRESS_BASE, Message, Shorthand, logical_match};
pub use ioapic::{IOAPIC_PINS, IOAPIC_VERSION, IoApicState};
pub use lapic::{
    APIC_BASE_BSP, APIC_BASE_ENABLE, Effect, LAPIC_VERSION, LapicError, LapicState, MIN_PERIOD_NS,
    MSR_APIC_BASE, MSR_TSC_DEADLINE, RunState, TimerMode, reg,
};
pub use pic::{PicRegs, PicState};
pub use wake::VcpuWake;

/// A timer outside the local APICs (the PIT) that vCPU threads poll, since nothing
/// runs between guest instructions but the vCPU loops.
pub trait PlatformTimer: Send + Sync {
    /// When `poll` next has something to do (guest ns); cheap, called often.
    fn next_event_ns(&self) -> Option<u64>;
    /// Raises whatever is due at `now_ns`.
    fn poll(&self, now_ns: u64);
}

/// ISA IRQ n on IOAPIC pin n: no interrupt source overrides.
pub const IDENTITY_ISA_ROUTING: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IrqChipError {
    #[error("the saved interrupt state has {saved} local APICs, this VM has {vcpus}")]
    VcpuCount { saved: usize, vcpus: usize },
    #[error("the platform timers are already set")]
    TimersAlreadySet,
}

/// The whole interrupt system as plain data, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqChipState {
    /// Guest time when saved: restore with `GuestClock::resume_at(clock_ns)`.
    pub clock_ns: u64,
    pub lapics: Vec<LapicState>,
    pub ioapic: IoApicState,
    pub pic: PicState,
}

/// One local APIC and lock-free mirrors of what other threads ask about it.
struct Lapic {
    state: Mutex<LapicState>,
    wake: Arc<VcpuWake>,
    /// A maskable interrupt is deliverable (IRR above PPR).
    pending: AtomicBool,
    /// LINT0 takes the PIC's INTR (ExtINT unmasked, or the APIC globally disabled).
    extint: AtomicBool,
    nmi: AtomicBool,
    ldr: AtomicU32,
    dfr: AtomicU32,
    timer: Deadline,
}

impl Lapic {
    fn new(index: usize, clock: &GuestClock) -> Self {
        let lapic = Lapic {
            state: Mutex::new(LapicState::new(index)),
            wake: Arc::new(VcpuWake::new(clock.clone())),
            pending: AtomicBool::new(false),
            extint: AtomicBool::new(false),
            nmi: AtomicBool::new(false),
            ldr: AtomicU32::new(0),
            dfr: AtomicU32::new(0),
            timer: Deadline::default(),
        };
        lapic.with(|_| ());
        lapic
    }

    /// Runs `f` on the state under its lock and refreshes the mirrors.
    fn with<R>(&self, f: impl FnOnce(&mut LapicState) -> R) -> R {
        let mut st = lock(&self.state);
        let r = f(&mut st);
        self.pending
            .store(st.deliverable().is_some(), Ordering::Release);
        self.extint.store(st.extint_enabled(), Ordering::Release);
        self.nmi.store(st.nmi_pending(), Ordering::Release);
        self.ldr.store(st.ldr(), Ordering::Release);
        self.dfr.store(st.dfr(), Ordering::Release);
        self.timer.set(st.timer_deadline());
        r
    }
}

/// The VM's interrupt controllers. Shared by every vCPU thread and every device.
pub struct IrqChip {
    clock: GuestClock,
    lapics: Vec<Lapic>,
    ioapic: Mutex<IoApicState>,
    pic: Mutex<PicState>,
    /// The master 8259's INT output.
    pic_output: AtomicBool,
    isa_to_gsi: [u32; 16],
    /// Set once before the vCPUs run: read on every poll without a lock.
    timers: OnceLock<Vec<Arc<dyn PlatformTimer>>>,
}

impl IrqChip {
    /// `vcpus` local APICs (IDs 0..vcpus) with ISA IRQ n wired to IOAPIC pin n.
    pub fn new(vcpus: usize, clock: GuestClock) -> Arc<Self> {
        Self::with_isa_routing(vcpus, clock, IDENTITY_ISA_ROUTING)
    }

    /// As `new`, with ISA IRQ n wired to IOAPIC pin `isa_to_gsi[n]` (what the MADT's
    /// interrupt source overrides say, e.g. IRQ0 -> GSI 2).
    pub fn with_isa_routing(vcpus: usize, clock: GuestClock, isa_to_gsi: [u32; 16]) -> Arc<Self> {
        assert!((1..=255).contains(&vcpus), "1 to 255 vCPUs in xAPIC mode");
        Arc::new(IrqChip {
            lapics: (0..vcpus).map(|i| Lapic::new(i, &clock)).collect(),
            clock,
            ioapic: Mutex::new(IoApicState::new()),
            pic: Mutex::new(PicState::new()),
            pic_output: AtomicBool::new(false),
            isa_to_gsi,
            timers: OnceLock::new(),
        })
    }

    pub fn clock(&self) -> &GuestClock {
        &self.clock
    }

    pub fn vcpu_count(&self) -> usize {
        self.lapics.len()
    }

    /// vCPU `index`'s local APIC, as its vCPU loop (or a test) drives it.
    pub fn lapic(&self, index: usize) -> LapicRef<'_> {
        LapicRef {
            chip: self,
            lapic: &self.lapics[index],
        }
    }

    /// vCPU `index`'s wake-up: the VMM notifies it to bring the vCPU out.
    pub fn wake(&self, index: usize) -> &Arc<VcpuWake> {
        &self.lapics[index].wake
    }

    /// Sets the timers the vCPU loops poll (the PIT), once, before the vCPUs run.
    pub fn set_platform_timers(
        &self,
        timers: Vec<Arc<dyn PlatformTimer>>,
    ) -> Result<(), IrqChipError> {
        self.timers
            .set(timers)
            .map_err(|_| IrqChipError::TimersAlreadySet)
    }

    fn platform_timers(&self) -> &[Arc<dyn PlatformTimer>] {
        self.timers.get().map_or(&[], Vec::as_slice)
    }

    /// The earliest deadline of the platform timers.
    pub fn platform_deadline(&self) -> Option<u64> {
        self.platform_timers()
            .iter()
            .fold(None, |d, t| earliest(d, t.next_event_ns()))
    }

    /// Polls the platform timers that are due at `now`.
    pub fn poll_platform_timers(&self, now: u64) {
        for t in self.platform_timers() {
            if t.next_event_ns().is_some_and(|d| now >= d) {
                t.poll(now);
            }
        }
    }

    /// The line of GSI `gsi`: IOAPIC pin `gsi` and, if an ISA IRQ is routed there,
    /// that PIC input too.
    pub fn irq_line(self: &Arc<Self>, gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(GsiLine {
            chip: self.clone(),
            gsi,
        })
    }

    /// The line of ISA IRQ `irq` (through the routing table).
    pub fn isa_irq_line(self: &Arc<Self>, irq: u8) -> Arc<dyn IrqLine> {
        self.irq_line(self.isa_to_gsi[usize::from(irq & 15)])
    }

    fn gsi_to_isa(&self, gsi: u32) -> Option<u8> {
        (0..16u8).find(|&irq| irq != 2 && self.isa_to_gsi[usize::from(irq)] == gsi)
    }

    /// Drives GSI `gsi` (asserted = high).
    pub fn set_gsi(&self, gsi: u32, asserted: bool) {
        if let Some(irq) = self.gsi_to_isa(gsi) {
            self.with_pic(|p| p.set_irq(irq, asserted));
        }
        if (gsi as usize) < IOAPIC_PINS {
            lock(&self.ioapic).set_level(gsi as usize, asserted, &mut |m| self.deliver(m));
        }
    }

    /// An MSI write of `data` to `address`; false if the address is not 0xFEExxxxx.
    pub fn deliver_msi(&self, address: u64, data: u32) -> bool {
        match Message::from_msi(address, data) {
            Some(m) => {
                self.deliver(&m);
                true
            }
            None => {
                tracing::debug!("MSI to {address:#x} (data {data:#x}) dropped");
                false
            }
        }
    }

    /// Sends `m` to the local APICs it names.
    pub fn deliver(&self, m: &Message) {
        if m.is_init_deassert() {
            return;
        }
        let targets = (0..self.lapics.len()).filter(|&i| self.is_target(i, m));
        match m.mode {
            // Lowest priority: the lowest-numbered APIC of the set will do.
            DeliveryMode::LowestPriority => {
                let first = targets.take(1);
                first.for_each(|i| self.accept_fixed(i, m));
            }
            DeliveryMode::Fixed => targets.for_each(|i| self.accept_fixed(i, m)),
            DeliveryMode::Nmi => targets.for_each(|i| self.event(i, LapicState::set_nmi)),
            DeliveryMode::Init => targets.for_each(|i| self.event(i, LapicState::init)),
            DeliveryMode::Startup => targets.for_each(|i| {
                self.event(i, |s| {
                    s.sipi(m.vector);
                })
            }),
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {
                tracing::debug!("interrupt message {m:?} not supported: dropped");
            }
        }
    }

    fn is_target(&self, i: usize, m: &Message) -> bool {
        match m.shorthand {
            Shorthand::SelfOnly => m.source == Some(i),
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => m.source != Some(i),
            Shorthand::None if m.logical => {
                let l = &self.lapics[i];
                logical_match(
                    l.ldr.load(Ordering::Acquire),
                    l.dfr.load(Ordering::Acquire),
                    m.dest,
                )
            }
            Shorthand::None => m.dest == 0xff || usize::from(m.dest) == i,
        }
    }

    fn accept_fixed(&self, i: usize, m: &Message) {
        let l = &self.lapics[i];
        if l.with(|s| s.accept(m.vector, m.level_triggered)) {
            l.wake.notify();
        }
    }

    fn event(&self, i: usize, f: impl FnOnce(&mut LapicState)) {
        let l = &self.lapics[i];
        l.with(f);
        l.wake.notify();
    }

    fn apply(&self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::EoiLevel(vector) => {
                lock(&self.ioapic).eoi(vector, &mut |m| self.deliver(m));
            }
            Effect::Send(m) => self.deliver(&m),
        }
    }

    /// Runs `f` on the PIC, then publishes its output and wakes the vCPUs taking it.
    fn with_pic<R>(&self, f: impl FnOnce(&mut PicState) -> R) -> R {
        let mut pic = lock(&self.pic);
        let r = f(&mut pic);
        let out = pic.output();
        self.pic_output.store(out, Ordering::Release);
        drop(pic);
        if out {
            for l in self
                .lapics
                .iter()
                .filter(|l| l.extint.load(Ordering::Acquire))
            {
                l.wake.notify();
            }
        }
        r
    }

    /// An NMI for vCPU `index` from outside (the VMM, a watchdog).
    pub fn inject_nmi(&self, index: usize) {
        self.event(index, LapicState::set_nmi);
    }

    /// Whether the PIC's INT output is raised.
    pub fn pic_output(&self) -> bool {
        self.pic_output.load(Ordering::Acquire)
    }

    pub fn ioapic_state(&self) -> IoApicState {
        lock(&self.ioapic).clone()
    }

    pub fn pic_state(&self) -> PicState {
        lock(&self.pic).clone()
    }

    pub fn save(&self) -> IrqChipState {
        IrqChipState {
            clock_ns: self.clock.now_ns(),
            pic: self.pic_state(),
            ioapic: self.ioapic_state(),
            lapics: self.lapics.iter().map(|l| lock(&l.state).clone()).collect(),
        }
    }

    /// Loads a saved state (into a chip with as many vCPUs, built on a clock that
    /// resumes at `state.clock_ns`).
    pub fn restore(&self, state: &IrqChipState) -> Result<(), IrqChipError> {
        if state.lapics.len() != self.lapics.len() {
            return Err(IrqChipError::VcpuCount {
                saved: state.lapics.len(),
                vcpus: self.lapics.len(),
            });
        }
        self.with_pic(|p| *p = state.pic.clone());
        *lock(&self.ioapic) = state.ioapic.clone();
        for (l, s) in self.lapics.iter().zip(&state.lapics) {
            l.with(|st| *st = s.clone());
            l.wake.notify();
        }
        Ok(())
    }
}

impl MsiSink for IrqChip {
    fn send(&self, address: u64, data: u32) -> io::Result<()> {
        if self.deliver_msi(address, data) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI address {address:#x} is not in the local APIC window"),
            ))
        }
    }
}

/// A vCPU's local APIC, as its vCPU loop drives it.
#[derive(Clone, Copy)]
pub struct LapicRef<'a> {
    chip: &'a IrqChip,
    lapic: &'a Lapic,
}

impl LapicRef<'_> {
    pub fn wake(&self) -> &VcpuWake {
        &self.lapic.wake
    }

    /// A copy of the registers (debugging, tests).
    pub fn state(&self) -> LapicState {
        lock(&self.lapic.state).clone()
    }

    /// A read of the xAPIC page at `offset` (0..0x1000).
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let now = self.chip.clock.now_ns();
        lock(&self.lapic.state).read_mmio(offset, data, now);
    }

    /// A write to the xAPIC page; IPIs and EOI broadcasts go out before it returns.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let now = self.chip.clock.now_ns();
        let effect = self.lapic.with(|s| s.write_mmio(offset, data, now));
        self.chip.apply(effect);
    }

    /// A register read by offset (the 32-bit view of `mmio_read`).
    pub fn read_register(&self, offset: u32) -> u32 {
        let now = self.chip.clock.now_ns();
        lock(&self.lapic.state).read(offset, now)
    }

    /// A register write by offset (the 32-bit view of `mmio_write`).
    pub fn write_register(&self, offset: u32, value: u32) {
        self.mmio_write(u64::from(offset), &value.to_le_bytes());
    }

    /// IA32_APIC_BASE or IA32_TSC_DEADLINE; `UnknownMsr` for any other.
    pub fn rdmsr(&self, msr: u32) -> Result<u64, LapicError> {
        lock(&self.lapic.state).rdmsr(msr)
    }

    /// Writes IA32_APIC_BASE or IA32_TSC_DEADLINE; an error other than `UnknownMsr`
    /// is a #GP for the guest.
    pub fn wrmsr(&self, msr: u32, value: u64) -> Result<(), LapicError> {
        self.lapic.with(|s| s.wrmsr(msr, value))
    }

    /// CR8 is TPR bits 7:4.
    pub fn cr8(&self) -> u64 {
        u64::from(lock(&self.lapic.state).tpr() >> 4)
    }

    pub fn set_cr8(&self, value: u64) {
        self.lapic.with(|s| s.set_tpr(((value & 0xf) << 4) as u32));
    }

    /// Lock-free: is there a maskable interrupt the CPU would take with IF = 1?
    pub fn has_interrupt(&self) -> bool {
        self.lapic.pending.load(Ordering::Acquire)
            || (self.lapic.extint.load(Ordering::Acquire) && self.chip.pic_output())
    }

    /// Acknowledges the interrupt the CPU takes now: the PIC's INTA for ExtINT, else
    /// the highest deliverable IRR moves to the ISR. None if nothing is deliverable.
    pub fn ack_interrupt(&self) -> Option<u8> {
        if self.lapic.extint.load(Ordering::Acquire) && self.chip.pic_output() {
            return Some(self.chip.with_pic(PicState::inta));
        }
        self.lapic.with(LapicState::acknowledge)
    }

    pub fn nmi_pending(&self) -> bool {
        self.lapic.nmi.load(Ordering::Acquire)
    }

    /// Takes a pending NMI (the caller delivers vector 2).
    pub fn take_nmi(&self) -> bool {
        self.nmi_pending() && self.lapic.with(LapicState::take_nmi)
    }

    pub fn run_state(&self) -> RunState {
        lock(&self.lapic.state).run_state()
    }

    pub fn set_halted(&self) {
        self.lapic.with(LapicState::set_halted);
    }

    pub fn set_running(&self) {
        self.lapic.with(LapicState::set_running);
    }

    /// After a SIPI: the start vector (CS = vector << 8, IP = 0), and the state is
    /// Running from now on.
    pub fn take_startup(&self) -> Option<u8> {
        self.lapic.with(LapicState::take_startup)
    }

    /// When the LAPIC timer next expires (guest ns).
    pub fn timer_deadline(&self) -> Option<u64> {
        self.lapic.timer.get()
    }

    /// The earliest of this LAPIC's timer and the platform timers.
    pub fn next_deadline(&self) -> Option<u64> {
        earliest(self.timer_deadline(), self.chip.platform_deadline())
    }

    /// Fires this LAPIC's timer and the platform timers if due; returns the time used.
    pub fn poll_timers(&self) -> u64 {
        let now = self.chip.clock.now_ns();
        if self.lapic.timer.due(now) && self.lapic.with(|s| s.poll_timer(now)) {
            self.lapic.wake.notify();
        }
        self.chip.poll_platform_timers(now);
        now
    }

    /// Whether HLT ends: an interrupt the CPU would take (with `interrupts_enabled`),
    /// an NMI, or an INIT/SIPI.
    pub fn halt_ends(&self, interrupts_enabled: bool) -> bool {
        (interrupts_enabled && self.has_interrupt())
            || self.nmi_pending()
            || !matches!(self.run_state(), RunState::Running | RunState::Halted)
    }

    /// Sleeps until a notify or the next timer deadline, then polls the timers.
    /// Returns true if woken by a notify.
    pub fn wait(&self) -> bool {
        let woken = self.lapic.wake.wait_until(self.next_deadline());
        self.poll_timers();
        woken
    }
}

/// One GSI as devices see it.
struct GsiLine {
    chip: Arc<IrqChip>,
    gsi: u32,
}

impl IrqLine for GsiLine {
    fn trigger(&self) -> io::Result<()> {
        self.chip.set_gsi(self.gsi, true);
        self.chip.set_gsi(self.gsi, false);
        Ok(())
    }

    fn set_level(&self, high: bool) -> io::Result<()> {
        self.chip.set_gsi(self.gsi, high);
        Ok(())
    }
}

/// The IOAPIC's MMIO page: register it at `arch::layout::IOAPIC_START`, length
/// `arch::layout::IOAPIC_SIZE`.
pub struct IoApicMmio(Arc<IrqChip>);

impl IoApicMmio {
    pub fn new(chip: Arc<IrqChip>) -> Self {
        IoApicMmio(chip)
    }
}

impl BusDevice for IoApicMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = lock(&self.0.ioapic).read(offset & !3);
        put_le(data, u64::from(value) >> (8 * (offset & 3)));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 {
            return;
        }
        let value = le_value(data) as u32;
        let chip = &self.0;
        lock(&chip.ioapic).write(offset, value, &mut |m| chip.deliver(m));
    }
}

/// Which 8259 port pair a [`PicPorts`] window is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PicPort {
    /// 0x20-0x21
    Master,
    /// 0xA0-0xA1
    Slave,
    /// 0x4D0-0x4D1
    Elcr,
}

/// One of the PIC's three port windows, each two ports long: register `Master` at
/// 0x20, `Slave` at 0xA0 and `Elcr` at [`ELCR_PORT`], length 2 each.
pub struct PicPorts {
    chip: Arc<IrqChip>,
    port: PicPort,
}

/// The ELCR ports.
pub const ELCR_PORT: u16 = 0x4d0;

impl PicPorts {
    pub fn new(chip: Arc<IrqChip>, port: PicPort) -> Self {
        PicPorts { chip, port }
    }
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *d = self.chip.with_pic(|p| match self.port {
                PicPort::Master => p.read(0, at),
                PicPort::Slave => p.read(1, at),
                PicPort::Elcr => p.read_elcr((at & 1) as usize),
            });
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i as u64;
            self.chip.with_pic(|p| match self.port {
                PicPort::Master => p.write(0, at, v),
                PicPort::Slave => p.write(1, at, v),
                PicPort::Elcr => p.write_elcr((at & 1) as usize, v),
            });
        }
    }
}
