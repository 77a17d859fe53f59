//! The PC legacy devices on the port bus as vessel's builder lays them out: COM1
//! (16550A), the keyboard controller's ports, the CMOS RTC, the ACPI PM1 and timer
//! block, the boot timer, the PIT and port 0x61, on a guest clock the input moves.
//!
//! Checked against small models: COM1 prints exactly the bytes written to its
//! transmit register outside DLAB and loopback; the keyboard controller resets the
//! machine once per 0xFE command and for nothing else; ACPI powers off once per
//! SLP_EN write with the S5 sleep type and for nothing else, its SCI level is
//! (status & enable) for the power button and timer bits, and its PM timer never goes
//! back; the CMOS index port reads back what was written, and a valid seconds or
//! minutes value written reads back while the clock stands still; every boot timer
//! write is one mark; after a poll the PIT's next deadline is later than the poll;
//! every device's state survives a save and a restore, and the PIT's KVM register
//! form converts back without trouble.
//!
//! Input: operations, each a byte (bits 0-2 kind, bits 4-5 access width 1/2/4/8)
//! and its fields: 0 read (port index, see [`PORTS`]), 1 write (port index, value),
//! 2 the clock moves (ns u32) and the PIT is polled, 3 host input on COM1 (count,
//! bytes), 4 the power button, 5 save and restore everything.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::acpi::SLEEP_TYPE_S5;
use arch::layout::ports;
use devices::acpi_pm::{AcpiPm, WINDOW_LEN};
use devices::interrupt::IrqLine;
use devices::irqchip::GuestClock;
use devices::legacy::pit::{Pit, PitPort61, PitState};
use devices::legacy::{BootTimer, Cmos, I8042, Serial};
use devices::{Bus, GuestRequest};

use crate::ops::{Ops, Program, access_len};

/// The ports an operation picks from: every port of every window, and 0x80 (nothing).
pub const PORTS: [u16; 31] = [
    0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, // COM1
    0x60, 0x64, // i8042
    0x70, 0x71, // CMOS
    0x600, 0x601, 0x602, 0x603, 0x604, 0x605, 0x606, 0x607, 0x608, 0x609, 0x60a, 0x60b, // PM
    0x40, 0x41, 0x42, 0x43, 0x61,  // PIT
    0x440, // boot timer
    0x80,
];
/// 2026-11-21 07:05:09 UTC: the host's time when the guest clock reads 0.
const EPOCH: i64 = 1_795_244_709;
const CMOS_SECONDS: u8 = 0;
const CMOS_MINUTES: u8 = 2;
const CMOS_STATUS_B: u8 = 0x0b;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Line {
    high: AtomicBool,
    edges: AtomicUsize,
}

impl IrqLine for Line {
    fn trigger(&self) -> std::io::Result<()> {
        self.edges.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        self.high.store(high, Ordering::Relaxed);
        Ok(())
    }
}

/// What the models expect.
#[derive(Default)]
struct Expected {
    output: Vec<u8>,
    line_control: u8,
    modem_control: u8,
    resets: usize,
    power_offs: usize,
    cmos_index: u8,
    /// SECONDS and MINUTES as last written, while the clock stands still.
    cmos_time: [Option<u8>; 2],
    cmos_binary: bool,
    boot_marks: usize,
    pm_timer: Option<u32>,
}

struct Platform {
    io: Bus,
    clock: GuestClock,
    serial: Arc<Mutex<Serial>>,
    cmos: Arc<Mutex<Cmos>>,
    pm: Arc<Mutex<AcpiPm>>,
    pit: Arc<Mutex<Pit>>,
    output: Capture,
    sci: Arc<Line>,
    requests: Arc<Mutex<Vec<GuestRequest>>>,
    marks: Arc<Mutex<Vec<devices::legacy::boot_timer::BootMark>>>,
    expected: Expected,
}

