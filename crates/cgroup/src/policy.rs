//! What a VM may have of the host's CPUs: a weight against the others (shares), a cap
//! (limit, in CPUs), a guarantee counted by admission (reservation) and the host CPUs
//! its threads run on (affinity).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CgroupError;

/// cgroup v1's `cpu.shares` range; the default weight is 1024.
pub const SHARES_MIN: u64 = 2;
pub const SHARES_MAX: u64 = 262_144;
pub const DEFAULT_SHARES: u64 = 1024;
/// A cap below 1% of a CPU is below the CFS quota's 1 ms floor at the 100 ms period.
pub const LIMIT_MIN: f64 = 0.01;
/// The CFS period a limit is expressed over.
pub const PERIOD_US: u64 = 100_000;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<CpuSet>,
}

impl CpuPolicy {
    /// Whether anything needs a cgroup (affinity alone does not).
    pub fn needs_cgroup(&self) -> bool {
        self.shares.is_some() || self.limit.is_some()
    }

    pub fn is_empty(&self) -> bool {
        *self == CpuPolicy::default()
    }

    /// Sets one `cpu_*` key from text (`vessel set`, `--cpu-*`); "" or "none" clears it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), CgroupError> {
        let clear = value.is_empty() || value == "none";
        let bad = |what: &str| CgroupError::BadPolicy(format!("{key}={value:?}: {what}"));
        match key {
            "cpu_shares" => {
                self.shares = if clear {
                    None
                } else {
                    Some(value.parse().map_err(|_| bad("not a whole number"))?)
                }
            }
            "cpu_limit" | "cpu_reservation" => {
                let v = if clear {
                    None
                } else {
                    Some(
                        value
                            .parse::<f64>()
                            .ok()
                            .filter(|v| v.is_finite())
                            .ok_or_else(|| bad("not a number of CPUs"))?,
                    )
                };
                if key == "cpu_limit" {
                    self.limit = v;
                } else {
                    self.reservation = v;
                }
            }
            "cpu_affinity" => {
                self.affinity = if clear {
                    None
                } else {
                    Some(value.parse().map_err(|e: String| bad(&e))?)
                }
            }
            _ => return Err(bad("unknown CPU setting")),
        }
        Ok(())
    }

    /// Checks the values against the host (`host_cpus` online CPUs).
    pub fn validate(&self, host_cpus: u32) -> Result<(), CgroupError> {
        let bad = |s: String| Err(CgroupError::BadPolicy(s));
        let host = f64::from(host_cpus);
        if let Some(s) = self.shares
            && !(SHARES_MIN..=SHARES_MAX).contains(&s)
        {
            return bad(format!(
                "cpu_shares={s}: must be {SHARES_MIN} to {SHARES_MAX} (default {DEFAULT_SHARES})"
            ));
        }
        if let Some(l) = self.limit
            && !(LIMIT_MIN..=host).contains(&l)
        {
            return bad(format!(
                "cpu_limit={l}: must be {LIMIT_MIN} to {host_cpus} CPUs (the host's)"
            ));
        }
        if let Some(r) = self.reservation {
            if !(r > 0.0 && r <= host) {
                return bad(format!(
                    "cpu_reservation={r}: must be above 0 and at most {host_cpus} CPUs (the host's)"
                ));
            }
            if let Some(l) = self.limit
                && r > l
            {
                return bad(format!(
                    "cpu_reservation={r} is above cpu_limit={l}: a VM cannot be guaranteed more than it may use"
                ));
            }
        }
        if let Some(a) = &self.affinity
            && let Some(c) = a.cpus().iter().find(|&&c| c >= host_cpus as usize)
        {
            return bad(format!(
                "cpu_affinity={a}: the host has no CPU {c} (it has 0-{})",
                host_cpus.saturating_sub(1)
            ));
        }
        Ok(())
    }

    /// `cpu_shares=700 cpu_limit=1.5` (what is set).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.shares {
            parts.push(format!("cpu_shares={s}"));
        }
        if let Some(l) = self.limit {
            parts.push(format!("cpu_limit={l}"));
        }
        if let Some(r) = self.reservation {
            parts.push(format!("cpu_reservation={r}"));
        }
        if let Some(a) = &self.affinity {
            parts.push(format!("cpu_affinity={a}"));
        }
        parts.join(" ")
    }
}

