//! Requests and responses, with the limits that keep a hostile client from costing
//! the monitor more than a few kilobytes.

use std::io::{self, BufRead, Read, Write};

use serde::Serialize;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;
const MAX_HEADERS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
    Other,
}

#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: Serialize>(status: u16, value: &T) -> Self {
        let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `{"error": message}` with the given status.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            &crate::model::ErrorBody {
                error: message.into(),
            },
        )
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }

    pub fn no_content() -> Self {
        Response {
            status: 204,
            content_type: "application/json",
            body: Vec::new(),
        }
    }

    pub fn write_to(&self, out: &mut impl Write, close: bool) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        out.write_all(head.as_bytes())?;
        out.write_all(&self.body)?;
        out.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Why a request could not be read: the answer to send, if the connection is still usable.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// The connection failed.
    Io,
    /// Malformed or too large: answer with this and close.
    Bad(Response),
}

/// Reads one request (head and body) from `input`.
pub fn read_request(input: &mut impl BufRead) -> Result<Request, ReadError> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = (&mut *input)
            .take((MAX_HEAD + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .map_err(|_| ReadError::Io)?;
        if n == 0 {
            return Err(if before == 0 {
                ReadError::Closed
            } else {
                ReadError::Bad(Response::error(400, "request ended inside its head"))
            });
        }
        if head.len() > MAX_HEAD {
            return Err(ReadError::Bad(Response::error(
                431,
                "request head too large",
            )));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let bad = |msg: &str| ReadError::Bad(Response::error(400, msg));
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReadError::Bad(Response::error(431, "too many headers")));
        }
        Err(e) => return Err(bad(&format!("malformed request: {e}"))),
    }
    let method = match parsed.method.unwrap_or("") {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        _ => Method::Other,
    };
    let path = parsed.path.unwrap_or("/").to_string();
    let mut length = 0usize;
    let mut close = parsed.version == Some(0);
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = value.parse().map_err(|_| bad("invalid Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Bad(Response::error(
                411,
                "chunked bodies are not supported: send Content-Length",
            )));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if length > MAX_BODY {
        return Err(ReadError::Bad(Response::error(
            413,
            "request body too large",
        )));
    }
    let mut body = vec![0u8; length];
    input.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("request body shorter than Content-Length"),
        _ => ReadError::Io,
    })?;
    Ok(Request {
        method,
        path,
        body,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Request, ReadError> {
        read_request(&mut io::BufReader::new(bytes))
    }

    fn status(r: Result<Request, ReadError>) -> u16 {
        match r {
            Err(ReadError::Bad(resp)) => resp.status,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_request_with_a_body() {
        let r =
            read(b"POST /v1/vms/a/actions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
                .unwrap();
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.path, "/v1/vms/a/actions");
        assert_eq!(r.body, b"body");
        assert!(!r.close);
    }

    #[test]
    fn rejects_what_it_should() {
        assert_eq!(status(read(b"GARBAGE\r\n\r\n")), 400);
        assert_eq!(
            status(read(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")),
            400
        );
        assert_eq!(
            status(read(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")),
            413
        );
        assert_eq!(
            status(read(
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            411
        );
        assert_eq!(
            status(read(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort")),
            400
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(read(huge.as_bytes())), 431);
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            status(read(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes())),
            431
        );
        assert!(matches!(read(b""), Err(ReadError::Closed)));
        assert_eq!(status(read(b"GET / HT")), 400);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 % 64) >> 3) as u8)
                .collect();
            let mut with_prefix = b"GET / HTTP/1.1\r\n".to_vec();
            with_prefix.extend_from_slice(&bytes);
            let _ = read(&bytes);
            let _ = read(&with_prefix);
        }
    }
}
