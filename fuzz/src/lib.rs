//! Fuzz harnesses for what a guest driver controls: the split virtqueue (available
//! ring, descriptor chains, indirect tables, used ring) and the virtio-blk request
//! parser. Used by the cargo-fuzz targets in `fuzz_targets/` and, on a stable
//! compiler, by `tests/corpus.rs` (the checked-in corpus plus seeded random inputs).
//!
//! Input layout: byte 0 picks the queue size (2^(b % 9)), byte 1 flags (bit 0:
//! EVENT_IDX; bits 8..: the head to parse for the block target), the rest is the
//! guest memory image: descriptor table at 0x0, available ring at 0x1000, used ring at
//! 0x2000, buffers and indirect tables wherever the descriptors say.
//!
//! Also: a DHCP frame from a guest, the packets a guest sends its vsock device
//! (`vsock.rs`), what a guest agent sends the host (`agent.rs`), the virtio network,
//! entropy, console and balloon queues (`virtio_*.rs` on `driver.rs`), the block
//! device's requests against a disk (`block_queue.rs`), the vsock device's queues
//! (`vsock_device.rs`), the PCI transport (`virtio_pci.rs`), the legacy ports
//! (`legacy.rs`), the interrupt controllers (`irqchip.rs`), the software CPU
//! (`x86_decode.rs`) and its translating tier (`x86_translate.rs`), what a control
//! API client sends (`control_api.rs`), what a network peer (`frame_stream.rs`) and
//! virtiofsd (`virtio_fs.rs`) send, and what whoever hands vessel a file or a stream
//! controls: a migration stream (`migration_stream.rs`), a snapshot's state file and a
//! snapshot being restored (`snapshot_memory.rs`), a qcow2 disk image (`qcow2.rs`), a
//! VM's vm.toml (`vm_toml.rs`), the host's host.toml (`host_toml.rs`) and a kernel and
//! initrd (`kernel.rs`). [`TARGETS`] lists them all; docs/fuzzing.md says how to run
//! them.

mod agent;
pub mod block_queue;
pub mod control_api;
pub mod driver;
pub mod frame_stream;
pub mod host_toml;
pub mod irqchip;
pub mod kernel;
pub mod legacy;
pub mod migration_stream;
pub mod mutate;
pub mod ops;
mod qcow2;
mod sandbox;
pub mod snapshot_memory;
pub mod trace;
pub mod virtio_balloon;
pub mod virtio_console;
pub mod virtio_fs;
pub mod virtio_net;
pub mod virtio_pci;
pub mod virtio_rng;
mod vm_toml;
pub mod vsock;
pub mod vsock_device;
pub mod x86_decode;
pub mod x86_translate;
pub use agent::{agent_protocol, agent_protocol_outcome, agent_seeds};
pub use block_queue::block_queue;
pub use control_api::control_api;
pub use frame_stream::frame_stream;
pub use host_toml::host_toml;
pub use irqchip::irqchip;
pub use kernel::kernel_loader;
pub use legacy::legacy_ports;
pub use migration_stream::migration_stream;
pub use qcow2::{qcow2_image, qcow2_opens};
pub use snapshot_memory::snapshot_memory;
pub use virtio_balloon::virtio_balloon;
pub use virtio_console::virtio_console;
pub use virtio_fs::virtio_fs;
pub use virtio_net::virtio_net;
pub use virtio_pci::virtio_pci;
pub use virtio_rng::virtio_rng;
pub use vm_toml::vm_toml;
pub use vsock::{vsock_packets, vsock_packets_stats, vsock_seeds};
pub use vsock_device::vsock_device;
pub use x86_decode::x86_decode;
pub use x86_translate::x86_translate;

