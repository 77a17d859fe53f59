//! I/O rate limits: token buckets for bytes and for operations, as Firecracker's rate
//! limiter and QEMU's throttling have them. A bucket holds a tenth of a second of its
//! rate (QEMU's default burst) unless its size is given (its refill time is then size
//! over rate), and starts full; a one-time burst is spent first. A
//! request larger than the bucket goes through when the bucket is full and leaves it
//! in debt, so any size passes and the long-run rate is exact. A device whose request
//! does not fit arms a timer for the moment it will, and takes nothing until then.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

use super::options::parse_size;

/// How much of its rate a bucket holds.
const BUCKET_WINDOW: Duration = Duration::from_millis(100);

/// One limit: tokens per second, and tokens to spend once before it applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub per_second: u64,
    #[serde(default)]
    pub burst: u64,
    /// The bucket's size (0: a tenth of a second of the rate).
    #[serde(default)]
    pub bucket: u64,
}

/// A device's limits (`bw=`, `iops=` and their bursts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<Rate>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Takes `key=value` if it is a limit's (`bw`, `iops`, and their `_burst` and
    /// `_bucket`);
    /// Ok(false) for other keys.
    pub fn parse_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        // `none` (or nothing) lifts the limit, or the burst.
        if value.is_empty() || value == "none" {
            match key {
                "bw" => self.bytes = None,
                "iops" => self.ops = None,
                "bw_burst" => self.bytes.iter_mut().for_each(|r| r.burst = 0),
                "iops_burst" => self.ops.iter_mut().for_each(|r| r.burst = 0),
                "bw_bucket" => self.bytes.iter_mut().for_each(|r| r.bucket = 0),
                "iops_bucket" => self.ops.iter_mut().for_each(|r| r.bucket = 0),
                _ => return Ok(false),
            }
            return Ok(true);
        }
        let bad = |what: &str| format!("{key}={value}: {what}");
        let size = || parse_size(value, 0).ok_or_else(|| bad("not a size (e.g. 10M)"));
        let count = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad("not a positive whole number"))
        };
        match key {
            "bw" => self.bytes.get_or_insert_default().per_second = size()?,
            "bw_burst" => self.bytes.get_or_insert_default().burst = size()?,
            "iops" => self.ops.get_or_insert_default().per_second = count()?,
            "iops_burst" => self.ops.get_or_insert_default().burst = count()?,
            "bw_bucket" => self.bytes.get_or_insert_default().bucket = size()?,
            "iops_bucket" => self.ops.get_or_insert_default().bucket = count()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Like [`Limits::parse_option`] for keys named `PREFIX` + a limit's key (a NIC's
    /// `rx_bw`, `tx_iops`...).
    pub fn parse_prefixed(&mut self, prefix: &str, key: &str, value: &str) -> Result<bool, String> {
        match key.strip_prefix(prefix) {
            Some(k) => self
                .parse_option(k, value)
                .map_err(|e| format!("{prefix}{e}")),
            None => Ok(false),
        }
    }

    /// A burst needs a rate.
    pub fn validate(&self) -> Result<(), String> {
        for (name, r) in [("bw", self.bytes), ("iops", self.ops)] {
            if r.is_some_and(|r| r.per_second == 0) {
                return Err(format!(
                    "{name}_burst and {name}_bucket need {name}= (a rate) too"
                ));
            }
        }
        Ok(())
    }

    /// The options `parse_option` reads back.
    pub fn to_spec(&self) -> String {
        self.to_spec_prefixed("")
    }

    /// The options `parse_prefixed` reads back.
    pub fn to_spec_prefixed(&self, prefix: &str) -> String {
        let mut s = String::new();
        for (name, r) in [("bw", self.bytes), ("iops", self.ops)] {
            if let Some(r) = r {
                s += &format!(",{prefix}{name}={}", r.per_second);
                if r.burst > 0 {
                    s += &format!(",{prefix}{name}_burst={}", r.burst);
                }
                if r.bucket > 0 {
                    s += &format!(",{prefix}{name}_bucket={}", r.bucket);
                }
            }
        }
        s
    }
}

#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    size: f64,
    /// Negative after a request larger than the bucket.
    budget: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(r: Rate, now: Instant) -> Self {
        let per_second = r.per_second as f64;
        let size = match r.bucket {
            0 => (per_second * BUCKET_WINDOW.as_secs_f64()).max(1.0),
            b => b as f64,
        };
        TokenBucket {
            per_second,
            size,
            budget: size,
            burst: r.burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.budget = (self.budget + dt * self.per_second).min(self.size);
        self.last = now;
    }

    /// How long until `n` tokens may be taken (zero: now).
    fn wait(&self, n: f64) -> Duration {
        if n <= self.burst {
            return Duration::ZERO;
        }
        let need = (n - self.burst).min(self.size);
        if self.budget >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.budget) / self.per_second)
        }
    }

    fn take(&mut self, n: f64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= n - from_burst;
    }
}

#[derive(Debug)]
struct Buckets {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

/// Limits in force, shared by the devices of one group; [`RateLimiter::admit`] is the
/// one call a device makes per request.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    buckets: Arc<Mutex<Buckets>>,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> Self {
        let now = Instant::now();
        RateLimiter {
            buckets: Arc::new(Mutex::new(Buckets {
                bytes: limits.bytes.map(|r| TokenBucket::new(r, now)),
                ops: limits.ops.map(|r| TokenBucket::new(r, now)),
            })),
        }
    }

    /// Puts new limits in force (their buckets full), for every device sharing it.
    pub fn update(&self, limits: &Limits) {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.bytes = limits.bytes.map(|r| TokenBucket::new(r, now));
        b.ops = limits.ops.map(|r| TokenBucket::new(r, now));
    }

    /// Takes the tokens for one request of `bytes` (and one operation) if both buckets
    /// have them; else takes nothing and says how long to wait.
    pub fn admit(&self, bytes: u64) -> Result<(), Duration> {
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Buckets { bytes: b, ops } = &mut *guard;
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut *b, bytes as f64), (&mut *ops, 1.0)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                wait = wait.max(bucket.wait(n));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (bucket, n) in [(b, bytes as f64), (ops, 1.0)] {
            if let Some(bucket) = bucket {
                bucket.take(n);
            }
        }
        Ok(())
    }
}

