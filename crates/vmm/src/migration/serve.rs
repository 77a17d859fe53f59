//! The source's side of post-copy: the guest is stopped here and runs there. Pages the
//! destination asks for go first; between requests the rest go in order. The source
//! holds every page until the destination says it has them all; a link that fails
//! before then leaves the guest stopped here with its memory whole.

use std::os::fd::AsRawFd;
use std::time::Instant;

use super::MigrationError;
use super::send::{Sender, unexpected};
use super::wire::{self, Frame, MAX_RUN, PAGE};

/// How post-copy ended badly: before the destination ran the guest (it may run here
/// again) or after (it must not).
pub(super) enum Served {
    NeverRan(MigrationError),
    Ran(MigrationError),
}

/// `pages` (sorted) as runs of consecutive pages.
pub(super) fn runs(pages: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, n)) if *start + u64::from(*n) * PAGE as u64 == p && *n < u32::MAX => {
                *n += 1
            }
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Whether a frame waits on `fd` (waiting up to `ms`; -1: until one comes).
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one descriptor we own.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Serves post-copy until the destination holds every page; `running`: the destination
/// said so already (a recovery).
pub(super) fn postcopy(
    s: &mut Sender<'_>,
    stale: &[u64],
    stopped: Instant,
    running: bool,
) -> Result<(), Served> {
    let mut sent = vec![false; stale.len()];
    let (mut cursor, mut running, mut done_sent) = (0usize, running, false);
    s.cancellable = !running;
    let fd = s.stream.as_raw_fd();
    let link = |e: MigrationError, running: bool| {
        if running {
            Served::Ran(MigrationError::Uncertain(format!(
                "post-copy stopped half way ({e}); the guest runs there and its missing pages are here"
            )))
        } else {
            Served::Ran(MigrationError::Uncertain(e.to_string()))
        }
    };
    loop {
        let busy = cursor < stale.len();
        if readable(fd, if busy || !done_sent { 0 } else { 60_000 }) {
            let mut r = s.stream;
            match wire::read(&mut r) {
                Ok(Frame::Request(gpa)) => {
                    s.report.postcopy_requests += 1;
                    if let Ok(k) = stale.binary_search(&gpa)
                        && !sent[k]
                    {
                        sent[k] = true;
                        s.send_pages(&[gpa], false).map_err(|e| link(e, running))?;
                        s.flush().map_err(|e| link(e, running))?;
                    }
                }
                Ok(Frame::Running) => {
                    running = true;
                    // The guest runs there now: no going back.
                    s.cancellable = false;
                    s.report.downtime_ms = stopped.elapsed().as_secs_f64() * 1e3;
                }
                // The destination holds every page (after a recovery it may say so
                // before this side has sent its own end).
                Ok(Frame::Done) => return Ok(()),
                Ok(Frame::Failed(why)) if !running => {
                    return Err(Served::NeverRan(MigrationError::Destination(why)));
                }
                Ok(other) => return Err(link(unexpected(&other), running)),
                Err(e) => return Err(link(e, running)),
            }
            continue;
        }
        if busy {
            // The next run of pages not sent yet.
            while cursor < stale.len() && sent[cursor] {
                cursor += 1;
            }
            let first = cursor;
            while cursor < stale.len()
                && !sent[cursor]
                && cursor - first < MAX_RUN
                && stale[cursor] == stale[first] + ((cursor - first) * PAGE) as u64
            {
                sent[cursor] = true;
                cursor += 1;
            }
            s.report.postcopy_pages += (cursor - first) as u64;
            s.send_pages(&stale[first..cursor], false)
                .map_err(|e| link(e, running))?;
        } else if !done_sent {
            wire::send(&mut s.out_mut(), &Frame::Done).map_err(|e| link(e, running))?;
            s.flush().map_err(|e| link(e, running))?;
            done_sent = true;
        } else {
            return Err(link(
                MigrationError::Link("the destination went quiet".into()),
                running,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_make_runs() {
        assert_eq!(
            super::runs(&[0x1000, 0x2000, 0x3000, 0x9000, 0xa000]),
            [(0x1000, 3), (0x9000, 2)]
        );
        assert!(super::runs(&[]).is_empty());
    }
}
