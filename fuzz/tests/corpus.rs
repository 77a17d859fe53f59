//! The fuzz harnesses on a stable compiler: every file of the checked-in corpora,
//! then seeded pseudo-random inputs (fresh ones and mutations of a well-formed
//! request). `cargo test --manifest-path fuzz/Cargo.toml --release`.

use std::path::Path;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    inputs.push(vessel_fuzz::seed_block_read());
    inputs
}

/// xorshift64*: fixed seeds, reproducible failures.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn inputs(name: &str, seed: u64, count: usize) -> Vec<Vec<u8>> {
    let mut out = corpus(name);
    let base = vessel_fuzz::seed_block_read();
    let mut r = Rng(seed);
    for i in 0..count {
        let mut v = if i % 2 == 0 {
            base.clone()
        } else {
            let len = (r.next() % 0x9000) as usize;
            (0..len).map(|_| r.next() as u8).collect()
        };
        // Mutate: flip bytes, mostly in the rings and the first buffers.
        for _ in 0..1 + r.next() % 16 {
            if v.is_empty() {
                break;
            }
            let hot = (r.next() % 0x3100) as usize;
            let at = if r.next().is_multiple_of(4) {
                (r.next() as usize) % v.len()
            } else {
                hot % v.len()
            };
            v[at] = r.next() as u8;
        }
        out.push(v);
    }
    out
}

#[test]
fn queue_corpus_and_random_inputs() {
    let all = inputs("queue", 0x9e37_79b9, 20_000);
    for input in &all {
        vessel_fuzz::queue(input);
    }
    eprintln!("queue: {} inputs", all.len());
}

#[test]
fn block_request_corpus_and_random_inputs() {
    let all = inputs("block_request", 0x7f4a_7c15, 20_000);
    for input in &all {
        vessel_fuzz::block_request(input);
    }
    eprintln!("block_request: {} inputs", all.len());
}

/// `VESSEL_FUZZ_WRITE_SEEDS=1` writes the seed inputs into the corpus directories.
#[test]
fn write_seeds_when_asked() {
    if std::env::var("VESSEL_FUZZ_WRITE_SEEDS").as_deref() != Ok("1") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for name in ["queue", "block_request"] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(
            root.join(name).join("block-read"),
            vessel_fuzz::seed_block_read(),
        )
        .unwrap();
    }
    for (target, seeds) in [
        ("vsock_packets", vessel_fuzz::vsock_seeds()),
        ("agent_protocol", vessel_fuzz::agent_seeds()),
    ] {
        std::fs::create_dir_all(root.join(target)).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(root.join(target).join(name), bytes).unwrap();
        }
    }
}

/// The seeds written by [`write_seeds_when_asked`] are those checked in.
fn checked_in_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    for (name, bytes) in seeds {
        let file = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
            panic!("{target}/{name}: {e} (VESSEL_FUZZ_WRITE_SEEDS=1 cargo test writes it)")
        });
        assert_eq!(
            &file, bytes,
            "{target}/{name} is not the seed the harness makes"
        );
    }
}

/// Flips, truncates and splices the seeds: for inputs that are records, mostly small
/// numbers and the fields that pick operations.
fn mutate(r: &mut Rng, seeds: &[Vec<u8>], i: usize) -> Vec<u8> {
    let mut v = seeds[i % seeds.len()].clone();
    if r.next().is_multiple_of(4) {
        let other = &seeds[r.next() as usize % seeds.len()];
        let at = r.next() as usize % (other.len() + 1);
        v.extend_from_slice(&other[at..]);
    }
    for _ in 0..1 + r.next() % 6 {
        if v.is_empty() {
            break;
        }
        let at = r.next() as usize % v.len();
        v[at] = match r.next() % 4 {
            0 => v[at] ^ (1 << (r.next() % 8)),
            1 => (r.next() % 8) as u8,
            2 => 0xff,
            _ => r.next() as u8,
        };
    }
    if r.next().is_multiple_of(8) {
        v.truncate(r.next() as usize % (v.len() + 1));
    }
    v
}

#[test]
fn vsock_packets_corpus_and_mutations() {
    let seeds = vessel_fuzz::vsock_seeds();
    checked_in_seeds("vsock_packets", &seeds);
    // The seeds reach the data path both ways and its ends, not only resets.
    let mut total = vessel_fuzz::vsock::VsockStats::default();
    for (name, bytes) in &seeds {
        let s = vessel_fuzz::vsock_packets_stats(bytes);
        assert_eq!(s.rejected, 0, "{name}: {s:?}");
        if *name == "bulk" {
            // The host program read what it asked for; the guest was told, then reset.
            assert!(s.bytes_to_host >= 2 * 65280, "{s:?}");
            assert!(s.credit_updates >= 1 && s.resets >= 1, "{s:?}");
        }
        total.accepted += s.accepted;
        total.host_initiated += s.host_initiated;
        total.bytes_to_guest += s.bytes_to_guest;
        total.bytes_to_host += s.bytes_to_host;
        total.shutdowns += s.shutdowns;
        total.credit_updates += s.credit_updates;
    }
    assert!(
        total.accepted >= 3 && total.host_initiated >= 2,
        "{total:?}"
    );
    assert!(
        total.bytes_to_guest > 0 && total.bytes_to_host > 0,
        "{total:?}"
    );
    assert!(
        total.shutdowns >= 2 && total.credit_updates >= 1,
        "{total:?}"
    );
    let all = corpus("vsock_packets");
    for input in &all {
        vessel_fuzz::vsock_packets(input);
    }
    let seeds: Vec<Vec<u8>> = seeds.into_iter().map(|(_, b)| b).collect();
    let mut r = Rng(0x0750_c4e7);
    let n = 3_000;
    for i in 0..n {
        let v = mutate(&mut r, &seeds, i);
        vessel_fuzz::vsock_packets(&v);
    }
    eprintln!("vsock_packets: {} inputs", all.len() + n);
}

