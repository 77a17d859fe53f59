//! A snapshot being restored, as `vessel run --restore DIR` does it: the folder's state
//! and memory files read and checked (`snapshot::read_state`), then the VM built around
//! them on the software CPU (`builder::build_from`): guest memory mapped from the
//! memory file, a state of KVM's converted to the software CPU's (`convert`), the vCPUs,
//! interrupt controllers, PIT and devices loaded. The folder lives in a private
//! directory (see [`crate::sandbox::files_dir`]); the memory file is sparse.
//!
//! The state is a real one (`corpus/state_file/emu-kit`, a kit guest captured on the
//! software CPU, given 1-4 vCPUs and 32 MiB) as it is or converted to KVM's form, with
//! edits: any value replaced by an odd one, arrays shortened or lengthened; or the
//! input's own bytes as the state's JSON (behind a right header and checksum), or as
//! the whole state file. The memory file is the right size, or a page or a byte short
//! or long, empty, half, or missing. The VM's configuration (vCPUs, memory) is the
//! state's or not.
//!
//! Checked: nothing panics; `read_state` accepts exactly a state that decodes with a
//! memory file of the size it says; a restore that succeeds is of the state's own
//! shape: as many vCPUs and as much memory as the state says (what a snapshot held is
//! restored whole or refused, never in part); converting the state to KVM's form and
//! back leaves the interrupt controllers' architectural registers as they were.
//!
//! Input: source (u8: bits 0-1 the template, the template in KVM's form, the input as
//! the JSON body, the input as the file; bits 2-3 the template's vCPUs, 1-4; bits 4-5
//! the VM's vCPUs: the state's, one fewer, one more, one; bit 6 the VM's memory 64
//! MiB, not 32), memory file (u8: see [`memory_len`]), then operations: 0 replace a
//! value (leaf u16, value u8, see [`odd`]), 1 shorten an array (array u16), 2 lengthen
//! one (array u16), 3 a page of the memory file (page u16, byte u8); for sources 2 and 3
//! the rest is the state.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;
use vmm::builder::{Console, Restore};
use vmm::config::{Accel, CpuModel, VmConfig};
use vmm::snapshot::file::{MEMORY, STATE, decode_state};
use vmm::snapshot::{FORMAT, IrqState, SnapshotBackend, SnapshotError, VmSnapshot, convert};

use crate::ops::{Ops, Program};
use crate::sandbox;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const TEMPLATE: &[u8] = include_bytes!("../corpus/state_file/emu-kit");
const FILES: &str = "vessel-fuzz-snap-";
const APIC_BASE_BSP: u64 = 1 << 8;

/// What a run did, for the seeds' test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub read: bool,
    pub restored: bool,
    pub refused: bool,
}

/// The template state given `cpus` vCPUs and 32 MiB, in KVM's form when `kvm`.
fn template(cpus: u16, kvm: bool) -> VmSnapshot {
    static BASE: OnceLock<VmSnapshot> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        decode_state(Path::new("emu-kit"), TEMPLATE).expect("the template state decodes")
    });
    let mut s = base.clone();
    let memory = 32 * MIB;
    s.memory_bytes = memory;
    s.memory = vec![vmm::snapshot::MemoryRange {
        guest: 0,
        len: memory,
        file_offset: 0,
    }];
    s.cpus = cpus;
    let v0 = s.vcpus[0].clone();
    s.vcpus = (0..cpus)
        .map(|i| {
            let mut v = v0.clone();
            v.index = i as u8;
            v
        })
        .collect();
    // Each vCPU's local APIC: the first one's, with its own ID, not the BSP.
    if let IrqState::Emu(e) = &mut s.irq {
        let l0 = serde_json::to_value(&e.chip.lapics[0]).expect("a local APIC as JSON");
        e.chip.lapics = (0..cpus)
            .map(|i| {
                let mut l = l0.clone();
                l["id"] = Value::from(i);
                if i > 0 {
                    let base = l["apic_base"].as_u64().unwrap_or(0);
                    l["apic_base"] = Value::from(base & !APIC_BASE_BSP);
                }
                serde_json::from_value(l).expect("a local APIC")
            })
            .collect();
    }
    if kvm {
        let cpuid = s.cpuid.clone();
        convert::to_backend(&mut s, SnapshotBackend::Kvm, &cpuid).expect("to KVM's form");
    }
    s
}

/// Where a JSON text's values are: every leaf (number, string, `true`, `false`,
/// `null`) and every array's elements, as byte ranges. (The state's JSON holds 128-bit
/// numbers, which `serde_json::Value` does not.)
#[derive(Default)]
struct Spans {
    leaves: Vec<(usize, usize)>,
    arrays: Vec<Vec<(usize, usize)>>,
}

fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while at < b.len() && b[at].is_ascii_whitespace() {
        at += 1;
    }
    at
}

/// Scans the value at `at` (JSON that serde_json wrote); returns where it ends.
fn scan(b: &[u8], at: usize, spans: &mut Spans) -> Option<usize> {
    let at = skip_ws(b, at);
    match *b.get(at)? {
        b'{' | b'[' => {
            let array = b[at] == b'[';
            let close = if array { b']' } else { b'}' };
            let mut elements = Vec::new();
            let mut i = skip_ws(b, at + 1);
            if b.get(i) == Some(&close) {
                return Some(i + 1);
            }
            loop {
                if !array {
                    i = scan(b, i, &mut Spans::default())?; // the key
                    i = skip_ws(b, i);
                    if b.get(i) != Some(&b':') {
                        return None;
                    }
                    i += 1;
                }
                let start = skip_ws(b, i);
                i = scan(b, start, spans)?;
                elements.push((start, i));
                i = skip_ws(b, i);
                match *b.get(i)? {
                    b',' => i += 1,
                    c if c == close => break,
                    _ => return None,
                }
            }
            if array {
                spans.arrays.push(elements);
            }
            Some(i + 1)
        }
        b'"' => {
            let mut i = at + 1;
            while *b.get(i)? != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            spans.leaves.push((at, i + 1));
            Some(i + 1)
        }
        _ => {
            let mut i = at;
            while i < b.len() && !matches!(b[i], b',' | b']' | b'}') && !b[i].is_ascii_whitespace()
            {
                i += 1;
            }
            spans.leaves.push((at, i));
            Some(i)
        }
    }
}

/// A value for a leaf (`old`, as JSON text): odd numbers, other types, or the old
/// value moved by one.
pub fn odd(pick: u8, old: &str) -> String {
    let n = old
        .parse::<i64>()
        .ok()
        .or_else(|| old.parse::<u64>().ok().map(|u| u as i64));
    match pick % 24 {
        0 => Value::from(0),
        1 => Value::from(1),
        2 => Value::from(-1),
        3 => Value::from(255),
        4 => Value::from(256),
        5 => Value::from(65535),
        6 => Value::from(65536),
        7 => Value::from(u32::MAX),
        8 => Value::from(u64::from(u32::MAX) + 1),
        9 => Value::from(u64::MAX),
        10 => Value::from(i64::MIN),
        11 => Value::from(1e300),
        12 => Value::from(0.5),
        13 => Value::from(""),
        14 => Value::from("Kvm"),
        15 => Value::Null,
        16 => Value::from(true),
        17 => Value::Array(Vec::new()),
        18 => Value::Object(Default::default()),
        19 => Value::from(n.map_or(1, |n| n.wrapping_add(1))),
        20 => Value::from(n.map_or(-1, |n| n.wrapping_sub(1))),
        21 => Value::from(n.map_or(0, |n| n.wrapping_mul(2))),
        22 => Value::from(24),
        _ => Value::from(128),
    }
    .to_string()
}

/// The memory file's length for a state of `want` bytes (None: no file).
pub fn memory_len(shape: u8, want: u64) -> Option<u64> {
    Some(match shape % 8 {
        0 => want,
        1 => want.saturating_sub(PAGE),
        2 => want.saturating_sub(1),
        3 => want + 1,
        4 => want + PAGE,
        5 => 0,
        6 => want / 2,
        _ => return None,
    })
}

