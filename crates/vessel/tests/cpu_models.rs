//! CPU models on the software CPU: a user-space program built for x86-64-v2 (SSE4.2's
//! string compare and CRC-32, POPCNT), compiled here with gcc, runs in the kit's Linux
//! on `--cpu-model v2` and prints what it printed on the host; on `--cpu-model v1` it
//! dies of SIGILL at its first v2 instruction, as on a v1 CPU. No /dev/kvm needed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{boot, kit};

const PROGRAM: &str = r#"
#include <nmmintrin.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    static const char hay[32] = "the quick brown fox jumps over";
    static const char fox[16] = "fox";
    __m128i needle = _mm_loadu_si128((const __m128i *)fox);
    __m128i h = _mm_loadu_si128((const __m128i *)(hay + 10));
    int at = _mm_cmpistri(needle, h, _SIDD_UBYTE_OPS | _SIDD_CMP_EQUAL_ORDERED);
    unsigned long long x = 0xf0f0f0f0f0f0f0f0ULL ^ (unsigned long long)argc;
    unsigned crc = _mm_crc32_u32(0, 0x12345678u ^ (unsigned)argc);
    printf("v2-program: cmpistri %d popcnt %d crc %08x strlen %zu\n", at,
           __builtin_popcountll(x), crc, strlen(hay + argc - 1));
    return 0;
}
"#;

/// The program, built static for x86-64-v2; None (test skipped) without gcc.
fn program(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = dir.join("v2.c");
    let bin = dir.join("v2-program");
    std::fs::write(&src, PROGRAM).unwrap();
    let built = Command::new("gcc")
        .args(["-O2", "-static", "-march=x86-64-v2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status();
    match built {
        Ok(s) if s.success() => Some(bin),
        other => {
            assert!(
                !common::required(),
                "gcc could not build the program: {other:?}"
            );
            eprintln!("skipped: gcc could not build the program: {other:?}");
            None
        }
    }
}

/// The kit's initramfs with the program added as /v2-program (a second archive after
/// the first, which the kernel unpacks on top).
fn initrd_with(kit: &kit::Kit, program: &std::path::Path, dir: &std::path::Path) -> String {
    let mut bytes = std::fs::read(&kit.initrd).unwrap();
    // (Zeros between archives are skipped; a newc archive starts 4-byte aligned.)
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    let mut cpio = kit::cpio::CpioWriter::new(Vec::new());
    cpio.file("v2-program", 0o755, &std::fs::read(program).unwrap())
        .unwrap();
    bytes.extend(cpio.finish().unwrap());
    let path = dir.join("initrd.img");
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn an_x86_64_v2_program_runs_on_the_v2_model_only() {
    let Some(kit) = kit() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(program) = program(dir.path()) else {
        return;
    };
    let on_host = Command::new(&program).output().unwrap();
    let want = String::from_utf8_lossy(&on_host.stdout).trim().to_string();
    assert!(
        want.starts_with("v2-program: cmpistri 6 popcnt 33"),
        "{want}"
    );
    let initrd = initrd_with(&kit, &program, dir.path());
    let cmdline = kit::cmdline("", Some("/v2-program"));
    let run = |model: &str| {
        boot(
            &kit.vmlinux,
            &[
                "--accel",
                "emu",
                "--cpu-model",
                model,
                "--memory",
                "256M",
                "--initrd",
                &initrd,
                "--cmdline",
                &cmdline,
            ],
            Duration::from_secs(240),
        )
    };
    let r = run("v2");
    assert_eq!(r.code, Some(0), "{}", r.dump());
    assert!(r.stdout.contains(&want), "wanted {want:?}: {}", r.dump());
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 0"),
        "{}",
        r.dump()
    );
    // SIGILL: 128 + 4.
    let r = run("x86-64-v1");
    assert!(!r.stdout.contains("v2-program:"), "{}", r.dump());
    assert!(
        r.stdout.contains("VESSEL-KIT: exit status 132"),
        "{}",
        r.dump()
    );
}
