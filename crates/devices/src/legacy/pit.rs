//! The 8254 programmable interval timer at ports 0x40-0x43, and port 0x61 (NMI status
//! and control: channel 2's gate, the speaker, the refresh toggle, OUT2), for the
//! software CPU backend (KVM has its own). Counters run at 1.193182 MHz of guest time.
//! Channel 0's OUT drives IRQ0: nothing runs between guest instructions, so the vCPU
//! loops call `poll` (through [`PitTimer`]) and each elapsed period raises one edge
//! (periods that passed unseen are coalesced into one).
//!
//! Modes 0-5 count; IRQ0 follows modes 0, 2, 3 and 4 (1 and 5 need a gate edge, which
//! channel 0 never sees). BCD counting is not supported (binary is used, and logged).

use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, lock};
use crate::interrupt::IrqLine;
use crate::irqchip::{Deadline, GuestClock, PlatformTimer};

pub const PIT_HZ: u64 = 1_193_182;
/// Where `Pit` (length 4) and `PitPort61` (length 1) sit on the port bus.
pub const PIT_PORTS: u16 = 0x40;
pub const PORT61: u16 = 0x61;
const NS_PER_S: u128 = 1_000_000_000;
/// The DRAM refresh request toggles bit 4 of port 0x61 every 15.085 µs.
const REFRESH_NS: u64 = 15_085;

const PORT61_GATE2: u8 = 1 << 0;
const PORT61_WRITABLE: u8 = 0x0f;
const PORT61_REFRESH: u8 = 1 << 4;
const PORT61_OUT2: u8 = 1 << 5;

/// Read/write flip-flop states (as the access mode names them).
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

fn ticks_between(start_ns: u64, now_ns: u64) -> u64 {
    (u128::from(now_ns.saturating_sub(start_ns)) * u128::from(PIT_HZ) / NS_PER_S) as u64
}

fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * NS_PER_S).div_ceil(u128::from(PIT_HZ)) as u64
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Channel {
    mode: u8,
    /// Access mode: 1 LSB, 2 MSB, 3 LSB then MSB.
    rw: u8,
    bcd: bool,
    /// The count, 1..=0x10000 (a written 0 is 0x10000).
    reload: u64,
    /// A count was written since the control word.
    loaded: bool,
    gate: bool,
    /// Ticks counted before `run_start` (gate pauses), and since it if counting.
    base_ticks: u64,
    run_start: Option<u64>,
    /// OUT rising edges already signalled on IRQ0 (channel 0).
    events: u64,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    /// Latched count still to be read (a read state), or 0.
    count_latched: u8,
    latched_count: u16,
    status_latched: Option<u8>,
    null_count: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            rw: RW_WORD0,
            bcd: false,
            reload: 0x10000,
            loaded: false,
            gate,
            base_ticks: 0,
            run_start: None,
            events: 0,
            read_state: RW_WORD0,
            write_state: RW_WORD0,
            write_latch: 0,
            count_latched: 0,
            latched_count: 0,
            status_latched: None,
            null_count: true,
        }
    }

    fn ticks(&self, now: u64) -> u64 {
        self.base_ticks + self.run_start.map_or(0, |s| ticks_between(s, now))
    }

    fn count(&self, now: u64) -> u16 {
        let n = self.reload;
        if !self.loaded {
            return n as u16;
        }
        let t = self.ticks(now);
        (match self.mode {
            2 => n - t % n,
            3 => (n - (2 * t) % n) & 0xfffe,
            _ => n.wrapping_sub(t),
        }) as u16
    }

    fn out(&self, now: u64) -> bool {
        if !self.loaded {
            return self.mode != 0;
        }
        let (t, n) = (self.ticks(now), self.reload);
        match self.mode {
            0 => t >= n,
            1 => self.run_start.is_none() || t >= n,
            2 => !self.gate || t % n != n - 1,
            3 => !self.gate || t % n < n.div_ceil(2),
            _ => t != n,
        }
    }

    /// OUT rising edges after `t` ticks: once for the one-shot modes, each period for
    /// the rate generator and the square wave.
    fn edges(&self, t: u64) -> u64 {
        match self.mode {
            2 | 3 => t / self.reload,
            _ => u64::from(t >= self.reload),
        }
    }

    /// The tick of the `k`-th edge (1-based).
    fn edge_tick(&self, k: u64) -> Option<u64> {
        match self.mode {
            2 | 3 => Some(k * self.reload),
            _ => (k == 1).then_some(self.reload),
        }
    }

    fn next_edge_ns(&self) -> Option<u64> {
        let start = self.run_start.filter(|_| self.loaded)?;
        let tick = self.edge_tick(self.events + 1)?;
        Some(start + ticks_to_ns(tick.saturating_sub(self.base_ticks)))
    }

    fn status(&self, now: u64) -> u8 {
        u8::from(self.out(now)) << 7
            | u8::from(self.null_count) << 6
            | self.rw << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now: u64) {
        if self.count_latched == 0 {
            self.latched_count = self.count(now);
            self.count_latched = if self.rw == 3 { RW_WORD0 } else { self.rw };
        }
    }

    fn control(&mut self, value: u8) {
        self.rw = (value >> 4) & 3;
        self.read_state = if self.rw == 3 { RW_WORD0 } else { self.rw };
        self.write_state = self.read_state;
        self.mode = match (value >> 1) & 7 {
            m @ 6..=7 => m - 4,
            m => m,
        };
        self.bcd = value & 1 != 0;
        if self.bcd {
            crate::guest_warn!("8254: BCD counting not supported, counting in binary");
        }
        self.loaded = false;
        self.run_start = None;
        self.base_ticks = 0;
        self.events = 0;
        self.null_count = true;
    }

    fn load(&mut self, value: u16, now: u64) {
        self.reload = if value == 0 {
            0x10000
        } else {
            u64::from(value)
        };
        self.loaded = true;
        self.null_count = false;
        self.base_ticks = 0;
        self.events = 0;
        // Modes 1 and 5 wait for a gate edge.
        self.run_start = (self.gate && !matches!(self.mode, 1 | 5)).then_some(now);
    }

    fn write(&mut self, value: u8, now: u64) {
        match self.write_state {
            RW_LSB => self.load(u16::from(value), now),
            RW_MSB => self.load(u16::from(value) << 8, now),
            RW_WORD0 => {
                self.write_latch = value;
                self.write_state = RW_WORD1;
            }
            _ => {
                self.load(u16::from(self.write_latch) | u16::from(value) << 8, now);
                self.write_state = RW_WORD0;
            }
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(status) = self.status_latched.take() {
            return status;
        }
        if self.count_latched != 0 {
            let [lo, hi] = self.latched_count.to_le_bytes();
            let (value, next) = match self.count_latched {
                RW_LSB => (lo, 0),
                RW_MSB => (hi, 0),
                _ => (lo, RW_MSB),
            };
            self.count_latched = next;
            return value;
        }
        let [lo, hi] = self.count(now).to_le_bytes();
        match self.read_state {
            RW_LSB => lo,
            RW_MSB => hi,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                lo
            }
            _ => {
                self.read_state = RW_WORD0;
                hi
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        if !gate {
            if matches!(self.mode, 0 | 2 | 3 | 4) {
                self.base_ticks = self.ticks(now);
                self.run_start = None;
            }
        } else if self.loaded {
            if !matches!(self.mode, 0 | 4) {
                // A rising gate restarts modes 1, 2, 3 and 5 from the reload value.
                self.base_ticks = 0;
                self.events = 0;
            }
            self.run_start = Some(now);
        }
        self.gate = gate;
    }
}

/// One PIT channel as KVM's `kvm_pit_channel_state` names it: how the PIT moves to
/// another backend (the count restarts from its reload value there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitChannelRegs {
    /// The reload value (0 means 0x10000).
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: Option<u8>,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: bool,
    pub gate: bool,
}