fn state_bytes(body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "VESSEL-STATE {FORMAT}\ncrc32 {:08x}\n",
        crc32fast::hash(body)
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// The interrupt controllers' architectural registers (what a conversion keeps).
fn registers(s: &VmSnapshot) -> Option<String> {
    let IrqState::Emu(e) = &s.irq else {
        return None;
    };
    let pic = e.chip.pic.registers();
    let ioapic = e.chip.ioapic.registers();
    let pit = e.pit.registers();
    let lapics: Vec<Vec<u8>> = e
        .chip
        .lapics
        .iter()
        .map(|l| l.register_page(e.chip.clock_ns).to_vec())
        .collect();
    Some(format!("{pic:?} {ioapic:?} {pit:?} {lapics:?}"))
}

pub fn snapshot_memory(data: &[u8]) {
    snapshot_memory_stats(data);
}

pub fn snapshot_memory_stats(data: &[u8]) -> SnapshotStats {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = sandbox::files_dir(FILES);
    let mut stats = SnapshotStats::default();
    let mut ops = Ops::new(data);
    let source = ops.u8();
    let shape = ops.u8();
    let cpus = 1 + u16::from(source >> 2 & 3);
    let mut pages: Vec<(u64, u8)> = Vec::new();
    let bytes = match source & 3 {
        s @ (0 | 1) => {
            let json = serde_json::to_vec(&template(cpus, s == 1)).expect("a state as JSON");
            let mut spans = Spans::default();
            scan(&json, 0, &mut spans).expect("the state's JSON scans");
            // (start, end, replacement), applied at the end from the last one back;
            // one that overlaps an edit made before it is left out.
            let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new();
            while ops.next_op() {
                match ops.u8() % 4 {
                    0 => {
                        let at = usize::from(ops.u16());
                        let pick = ops.u8();
                        let (start, end) = spans.leaves[at % spans.leaves.len()];
                        let old = String::from_utf8_lossy(&json[start..end]);
                        edits.push((start, end, odd(pick, &old).into_bytes()));
                    }
                    k @ (1 | 2) => {
                        let at = usize::from(ops.u16());
                        let a = &spans.arrays[at % spans.arrays.len()];
                        let Some(&(start, end)) = a.last() else {
                            continue;
                        };
                        if k == 2 {
                            let mut copy = b",".to_vec();
                            copy.extend_from_slice(&json[start..end]);
                            edits.push((end, end, copy));
                        } else if a.len() > 1 {
                            edits.push((a[a.len() - 2].1, end, Vec::new()));
                        } else {
                            edits.push((start, end, Vec::new()));
                        }
                    }
                    _ => {
                        let page = u64::from(ops.u16());
                        pages.push((page, ops.u8()));
                    }
                }
            }
            let mut text = json;
            let mut done: Vec<(usize, usize)> = Vec::new();
            let mut order: Vec<usize> = (0..edits.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse((edits[i].0, i)));
            let kept: Vec<usize> = order
                .into_iter()
                .filter(|&i| {
                    let (s, e, _) = &edits[i];
                    let clash = done
                        .iter()
                        .any(|&(ds, de)| *s < de.max(ds + 1) && ds < (*e).max(s + 1));
                    if !clash {
                        done.push((*s, *e));
                    }
                    !clash
                })
                .collect();
            for i in kept {
                let (s, e, r) = &edits[i];
                text.splice(*s..*e, r.iter().copied());
            }
            state_bytes(&text)
        }
        2 => state_bytes(ops.bytes(usize::MAX)),
        _ => ops.bytes(usize::MAX).to_vec(),
    };
    let decoded = decode_state(Path::new(STATE), &bytes);
    let want = decoded.as_ref().map_or(32 * MIB, |s| s.memory_bytes);
    // The memory file: sparse, at most 64 MiB (a state may say anything).
    let len = memory_len(shape, want).filter(|l| *l <= 64 * MIB + PAGE);
    let state_path = dir.join(STATE);
    let memory_path = dir.join(MEMORY);
    std::fs::write(&state_path, &bytes).expect("the state file");
    let _ = std::fs::remove_file(&memory_path);
    if let Some(len) = len {
        let f = std::fs::File::create(&memory_path).expect("the memory file");
        f.set_len(len).expect("the memory file's size");
        for (page, byte) in &pages {
            let at = page * PAGE % len.max(1);
            let n = PAGE.min(len - at) as usize;
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![*byte; n], at)
                .expect("a page of the memory file");
        }
    }
    let read = vmm::snapshot::read_state(&dir);
    let whole = decoded.is_ok() && len == decoded.as_ref().ok().map(|s| s.memory_bytes);
    match &read {
        Ok(_) => assert!(
            whole,
            "read_state took a state or memory file it should refuse"
        ),
        Err(e) => {
            assert!(!whole, "read_state refused a good snapshot: {e}");
            if decoded.is_ok() && len.is_some() {
                assert!(
                    matches!(e, SnapshotError::MemorySize { .. }),
                    "a memory file of the wrong size refused as {e}"
                );
            }
        }
    }
    let Ok(state) = read else {
        return stats;
    };
    stats.read = true;
    convert_round_trip(&state);
    let config_cpus = match source >> 4 & 3 {
        0 => state.cpus,
        1 => state.cpus.saturating_sub(1),
        2 => state.cpus.saturating_add(1),
        _ => 1,
    }
    .clamp(1, 8);
    let config_memory = if source & 0x40 != 0 {
        64 * MIB
    } else {
        32 * MIB
    };
    let config = config(config_cpus, config_memory, &dir);
    let restore = Restore {
        state,
        memory: memory_path.clone(),
        postcopy: None,
    };
    match vmm::builder::build_from(
        &config,
        Console::Output(Box::new(std::io::sink())),
        Some(&restore),
    ) {
        Ok(vm) => {
            stats.restored = true;
            assert_eq!(
                restore.state.cpus, config.cpus,
                "a snapshot of {} vCPUs restored as a VM of {}",
                restore.state.cpus, config.cpus
            );
            assert_eq!(
                restore.state.memory_bytes, config.memory,
                "a snapshot of {} bytes restored as a VM of {}",
                restore.state.memory_bytes, config.memory
            );
            drop(vm);
        }
        Err(_) => stats.refused = true,
    }
    stats
}

