//! The control API as a client on the VM's socket reaches it: HTTP/1.1 requests read
//! one after another from one connection (keep-alive) through a read buffer of any
//! size, routed as the monitor routes them, their JSON bodies parsed, and the
//! settings of `POST .../settings` taken through the checks the monitor runs before
//! anything changes (key=value, balloon sizes, live keys, `VmSpec::set`, the devices'
//! limits) on a VM's spec.
//!
//! Checked: a request read has a body of at most [`api::MAX_BODY`]; a refusal is a
//! 4xx answer and ends the connection; an action or settings body that parses says
//! the same once written and parsed again; settings that pass every check leave a spec
//! whose vm.toml loads again as the same spec (what the next command reads); every
//! answer is well-formed HTTP with its Content-Length.
//!
//! Input: read buffer size (1 + byte % 64), then the bytes the client sends.

use std::io::BufReader;
use std::path::Path;

use api::model::{ActionRequest, SettingsRequest, StateBody};
use api::{Method, ReadError, Request, Response, read_request};
use manager::{VmSpec, resources, spec};

/// Requests read from one connection, at most.
const MAX_REQUESTS: usize = 32;
/// The VM the requests are about.
const NAME: &str = "fuzz";
/// Its vm.toml: a disk and a NIC, CPU policy, a balloon.
pub const VM_TOML: &str = r#"cpus = 2
memory = "512M"
kernel = "kit"
balloon = true
disks = ["path=disk0.qcow2,format=qcow2,id=root,bw=10485760,iops=50"]
nets = ["user,mac=52:54:00:12:34:56,rx_bw=1048576"]

[cpu]
shares = 700
limit = 1.5
"#;

fn answered(r: &Response) {
    let mut out = Vec::new();
    r.write_to(&mut out, false).expect("writing to memory");
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with(&format!("HTTP/1.1 {} ", r.status)));
    let length = format!("Content-Length: {}", r.body.len());
    assert!(head.lines().any(|l| l == length), "{head}");
    assert_eq!(body.len(), String::from_utf8_lossy(&r.body).len());
}

/// The settings as the monitor takes them, up to the point where it would apply them.
fn settings(base: &VmSpec, req: &SettingsRequest) -> Response {
    let mut spec = base.clone();
    for kv in &req.settings {
        let Some((k, v)) = kv.split_once('=') else {
            return Response::error(400, "not key=value");
        };
        if let Some(size) = spec::balloon_size(k, v) {
            if let Err(e) = size.and_then(|s| spec::check_balloon(&spec, s)) {
                return Response::error(409, e);
            }
            continue;
        }
        if !resources::is_live_key(k) {
            return Response::error(409, "not a live setting");
        }
        if let Err(e) = spec.set(k, v) {
            return Response::error(400, e);
        }
    }
    for device in resources::devices_named(&req.settings) {
        if spec.device_limits(device).is_none() {
            return Response::error(400, format!("the VM has no {device}"));
        }
    }
    // What `save_spec` writes is what the next command loads.
    let again = VmSpec::from_toml(Path::new("vm.toml"), &spec.to_toml()).unwrap_or_else(|e| {
        panic!(
            "settings {:?} left a vm.toml that does not load: {e}",
            req.settings
        )
    });
    assert_eq!(
        again, spec,
        "settings {:?}: vm.toml does not round-trip",
        req.settings
    );
    Response::json(
        200,
        &StateBody {
            state: "running".into(),
        },
    )
}

