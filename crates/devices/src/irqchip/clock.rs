//! Guest time for the software CPU: nanoseconds since the VM started. The guest TSC
//! runs at exactly 1 GHz (TSC = guest nanoseconds), and the local APIC timer counts
//! the same 1 GHz crystal (CPUID leaf 0x15 says so), so no calibration can drift.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Guest TSC frequency and the local APIC timer's crystal (before the divider).
pub const TSC_HZ: u64 = 1_000_000_000;

/// The guest's clock: host monotonic time from a start point, or a manual clock that
/// only moves when told (tests, deterministic replays).
#[derive(Clone, Debug)]
pub struct GuestClock(Source);

#[derive(Clone, Debug)]
enum Source {
    /// `base` nanoseconds at host instant `start`.
    Host {
        start: Instant,
        base: u64,
    },
    Manual(Arc<AtomicU64>),
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestClock {
    /// A clock reading 0 now and following host time.
    pub fn new() -> Self {
        Self::resume_at(0)
    }

    /// A clock following host time that reads `ns` now: a restored VM continues its time.
    pub fn resume_at(ns: u64) -> Self {
        GuestClock(Source::Host {
            start: Instant::now(),
            base: ns,
        })
    }

    /// A clock that stands still at 0 until `advance` or `set` moves it.
    pub fn manual() -> Self {
        GuestClock(Source::Manual(Arc::new(AtomicU64::new(0))))
    }

    /// Guest nanoseconds since the VM started (a restored VM counts on from its snapshot).
    pub fn now_ns(&self) -> u64 {
        match &self.0 {
            Source::Host { start, base } => base + start.elapsed().as_nanos() as u64,
            Source::Manual(ns) => ns.load(Ordering::Acquire),
        }
    }

    /// The guest TSC (1 GHz, so equal to `now_ns`).
    pub fn tsc(&self) -> u64 {
        self.now_ns()
    }

    /// Moves a manual clock forward; a host clock ignores it.
    pub fn advance(&self, ns: u64) {
        if let Source::Manual(t) = &self.0 {
            t.fetch_add(ns, Ordering::AcqRel);
        }
    }

    /// Sets a manual clock; a host clock ignores it.
    pub fn set(&self, ns: u64) {
        if let Source::Manual(t) = &self.0 {
            t.store(ns, Ordering::Release);
        }
    }

    /// Host time until guest time `ns` (zero if it has passed). A manual clock maps
    /// guest nanoseconds to host nanoseconds from now.
    pub fn host_duration_until(&self, ns: u64) -> Duration {
        Duration::from_nanos(ns.saturating_sub(self.now_ns()))
    }
}

/// A deadline in guest nanoseconds that other threads read without a lock.
#[derive(Debug)]
pub struct Deadline(AtomicU64);

impl Default for Deadline {
    fn default() -> Self {
        Deadline(AtomicU64::new(u64::MAX))
    }
}

impl Deadline {
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|&d| d != u64::MAX)
    }

    pub fn set(&self, deadline: Option<u64>) {
        let raw = deadline.map_or(u64::MAX, |d| d.min(u64::MAX - 1));
        self.0.store(raw, Ordering::Release);
    }

    /// Whether the deadline is set and has passed at `now`.
    pub fn due(&self, now: u64) -> bool {
        now >= self.0.load(Ordering::Acquire)
    }
}

/// The earlier of two optional deadlines.
pub fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = GuestClock::manual();
        assert_eq!(c.now_ns(), 0);
        c.advance(1500);
        assert_eq!(c.clone().now_ns(), 1500);
        c.set(10);
        assert_eq!(c.tsc(), 10);
    }

    #[test]
    fn host_clock_advances_and_resumes() {
        let c = GuestClock::resume_at(5_000_000_000);
        let a = c.now_ns();
        assert!(a >= 5_000_000_000);
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.now_ns() >= a + 2_000_000);
    }

    #[test]
    fn deadline_due_and_unset() {
        let d = Deadline::default();
        assert_eq!(d.get(), None);
        assert!(!d.due(u64::MAX - 1));
        d.set(Some(100));
        assert!(!d.due(99));
        assert!(d.due(100));
        assert_eq!(earliest(Some(3), None), Some(3));
        assert_eq!(earliest(Some(3), Some(2)), Some(2));
    }
}
