//! `key=value,key=value` option strings as the command line gives them.

/// Splits `s` into (key, value) pairs. A first item without `=` is returned under
/// `first_key` (so `--disk disk.img` means `path=disk.img`).
pub fn pairs<'a>(s: &'a str, first_key: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut out = Vec::new();
    for (i, item) in s.split(',').enumerate() {
        match item.split_once('=') {
            Some((k, v)) => out.push((k.trim(), v)),
            None if i == 0 && !item.is_empty() => out.push((first_key, item)),
            None => return Err(format!("'{item}' is not key=value")),
        }
    }
    Ok(out)
}

pub fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// Sizes like `512M`, `2G`, `1.5G`, `64K` (binary units, an optional `B` or `iB`); a
/// plain number is scaled by `2^default_shift`. None for anything else, or below 1.
pub fn parse_size(text: &str, default_shift: u32) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (number, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return None,
            };
            (&t[..i], shift)
        }
        _ => (t, default_shift),
    };
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let bytes = value * (1u64 << shift) as f64;
    (bytes.is_finite() && (1.0..=u64::MAX as f64).contains(&bytes)).then_some(bytes as u64)
}
