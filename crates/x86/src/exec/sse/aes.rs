//! AES-NI (aesenc, aesenclast, aesdec, aesdeclast, aesimc, aeskeygenassist) and
//! PCLMULQDQ, in software: the result does not depend on what the host has, so a guest
//! offered them can move between hosts. The state is the XMM register's 16 bytes in
//! FIPS-197's column order (byte `r + 4c` is row r of column c).

use iced_x86::{Instruction, Mnemonic as Mn};

use super::{V2, pick};
use crate::decode::Handler;
use crate::machine::{Machine, R};

/// Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1.
const fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1b;
        }
        b >>= 1;
    }
    p
}

/// FIPS-197's S-box: the multiplicative inverse (0 for 0), then the affine map.
const fn sbox_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut x = 0;
    while x < 256 {
        let mut inv = 0u8;
        let mut y = 1;
        while y < 256 {
            if gf_mul(x as u8, y as u8) == 1 {
                inv = y as u8;
            }
            y += 1;
        }
        t[x] = inv
            ^ inv.rotate_left(1)
            ^ inv.rotate_left(2)
            ^ inv.rotate_left(3)
            ^ inv.rotate_left(4)
            ^ 0x63;
        x += 1;
    }
    t
}

const fn inverse(t: &[u8; 256]) -> [u8; 256] {
    let mut inv = [0u8; 256];
    let mut x = 0;
    while x < 256 {
        inv[t[x] as usize] = x as u8;
        x += 1;
    }
    inv
}

const SBOX: [u8; 256] = sbox_table();
const INV_SBOX: [u8; 256] = inverse(&SBOX);

fn bytes(v: u128) -> [u8; 16] {
    v.to_le_bytes()
}

fn value(b: [u8; 16]) -> u128 {
    u128::from_le_bytes(b)
}

/// ShiftRows (row r moves r columns left) or its inverse, and a byte substitution.
fn shift_sub(s: u128, inverse: bool, table: &[u8; 256]) -> u128 {
    let b = bytes(s);
    let mut out = [0u8; 16];
    for c in 0..4 {
        for r in 0..4 {
            let from = if inverse {
                (c + 4 - r) % 4
            } else {
                (c + r) % 4
            };
            out[r + 4 * c] = table[usize::from(b[r + 4 * from])];
        }
    }
    value(out)
}

/// MixColumns with `m`'s first row (each row is the one above rotated right).
fn mix(s: u128, m: [u8; 4]) -> u128 {
    let b = bytes(s);
    let mut out = [0u8; 16];
    for c in 0..4 {
        for r in 0..4 {
            out[r + 4 * c] =
                (0..4).fold(0, |acc, k| acc ^ gf_mul(m[(k + 4 - r) % 4], b[k + 4 * c]));
        }
    }
    value(out)
}

const MIX: [u8; 4] = [2, 3, 1, 1];
const INV_MIX: [u8; 4] = [14, 11, 13, 9];

pub(crate) fn aesenc(state: u128, key: u128) -> u128 {
    mix(shift_sub(state, false, &SBOX), MIX) ^ key
}

pub(crate) fn aesenclast(state: u128, key: u128) -> u128 {
    shift_sub(state, false, &SBOX) ^ key
}

pub(crate) fn aesdec(state: u128, key: u128) -> u128 {
    mix(shift_sub(state, true, &INV_SBOX), INV_MIX) ^ key
}

pub(crate) fn aesdeclast(state: u128, key: u128) -> u128 {
    shift_sub(state, true, &INV_SBOX) ^ key
}

pub(crate) fn aesimc(key: u128) -> u128 {
    mix(key, INV_MIX)
}

/// aeskeygenassist: SubWord of dwords 1 and 3, and each rotated right by 8 and XORed
/// with the round constant.
pub(crate) fn aeskeygenassist(src: u128, rcon: u8) -> u128 {
    let sub_word = |w: u32| u32::from_le_bytes(w.to_le_bytes().map(|x| SBOX[usize::from(x)]));
    let (x1, x3) = (sub_word((src >> 32) as u32), sub_word((src >> 96) as u32));
    let rot = |w: u32| w.rotate_right(8) ^ u32::from(rcon);
    u128::from(x1) | u128::from(rot(x1)) << 32 | u128::from(x3) << 64 | u128::from(rot(x3)) << 96
}

