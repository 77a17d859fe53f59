//! The CLI's side of the control API.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::model::ErrorBody;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control API: {0}")]
    Io(#[from] std::io::Error),
    #[error("control API sent a malformed response: {0}")]
    Protocol(String),
    /// The server answered with an error status and message.
    #[error("{message}")]
    Status { status: u16, message: String },
}

pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Client {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One request on a fresh connection; returns the status and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(status_line.trim().to_string()))?;
        let mut length = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(ClientError::Protocol(
                    "response ended in its headers".into(),
                ));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = Vec::new();
        match length {
            Some(n) => {
                body.resize(n, 0);
                reader.read_exact(&mut body)?;
            }
            None => {
                reader.read_to_end(&mut body)?;
            }
        }
        Ok((status, body))
    }

    /// GET `path`, decoding a JSON answer; error statuses become `ClientError::Status`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.request("GET", path, None)?;
        decode(status, &body)
    }

    /// GET `path` as text.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (status, body) = self.request("GET", path, None)?;
        check(status, &body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (status, body) = self.request("POST", path, Some(&json))?;
        decode(status, &body)
    }
}

fn check(status: u16, body: &[u8]) -> Result<(), ClientError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
    Err(ClientError::Status { status, message })
}

fn decode<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
    check(status, body)?;
    serde_json::from_slice(body).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Response;
    use crate::model::{ActionRequest, StateBody};
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    fn server() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handler = |r: &crate::Request| match (r.method, r.path.as_str()) {
            (crate::Method::Get, "/state") => Response::json(
                200,
                &StateBody {
                    state: "running".into(),
                },
            ),
            (crate::Method::Post, "/actions") => {
                match serde_json::from_slice::<ActionRequest>(&r.body) {
                    Ok(_) => Response::json(
                        200,
                        &StateBody {
                            state: "paused".into(),
                        },
                    ),
                    Err(e) => Response::error(400, e.to_string()),
                }
            }
            (_, "/panic") => panic!("handler bug"),
            _ => Response::error(404, "no such resource"),
        };
        std::thread::spawn(move || {
            crate::serve(listener, Arc::new(handler), crate::InFlight::default())
        });
        (dir, path)
    }

    #[test]
    fn round_trips_and_errors() {
        let (_d, path) = server();
        let c = Client::new(&path);
        let s: StateBody = c.get("/state").unwrap();
        assert_eq!(s.state, "running");
        let s: StateBody = c
            .post("/actions", &serde_json::json!({"action": "pause"}))
            .unwrap();
        assert_eq!(s.state, "paused");
        let err = c
            .post::<_, StateBody>(
                "/actions",
                &serde_json::json!({"action": "pause", "extra": 1}),
            )
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Status { status: 400, ref message } if message.contains("unknown field")),
            "{err}"
        );
        let err = c.get::<StateBody>("/nope").unwrap_err();
        assert!(matches!(err, ClientError::Status { status: 404, .. }));
        let err = c.get::<StateBody>("/panic").unwrap_err();
        assert!(matches!(err, ClientError::Status { status: 500, .. }));
        // Still serving after all that.
        let s: StateBody = c.get("/state").unwrap();
        assert_eq!(s.state, "running");
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let (_d, path) = server();
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .write_all(
                b"GET /state HTTP/1.1\r\n\r\nGET /state HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let mut all = String::new();
        stream.read_to_string(&mut all).unwrap();
        assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
    }

    #[test]
    fn connecting_to_nothing_is_a_clear_error() {
        let err = Client::new("/nonexistent/api.sock")
            .get::<StateBody>("/")
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot reach /nonexistent/api.sock")
        );
    }
}
