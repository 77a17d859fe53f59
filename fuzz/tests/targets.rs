//! The device, loader, host and control API harnesses on a stable compiler: every file
//! of their corpora, then seeded mutations of them. Also: the generated seeds are the
//! ones checked in (`VESSEL_FUZZ_WRITE_SEEDS=1` writes them; `VESSEL_FUZZ_TRACE=FILE`
//! adds seeds from a recorded boot, see docs/fuzzing.md), the seeds reach what they
//! are for, and every target has its binary, wrapper, corpus and row in the docs.

use std::path::{Path, PathBuf};

use vessel_fuzz::mutate::{Rng, mutate};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Named inputs.
type Seeds = Vec<(String, Vec<u8>)>;

/// Seeds the harnesses make, by target.
fn generated() -> Vec<(&'static str, Seeds)> {
    let own = |v: Vec<(&str, Vec<u8>)>| {
        v.into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect::<Vec<_>>()
    };
    let discover = std::fs::read(root().join("corpus/dhcp/discover")).unwrap();
    let code64 = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp $-1
    let bzimage = testguest::bzimage(&code64);
    let pvh = testguest::pvh_elf(&[0xf4]);
    let pvh32 = testguest::kernel32::pvh_elf32(&[0xf4]);
    let multiboot_elf = testguest::kernel32::multiboot_elf(&[0xf4]);
    let multiboot_binary = testguest::kernel32::multiboot_binary(&[0xf4]);
    let initrd: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let kernel = vessel_fuzz::kernel::kernel_input;
    vec![
        (
            "virtio_rng",
            own(vessel_fuzz::virtio_rng::virtio_rng_seeds()),
        ),
        (
            "virtio_console",
            own(vessel_fuzz::virtio_console::virtio_console_seeds()),
        ),
        (
            "virtio_balloon",
            own(vessel_fuzz::virtio_balloon::virtio_balloon_seeds()),
        ),
        (
            "virtio_net",
            own(vessel_fuzz::virtio_net::virtio_net_seeds(&discover)),
        ),
        ("virtio_pci", vessel_fuzz::virtio_pci::virtio_pci_seeds()),
        ("control_api", vessel_fuzz::control_api::control_api_seeds()),
        ("host_toml", own(vessel_fuzz::host_toml::host_toml_seeds())),
        (
            "block_queue",
            own(vessel_fuzz::block_queue::block_queue_seeds()),
        ),
        (
            "vsock_device",
            own(vessel_fuzz::vsock_device::vsock_device_seeds()),
        ),
        (
            "frame_stream",
            own(vessel_fuzz::frame_stream::frame_stream_seeds(&discover)),
        ),
        (
            "snapshot_memory",
            own(vessel_fuzz::snapshot_memory::snapshot_memory_seeds()),
        ),
        ("virtio_fs", vessel_fuzz::virtio_fs::virtio_fs_seeds()),
        (
            "x86_decode",
            own(vessel_fuzz::x86_decode::x86_decode_seeds()),
        ),
        (
            "x86_translate",
            own(vessel_fuzz::x86_translate::x86_translate_seeds()),
        ),
        (
            "kernel_loader",
            own(vec![
                (
                    "testguest-bzimage",
                    kernel(4, "console=ttyS0 reboot=k panic=1", &[], &bzimage),
                ),
                (
                    "testguest-bzimage-initrd",
                    kernel(5, "console=ttyS0", &initrd, &bzimage),
                ),
                ("testguest-pvh", kernel(4, "console=ttyS0", &[], &pvh)),
                ("testguest-pvh-initrd", kernel(3, "", &initrd, &pvh)),
                ("testguest-pvh32", kernel(4, "console=ttyS0", &[], &pvh32)),
                (
                    "testguest-multiboot-elf-initrd",
                    kernel(3, "a test", &initrd, &multiboot_elf),
                ),
                (
                    "testguest-multiboot-binary",
                    kernel(2, "", &[], &multiboot_binary),
                ),
            ]),
        ),
    ]
}

