//! The MC146818 CMOS real-time clock at ports 0x70/0x71: the host's date and time
//! (UTC) in BCD or binary, 24- or 12-hour, as status register B asks. A guest that
//! sets the clock moves its own offset, never the host's.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
/// The century register the FADT points at.
const CENTURY: usize = arch::acpi::CMOS_CENTURY as usize;

const B_24_HOUR: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;
const D_VALID_RAM: u8 = 1 << 7;
const HOUR_PM: u8 = 1 << 7;

pub type Clock = Box<dyn Fn() -> i64 + Send>;

pub struct Cmos {
    index: usize,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    now: Clock,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl DateTime {
    fn from_epoch(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let s = secs.rem_euclid(86_400) as u32;
        DateTime {
            year,
            month,
            day,
            hour: s / 3600,
            minute: s / 60 % 60,
            second: s % 60,
        }
    }

    fn to_epoch(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }

    /// CMOS day of week: 1 = Sunday.
    fn weekday(self) -> u32 {
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u32 + 1
    }
}

/// The CMOS as plain data, for snapshots: the index register, the NVRAM, and the guest's
/// clock as an offset from the host's (so a restored guest reads the current time).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    pub index: usize,
    pub ram: Vec<u8>,
    pub offset: i64,
}

impl Cmos {
    pub fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            offset: self.offset,
        }
    }

    pub fn restore(&mut self, s: &CmosState) {
        self.index = s.index % self.ram.len();
        for (d, v) in self.ram.iter_mut().zip(&s.ram) {
            *d = *v;
        }
        self.offset = s.offset;
    }

    pub fn new() -> Self {
        Self::with_clock(Box::new(host_now))
    }

    /// A CMOS reading time from `now` (seconds since the epoch); tests use a fixed clock.
    pub fn with_clock(now: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        ram[STATUS_B] = B_24_HOUR;
        ram[STATUS_D] = D_VALID_RAM;
        Cmos {
            index: 0,
            ram,
            offset: 0,
            now,
        }
    }

    fn guest_time(&self) -> DateTime {
        DateTime::from_epoch((self.now)() + self.offset)
    }

    fn encode(&self, value: u32) -> u8 {
        if self.ram[STATUS_B] & B_BINARY != 0 {
            value as u8
        } else {
            (((value / 10) << 4) | (value % 10)) as u8
        }
    }

    fn decode(&self, raw: u8) -> u32 {
        if self.ram[STATUS_B] & B_BINARY != 0 {
            u32::from(raw)
        } else {
            u32::from(raw >> 4) * 10 + u32::from(raw & 0xf)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.ram[STATUS_B] & B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, raw: u8) -> u32 {
        if self.ram[STATUS_B] & B_24_HOUR != 0 {
            return self.decode(raw);
        }
        let h = self.decode(raw & !HOUR_PM) % 12;
        if raw & HOUR_PM != 0 { h + 12 } else { h }
    }

    fn read_register(&mut self, reg: usize) -> u8 {
        let t = self.guest_time();
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            WEEKDAY => self.encode(t.weekday()),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u32),
            CENTURY => self.encode(t.year.div_euclid(100) as u32),
            // Never "update in progress": reads are consistent at any time.
            STATUS_A => self.ram[STATUS_A] & 0x7f,
            STATUS_C => std::mem::take(&mut self.ram[STATUS_C]),
            _ => self.ram[reg],
        }
    }

    fn write_register(&mut self, reg: usize, value: u8) {
        let mut t = self.guest_time();
        let field = match reg {
            SECONDS => &mut t.second,
            MINUTES => &mut t.minute,
            HOURS => &mut t.hour,
            DAY => &mut t.day,
            MONTH => &mut t.month,
            YEAR | CENTURY => {
                let v = i64::from(self.decode(value));
                t.year = if reg == YEAR {
                    t.year.div_euclid(100) * 100 + v
                } else {
                    v * 100 + t.year.rem_euclid(100)
                };
                return self.set_guest_time(t);
            }
            STATUS_C | STATUS_D | WEEKDAY => return,
            _ => {
                self.ram[reg] = value;
                return;
            }
        };
        *field = if reg == HOURS {
            self.decode_hour(value)
        } else {
            self.decode(value)
        };
        self.set_guest_time(t);
    }

    fn set_guest_time(&mut self, t: DateTime) {
        let valid = (1..=12).contains(&t.month)
            && (1..=31).contains(&t.day)
            && t.hour < 24
            && t.minute < 60
            && t.second < 60;
        if valid {
            self.offset = t.to_epoch() - (self.now)();
        }
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = match offset {
            0 => self.index as u8,
            _ => self.read_register(self.index),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = usize::from(data[0] & 0x7f),
            _ => self.write_register(self.index, data[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-21 07:05:09 UTC, a Saturday.
    const NOW: i64 = 1_795_244_709;

    fn cmos() -> Cmos {
        Cmos::with_clock(Box::new(|| NOW))
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut d = [0];
        c.read(1, &mut d);
        d[0]
    }

    fn write(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0, &[reg]);
        c.write(1, &[v]);
    }

    #[test]
    fn civil_dates_round_trip() {
        for secs in [
            0,
            NOW,
            951_782_400, /* 2000-02-29 */
            4_102_444_800,
            -86_400,
        ] {
            assert_eq!(DateTime::from_epoch(secs).to_epoch(), secs);
        }
        let t = DateTime::from_epoch(NOW);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 21));
        assert_eq!((t.hour, t.minute, t.second), (7, 5, 9));
        assert_eq!(t.weekday(), 7, "Saturday");
    }

    #[test]
    fn reads_the_host_time_in_bcd() {
        let mut c = cmos();
        let regs: Vec<u8> = [0u8, 2, 4, 6, 7, 8, 9, 0x32]
            .iter()
            .map(|r| read(&mut c, *r))
            .collect();
        assert_eq!(regs, vec![0x09, 0x05, 0x07, 0x07, 0x21, 0x11, 0x26, 0x20]);
        assert_eq!(read(&mut c, 0x0d), 0x80);
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0, "never update-in-progress");
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = Cmos::with_clock(Box::new(|| NOW + 12 * 3600)); // 19:05
        write(&mut c, 0x0b, B_BINARY);
        assert_eq!(read(&mut c, 4), 7 | HOUR_PM);
        assert_eq!(read(&mut c, 9), 26);
        write(&mut c, 0x0b, B_BINARY | B_24_HOUR);
        assert_eq!(read(&mut c, 4), 19);
    }

    #[test]
    fn guest_sets_its_own_clock() {
        let mut c = cmos();
        write(&mut c, 9, 0x30); // year 2030
        write(&mut c, 4, 0x23); // 23:xx
        assert_eq!(read(&mut c, 9), 0x30);
        assert_eq!(read(&mut c, 4), 0x23);
        assert_eq!(read(&mut c, 7), 0x21);
        write(&mut c, 8, 0x13); // month 13 is refused
        assert_eq!(read(&mut c, 8), 0x11);
    }

    #[test]
    fn nmi_bit_is_not_part_of_the_index_and_ram_keeps_bytes() {
        let mut c = cmos();
        write(&mut c, 0x80 | 0x40, 0xab);
        assert_eq!(read(&mut c, 0x40), 0xab);
    }
}
