//! The socket, file and thread harnesses leave nothing behind: every descriptor a run
//! opens is closed and every socket file it binds is removed by the time it returns (a
//! test binary of its own, so no other test opens files meanwhile).

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

/// A harness and the inputs to run it on.
type Runs = Vec<(fn(&[u8]), Vec<Vec<u8>>)>;

#[test]
fn runs_leave_no_descriptors_or_socket_files() {
    let discover = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/dhcp/discover"))
        .expect("the DHCP seed");
    let named = |v: Vec<(&'static str, Vec<u8>)>| v.into_iter().map(|(_, b)| b).collect();
    let runs: Runs = vec![
        (
            vessel_fuzz::vsock_packets,
            named(vessel_fuzz::vsock_seeds()),
        ),
        (
            vessel_fuzz::agent_protocol,
            named(vessel_fuzz::agent_seeds()),
        ),
        (
            vessel_fuzz::vsock_device,
            named(vessel_fuzz::vsock_device::vsock_device_seeds()),
        ),
        (
            vessel_fuzz::block_queue,
            named(vessel_fuzz::block_queue::block_queue_seeds()),
        ),
        (
            vessel_fuzz::frame_stream,
            named(vessel_fuzz::frame_stream::frame_stream_seeds(&discover)),
        ),
        (
            vessel_fuzz::virtio_fs,
            vessel_fuzz::virtio_fs::virtio_fs_seeds()
                .into_iter()
                .map(|(_, b)| b)
                .collect(),
        ),
        (
            vessel_fuzz::snapshot_memory,
            named(vessel_fuzz::snapshot_memory::snapshot_memory_seeds()),
        ),
    ];
    // The first runs set up the sandbox directories (and their descriptor-free state).
    for (run, seeds) in &runs {
        run(&seeds[0]);
    }
    let before = fds();
    for _ in 0..10 {
        for (run, seeds) in &runs {
            for s in seeds {
                run(s);
            }
        }
    }
    assert_eq!(fds(), before, "descriptors left open");
    assert_eq!(socket_files(), Vec::<PathBuf>::new(), "socket files left");
}