impl PitState {
    pub fn registers(&self) -> [PitChannelRegs; 3] {
        self.channels.clone().map(|c| PitChannelRegs {
            count: (c.reload & 0xffff) as u32,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
        })
    }

    /// Channels counting from their reload values at guest time `now`.
    pub fn from_registers(regs: &[PitChannelRegs; 3], now: u64) -> Self {
        PitState {
            channels: regs.map(|r| {
                let mut c = Channel::new(r.gate);
                c.mode = r.mode.min(5);
                c.rw = r.rw_mode & 3;
                c.bcd = r.bcd;
                c.reload = if r.count == 0 {
                    0x10000
                } else {
                    u64::from(r.count & 0xffff).max(1)
                };
                c.loaded = r.count != 0;
                c.null_count = false;
                c.run_start = (r.gate || c.mode == 0 || c.mode == 4).then_some(now);
                c.read_state = r.read_state & 3;
                c.write_state = r.write_state & 3;
                c.write_latch = r.write_latch;
                c.count_latched = r.count_latched & 3;
                c.latched_count = r.latched_count;
                c.status_latched = r.status_latched;
                c
            }),
            port61: 0,
        }
    }
}

/// The PIT as plain data, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    channels: [Channel; 3],
    port61: u8,
}

pub struct Pit {
    state: PitState,
    irq0: Arc<dyn IrqLine>,
    clock: GuestClock,
    deadline: Arc<Deadline>,
}

impl Pit {
    /// A PIT whose channel 0 drives `irq0` (the ISA IRQ0 line).
    pub fn new(irq0: Arc<dyn IrqLine>, clock: GuestClock) -> Self {
        Pit {
            state: PitState {
                // Channels 0 and 1 have their gates tied high; channel 2's is port 0x61 bit 0.
                channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
                port61: 0,
            },
            irq0,
            clock,
            deadline: Arc::new(Deadline::default()),
        }
    }

    /// Ports 0x40-0x43 (`offset` 0-3).
    pub fn read_port(&mut self, offset: u64) -> u8 {
        let now = self.clock.now_ns();
        match offset {
            0..=2 => self.state.channels[offset as usize].read(now),
            _ => 0xff,
        }
    }

    pub fn write_port(&mut self, offset: u64, value: u8) {
        let now = self.clock.now_ns();
        match offset {
            0..=2 => self.state.channels[offset as usize].write(value, now),
            _ => self.write_control(value, now),
        }
        self.update_deadline();
    }

    fn write_control(&mut self, value: u8, now: u64) {
        let select = value >> 6;
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for (i, ch) in self.state.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x20 == 0 {
                    ch.latch_count(now);
                }
                if value & 0x10 == 0 && ch.status_latched.is_none() {
                    ch.status_latched = Some(ch.status(now));
                }
            }
            return;
        }
        let ch = &mut self.state.channels[usize::from(select)];
        if (value >> 4) & 3 == 0 {
            ch.latch_count(now);
        } else {
            ch.control(value);
        }
    }

    /// Port 0x61.
    pub fn read_port61(&self) -> u8 {
        let now = self.clock.now_ns();
        let refresh = if (now / REFRESH_NS) & 1 != 0 {
            PORT61_REFRESH
        } else {
            0
        };
        let out2 = if self.state.channels[2].out(now) {
            PORT61_OUT2
        } else {
            0
        };
        (self.state.port61 & PORT61_WRITABLE) | refresh | out2
    }

    pub fn write_port61(&mut self, value: u8) {
        let now = self.clock.now_ns();
        self.state.port61 = value & PORT61_WRITABLE;
        self.state.channels[2].set_gate(value & PORT61_GATE2 != 0, now);
    }

    /// Raises IRQ0 if channel 0's OUT rose since the last poll (once however many times).
    pub fn poll(&mut self, now: u64) {
        let ch = &mut self.state.channels[0];
        if ch.loaded && ch.run_start.is_some() {
            let edges = ch.edges(ch.ticks(now));
            if edges > ch.events {
                ch.events = edges;
                if let Err(e) = self.irq0.trigger() {
                    tracing::warn!("PIT IRQ0: {e}");
                }
            }
        }
        self.update_deadline();
    }

    /// When channel 0's OUT next rises (guest ns).
    pub fn next_event_ns(&self) -> Option<u64> {
        self.state.channels[0].next_edge_ns()
    }

    fn update_deadline(&self) {
        self.deadline.set(self.next_event_ns());
    }

    pub fn save(&self) -> PitState {
        self.state.clone()
    }

    pub fn restore(&mut self, state: &PitState) {
        self.state = state.clone();
        self.update_deadline();
    }
}