fn route(base: &VmSpec, r: &Request) -> Response {
    let Some(rest) = r.path.strip_prefix("/v1/vms/") else {
        return Response::error(404, "no such resource");
    };
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    if name != NAME {
        return Response::error(404, "no such VM");
    }
    match (r.method, sub) {
        (Method::Post, "actions") => match serde_json::from_slice::<ActionRequest>(&r.body) {
            Ok(a) => {
                let text = serde_json::to_vec(&a).expect("an action writes");
                let back: ActionRequest = serde_json::from_slice(&text).expect("and reads");
                assert_eq!(back, a, "an action request round trip");
                Response::json(
                    200,
                    &StateBody {
                        state: "running".into(),
                    },
                )
            }
            Err(e) => Response::error(400, format!("invalid action request: {e}")),
        },
        (Method::Post, "settings") => match serde_json::from_slice::<SettingsRequest>(&r.body) {
            Ok(s) => {
                let text = serde_json::to_vec(&s).expect("settings write");
                let back: SettingsRequest = serde_json::from_slice(&text).expect("and read");
                assert_eq!(back, s, "a settings request round trip");
                settings(base, &s)
            }
            Err(e) => Response::error(400, format!("invalid settings request: {e}")),
        },
        (Method::Get, "" | "state" | "metrics") => Response::no_content(),
        (_, "" | "state" | "actions" | "metrics" | "settings") => {
            Response::error(405, "method not allowed")
        }
        _ => Response::error(404, "no such resource"),
    }
}

pub fn control_api(data: &[u8]) {
    control_api_statuses(data);
}

/// Runs an input; the status of every answer (for the corpus test).
pub fn control_api_statuses(data: &[u8]) -> Vec<u16> {
    let mut statuses = Vec::new();
    let Some((&size, sent)) = data.split_first() else {
        return statuses;
    };
    let base = VmSpec::from_toml(Path::new("vm.toml"), VM_TOML).expect("the base vm.toml");
    let mut input = BufReader::with_capacity(1 + usize::from(size % 64), sent);
    for _ in 0..MAX_REQUESTS {
        match read_request(&mut input) {
            Ok(r) => {
                assert!(r.body.len() <= api::MAX_BODY, "a body past the limit");
                let answer = route(&base, &r);
                answered(&answer);
                statuses.push(answer.status);
                if r.close {
                    break;
                }
            }
            Err(ReadError::Bad(answer)) => {
                assert!(
                    (400..500).contains(&answer.status),
                    "refused with {}",
                    answer.status
                );
                answered(&answer);
                statuses.push(answer.status);
                break;
            }
            Err(ReadError::Closed | ReadError::Io) => break,
        }
    }
    statuses
}

/// Requests as `api::Client::request` writes them (one per connection), and a curl
/// session on one keep-alive connection (the README shows curl on the socket).
pub fn control_api_seeds() -> Vec<(String, Vec<u8>)> {
    let requests = [
        ("GET", "", ""),
        ("GET", "/state", ""),
        ("POST", "/actions", r#"{"action":"pause"}"#),
        (
            "POST",
            "/actions",
            r#"{"action":"snapshot","name":"before","description":"x"}"#,
        ),
        (
            "POST",
            "/settings",
            r#"{"settings":["cpu_shares=300","disk0.bw=10M","net0.rx_bw=none"]}"#,
        ),
        (
            "POST",
            "/settings",
            r#"{"settings":["balloon=256M","cpu_affinity=0"]}"#,
        ),
    ];
    let mut seeds = Vec::new();
    for (i, (method, sub, body)) in requests.iter().enumerate() {
        let mut input = vec![63u8];
        input.extend_from_slice(
            format!(
                "{method} /v1/vms/{NAME}{sub} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        seeds.push((format!("cli-{i}"), input));
    }
    let mut session = vec![0u8];
    for (method, sub, body) in [
        ("GET", "/metrics", ""),
        ("POST", "/actions", r#"{"action":"resume"}"#),
        ("GET", "", ""),
    ] {
        let mut r = format!(
            "{method} /v1/vms/{NAME}{sub} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"
        );
        if !body.is_empty() {
            r += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        session.extend_from_slice((r + "\r\n" + body).as_bytes());
    }
    seeds.push(("curl-keep-alive".into(), session));
    seeds
}
