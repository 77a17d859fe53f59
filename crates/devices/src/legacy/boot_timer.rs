//! vessel's boot timer: a guest writes a byte to I/O port 0x440 (see the README) and
//! vessel logs the milliseconds since its own process started, so boot time is
//! measured without parsing the console.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// Marks kept and logged at most: a guest writing the port in a loop must not grow
/// the monitor's memory or its log without bound (boots write a handful).
pub const MAX_MARKS: usize = 256;

/// One guest write: the byte and when it arrived.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BootMark {
    pub value: u8,
    pub since_start: Duration,
}

pub struct BootTimer {
    start: Instant,
    marks: Arc<Mutex<Vec<BootMark>>>,
}

impl BootTimer {
    /// `start` is the process start as the VMM measured it.
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            marks: Arc::default(),
        }
    }

    /// The marks so far (shared, for metrics and benchmarks).
    pub fn marks(&self) -> Arc<Mutex<Vec<BootMark>>> {
        self.marks.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut marks = crate::bus::lock(&self.marks);
        if marks.len() >= MAX_MARKS {
            return;
        }
        let mark = BootMark {
            value: data[0],
            since_start: self.start.elapsed(),
        };
        tracing::info!(
            "boot-timer: {:.3} ms (guest wrote {:#04x}){}",
            mark.since_start.as_secs_f64() * 1000.0,
            mark.value,
            if marks.len() + 1 == MAX_MARKS {
                "; later marks are ignored"
            } else {
                ""
            }
        );
        marks.push(mark);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_writing_in_a_loop_gets_only_the_first_marks() {
        let mut timer = BootTimer::new(Instant::now());
        for i in 0..MAX_MARKS + 10 {
            timer.write(0, &[i as u8]);
        }
        let marks = timer.marks();
        let marks = marks.lock().unwrap();
        assert_eq!(marks.len(), MAX_MARKS);
        assert_eq!(marks[1].value, 1);
    }
}