/// A fuzz target: its name (the cargo-fuzz binary and corpus directory) and harness.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, as the stable smoke runner and the consistency test see them.
pub const TARGETS: [Target; 26] = [
    Target {
        name: "queue",
        run: queue,
    },
    Target {
        name: "block_request",
        run: block_request,
    },
    Target {
        name: "dhcp",
        run: dhcp,
    },
    Target {
        name: "qcow2_image",
        run: qcow2_image,
    },
    Target {
        name: "state_file",
        run: state_file,
    },
    Target {
        name: "vm_toml",
        run: vm_toml,
    },
    Target {
        name: "vsock_packets",
        run: vsock_packets,
    },
    Target {
        name: "agent_protocol",
        run: agent_protocol,
    },
    Target {
        name: "virtio_net",
        run: virtio_net,
    },
    Target {
        name: "virtio_rng",
        run: virtio_rng,
    },
    Target {
        name: "virtio_console",
        run: virtio_console,
    },
    Target {
        name: "virtio_balloon",
        run: virtio_balloon,
    },
    Target {
        name: "virtio_pci",
        run: virtio_pci,
    },
    Target {
        name: "legacy_ports",
        run: legacy_ports,
    },
    Target {
        name: "irqchip",
        run: irqchip,
    },
    Target {
        name: "kernel_loader",
        run: kernel_loader,
    },
    Target {
        name: "host_toml",
        run: host_toml,
    },
    Target {
        name: "control_api",
        run: control_api,
    },
    Target {
        name: "block_queue",
        run: block_queue,
    },
    Target {
        name: "vsock_device",
        run: vsock_device,
    },
    Target {
        name: "frame_stream",
        run: frame_stream,
    },
    Target {
        name: "snapshot_memory",
        run: snapshot_memory,
    },
    Target {
        name: "virtio_fs",
        run: virtio_fs,
    },
    Target {
        name: "x86_decode",
        run: x86_decode,
    },
    Target {
        name: "x86_translate",
        run: x86_translate,
    },
    Target {
        name: "migration_stream",
        run: migration_stream,
    },
];

use devices::virtio::block::request::{self, Request, RequestKind};
use devices::virtio::chain::{Chain, Cursor, UsedRing, pop, pop_all};
use devices::virtio::guest_io::{GuestAccess, GuestRam};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Two adjacent regions (buffers may straddle them) and a third after a hole.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x4000), (0x1_0000, 0x1000)];
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

pub struct Setup {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub head: u16,
}

/// Guest memory and a ready queue from fuzz input; None for input too short to mean
/// anything.
pub fn setup(data: &[u8]) -> Option<Setup> {
    if data.len() < 4 {
        return None;
    }
    let size = 1u16 << (data[0] % 9);
    let event_idx = data[1] & 1 != 0;
    let head = u16::from_le_bytes([data[2], data[3]]);
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).ok()?;
    let mut image = &data[4..];
    for (base, len) in REGIONS {
        let n = image.len().min(len);
        mem.write_slice(&image[..n], GuestAddress(base)).ok()?;
        image = &image[n..];
    }
    let mut queue = Queue::new(256).ok()?;
    queue.try_set_size(size).ok()?;
    queue.try_set_desc_table_address(GuestAddress(DESC)).ok()?;
    queue.try_set_avail_ring_address(GuestAddress(AVAIL)).ok()?;
    queue.try_set_used_ring_address(GuestAddress(USED)).ok()?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some(Setup { mem, queue, head })
}

fn check_chain(mem: &GuestMemoryMmap, chain: &Chain) {
    let mut total = 0u64;
    for (segs, access) in [
        (&chain.readable, Permissions::Read),
        (&chain.writable, Permissions::Write),
    ] {
        for s in segs.iter() {
            assert!(s.len > 0, "zero-length segment kept");
            assert!(
                mem.check_range(s.addr, s.len as usize, access),
                "segment {s:?} outside guest memory"
            );
            total += u64::from(s.len);
        }
    }
    assert!(
        total <= u64::from(u32::MAX),
        "chain longer than 4 GiB accepted"
    );
}

/// The queue: pop everything available, walk every chain, read and write through
/// the buffers, publish completions, decide on interrupts; twice, as a device would
/// across notifications (through [`GuestRam`], as the block device does, then
/// through plain `GuestMemory`, as the others do).
pub fn queue(data: &[u8]) {
    let Some(Setup { mem, mut queue, .. }) = setup(data) else {
        return;
    };
    let mut used = UsedRing::new(&queue);
    let ram = GuestRam::new(&mem);
    if !serve(&mem, &ram, &mut queue, &mut used) {
        return;
    }
    if !serve(&mem, &mem, &mut queue, &mut used) {
        return;
    }
    let _ = queue.enable_notification(&mem);
    let _ = pop(&mut queue, &mem);
}

fn serve<A: GuestAccess>(
    mem: &GuestMemoryMmap,
    access: &A,
    queue: &mut Queue,
    used: &mut UsedRing,
) -> bool {
    let mut chain = Chain::new();
    let mut heads = Vec::new();
    let mut buf = [0u8; 64];
    if pop_all(queue, access, &mut heads).is_err() {
        return false;
    }
    for &head in &heads {
        if chain.walk(access, queue, head).is_err() {
            continue;
        }
        check_chain(mem, &chain);
        let mut r = Cursor::new(&chain.readable);
        let n = r.remaining().min(buf.len() as u64) as usize;
        assert!(r.read(access, &mut buf[..n]));
        let mut w = Cursor::new(&chain.writable);
        let written = w.write(access, &buf[..n.min(chain.writable_len() as usize)]);
        used.push(head, written as u32);
    }
    if used.publish(queue, access).is_err() {
        return false;
    }
    let _ = used.needs_interrupt(queue, access);
    true
}

