//! `key=value,key=value` option strings as the command line gives them.

/// Splits `s` into (key, value) pairs. A first item without `=` is returned under
/// `first_key` (so `--disk disk.img` means `path=disk.img`).
pub(crate) fn pairs<'a>(s: &'a str, first_key: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
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

pub(crate) fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}