/// How much a rate limit has held a queue back.
#[derive(Debug, Default)]
pub struct Throttling {
    /// Requests (or frames) that had to wait for the bucket.
    pub requests: AtomicU64,
    /// Time the queue stood still, in nanoseconds.
    pub nanos: AtomicU64,
}

/// A rate limit in force on one queue: while a request waits for its tokens, the queue
/// stands still and the timer is set for when they will be there.
pub struct QueueThrottle {
    limiter: RateLimiter,
    timer: TimerFd,
    since: Option<Instant>,
    stats: Arc<Throttling>,
}

impl QueueThrottle {
    pub fn new(limiter: RateLimiter, stats: Arc<Throttling>) -> std::io::Result<Self> {
        Ok(QueueThrottle {
            limiter,
            timer: TimerFd::new()?,
            since: None,
            stats,
        })
    }

    /// Whether the queue is waiting for its timer (a kick from the driver changes
    /// nothing then).
    pub fn waiting(&self) -> bool {
        self.since.is_some()
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer fired.
    pub fn timer_expired(&mut self) {
        let _ = self.timer.wait();
    }

    /// Whether a request of `bytes` may go now; if not, the timer is set for when it
    /// may.
    pub fn admit(&mut self, bytes: u64) -> bool {
        match self.limiter.admit(bytes) {
            Ok(()) => {
                if let Some(since) = self.since.take() {
                    let waited = since.elapsed().as_nanos() as u64;
                    self.stats.nanos.fetch_add(waited, Ordering::Relaxed);
                }
                true
            }
            Err(wait) => {
                if self.since.is_none() {
                    self.since = Some(Instant::now());
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                }
                // A zero time would disarm the timer.
                let wait = wait.max(Duration::from_micros(1));
                if let Err(e) = self.timer.reset(wait, None) {
                    tracing::error!("rate limit timer: {e}");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(spec: &str) -> Limits {
        let mut l = Limits::default();
        for kv in spec.split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            assert!(l.parse_option(k, v).unwrap(), "{kv}");
        }
        l.validate().unwrap();
        l
    }

    #[test]
    fn options_parse_and_read_back() {
        let l = limits("bw=10M,bw_burst=1M,iops=200,iops_bucket=400");
        let rate = |per_second, burst, bucket| Rate {
            per_second,
            burst,
            bucket,
        };
        assert_eq!(l.bytes, Some(rate(10 << 20, 1 << 20, 0)));
        assert_eq!(l.ops, Some(rate(200, 0, 400)));
        assert_eq!(
            l.to_spec(),
            ",bw=10485760,bw_burst=1048576,iops=200,iops_bucket=400"
        );
        let mut bad = Limits::default();
        assert!(bad.parse_option("bw", "fast").is_err());
        assert!(bad.parse_option("iops", "0").is_err());
        assert!(!bad.parse_option("path", "x").unwrap());
        bad.parse_option("iops_burst", "5").unwrap();
        assert!(bad.validate().unwrap_err().contains("need iops="));
    }

    /// Driven with a clock of its own: the rate a greedy client gets is the rate set,
    /// requests larger than the bucket included.
    #[test]
    fn a_greedy_client_gets_the_rate() {
        for (spec, size, want) in [
            ("bw=1M", 4096u64, (1u64 << 20) as f64),
            ("bw=1M", 4 << 20, (1u64 << 20) as f64),
            ("iops=100", 512, 100.0),
        ] {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(limits(spec).bytes.or(limits(spec).ops).unwrap(), t0);
            let per_request = if spec.starts_with("bw") {
                size as f64
            } else {
                1.0
            };
            let mut now = t0;
            let mut done = 0.0;
            while now < t0 + Duration::from_secs(20) {
                b.refill(now);
                match b.wait(per_request) {
                    w if w.is_zero() => {
                        b.take(per_request);
                        done += per_request;
                    }
                    w => now += w,
                }
            }
            let rate = done / 20.0;
            assert!(
                (rate / want - 1.0).abs() < 0.03,
                "{spec} x{size}: {rate} vs {want}"
            );
        }
    }

    /// A bucket of 5 at 10 per second: 5 at once, then one every 100 ms.
    #[test]
    fn a_bucket_size_sets_the_refill_time() {
        let r = RateLimiter::new(&limits("iops=10,iops_bucket=5"));
        let n = (0..100).take_while(|_| r.admit(0).is_ok()).count();
        assert_eq!(n, 5);
        let wait = r.admit(0).unwrap_err();
        assert!(wait > Duration::from_millis(80) && wait <= Duration::from_millis(100));
    }

    #[test]
    fn a_burst_is_spent_once() {
        let l = limits("iops=10,iops_burst=50");
        let r = RateLimiter::new(&l);
        // 50 from the burst, then the bucket's one (a tenth of a second of 10/s).
        let n = (0..100).take_while(|_| r.admit(0).is_ok()).count();
        assert_eq!(n, 51);
        let wait = r.admit(0).unwrap_err();
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(100));
    }
}