impl Platform {
    fn new() -> Self {
        let clock = GuestClock::manual();
        let output = Capture::default();
        let requests: Arc<Mutex<Vec<GuestRequest>>> = Arc::default();
        let log = requests.clone();
        let sink: devices::RequestSink = Arc::new(move |r| log.lock().expect("requests").push(r));
        let serial = Arc::new(Mutex::new(Serial::new(
            Arc::new(Line::default()),
            Box::new(output.clone()),
        )));
        let (kbd_data, kbd_cmd) = I8042::ports(sink.clone());
        let cmos_clock = clock.clone();
        let cmos = Arc::new(Mutex::new(Cmos::with_clock(Box::new(move || {
            EPOCH + (cmos_clock.now_ns() / 1_000_000_000) as i64
        }))));
        let sci = Arc::new(Line::default());
        let pm = Arc::new(Mutex::new(AcpiPm::new(sci.clone(), sink)));
        let pit = Arc::new(Mutex::new(Pit::new(
            Arc::new(Line::default()),
            clock.clone(),
        )));
        let timer = BootTimer::new(Instant::now());
        let marks = timer.marks();
        let mut io = Bus::new();
        let windows: [(u16, u64, devices::bus::SharedDevice); 8] = [
            (ports::COM1, 8, serial.clone()),
            (ports::I8042_DATA, 1, Arc::new(Mutex::new(kbd_data))),
            (ports::I8042_COMMAND, 1, Arc::new(Mutex::new(kbd_cmd))),
            (ports::CMOS, 2, cmos.clone()),
            (ports::ACPI_PM1A_EVT, WINDOW_LEN, pm.clone()),
            (ports::PIT, 4, pit.clone()),
            (
                ports::NMI_STATUS,
                1,
                Arc::new(Mutex::new(PitPort61::new(pit.clone()))),
            ),
            (ports::BOOT_TIMER, 1, Arc::new(Mutex::new(timer))),
        ];
        for (port, len, device) in windows {
            io.insert(u64::from(port), len, device)
                .expect("the port map");
        }
        Platform {
            io,
            clock,
            serial,
            cmos,
            pm,
            pit,
            output,
            sci,
            requests,
            marks,
            expected: Expected::default(),
        }
    }

    fn read(&mut self, port: u16, len: usize) {
        let mut d = [0u8; 8];
        let hit = self.io.read(u64::from(port), &mut d[..len]);
        let e = &mut self.expected;
        if !hit {
            return;
        }
        match port {
            0x70 => assert_eq!(d[0], e.cmos_index, "the CMOS index reads back"),
            0x71 => {
                let slot = [CMOS_SECONDS, CMOS_MINUTES]
                    .iter()
                    .position(|&r| r == e.cmos_index);
                if let Some(v) = slot.and_then(|s| e.cmos_time[s]) {
                    assert_eq!(d[0], v, "a time register written reads back");
                }
            }
            0x608 if len == 4 => {
                let t = u32::from_le_bytes(d[..4].try_into().expect("4 bytes"));
                if let Some(last) = e.pm_timer {
                    assert!(t.wrapping_sub(last) < 1 << 31, "the PM timer went back");
                }
                e.pm_timer = Some(t);
            }
            _ => {}
        }
    }

    fn write(&mut self, port: u16, len: usize, v: u64) {
        let d = v.to_le_bytes();
        let before = self.marks.lock().expect("marks").len();
        let hit = self.io.write(u64::from(port), &d[..len]);
        let e = &mut self.expected;
        if !hit {
            return;
        }
        let b = d[0];
        match port {
            0x3f8 if e.line_control & 0x80 == 0 && e.modem_control & 0x10 == 0 => e.output.push(b),
            0x3fb => e.line_control = b,
            0x3fc => e.modem_control = b,
            0x64 if b == 0xfe => e.resets += 1,
            0x70 => e.cmos_index = b & 0x7f,
            0x71 => self.cmos_written(b),
            0x440 => e.boot_marks += 1,
            _ => {}
        }
        // PM1a control's high byte, however it is reached.
        for (i, byte) in d[..len].iter().enumerate() {
            if port as usize + i == 0x605 && byte & 0x20 != 0 && (byte >> 2) & 7 == SLEEP_TYPE_S5 {
                self.expected.power_offs += 1;
            }
        }
        let after = self.marks.lock().expect("marks").len();
        assert!(
            port == 0x440 || after == before,
            "a boot mark from another port"
        );
    }

    fn cmos_written(&mut self, v: u8) {
        let e = &mut self.expected;
        let decoded = if e.cmos_binary {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        };
        let canonical = e.cmos_binary || (v & 0xf < 10 && v >> 4 < 10);
        match e.cmos_index {
            CMOS_SECONDS | CMOS_MINUTES => {
                let slot = usize::from(e.cmos_index / 2);
                e.cmos_time[slot] = (canonical && decoded < 60).then_some(v);
            }
            CMOS_STATUS_B => {
                e.cmos_binary = v & 4 != 0;
                e.cmos_time = [None; 2];
            }
            _ => {}
        }
    }

