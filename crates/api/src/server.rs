//! Serving requests on a Unix socket: a thread per connection (a control socket has a
//! handful of clients), keep-alive, and a hostile client never takes the server down.

use std::io::{BufReader, BufWriter};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::http::{ReadError, Request, Response, read_request};

/// Answers one request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request) -> Response;
}

impl<F: Fn(&Request) -> Response + Send + Sync + 'static> Handler for F {
    fn handle(&self, request: &Request) -> Response {
        self(request)
    }
}

/// A client idle this long between requests is disconnected.
const IDLE: Duration = Duration::from_secs(60);

/// Requests being answered right now, so a process can let them finish before it exits.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Waits (up to `timeout`) until no request is being answered.
    pub fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.0.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Accepts connections until the listener fails (for instance, when its socket file
/// is removed and the listener closed).
pub fn serve(listener: UnixListener, handler: Arc<dyn Handler>, in_flight: InFlight) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let handler = handler.clone();
                let in_flight = in_flight.clone();
                let spawned = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || connection(stream, handler.as_ref(), &in_flight));
                if let Err(e) = spawned {
                    tracing::warn!("control API: cannot serve a connection: {e}");
                }
            }
            Err(e) => {
                tracing::debug!("control API: accept: {e}");
                return;
            }
        }
    }
}

fn connection(stream: UnixStream, handler: &dyn Handler, in_flight: &InFlight) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    let mut output = BufWriter::new(write_half);
    loop {
        let request = read_request(&mut input);
        in_flight.0.fetch_add(1, Ordering::AcqRel);
        let (response, close) = match request {
            Ok(request) => {
                // A handler bug must cost one request, not the monitor.
                let response = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    handler.handle(&request)
                }))
                .unwrap_or_else(|_| Response::error(500, "internal error"));
                (response, request.close)
            }
            Err(ReadError::Bad(response)) => (response, true),
            Err(ReadError::Closed | ReadError::Io) => {
                in_flight.0.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        };
        let written = response.write_to(&mut output, close);
        in_flight.0.fetch_sub(1, Ordering::AcqRel);
        if written.is_err() || close {
            return;
        }
    }
}