/// `VESSEL_FUZZ_WRITE_SEEDS=1` writes the generated seeds; with `VESSEL_FUZZ_TRACE`
/// naming recorded traces (colon-separated), their seeds too.
#[test]
fn write_seeds_when_asked() {
    if std::env::var("VESSEL_FUZZ_WRITE_SEEDS").as_deref() != Ok("1") {
        return;
    }
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for (target, seeds) in generated() {
        for (name, bytes) in seeds {
            write(target, &name, &bytes);
        }
    }
    let Ok(traces) = std::env::var("VESSEL_FUZZ_TRACE") else {
        return;
    };
    for (t, path) in traces.split(':').enumerate() {
        let text = std::fs::read_to_string(path).unwrap();
        let accesses = vessel_fuzz::trace::parse(&text);
        for (target, seeds) in [
            ("legacy_ports", vessel_fuzz::trace::legacy_seeds(&accesses)),
            ("virtio_pci", vessel_fuzz::trace::pci_seeds(&accesses)),
            ("irqchip", vessel_fuzz::trace::irqchip_seeds(&accesses)),
        ] {
            for (i, bytes) in seeds.iter().enumerate() {
                write(target, &format!("boot-{t}-{i}"), bytes);
            }
        }
    }
}

#[test]
fn generated_seeds_are_checked_in() {
    for (target, seeds) in generated() {
        let files = corpus(target);
        for (name, bytes) in seeds {
            let file = files.iter().find(|(n, _)| *n == name).unwrap_or_else(|| {
                panic!("{target}/{name} missing (VESSEL_FUZZ_WRITE_SEEDS=1 cargo test writes it)")
            });
            assert!(
                file.1 == bytes,
                "{target}/{name} is not the seed the harness makes"
            );
        }
    }
}

/// The bus-access targets have seeds from a real boot.
#[test]
fn recorded_boot_seeds_are_checked_in() {
    for target in ["legacy_ports", "virtio_pci", "irqchip"] {
        let boot = corpus(target)
            .into_iter()
            .filter(|(n, _)| n.starts_with("boot-"))
            .count();
        assert!(boot > 0, "{target}: no seeds from a recorded boot");
    }
}

