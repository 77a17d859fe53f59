//! vessel's control API: HTTP/1.1 with JSON bodies over a Unix socket, one socket per
//! running VM (documented in `docs/api.yaml`). The server side is a small blocking
//! server (request parsing by `httparse`); the client is what the CLI uses. Any HTTP
//! client works too, e.g. `curl --unix-socket control.sock http://localhost/v1/vms/NAME`.

mod client;
mod http;
pub mod model;
mod server;

pub use client::{Client, ClientError};
pub use http::{MAX_BODY, Method, ReadError, Request, Response, read_request};
pub use server::{Handler, InFlight, serve};
