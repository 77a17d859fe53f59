//! ACPI fixed hardware: the PM1a event block (status, enable), the PM1a control
//! block (sleep type + enable: S5 powers off) and the 3.579545 MHz PM timer.

use std::sync::Arc;
use std::time::Instant;

use arch::acpi::SLEEP_TYPE_S5;
use arch::layout::ports;

use crate::bus::{BusDevice, le_value, put_le};
use crate::interrupt::IrqLine;
use crate::request::{GuestRequest, RequestSink};

const PM_TIMER_HZ: u128 = 3_579_545;
const STS_TMR: u16 = 1;
const STS_PWRBTN: u16 = 1 << 8;
const CNT_SCI_EN: u16 = 1;
const CNT_SLP_EN: u16 = 1 << 13;
const CNT_SLP_TYP_SHIFT: u16 = 10;

/// Offsets inside the PM register window.
const EVT: u64 = 0;
const CNT: u64 = (ports::ACPI_PM1A_CNT - ports::ACPI_PM1A_EVT) as u64;
const TMR: u64 = (ports::ACPI_PM_TMR - ports::ACPI_PM1A_EVT) as u64;
/// Length of the window from PM1a_EVT to the end of the PM timer.
pub const WINDOW_LEN: u64 = TMR + ports::ACPI_PM_TMR_LEN as u64;

pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    start: Instant,
    sci: Arc<dyn IrqLine>,
    requests: RequestSink,
}

/// The PM1 registers as plain data, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

impl AcpiPm {
    pub fn save(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    pub fn restore(&mut self, s: &AcpiPmState) {
        self.status = s.status;
        self.enable = s.enable;
        self.control = s.control;
        self.update_sci();
    }

    pub fn new(sci: Arc<dyn IrqLine>, requests: RequestSink) -> Self {
        AcpiPm {
            status: 0,
            enable: 0,
            // No SMM: the platform is always in ACPI mode.
            control: CNT_SCI_EN,
            start: Instant::now(),
            sci,
            requests,
        }
    }

    /// The fixed-feature power button: the guest OS decides what to do with it.
    pub fn press_power_button(&mut self) {
        self.status |= STS_PWRBTN;
        self.update_sci();
    }

    fn update_sci(&self) {
        let pending = self.status & self.enable & (STS_PWRBTN | STS_TMR) != 0;
        if let Err(e) = self.sci.set_level(pending) {
            tracing::warn!("ACPI SCI: {e}");
        }
    }

    fn timer(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }

    fn registers(&self) -> [u8; WINDOW_LEN as usize] {
        let mut r = [0u8; WINDOW_LEN as usize];
        r[0..2].copy_from_slice(&self.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.enable.to_le_bytes());
        r[4..6].copy_from_slice(&(self.control & !CNT_SLP_EN).to_le_bytes());
        r[8..12].copy_from_slice(&self.timer().to_le_bytes());
        r
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        let v = u16::from(value);
        match offset {
            // Status bits are write-one-to-clear.
            o if o == EVT => self.status &= !v,
            o if o == EVT + 1 => self.status &= !(v << 8),
            o if o == EVT + 2 => self.enable = (self.enable & 0xff00) | v,
            o if o == EVT + 3 => self.enable = (self.enable & 0x00ff) | (v << 8),
            o if o == CNT => self.control = (self.control & 0xff00) | v | CNT_SCI_EN,
            o if o == CNT + 1 => {
                self.control = (self.control & 0x00ff) | (v << 8);
                if self.control & CNT_SLP_EN != 0 {
                    self.sleep((self.control >> CNT_SLP_TYP_SHIFT) & 7);
                }
            }
            _ => {}
        }
    }

    fn sleep(&mut self, sleep_type: u16) {
        self.control &= !CNT_SLP_EN;
        if sleep_type == u16::from(SLEEP_TYPE_S5) {
            (self.requests)(GuestRequest::PowerOff);
        } else {
            crate::guest_warn!("guest asked for unsupported sleep type {sleep_type}");
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.registers();
        let start = offset as usize;
        let value = regs
            .get(start..start + data.len())
            .map(le_value)
            .unwrap_or(u64::MAX);
        put_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.write_byte(offset + i as u64, *b);
        }
        self.update_sci();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Level(AtomicBool);
    impl IrqLine for Level {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_level(&self, high: bool) -> std::io::Result<()> {
            self.0.store(high, Ordering::SeqCst);
            Ok(())
        }
    }

    fn pm() -> (AcpiPm, Arc<Mutex<Vec<GuestRequest>>>, Arc<Level>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sci = Arc::new(Level::default());
        let pm = AcpiPm::new(sci.clone(), Arc::new(move |r| s.lock().unwrap().push(r)));
        (pm, seen, sci)
    }

    #[test]
    fn s5_powers_off() {
        let (mut pm, seen, _) = pm();
        let mut cnt = [0u8; 2];
        pm.read(CNT, &mut cnt);
        assert_eq!(
            u16::from_le_bytes(cnt) & CNT_SCI_EN,
            1,
            "always in ACPI mode"
        );
        pm.write(CNT, &((5 << 10) as u16).to_le_bytes());
        assert!(seen.lock().unwrap().is_empty(), "no SLP_EN, no sleep");
        pm.write(CNT, &((5 << 10) | CNT_SLP_EN).to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![GuestRequest::PowerOff]);
    }

    #[test]
    fn power_button_raises_sci_until_acknowledged() {
        let (mut pm, _, sci) = pm();
        pm.press_power_button();
        assert!(!sci.0.load(Ordering::SeqCst), "not enabled yet");
        pm.write(EVT + 2, &STS_PWRBTN.to_le_bytes());
        assert!(sci.0.load(Ordering::SeqCst));
        let mut sts = [0u8; 2];
        pm.read(EVT, &mut sts);
        assert_ne!(u16::from_le_bytes(sts) & STS_PWRBTN, 0);
        pm.write(EVT, &STS_PWRBTN.to_le_bytes());
        assert!(!sci.0.load(Ordering::SeqCst));
    }

    #[test]
    fn pm_timer_counts_up() {
        let (mut pm, _, _) = pm();
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        pm.read(TMR, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        pm.read(TMR, &mut b);
        let ticks = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a));
        assert!(
            ticks >= 7000,
            "2 ms at 3.58 MHz is ~7160 ticks, got {ticks}"
        );
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut pm, _, _) = pm();
        let mut d = [0u8; 8];
        pm.read(WINDOW_LEN - 1, &mut d);
        pm.write(WINDOW_LEN - 1, &d);
    }
}