#[test]
fn agent_protocol_corpus_and_mutations() {
    let seeds = vessel_fuzz::agent_seeds();
    checked_in_seeds("agent_protocol", &seeds);
    // The seeds are answers the client takes (the agent's error as an error).
    for (name, bytes) in &seeds {
        let outcome = vessel_fuzz::agent_protocol_outcome(bytes);
        if *name == "error" {
            assert_eq!(outcome, Err("permission denied".into()));
        } else {
            assert_eq!(outcome, Ok(()), "{name}");
        }
    }
    // A float that serde_json parses 2 ULPs away from where it parses its re-encoding.
    let mut facts = vec![0, 0, 0, 0, 0, agent::protocol::VERSION, 0];
    facts.extend_from_slice(
        br#"{"op":"facts","os":"","kernel":"","uptime_seconds":1.8659026096182804585575961e199,"addresses":[],"memory_total_kib":0,"memory_available_kib":0,"clock_unix_ns":0}"#,
    );
    let n = (facts.len() - 5) as u32;
    facts[1..5].copy_from_slice(&n.to_le_bytes());
    assert_eq!(vessel_fuzz::agent_protocol_outcome(&facts), Ok(()));
    let all = corpus("agent_protocol");
    for input in &all {
        vessel_fuzz::agent_protocol(input);
    }
    let seeds: Vec<Vec<u8>> = seeds.into_iter().map(|(_, b)| b).collect();
    let mut r = Rng(0xa9e7_0001);
    let n = 2_000;
    for i in 0..n {
        vessel_fuzz::agent_protocol(&mutate(&mut r, &seeds, i));
    }
    eprintln!("agent_protocol: {} inputs", all.len() + n);
}

#[test]
fn dhcp_corpus_and_mutations() {
    let seeds = corpus("dhcp");
    let mut r = Rng(0x51ed_2701);
    let mut n = 0;
    for i in 0..20_000 {
        let mut v = seeds[i % seeds.len()].clone();
        for _ in 0..1 + r.next() % 8 {
            let at = (r.next() as usize) % v.len();
            v[at] = r.next() as u8;
        }
        if r.next().is_multiple_of(8) {
            v.truncate((r.next() as usize) % (v.len() + 1));
        }
        vessel_fuzz::dhcp(&v);
        n += 1;
    }
    for s in &seeds {
        vessel_fuzz::dhcp(s);
    }
    // The seeds are real requests: a DISCOVER is answered.
    let discover =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/dhcp/discover")).unwrap();
    assert!(
        network::dhcp::DhcpServer::new("fuzz")
            .handle(&discover)
            .is_some()
    );
    eprintln!("dhcp: {n} inputs");
}

#[test]
fn state_file_corpus_and_mutations() {
    let seeds: Vec<Vec<u8>> = corpus("state_file")
        .into_iter()
        .filter(|s| s.starts_with(b"VESSEL-STATE"))
        .collect();
    assert!(!seeds.is_empty());
    let mut r = Rng(0x57a7_e001);
    let mut n = 0;
    for s in &seeds {
        // As written (checksum intact) it decodes; its body with a fresh checksum too.
        let mut whole = vec![0u8];
        whole.extend_from_slice(s);
        vessel_fuzz::state_file(&whole);
        let body_at = s
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(1)
            .unwrap()
            .0
            + 1;
        let mut body = vec![1u8];
        body.extend_from_slice(&s[body_at..]);
        for i in 0..3_000 {
            let mut v = if i % 2 == 0 {
                body.clone()
            } else {
                whole.clone()
            };
            for _ in 0..1 + r.next() % 8 {
                let at = 1 + (r.next() as usize) % (v.len() - 1);
                v[at] = match r.next() % 4 {
                    0 => b'9',
                    1 => b'"',
                    2 => b'-',
                    _ => r.next() as u8,
                };
            }
            if r.next().is_multiple_of(8) {
                v.truncate(1 + (r.next() as usize) % v.len());
            }
            vessel_fuzz::state_file(&v);
            n += 1;
        }
    }
    let good =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/state_file/emu-kit"))
            .unwrap();
    assert!(vmm::snapshot::file::decode_state(Path::new("state"), &good).is_ok());
    eprintln!("state_file: {n} inputs");
}