/// Register at port 0x40, length 4.
impl BusDevice for Pit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.read_port(offset + i as u64);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            self.write_port(offset + i as u64, v);
        }
    }
}

/// Port 0x61 (length 1) of a shared PIT.
pub struct PitPort61(Arc<Mutex<Pit>>);

impl PitPort61 {
    pub fn new(pit: Arc<Mutex<Pit>>) -> Self {
        PitPort61(pit)
    }
}

impl BusDevice for PitPort61 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let value = lock(&self.0).read_port61();
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            lock(&self.0).write_port61(v);
        }
    }
}

/// The PIT as a platform timer the vCPU loops poll (`IrqChip::set_platform_timers`):
/// its deadline is read without the PIT's lock. It does not keep the PIT alive (its
/// port windows do): the chip holds its timers and the PIT's IRQ0 line holds the chip,
/// so a strong reference here would be a cycle, and every VM would leak both.
pub struct PitTimer {
    pit: Weak<Mutex<Pit>>,
    deadline: Arc<Deadline>,
}

impl PitTimer {
    pub fn new(pit: Arc<Mutex<Pit>>) -> Arc<Self> {
        let deadline = lock(&pit).deadline.clone();
        Arc::new(PitTimer {
            pit: Arc::downgrade(&pit),
            deadline,
        })
    }
}

impl PlatformTimer for PitTimer {
    fn next_event_ns(&self) -> Option<u64> {
        self.deadline.get()
    }