/// A state moved to KVM's form and back to the software CPU's (what moving a VM there
/// and back does), twice: the second trip changes none of the interrupt controllers'
/// registers (the first may: a state can hold bits no register keeps).
fn convert_round_trip(state: &VmSnapshot) {
    let mut s = state.clone();
    let cpuid = s.cpuid.clone();
    let mut seen = Vec::new();
    for _ in 0..2 {
        if convert::to_backend(&mut s, SnapshotBackend::Kvm, &cpuid).is_err() {
            return;
        }
        assert_eq!(s.backend, SnapshotBackend::Kvm);
        if convert::to_backend(&mut s, SnapshotBackend::Emu, &cpuid).is_err() {
            return;
        }
        assert_eq!(s.backend, SnapshotBackend::Emu);
        seen.push(registers(&s));
    }
    assert_eq!(
        seen[0], seen[1],
        "the interrupt controllers changed on a second trip to KVM and back"
    );
}

fn config(cpus: u16, memory: u64, dir: &Path) -> VmConfig {
    VmConfig {
        kernel: PathBuf::from("/nonexistent/kernel"),
        initrd: None,
        cmdline: String::new(),
        cpus,
        memory,
        accel: Accel::Emu,
        disks: Vec::new(),
        nets: Vec::new(),
        networks: dir.join("networks"),
        cpu_model: CpuModel::Host,
        vmgenid: [0; 16],
        rng: false,
        vsock: None,
        shares: Vec::new(),
        runtime_dir: dir.to_path_buf(),
        shared_memory: false,
        balloon: false,
        memory_merge: false,
        memory_compress: None,
        hvc: None,
        kvm_fallback: true,
        debug_exit: false,
    }
}

/// Seeds: the template restored whole (1 and 2 vCPUs, and from KVM's form), and with
/// the memory file a page short, a byte long and missing; a VM of another shape.
pub fn snapshot_memory_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let seed = |source: u8, shape: u8, ops: &[u8]| {
        let mut p = Program::default();
        p.u8(source).u8(shape).bytes(ops);
        p.0
    };
    // A few pages of the memory file: the first, one in the middle, the last.
    let mut pages = Program::default();
    for (page, byte) in [(0u16, 0xf4u8), (4096, 0x90), (8191, 0xcc)] {
        pages.u8(3).u16(page).u8(byte);
    }
    let pages = pages.0;
    // The second vCPU's local APIC removed, the VM of one vCPU: restored, it would
    // have dropped the second vCPU.
    let json = serde_json::to_vec(&template(2, false)).expect("a state as JSON");
    let mut spans = Spans::default();
    scan(&json, 0, &mut spans).expect("the state's JSON scans");
    let key = b"\"lapics\":";
    let at = json
        .windows(key.len())
        .position(|w| w == key)
        .expect("the local APICs")
        + key.len();
    let lapics = spans
        .arrays
        .iter()
        .position(|a| a.first().is_some_and(|e| e.0 == at + 1))
        .expect("the local APICs' array") as u16;
    let mut shorten = Program::default();
    shorten.u8(1).u16(lapics);
    vec![
        (
            "regression-2-vcpus-1-local-apic-into-1",
            seed(1 << 2 | 1 << 4, 0, &shorten.0),
        ),
        ("emu-1-vcpu", seed(0, 0, &pages)),
        ("emu-2-vcpus", seed(1 << 2, 0, &pages)),
        ("kvm-form-2-vcpus", seed(1 | 1 << 2, 0, &pages)),
        ("memory-a-page-short", seed(0, 1, &pages)),
        ("memory-a-byte-long", seed(1 << 2, 3, &[])),
        ("memory-missing", seed(0, 7, &[])),
        ("vm-with-another-vcpu-count", seed(1 << 2 | 1 << 4, 0, &[])),
        ("vm-with-more-memory", seed(0x40, 0, &[])),
    ]
}
