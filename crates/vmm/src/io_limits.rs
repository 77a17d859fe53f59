//! The VM's I/O rate limiters by device (`disk0`, `net0`), so their limits can change
//! while the VM runs. Every disk and NIC has one (without limits it never holds
//! anything back), so a limit can also be set on a device that started without.

use devices::virtio::rate_limit::{Limits, RateLimiter};

/// One device's limits, as its `--disk` or `--net` spec gives them.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceLimits {
    Disk(Limits),
    Nic { rx: Limits, tx: Limits },
}

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

    /// Puts `limits` in force on `device`.
    pub fn set(&self, device: &str, limits: &DeviceLimits) -> Result<(), String> {
        let (_, queues) = self
            .devices
            .iter()
            .find(|(d, _)| d == device)
            .ok_or_else(|| format!("no device {device} (disks are disk0.., NICs net0..)"))?;
        match (queues, limits) {
            (Queues::Disk(l), DeviceLimits::Disk(limits)) => l.update(limits),
            (Queues::Nic { rx, tx }, DeviceLimits::Nic { rx: r, tx: t }) => {
                rx.update(r);
                tx.update(t);
            }
            _ => return Err(format!("{device}: limits of another kind of device")),
        }
        Ok(())
    }
}
