//! The monitor's side of live migration: sending its VM to a `vessel receive`, and, at
//! a post-copy's destination, listening again for the source after the link failed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use api::Response;
use api::model::{MigrateBody, MigrateRequest, RecoverBody, RecoverRequest};
use vmm::RunState;

use super::{Monitor, lock};
use crate::status::VmState;

impl Monitor {
    /// Moves the VM to a `vessel receive` at `req.to`; on success the VM ends here.
    pub(super) fn migrate(&self, req: &MigrateRequest) -> Response {
        let to = match crate::migration::Endpoint::parse(&req.to) {
            Ok(t) => t,
            Err(e) => return Response::error(400, e),
        };
        let Some(handle) = lock(&self.handle).clone() else {
            return Response::error(409, format!("VM {} is rebooting; try again", self.name));
        };
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Response::error(409, format!("{} is migrating already", self.name));
        }
        self.migration_cancel.store(false, Ordering::SeqCst);
        let opts = vmm::migration::SendOptions {
            downtime: Duration::from_millis(req.downtime_ms.unwrap_or(300)),
            max_bandwidth: req.max_bandwidth,
            compress: req.compress,
            auto_converge: !req.no_auto_converge,
            postcopy_after: req.postcopy_after,
            copy_disks: req.copy_disks,
            ..Default::default()
        };
        let config = crate::migration::travelling_spec(&self.spec, &self.bundle.dir).to_toml();
        let jailed_unix = self.jailed && matches!(to, crate::migration::Endpoint::Unix(_));
        let connected = to.connect().map_err(|e| {
            if jailed_unix {
                // Its jail holds only its own VM's paths.
                (502, format!("{e} (a jailed monitor sees only its VM's folder: use tcp:, or a socket in that folder)"))
            } else {
                (502, e)
            }
        });
        let result = connected.and_then(|link| {
            if req.recover {
                handle.migrate_recover(&link, &opts, &self.migration_cancel)
            } else {
                handle.migrate(&link, &self.name, config, &opts, &self.migration_cancel)
            }
            .map_err(|e| (409, e.to_string()))
        });
        let response = match result {
            Ok(r) => {
                *lock(&self.migrated_to) = Some(to.to_string());
                self.kill_requested.store(true, Ordering::SeqCst);
                handle.kill();
                Response::json(
                    200,
                    &MigrateBody {
                        to: to.to_string(),
                        rounds: r.rounds,
                        bytes_sent: r.bytes_sent,
                        pages_sent: r.pages_sent,
                        zero_pages: r.zero_pages,
                        seconds: r.seconds,
                        downtime_ms: r.downtime_ms,
                        throttle_percent: r.throttle_percent,
                        postcopy_pages: r.postcopy_pages,
                        postcopy_requests: r.postcopy_requests,
                    },
                )
            }
            Err((code, e)) => {
                tracing::warn!("migration to {to} failed: {e}");
                if handle.state() == RunState::Paused {
                    // Stopped for good here, or until a recovery (post-copy).
                    self.write_status(VmState::Paused, None);
                }
                Response::error(
                    code,
                    format!("migration of {} to {to} failed: {e}", self.name),
                )
            }
        };
        self.migrating.store(false, Ordering::SeqCst);
        response
    }

    /// At the destination of a post-copy whose link failed: listens for the source's new
    /// connection and hands it to the post-copy.
    pub(super) fn listen_for_recovery(&self, req: &RecoverRequest) -> Response {
        let Some(handle) = lock(&self.handle).clone() else {
            return Response::error(409, format!("VM {} is rebooting; try again", self.name));
        };
        let (listener, bound) =
            match crate::migration::Endpoint::parse(&req.listen).and_then(|e| e.listen()) {
                Ok(l) => l,
                Err(e) => return Response::error(400, e),
            };
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let relinked = crate::migration::accept_resume(&listener)
                    .and_then(|link| handle.postcopy_relink(link).map_err(|e| e.to_string()));
                if let Err(e) = relinked {
                    tracing::warn!("post-copy recovery: {e}");
                }
            });
        match spawned {
            Ok(_) => Response::json(200, &RecoverBody { listening: bound }),
            Err(e) => Response::error(500, e.to_string()),
        }
    }
}