#[test]
fn qcow2_image_corpus_and_mutations() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/qcow2_image");
    let mut seeds = Vec::new();
    for name in [
        "v3-4k.qcow2",
        "v3-64k.qcow2",
        "v2-4k.qcow2",
        "data-4k.qcow2",
        "compressed-4k.qcow2",
        "overlay-4k.qcow2",
    ] {
        let s = std::fs::read(dir.join(name)).unwrap();
        // The seeds open (the overlay on the sandbox's backing image).
        vessel_fuzz::qcow2_opens(&s).unwrap_or_else(|e| panic!("{name}: {e}"));
        seeds.push(s);
    }
    for s in corpus("qcow2_image") {
        vessel_fuzz::qcow2_image(&s);
    }
    let mut r = Rng(0x9c0_2a11);
    let mut n = 0;
    for i in 0..3_000 {
        let mut v = seeds[i % seeds.len()].clone();
        let cluster = 1usize << v[23].clamp(9, 16);
        for _ in 0..1 + r.next() % 6 {
            // Mostly the header; else the metadata clusters after it (refcount table,
            // refcount block, L1 and L2 tables), else anywhere.
            let at = match r.next() % 4 {
                0 | 1 => r.next() as usize % 512,
                2 => cluster + r.next() as usize % (4 * cluster),
                _ => r.next() as usize,
            } % v.len();
            v[at] = match r.next() % 4 {
                0 => v[at] ^ (1 << (r.next() % 8)),
                1 => 0xff,
                2 => 0,
                _ => r.next() as u8,
            };
        }
        if r.next().is_multiple_of(8) {
            v.truncate(r.next() as usize % (v.len() + 1));
        }
        vessel_fuzz::qcow2_image(&v);
        n += 1;
    }
    eprintln!("qcow2_image: {n} inputs");
}

#[test]
fn vm_toml_corpus_and_mutations() {
    // Files that once crashed a loader load no more, and do not crash it either.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/vm_toml");
    let mut regressions = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("regression-") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            vessel_fuzz::vm_toml(text.as_bytes());
            assert!(manager::VmSpec::from_toml(Path::new("vm.toml"), &text).is_err());
            regressions += 1;
        }
    }
    assert!(regressions > 0);
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("regression-"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter(|s| std::str::from_utf8(s).is_ok_and(|t| t.contains("memory")))
        .collect();
    assert!(seeds.len() >= 2);
    for s in &seeds {
        let text = std::str::from_utf8(s).unwrap();
        // The seeds load (else the mutations below test only the TOML parser).
        manager::VmSpec::from_toml(Path::new("vm.toml"), text).unwrap();
        vessel_fuzz::vm_toml(s);
    }
    // Values swapped for others that are odd, out of range or malformed.
    let odd = [
        "0",
        "-1",
        "1e308",
        "nan",
        "inf",
        "\"\"",
        "\"none\"",
        "262145",
        "0.001",
        "\"0-4095\"",
        "\"path=,bw=\"",
        "\"9-1\"",
        "\"user,rx_bw=0\"",
        "\"path=a,iops_burst=5\"",
    ];
    let mut r = Rng(0x70_3170);
    let mut n = 0;
    for i in 0..4_000 {
        let text = std::str::from_utf8(&seeds[i % seeds.len()]).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let at = r.next() as usize % lines.len();
        if let Some((k, _)) = lines[at].split_once(" = ") {
            lines[at] = format!("{k} = {}", odd[r.next() as usize % odd.len()]);
        }
        vessel_fuzz::vm_toml(lines.join("\n").as_bytes());
        n += 1;
    }
    eprintln!("vm_toml: {n} inputs");
}

#[test]
fn migration_stream_corpus_and_mutations() {
    let seeds: Vec<Vec<u8>> = corpus("migration_stream")
        .into_iter()
        .filter(|s| s.get(1..15) == Some(b"VESSEL-MIGRATE"))
        .collect();
    assert!(!seeds.is_empty());
    // A recorded stream is a whole, valid migration.
    for s in &seeds {
        let mut r = &s[1..];
        let hello = vmm::migration::receive::hello(&mut r).expect("a recorded greeting");
        let dir = std::env::temp_dir().join(format!("vessel-fuzz-seed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let got = vmm::migration::receive::into_folder(&mut r, &hello, &dir, &[]);
        let _ = std::fs::remove_dir_all(&dir);
        got.expect("a recorded stream is received whole");
    }
    let mut r = Rng(0x316_7a7e);
    for s in &seeds {
        for _ in 0..300 {
            let mut v = s.clone();
            for _ in 0..1 + r.next() % 8 {
                let at = 1 + (r.next() as usize) % (v.len() - 1);
                v[at] = r.next() as u8;
            }
            if r.next().is_multiple_of(4) {
                v.truncate(1 + (r.next() as usize) % v.len());
            }
            vessel_fuzz::migration_stream(&v);
            // The same bytes after a valid greeting.
            v[0] = 1;
            vessel_fuzz::migration_stream(&v);
        }
    }
}
