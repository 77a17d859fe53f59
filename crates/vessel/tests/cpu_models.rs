//! CPU models on the software CPU: a user-space program built for x86-64-v2 (SSE4.2's
//! string compare and CRC-32, POPCNT), compiled here with gcc, runs in the kit's Linux
//! on `--cpu-model v2` and prints what it printed on the host, then encrypts and
//! decrypts FIPS-197's example block with AES-NI (its key expanded by
//! aeskeygenassist) and multiplies with PCLMULQDQ, as the model offers them; on
//! `--cpu-model v1` it dies of SIGILL at its first v2 instruction, as on a v1 CPU. No
//! /dev/kvm needed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{boot, kit};

const PROGRAM: &str = r#"
#include <nmmintrin.h>
#include <stdio.h>
#include <string.h>
#include <wmmintrin.h>

static __m128i next_key(__m128i key, __m128i assist) {
    assist = _mm_shuffle_epi32(assist, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

#define ROUND_KEY(i, rcon) k[i] = next_key(k[i - 1], _mm_aeskeygenassist_si128(k[i - 1], rcon))

static void hex(const char *what, __m128i v) {
    unsigned char b[16];
    _mm_storeu_si128((__m128i *)b, v);
    printf(" %s ", what);
    for (int i = 0; i < 16; i++) printf("%02x", b[i]);
}

/* FIPS-197 appendix C.1 with AES-NI, and a carry-less product. */
static void aes(void) {
    if (!__builtin_cpu_supports("aes") || !__builtin_cpu_supports("pclmul")) {
        puts("aes-program: absent");
        return;
    }
    unsigned char key[16], plain[16];
    for (int i = 0; i < 16; i++) {
        key[i] = i;
        plain[i] = (i << 4) | i;
    }
    __m128i k[11];
    k[0] = _mm_loadu_si128((const __m128i *)key);
    ROUND_KEY(1, 0x01); ROUND_KEY(2, 0x02); ROUND_KEY(3, 0x04); ROUND_KEY(4, 0x08);
    ROUND_KEY(5, 0x10); ROUND_KEY(6, 0x20); ROUND_KEY(7, 0x40); ROUND_KEY(8, 0x80);
    ROUND_KEY(9, 0x1b); ROUND_KEY(10, 0x36);
    __m128i s = _mm_xor_si128(_mm_loadu_si128((const __m128i *)plain), k[0]);
    for (int i = 1; i < 10; i++) s = _mm_aesenc_si128(s, k[i]);
    s = _mm_aesenclast_si128(s, k[10]);
    printf("aes-program:");
    hex("cipher", s);
    s = _mm_xor_si128(s, k[10]);
    for (int i = 9; i > 0; i--) s = _mm_aesdec_si128(s, _mm_aesimc_si128(k[i]));
    hex("plain", _mm_aesdeclast_si128(s, k[0]));
    __m128i c = _mm_clmulepi64_si128(_mm_set_epi64x(7, 3), _mm_set_epi64x(5, 3), 0x11);
    printf(" clmul %llx\n", (unsigned long long)_mm_cvtsi128_si64(c));
}

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
    aes();
    return 0;
}
"#;

/// What the program prints for AES-NI and PCLMULQDQ (FIPS-197's ciphertext, the
/// plaintext back, 7 times 5 without carries).
const AES_LINE: &str = "aes-program: cipher 69c4e0d86a7b0430d8cdb78070b4c55a \
     plain 00112233445566778899aabbccddeeff clmul 1b";

/// The program, built static for x86-64-v2; None (test skipped) without gcc.
fn program(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = dir.join("v2.c");
    let bin = dir.join("v2-program");
    std::fs::write(&src, PROGRAM).unwrap();
    let built = Command::new("gcc")
        .args([
            "-O2",
            "-static",
            "-march=x86-64-v2",
            "-maes",
            "-mpclmul",
            "-o",
        ])
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
    let on_host = String::from_utf8_lossy(&on_host.stdout);
    let want = on_host
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        want.starts_with("v2-program: cmpistri 6 popcnt 33"),
        "{want}"
    );
    // The host's AES-NI agrees with FIPS-197 (where it has one).
    assert!(
        on_host.contains(AES_LINE) || on_host.contains("aes-program: absent"),
        "{on_host}"
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
        r.stdout.contains(AES_LINE),
        "wanted {AES_LINE:?}: {}",
        r.dump()
    );
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