/// The block request parser on the chain at the input's head.
pub fn block_request(data: &[u8]) {
    let Some(Setup { mem, queue, head }) = setup(data) else {
        return;
    };
    let head = head % (queue.size() + 1); // mostly in range, sometimes just past
    let ram = GuestRam::new(&mem);
    let mut chain = Chain::new();
    if chain.walk(&ram, &queue, head).is_err() {
        return;
    }
    check_chain(&mem, &chain);
    let mut req = Request::default();
    if req.parse(&chain, &ram).is_err() {
        return;
    }
    let status_ok = chain
        .writable
        .iter()
        .any(|s| (s.addr.0..s.addr.0 + u64::from(s.len)).contains(&req.status.0));
    assert!(status_ok, "status byte outside the writable buffers");
    let sum: u64 = req.data.iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(sum, req.data_len);
    match req.kind {
        RequestKind::Read | RequestKind::GetId => {
            assert!(req.data_len < chain.writable_len());
            for s in &req.data {
                assert!(mem.check_range(s.addr, s.len as usize, Permissions::Write));
            }
        }
        RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => {
            assert!(req.data_len + request::HEADER_LEN <= chain.readable_len());
            let mut ranges = Vec::new();
            if request::parse_ranges(&ram, &req.data, req.data_len, 32, &mut ranges).is_ok() {
                assert_eq!(ranges.len() as u64 * request::RANGE_LEN, req.data_len);
                for r in &ranges {
                    let _ = request::byte_range(
                        r.sector,
                        u64::from(r.sectors) * request::SECTOR_SIZE,
                        1 << 30,
                    );
                }
            }
        }
        RequestKind::Flush | RequestKind::Unsupported(_) => assert_eq!(req.data_len, 0),
    }
}

/// A well-formed input (a read request: header, two data buffers, status) for seeding
/// corpora.
pub fn seed_block_read() -> Vec<u8> {
    let mut image = vec![0u8; 0x8000];
    let desc = |image: &mut Vec<u8>, i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let at = DESC as usize + 16 * i;
        image[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        image[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        image[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        image[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(&mut image, 0, 0x3000, 16, 1, 1);
    desc(&mut image, 1, 0x3800, 512, 3, 2);
    desc(&mut image, 2, 0x3f00, 512, 3, 3);
    desc(&mut image, 3, 0x3ff0, 1, 2, 0);
    image[0x3000..0x3004].copy_from_slice(&request::types::IN.to_le_bytes());
    image[0x1002..0x1004].copy_from_slice(&1u16.to_le_bytes()); // avail idx
    let mut input = vec![4, 1, 0, 0];
    input.extend(image);
    input
}

/// A frame from a guest on a named network, as vessel's switch sees it: its DHCP server
/// answers well-formed requests and leaves everything else alone, never panicking.
pub fn dhcp(data: &[u8]) {
    let mut server = network::dhcp::DhcpServer::new("fuzz");
    for _ in 0..2 {
        if let Some(reply) = server.handle(data) {
            // An Ethernet broadcast of IPv4/UDP from the server.
            assert!(reply.len() >= 42 + 240, "a short reply");
            assert_eq!(reply[6..12], network::dhcp::SERVER_MAC);
        }
    }
}

/// A snapshot's state file, as `vessel run --restore` reads it. Byte 0 odd: the rest is
/// taken as the JSON body and given a valid header and checksum, so the fuzzer reaches
/// the parser and the checks behind the CRC.
pub fn state_file(data: &[u8]) {
    let path = std::path::Path::new("state");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        let mut v = format!(
            "VESSEL-STATE {}\ncrc32 {:08x}\n",
            vmm::snapshot::FORMAT,
            crc32fast::hash(rest)
        )
        .into_bytes();
        v.extend_from_slice(rest);
        v
    } else {
        rest.to_vec()
    };
    if let Ok(s) = vmm::snapshot::file::decode_state(path, &bytes) {
        // What decodes passed the checks the builder relies on.
        assert_eq!(usize::from(s.cpus), s.vcpus.len());
        assert_eq!(s.memory.iter().map(|r| r.len).sum::<u64>(), s.memory_bytes);
    }
}