/// cgroup v2's `cpu.weight` (1..10000, default 100) for v1 shares (default 1024), in
/// proportion, as systemd converts CPUShares=: the ratios between VMs are kept.
pub fn shares_to_weight(shares: u64) -> u64 {
    (shares * 100 / DEFAULT_SHARES).clamp(1, 10_000)
}

/// The CFS quota in microseconds per [`PERIOD_US`] for a cap in CPUs.
pub fn quota_us(limit: f64) -> u64 {
    ((limit * PERIOD_US as f64).round() as u64).max(1000)
}

/// Host CPUs, as in `0,2-3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

/// Highest CPU number accepted (`cpu_set_t` holds 1024).
const MAX_CPU: usize = 1023;

impl CpuSet {
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }
}

impl std::str::FromStr for CpuSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let num = |t: &str| {
                t.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c <= MAX_CPU)
                    .ok_or_else(|| format!("{t:?} is not a CPU number (0-{MAX_CPU})"))
            };
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if lo > hi {
                return Err(format!("{part:?} is an empty range"));
            }
            cpus.extend(lo..=hi);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuSet(cpus))
    }
}

impl fmt::Display for CpuSet {
    /// Runs collapsed: `0,2-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if i == j {
                write!(f, "{}", self.0[i])?;
            } else {
                write!(f, "{}-{}", self.0[i], self.0[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

impl Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_sets_parse_and_print_collapsed() {
        let s: CpuSet = "3,0-1, 2,7".parse().unwrap();
        assert_eq!(s.cpus(), &[0, 1, 2, 3, 7]);
        assert_eq!(s.to_string(), "0-3,7");
        for bad in ["", "a", "2-1", "0-", "4096", "1,,2"] {
            assert!(bad.parse::<CpuSet>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn policies_are_checked_against_the_host() {
        let mut p = CpuPolicy::default();
        p.set("cpu_shares", "700").unwrap();
        p.set("cpu_limit", "1.5").unwrap();
        p.set("cpu_affinity", "0-1").unwrap();
        p.validate(2).unwrap();
        assert_eq!(
            p.describe(),
            "cpu_shares=700 cpu_limit=1.5 cpu_affinity=0-1"
        );
        let refused = |k: &str, v: &str, host: u32| {
            let mut p = p.clone();
            p.set(k, v)
                .and_then(|()| p.validate(host))
                .unwrap_err()
                .to_string()
        };
        assert!(refused("cpu_shares", "1", 2).contains("must be 2 to 262144"));
        assert!(refused("cpu_shares", "-5", 2).contains("not a whole number"));
        assert!(refused("cpu_limit", "3", 2).contains("must be 0.01 to 2 CPUs"));
        assert!(refused("cpu_limit", "NaN", 2).contains("not a number"));
        assert!(refused("cpu_reservation", "1.6", 2).contains("above cpu_limit=1.5"));
        assert!(refused("cpu_affinity", "0,4", 2).contains("no CPU 4"));
        assert!(refused("cpu_colour", "red", 2).contains("unknown CPU setting"));
        p.set("cpu_limit", "none").unwrap();
        assert_eq!(p.limit, None);
    }

    #[test]
    fn v1_shares_map_onto_v2_weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 100);
        assert_eq!((shares_to_weight(700), shares_to_weight(300)), (68, 29));
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(quota_us(0.5), 50_000);
        assert_eq!(quota_us(0.001), 1000);
    }
}
