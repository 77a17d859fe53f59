//! The VM's I/O rate limiters by device (`disk0`, `net0`), so their limits can change
//! while the VM runs. Every disk and NIC has one (without limits it never holds
//! anything back), so a limit can also be set on a device that started without.

use devices::virtio::rate_limit::{Limits, RateLimiter};

enum Queues {
    Disk(RateLimiter),
    Nic { rx: RateLimiter, tx: RateLimiter },
}

#[derive(Default)]
pub struct IoLimits {
    devices: Vec<(String, Queues)>,
}

impl IoLimits {
    pub(crate) fn add_disk(&mut self, index: usize, limiter: RateLimiter) {
        self.devices
            .push((format!("disk{index}"), Queues::Disk(limiter)));
    }

    pub(crate) fn add_nic(&mut self, index: usize, rx: RateLimiter, tx: RateLimiter) {
        self.devices
            .push((format!("net{index}"), Queues::Nic { rx, tx }));
    }

    /// New limits for `device` from options as `--disk` (`bw=10M,iops=50`) or `--net`
    /// (`rx_bw=1M,tx_iops=100`) take them; what the options leave out is unlimited.
    pub fn set(&self, device: &str, options: &str) -> Result<(), String> {
        let (_, queues) = self
            .devices
            .iter()
            .find(|(d, _)| d == device)
            .ok_or_else(|| format!("no device {device} (disks are disk0.., NICs net0..)"))?;
        // Nothing: no limits.
        let pairs = match options.trim() {
            "" => Vec::new(),
            o => devices::virtio::options::pairs(o, "")?,
        };
        match queues {
            Queues::Disk(l) => {
                let mut limits = Limits::default();
                for (k, v) in pairs {
                    if !limits.parse_option(k, v)? {
                        return Err(format!("{k}: not a disk limit (bw, iops and their _burst)"));
                    }
                }
                limits.validate()?;
                l.update(&limits);
            }
            Queues::Nic { rx, tx } => {
                let (mut r, mut t) = (Limits::default(), Limits::default());
                for (k, v) in pairs {
                    if !(r.parse_prefixed("rx_", k, v)? || t.parse_prefixed("tx_", k, v)?) {
                        return Err(format!(
                            "{k}: not a NIC limit (rx_bw, tx_bw, rx_iops, tx_iops and their _burst)"
                        ));
                    }
                }
                r.validate()?;
                t.validate()?;
                rx.update(&r);
                tx.update(&t);
            }
        }
        Ok(())
    }
}