#[test]
fn seeds_reach_what_they_are_for() {
    for (name, bytes) in vessel_fuzz::virtio_pci::virtio_pci_seeds() {
        let n = vessel_fuzz::virtio_pci::virtio_pci_activations(&bytes);
        let expected = match name.as_str() {
            // Refused features: never started, not even by the snapshot.
            "regression-refused-features-resumed" => 0,
            // Started at DRIVER_OK; the features changed since then stop it.
            "regression-features-changed-while-running" => 1,
            // At DRIVER_OK, when the snapshot at the end resumes it, in its copy.
            _ => 3,
        };
        assert_eq!(n, expected, "{name}: activations");
    }
    for (name, bytes) in corpus("kernel_loader") {
        if name.starts_with("testguest") {
            assert!(vessel_fuzz::kernel::kernel_loads(&bytes), "{name} loads");
        }
    }
    // The block seeds complete requests on every kind of disk, read back what they
    // wrote and are refused what they must be.
    for (name, bytes) in vessel_fuzz::block_queue::block_queue_seeds() {
        let s = vessel_fuzz::block_queue::block_queue_stats(&bytes);
        assert_eq!((s.aliased, s.refused), (0, 0), "{name}: {s:?}");
        match name {
            "refused" => assert_eq!((s.ok, s.ioerr, s.unsupp), (2, 7, 3), "{name}: {s:?}"),
            "qcow2-magic-on-probed-raw" => assert_eq!((s.ok, s.ioerr), (0, 1), "{name}: {s:?}"),
            // The write refused; the discard not offered.
            n if n.starts_with("readonly") => {
                assert_eq!((s.ok, s.ioerr, s.unsupp), (3, 1, 1), "{name}: {s:?}")
            }
            _ => assert!(
                s.ioerr == 0 && s.unsupp == 0 && s.read_checked > 0,
                "{name}: {s:?}"
            ),
        }
    }
    // The vsock seeds move data both ways through the queues, and the event goes out.
    for (name, bytes) in vessel_fuzz::vsock_device::vsock_device_seeds() {
        let s = vessel_fuzz::vsock_device::vsock_device_stats(&bytes);
        let ok = match name {
            "linux-guest-connects" => {
                s.accepted == 1 && s.events == 1 && s.bytes_to_host >= 18 && s.bytes_to_guest >= 256
            }
            "linux-host-connects" => {
                s.host_initiated == 1 && s.bytes_to_host >= 23 && s.bytes_to_guest >= 1280
            }
            // The reset the seed asks for, none forced by the harness.
            _ => s.accepted == 1 && s.packets_to_guest >= 2 && s.resets == 1,
        };
        assert!(
            ok && (name == "device-reset" || s.resets == 0),
            "{name}: {s:?}"
        );
    }
    // The frame stream seeds carry frames both ways, and drop the connections they
    // break.
    let discover = std::fs::read(root().join("corpus/dhcp/discover")).unwrap();
    for (name, bytes) in vessel_fuzz::frame_stream::frame_stream_seeds(&discover) {
        let s = vessel_fuzz::frame_stream::frame_stream_stats(&bytes);
        let ok = match name {
            // Every frame each way, the largest one included.
            "passt-traffic" => (s.received, s.sent, s.peer_read) == (4, 2, 4 + 42 + 4 + 1500),
            "passt-restarted-socket-full" => s.reconnects == 2 && s.received == 2 && s.sent == 17,
            _ => s.dropped_connections == 3 && s.received == 2,
        };
        assert!(ok, "{name}: {s:?}");
    }
    // The snapshot seeds: the whole ones restore, the others are refused where they
    // should be.
    for (name, bytes) in vessel_fuzz::snapshot_memory::snapshot_memory_seeds() {
        let s = vessel_fuzz::snapshot_memory::snapshot_memory_stats(&bytes);
        let (read, restored) = match name {
            n if n.starts_with("memory-") => (false, false),
            n if n.starts_with("vm-with") || n.starts_with("regression-") => (true, false),
            _ => (true, true),
        };
        assert_eq!((s.read, s.restored), (read, restored), "{name}: {s:?}");
    }
    // The virtio-fs seeds: the device is made on a reply it can take, and activated
    // (twice for the Linux seed) unless a ring is outside RAM or virtiofsd is gone.
    for (name, bytes) in vessel_fuzz::virtio_fs::virtio_fs_seeds() {
        let s = vessel_fuzz::virtio_fs::virtio_fs_stats(&bytes);
        let (made, activated, refused) = match name.as_str() {
            "linux-probe-and-reset" => (true, 2, 0),
            "ring-outside-ram" => (true, 0, 1),
            "features-reply-small-size" | "features-reply-twice" => (true, 1, 0),
            n if n.starts_with("features-reply-") => (false, 0, 0),
            // (vhost reads a whole ring state whatever size the header says.)
            "vring-base-reply-small-size" => (true, 2, 0),
            // A reset that gets an answer it cannot take, or more than its answer,
            // ends the connection: the second activation fails.
            n if n.starts_with("vring-base-reply-") => (true, 1, 1),
            _ => (true, 2, 0),
        };
        assert_eq!(
            (s.made, s.activated, s.refused),
            (made, activated, refused),
            "{name}: {s:?}"
        );
    }
    // The x86 seeds run their code (the refused one stops at once).
    for (name, bytes) in vessel_fuzz::x86_decode::x86_decode_seeds() {
        let n = vessel_fuzz::x86_decode::x86_decode_steps(&bytes);
        let want = match name {
            "linux-64-function" => 14,
            "system-and-strings-64" => 11,
            "sse-and-x87-64" => 9,
            // The division by zero faults.
            "protected-32" => 6,
            "real-mode-firmware" => 16,
            "across-a-page" => 2,
            _ => 0,
        };
        assert_eq!(n, want, "{name}: instructions completed");
    }
    // The translating tier's seeds run to their hlt both times (at CPL 3, to the #GP
    // it raises), partly translated, and no less of it the second time (the TLB warm).
    for (name, bytes) in vessel_fuzz::x86_translate::x86_translate_seeds() {
        let r = vessel_fuzz::x86_translate::x86_translate_runs(&bytes);
        let halts = !name.ends_with("cpl3");
        assert!(
            r.halted == [halts; 2] && r.translated[0] > 0 && r.translated[1] >= r.translated[0],
            "{name}: {r:?}"
        );
    }
    // The control API seeds are requests answered without a refusal.
    for (name, bytes) in vessel_fuzz::control_api::control_api_seeds() {
        let statuses = vessel_fuzz::control_api::control_api_statuses(&bytes);
        assert!(!statuses.is_empty(), "{name}: no request read");
        assert!(
            statuses.iter().all(|s| (200..300).contains(s)),
            "{name}: {statuses:?}"
        );
    }
}