    fn check(&self) {
        let e = &self.expected;
        assert_eq!(
            *self.output.0.lock().expect("capture"),
            e.output,
            "COM1 output is not what was written to its transmit register"
        );
        let requests = self.requests.lock().expect("requests");
        let count = |r| requests.iter().filter(|&&x| x == r).count();
        assert_eq!(
            count(GuestRequest::Reset),
            e.resets,
            "keyboard controller resets"
        );
        assert_eq!(
            count(GuestRequest::PowerOff),
            e.power_offs,
            "ACPI power-offs"
        );
        drop(requests);
        assert_eq!(self.marks.lock().expect("marks").len(), e.boot_marks);
        let mut regs = [0u8; 4];
        self.io.read(u64::from(ports::ACPI_PM1A_EVT), &mut regs);
        let status = u16::from_le_bytes([regs[0], regs[1]]);
        let enable = u16::from_le_bytes([regs[2], regs[3]]);
        assert_eq!(
            self.sci.high.load(Ordering::Relaxed),
            status & enable & 0x101 != 0,
            "SCI level"
        );
    }

    fn advance(&mut self, ns: u64) {
        self.clock.advance(ns);
        let now = self.clock.now_ns();
        if ns >= 1_000_000_000 || now % 1_000_000_000 < ns {
            self.expected.cmos_time = [None; 2]; // a second ticked
        }
        let mut pit = self.pit.lock().expect("pit");
        pit.poll(now);
        if let Some(next) = pit.next_event_ns() {
            assert!(
                next > now,
                "the PIT is due at {next} right after a poll at {now}"
            );
        }
    }

    fn round_trip(&mut self) {
        let now = self.clock.now_ns();
        let mut serial = self.serial.lock().expect("serial");
        let s = serial.save();
        serial.restore(&s);
        assert_eq!(serial.save(), s, "COM1 state");
        drop(serial);
        let mut cmos = self.cmos.lock().expect("cmos");
        let c = cmos.save();
        cmos.restore(&c);
        assert_eq!(cmos.save(), c, "CMOS state");
        drop(cmos);
        let mut pm = self.pm.lock().expect("pm");
        let p = pm.save();
        pm.restore(&p);
        assert_eq!(pm.save(), p, "ACPI PM state");
        drop(pm);
        let mut pit = self.pit.lock().expect("pit");
        let t = pit.save();
        pit.restore(&t);
        assert_eq!(pit.save(), t, "PIT state");
        // The PIT moving to KVM and back: registers, then channels counting anew.
        let converted = PitState::from_registers(&t.registers(), now);
        let mut other = Pit::new(Arc::new(Line::default()), self.clock.clone());
        other.restore(&converted);
        other.poll(now + 1_000_000);
        for port in 0..4 {
            other.read_port(port);
        }
    }
}

pub fn legacy_ports(data: &[u8]) {
    let mut ops = Ops::new(data);
    let mut p = Platform::new();
    while ops.next_op() {
        let op = ops.u8();
        let len = access_len(op >> 4);
        match op & 7 {
            0 => {
                let port = PORTS[usize::from(ops.u8()) % PORTS.len()];
                p.read(port, len);
            }
            1 => {
                let port = PORTS[usize::from(ops.u8()) % PORTS.len()];
                let v = ops.value(len);
                p.write(port, len, v);
            }
            2 => p.advance(u64::from(ops.u32())),
            3 => {
                let n = usize::from(ops.u8());
                let bytes = ops.bytes(n);
                p.serial.lock().expect("serial").enqueue_input(bytes);
            }
            4 => p.pm.lock().expect("pm").press_power_button(),
            5 => p.round_trip(),
            _ => {}
        }
        p.check();
    }
}

/// A port access as [`legacy_ports`] reads it; None for a port it does not serve.
pub fn access(p: &mut Program, write: bool, port: u16, len: usize, value: u64) -> Option<()> {
    let index = PORTS.iter().position(|&x| x == port)?;
    let width = [1, 2, 4, 8].iter().position(|&l| l == len)? as u8;
    p.u8(u8::from(write) | width << 4).u8(index as u8);
    if write {
        p.value(len, value);
    }
    Some(())
}
