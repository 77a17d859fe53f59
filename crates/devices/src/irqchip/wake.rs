//! Getting a software vCPU's attention: a flag its run loop polls between instruction
//! blocks, and a wake-up for a vCPU sleeping in HLT or waiting for a SIPI. The VMM
//! uses the same primitive to bring a vCPU out for pause or stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use super::clock::GuestClock;
use crate::bus::lock;

pub struct VcpuWake {
    attention: AtomicBool,
    /// Set by `notify`, consumed by `wait_until`: a notify between the sleeper's last
    /// look at its state and its sleep is not lost.
    kicked: Mutex<bool>,
    cond: Condvar,
    clock: GuestClock,
}

impl VcpuWake {
    pub fn new(clock: GuestClock) -> Self {
        VcpuWake {
            attention: AtomicBool::new(false),
            kicked: Mutex::new(false),
            cond: Condvar::new(),
            clock,
        }
    }

    /// Something changed for this vCPU: raise its attention flag and wake it if asleep.
    pub fn notify(&self) {
        self.attention.store(true, Ordering::Release);
        *lock(&self.kicked) = true;
        self.cond.notify_all();
    }

    /// The cheap poll for the run loop's hot path.
    pub fn attention(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    /// The flag itself, for a software CPU's translated loops to watch.
    pub fn attention_flag(&self) -> &AtomicBool {
        &self.attention
    }

    /// Reads and clears the attention flag (the loop then looks at everything).
    pub fn take_attention(&self) -> bool {
        self.attention.swap(false, Ordering::AcqRel)
    }

    /// Sleeps until `notify` (true) or until guest time `deadline` (false). A notify
    /// that came since the previous wait returns at once.
    pub fn wait_until(&self, deadline: Option<u64>) -> bool {
        let mut kicked = lock(&self.kicked);
        loop {
            if *kicked {
                *kicked = false;
                return true;
            }
            match deadline {
                None => kicked = self.cond.wait(kicked).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let wait = self.clock.host_duration_until(d);
                    if wait.is_zero() {
                        return false;
                    }
                    let (k, result) = self
                        .cond
                        .wait_timeout(kicked, wait)
                        .unwrap_or_else(|e| e.into_inner());
                    kicked = k;
                    // A manual clock does not move by itself: the host timeout is the deadline.
                    if result.timed_out() && !*kicked {
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn notify_wakes_a_sleeper_and_raises_attention() {
        let wake = Arc::new(VcpuWake::new(GuestClock::new()));
        let w = wake.clone();
        let sleeper = std::thread::spawn(move || w.wait_until(None));
        std::thread::sleep(Duration::from_millis(20));
        wake.notify();
        assert!(sleeper.join().unwrap());
        assert!(wake.take_attention());
        assert!(!wake.attention());
    }

    #[test]
    fn notify_before_the_wait_is_not_lost() {
        let wake = VcpuWake::new(GuestClock::new());
        wake.notify();
        assert!(wake.wait_until(None));
    }

    #[test]
    fn wait_until_times_out_at_the_deadline() {
        let clock = GuestClock::new();
        let wake = VcpuWake::new(clock.clone());
        let t0 = Instant::now();
        let deadline = clock.now_ns() + 30_000_000;
        assert!(!wake.wait_until(Some(deadline)));
        assert!(clock.now_ns() >= deadline);
        assert!(t0.elapsed() < Duration::from_secs(2));
        // A deadline in the past returns at once.
        assert!(!wake.wait_until(Some(0)));
    }

    #[test]
    fn manual_clock_deadline_is_host_time_from_now() {
        let clock = GuestClock::manual();
        clock.set(1000);
        let wake = VcpuWake::new(clock);
        let t0 = Instant::now();
        assert!(!wake.wait_until(Some(1000 + 5_000_000)));
        assert!(t0.elapsed() >= Duration::from_millis(5));
    }
}
