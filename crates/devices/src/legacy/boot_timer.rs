//! vessel's boot timer: a guest writes a byte to I/O port 0x440 (see the README) and
//! vessel logs the milliseconds since its own process started, so boot time is
//! measured without parsing the console.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

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
        let mark = BootMark {
            value: data[0],
            since_start: self.start.elapsed(),
        };
        tracing::info!(
            "boot-timer: {:.3} ms (guest wrote {:#04x})",
            mark.since_start.as_secs_f64() * 1000.0,
            mark.value
        );
        crate::bus::lock(&self.marks).push(mark);
    }
}