/// pclmulqdq: the carry-less product of the quadwords imm[0] and imm[4] pick.
pub(crate) fn pclmulqdq(a: u128, b: u128, imm: u8) -> u128 {
    let x = (a >> (64 * u32::from(imm & 1))) as u64;
    let y = (b >> (64 * u32::from(imm >> 4 & 1))) as u64;
    (0..64)
        .filter(|k| y >> k & 1 != 0)
        .fold(0u128, |p, k| p ^ u128::from(x) << k)
}

op! {
    Aesenc => |a, b, i| aesenc(a, b);
    Aesenclast => |a, b, i| aesenclast(a, b);
    Aesdec => |a, b, i| aesdec(a, b);
    Aesdeclast => |a, b, i| aesdeclast(a, b);
    Aesimc => |a, b, i| aesimc(b);
    Aeskeygenassist => |a, b, i| aeskeygenassist(b, i);
    Pclmulqdq => |a, b, i| pclmulqdq(a, b, i);
}

pub(crate) fn select(i: &Instruction) -> Option<Handler> {
    match i.mnemonic() {
        Mn::Aesenc => pick::<Aesenc>(i),
        Mn::Aesenclast => pick::<Aesenclast>(i),
        Mn::Aesdec => pick::<Aesdec>(i),
        Mn::Aesdeclast => pick::<Aesdeclast>(i),
        Mn::Aesimc => pick::<Aesimc>(i),
        Mn::Aeskeygenassist => pick::<Aeskeygenassist>(i),
        Mn::Pclmulqdq => pick::<Pclmulqdq>(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> u128 {
        let mut b = [0u8; 16];
        for (k, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * k..2 * k + 2], 16).expect("hex");
        }
        value(b)
    }

    /// AES-128's key expansion the way software using AES-NI writes it.
    fn expand(key: u128) -> [u128; 11] {
        const RCON: [u8; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 0x1b, 0x36];
        let mut k = [key; 11];
        for r in 1..11 {
            let assist = aeskeygenassist(k[r - 1], RCON[r - 1]);
            let t = u128::from((assist >> 96) as u32) * ((1u128 << 96) | (1 << 64) | (1 << 32) | 1);
            let mut prev = k[r - 1];
            prev ^= prev << 32;
            prev ^= prev << 64;
            k[r] = prev ^ t;
        }
        k
    }

    /// FIPS-197 appendix C.1: AES-128 encrypts and decrypts its example block.
    #[test]
    fn fips_197_example() {
        let key = hex("000102030405060708090a0b0c0d0e0f");
        let plain = hex("00112233445566778899aabbccddeeff");
        let cipher = hex("69c4e0d86a7b0430d8cdb78070b4c55a");
        let k = expand(key);
        let mut s = plain ^ k[0];
        for rk in &k[1..10] {
            s = aesenc(s, *rk);
        }
        assert_eq!(aesenclast(s, k[10]), cipher);
        // The equivalent inverse cipher: round keys through aesimc.
        let mut s = cipher ^ k[10];
        for rk in k[1..10].iter().rev() {
            s = aesdec(s, aesimc(*rk));
        }
        assert_eq!(aesdeclast(s, k[0]), plain);
    }

    #[test]
    fn the_sbox_has_its_known_corners() {
        assert_eq!(
            (SBOX[0], SBOX[1], SBOX[0x53], SBOX[0xff]),
            (0x63, 0x7c, 0xed, 0x16)
        );
        assert_eq!(INV_SBOX[0x63], 0);
    }

    #[test]
    fn carry_less_products() {
        assert_eq!(pclmulqdq(3, 3, 0), 5);
        let a = (7u128 << 64) | u128::from(u64::MAX);
        assert_eq!(pclmulqdq(a, 1 << 64, 0x11), 7);
        assert_eq!(pclmulqdq(a, 2, 0x00), u128::from(u64::MAX) << 1);
    }
}