/// Each target over its corpus, then `count` mutations of it.
fn run(target: &str, seed: u64, count: usize) {
    let harness = vessel_fuzz::TARGETS
        .iter()
        .find(|t| t.name == target)
        .unwrap()
        .run;
    let inputs: Vec<Vec<u8>> = corpus(target).into_iter().map(|(_, b)| b).collect();
    assert!(!inputs.is_empty(), "{target}: empty corpus");
    for input in &inputs {
        harness(input);
    }
    let mut r = Rng(seed);
    for i in 0..count {
        let input = mutate(&mut r, &inputs, i);
        let run = std::panic::catch_unwind(|| harness(&input));
        if let Err(panic) = run {
            let dir = root().join("artifacts").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("test-crash-{:08x}", crc32fast::hash(&input)));
            std::fs::write(&file, &input).unwrap();
            eprintln!("{target}: mutation {i} saved as {}", file.display());
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!("{target}: {} inputs", inputs.len() + count);
}

/// `VESSEL_FUZZ_REPLAY=TARGET:FILE` runs one input (a crash from a fuzzer or a smoke
/// run) through its harness on a stable compiler.
#[test]
fn replay_when_asked() {
    let Ok(replay) = std::env::var("VESSEL_FUZZ_REPLAY") else {
        return;
    };
    let (target, file) = replay.split_once(':').expect("TARGET:FILE");
    let harness = vessel_fuzz::TARGETS
        .iter()
        .find(|t| t.name == target)
        .unwrap_or_else(|| panic!("no target {target}"))
        .run;
    harness(&std::fs::read(file).unwrap());
}

#[test]
fn virtio_net_corpus_and_mutations() {
    run("virtio_net", 0x4e37_0001, 3000);
}

#[test]
fn virtio_rng_corpus_and_mutations() {
    run("virtio_rng", 0x7279_0001, 3000);
}

#[test]
fn virtio_console_corpus_and_mutations() {
    run("virtio_console", 0xc0de_0001, 3000);
}

#[test]
fn virtio_balloon_corpus_and_mutations() {
    run("virtio_balloon", 0xba11_0001, 3000);
}

#[test]
fn virtio_pci_corpus_and_mutations() {
    run("virtio_pci", 0x9c10_0001, 3000);
}

#[test]
fn legacy_ports_corpus_and_mutations() {
    run("legacy_ports", 0x1e9a_0001, 3000);
}

#[test]
fn irqchip_corpus_and_mutations() {
    run("irqchip", 0x1a91_0001, 3000);
}

#[test]
fn kernel_loader_corpus_and_mutations() {
    run("kernel_loader", 0xb007_0001, 2000);
}

#[test]
fn host_toml_corpus_and_mutations() {
    run("host_toml", 0x4057_0001, 3000);
}

#[test]
fn control_api_corpus_and_mutations() {
    run("control_api", 0xa91c_0001, 3000);
}

#[test]
fn block_queue_corpus_and_mutations() {
    run("block_queue", 0xb10c_0001, 3000);
}

#[test]
fn vsock_device_corpus_and_mutations() {
    run("vsock_device", 0x750c_0001, 3000);
}

#[test]
fn frame_stream_corpus_and_mutations() {
    run("frame_stream", 0xf4a3_0001, 3000);
}

#[test]
fn snapshot_memory_corpus_and_mutations() {
    run("snapshot_memory", 0x5a95_0001, 2000);
}

#[test]
fn virtio_fs_corpus_and_mutations() {
    run("virtio_fs", 0xf5f5_0001, 3000);
}

#[test]
fn x86_decode_corpus_and_mutations() {
    run("x86_decode", 0x86de_0001, 5000);
}

#[test]
fn x86_translate_corpus_and_mutations() {
    run("x86_translate", 0x86c7_0001, 2000);
}

/// Every target is a cargo-fuzz binary with its wrapper, a corpus, a stable test and a
/// row in docs/fuzzing.md; nothing is listed that is not a target.
#[test]
fn every_target_is_wired_up() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let bins: Vec<&str> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("name = ")))
        .map(|n| n.trim_matches('"'))
        .collect();
    let names: Vec<&str> = vessel_fuzz::TARGETS.iter().map(|t| t.name).collect();
    let (mut sorted_bins, mut sorted_names) = (bins.clone(), names.clone());
    sorted_bins.sort_unstable();
    sorted_names.sort_unstable();
    assert_eq!(sorted_bins, sorted_names, "[[bin]]s and TARGETS");
    let docs = std::fs::read_to_string(root().join("../docs/fuzzing.md")).unwrap();
    let tests = std::fs::read_to_string(root().join("tests/corpus.rs")).unwrap()
        + &std::fs::read_to_string(root().join("tests/targets.rs")).unwrap();
    for name in names {
        let wrapper = std::fs::read_to_string(root().join(format!("fuzz_targets/{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz_targets/{name}.rs: {e}"));
        assert!(
            wrapper.contains(&format!("vessel_fuzz::{name}(data)")),
            "{name}'s wrapper"
        );
        assert!(!corpus(name).is_empty(), "{name}: empty corpus");
        assert!(
            docs.contains(&format!("| `{name}` |")),
            "{name}: no row in docs/fuzzing.md"
        );
        assert!(
            tests.contains(&format!("fn {name}_corpus_and")),
            "{name}: no stable test"
        );
    }
}