    fn poll(&self, now_ns: u64) {
        if let Some(pit) = self.pit.upgrade() {
            lock(&pit).poll(now_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Edges(AtomicUsize);

    impl IrqLine for Edges {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, _high: bool) -> io::Result<()> {
            Ok(())
        }
    }

    fn pit() -> (Pit, Arc<Edges>, GuestClock) {
        let edges = Arc::new(Edges::default());
        let clock = GuestClock::manual();
        (Pit::new(edges.clone(), clock.clone()), edges, clock)
    }

    fn edges(e: &Edges) -> usize {
        e.0.load(Ordering::SeqCst)
    }

    /// Linux's i8253 clockevent at HZ=250: LATCH = 4773.
    const LATCH: u16 = 4773;

    #[test]
    fn mode2_periodic_irq0_as_linux_programs_it() {
        let (mut p, e, clock) = pit();
        p.write_port(3, 0x34);
        p.write_port(0, LATCH as u8);
        p.write_port(0, (LATCH >> 8) as u8);
        let period = ticks_to_ns(u64::from(LATCH));
        assert!((4_000_000..4_001_000).contains(&period));
        assert_eq!(p.next_event_ns(), Some(period));
        p.poll(period - 1);
        assert_eq!(edges(&e), 0);
        p.poll(period);
        assert_eq!(edges(&e), 1);
        assert_eq!(p.next_event_ns(), Some(ticks_to_ns(2 * u64::from(LATCH))));
        // Ten periods late: one edge, and the next one stays on the period grid.
        p.poll(period * 12 + 10);
        assert_eq!(edges(&e), 2);
        assert_eq!(p.next_event_ns(), Some(ticks_to_ns(13 * u64::from(LATCH))));
        // The count runs down within the period.
        clock.set(ticks_to_ns(u64::from(LATCH) * 20 + 1000));
        p.write_port(3, 0x00);
        let count = u16::from(p.read_port(0)) | u16::from(p.read_port(0)) << 8;
        assert_eq!(count, LATCH - 1000);
    }

    #[test]
    fn mode3_square_wave_fires_each_period() {
        let (mut p, e, _clock) = pit();
        p.write_port(3, 0x36);
        p.write_port(0, 0x00);
        p.write_port(0, 0x10); // 4096 ticks
        let period = ticks_to_ns(4096);
        for k in 1..=3 {
            p.poll(period * k);
        }
        assert_eq!(edges(&e), 3);
    }

    #[test]
    fn mode0_fires_once_at_terminal_count() {
        let (mut p, e, _clock) = pit();
        // Linux's pit_shutdown: mode 0, count 0 (65536).
        p.write_port(3, 0x30);
        p.write_port(0, 0);
        p.write_port(0, 0);
        let at = ticks_to_ns(0x10000);
        assert_eq!(p.next_event_ns(), Some(at));
        p.poll(at);
        p.poll(at * 3);
        assert_eq!(edges(&e), 1);
        assert_eq!(p.next_event_ns(), None);
    }

    #[test]
    fn latch_freezes_the_count_until_read() {
        let (mut p, _e, clock) = pit();
        p.write_port(3, 0x34);
        p.write_port(0, 0xff);
        p.write_port(0, 0xff);
        clock.set(ticks_to_ns(0x100));
        p.write_port(3, 0x00);
        clock.set(ticks_to_ns(0x300));
        assert_eq!(p.read_port(0), 0xff);
        clock.set(ticks_to_ns(0x500));
        assert_eq!(p.read_port(0), 0xfe, "latched 0xfeff");
        // Live again: lobyte then hibyte of the current count.
        assert_eq!(p.read_port(0), 0xff);
        assert_eq!(p.read_port(0), 0xfa);
    }

    #[test]
    fn read_back_status_then_count() {
        let (mut p, _e, clock) = pit();
        p.write_port(3, 0xb0); // channel 2, lo/hi, mode 0
        p.write_port(2, 0x34);
        p.write_port(2, 0x12);
        // Gate low: mode 0 holds its count.
        clock.set(1_000_000);
        p.write_port(3, 0xc8); // read-back count and status of channel 2
        assert_eq!(p.read_port(2), 0x30, "OUT low, count loaded, lo/hi, mode 0");
        assert_eq!(p.read_port(2), 0x34);
        assert_eq!(p.read_port(2), 0x12);
        // Status only, after a control word: null count set.
        p.write_port(3, 0xb6);
        p.write_port(3, 0xe8);
        assert_eq!(p.read_port(2), 0xf6, "OUT high, null count, lo/hi, mode 3");
    }

    #[test]
    fn channel2_gate_and_out2_as_pit_calibrate_tsc_polls_them() {
        let (mut p, e, clock) = pit();
        // outb((inb(0x61) & ~0x02) | 0x01, 0x61): gate high, speaker off.
        let v = (p.read_port61() & !0x02) | 0x01;
        p.write_port61(v);
        // Mode 0, 10 ms.
        let latch = (PIT_HZ / 100) as u16;
        p.write_port(3, 0xb0);
        p.write_port(2, latch as u8);
        p.write_port(2, (latch >> 8) as u8);
        assert_eq!(p.read_port61() & PORT61_OUT2, 0);
        clock.set(9_990_000);
        assert_eq!(p.read_port61() & PORT61_OUT2, 0);
        clock.set(10_000_000);
        assert_ne!(p.read_port61() & PORT61_OUT2, 0);
        assert_eq!(p.read_port61() & 0x0f, 0x01);
        assert_eq!(edges(&e), 0, "channel 2 does not drive IRQ0");
        // quick_pit_calibrate: count from 0xffff, the MSB read live goes down.
        p.write_port(3, 0xb0);
        p.write_port(2, 0xff);
        p.write_port(2, 0xff);
        let msb = |p: &mut Pit| {
            p.read_port(2);
            p.read_port(2)
        };
        assert_eq!(msb(&mut p), 0xff);
        clock.advance(ticks_to_ns(256 * 3));
        assert_eq!(msb(&mut p), 0xfc);
        // Gate low pauses mode 0.
        p.write_port61(0);
        clock.advance(ticks_to_ns(256 * 10));
        assert_eq!(msb(&mut p), 0xfc);
        p.write_port61(1);
        clock.advance(ticks_to_ns(256));
        assert_eq!(msb(&mut p), 0xfb);
    }

    #[test]
    fn refresh_bit_toggles() {
        let (p, _e, clock) = pit();
        let a = p.read_port61() & PORT61_REFRESH;
        clock.advance(REFRESH_NS);
        assert_ne!(p.read_port61() & PORT61_REFRESH, a);
    }

    #[test]
    fn pit_timer_drives_irq0_through_the_irqchip() {
        use crate::irqchip::{IrqChip, reg};
        let clock = GuestClock::manual();
        let chip = IrqChip::new(1, clock.clone());
        let pit = Arc::new(Mutex::new(Pit::new(chip.isa_irq_line(0), clock.clone())));
        chip.set_platform_timers(vec![PitTimer::new(pit.clone())])
            .unwrap();
        let l = chip.lapic(0);
        l.write_register(reg::SVR, 0x1ff);
        l.write_register(reg::DFR, 0xffff_ffff);
        l.write_register(reg::LDR, 1 << 24);
        let mut io = crate::irqchip::IoApicMmio::new(chip.clone());
        io.write(0, &0x10u32.to_le_bytes());
        io.write(0x10, &0x0830u32.to_le_bytes()); // pin 0: vector 0x30, logical
        io.write(0, &0x11u32.to_le_bytes());
        io.write(0x10, &0x0100_0000u32.to_le_bytes());
        {
            let mut p = lock(&pit);
            p.write(3, &[0x34]);
            p.write(0, &[LATCH as u8]);
            p.write(0, &[(LATCH >> 8) as u8]);
        }
        let period = ticks_to_ns(u64::from(LATCH));
        assert_eq!(l.next_deadline(), Some(period));
        clock.set(period);
        l.poll_timers();
        assert_eq!(l.ack_interrupt(), Some(0x30));
        l.write_register(reg::EOI, 0);
        clock.set(period * 2);
        l.poll_timers();
        assert_eq!(l.ack_interrupt(), Some(0x30));
        let mut port61 = PitPort61::new(pit);
        let mut d = [0u8];
        port61.write(0, &[1]);
        port61.read(0, &mut d);
        assert_eq!(d[0] & 1, 1);
    }

    /// Wired as the software CPU's builder wires them (IRQ0 holds the chip, the chip
    /// its timers), chip and PIT go when their owners do; the fuzzer's leak check
    /// found them kept alive by each other.
    #[test]
    fn chip_and_pit_are_freed_with_their_owners() {
        use crate::irqchip::IrqChip;
        let clock = GuestClock::manual();
        let chip = IrqChip::new(2, clock.clone());
        let pit = Arc::new(Mutex::new(Pit::new(chip.isa_irq_line(0), clock)));
        chip.set_platform_timers(vec![PitTimer::new(pit.clone())])
            .unwrap();
        let (c, p) = (Arc::downgrade(&chip), Arc::downgrade(&pit));
        drop((chip, pit));
        assert!(c.upgrade().is_none(), "the chip outlived its owners");
        assert!(p.upgrade().is_none(), "the PIT outlived its owners");
    }
}
