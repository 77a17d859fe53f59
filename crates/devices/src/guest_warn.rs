//! Warnings a guest can cause, rate-limited: a hostile guest that repeats what makes a
//! device complain (a refused feature, a moved BAR, an unsupported sleep state) must
//! not fill the monitor's log and the host's disk. Each call site of [`guest_warn!`]
//! says at most [`BURST`] lines at once and one more per [`REFILL_MS`] after that; the
//! line after a quiet spell says how many were left out.

use std::sync::Mutex;
use std::time::Instant;

/// Lines a call site may say at once.
pub const BURST: u32 = 10;
/// Milliseconds to earn one more line.
pub const REFILL_MS: u64 = 6_000;

#[derive(Debug)]
struct State {
    tokens: u32,
    /// Milliseconds since [`epoch`] at the last refill.
    at: u64,
    suppressed: u64,
}

/// One call site's budget.
#[derive(Debug)]
pub struct Site(Mutex<Option<State>>);

impl Site {
    pub const fn new() -> Site {
        Site(Mutex::new(None))
    }

    /// Whether a line may be said now: Some(lines left out since the last one said).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed().as_millis() as u64)
    }

    /// [`Site::allow`] at `now` milliseconds.
    pub fn allow_at(&self, now: u64) -> Option<u64> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let s = s.get_or_insert(State {
            tokens: BURST,
            at: now,
            suppressed: 0,
        });
        let earned = now.saturating_sub(s.at) / REFILL_MS;
        if earned > 0 {
            s.tokens = s
                .tokens
                .saturating_add(u32::try_from(earned).unwrap_or(u32::MAX))
                .min(BURST);
            s.at += earned * REFILL_MS;
        }
        if s.tokens == 0 {
            s.suppressed += 1;
            return None;
        }
        s.tokens -= 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for Site {
    fn default() -> Self {
        Site::new()
    }
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `tracing::warn!` for what a guest can make happen again and again: rate-limited per
/// call site (see the module).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static SITE: $crate::guest_warn::Site = $crate::guest_warn::Site::new();
        match SITE.allow() {
            Some(0) => tracing::warn!($($arg)*),
            Some(n) => tracing::warn!("{} ({n} more like it left out)", format_args!($($arg)*)),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_refill_saying_what_was_left_out() {
        let site = Site::new();
        for _ in 0..BURST {
            assert_eq!(site.allow_at(0), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(site.allow_at(REFILL_MS - 1), None);
        }
        assert_eq!(site.allow_at(REFILL_MS), Some(100));
        assert_eq!(site.allow_at(REFILL_MS + 1), None);
        // A long quiet spell earns a full burst, no more.
        let later = 100 * REFILL_MS;
        for i in 0..BURST {
            assert_eq!(site.allow_at(later), Some(u64::from(i == 0)));
        }
        assert_eq!(site.allow_at(later), None);
    }
}
