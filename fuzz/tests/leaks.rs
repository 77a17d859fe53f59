//! The socket harnesses leave nothing behind: every descriptor a run opens is closed
//! and every socket file it binds is removed by the time it returns (a test binary of
//! its own, so no other test opens files meanwhile).

use std::path::PathBuf;

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn socket_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(format!("/tmp/vessel-fuzz-sock-{}", std::process::id()));
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn runs_leave_no_descriptors_or_socket_files() {
    let vsock = vessel_fuzz::vsock_seeds();
    let agent = vessel_fuzz::agent_seeds();
    // The first runs set up the sandbox directory (and its descriptor-free state).
    vessel_fuzz::vsock_packets(&vsock[0].1);
    vessel_fuzz::agent_protocol(&agent[0].1);
    let before = fds();
    for _ in 0..10 {
        for (_, s) in &vsock {
            vessel_fuzz::vsock_packets(s);
        }
        for (_, s) in &agent {
            vessel_fuzz::agent_protocol(s);
        }
    }
    assert_eq!(fds(), before, "descriptors left open");
    assert_eq!(socket_files(), Vec::<PathBuf>::new(), "socket files left");
}
