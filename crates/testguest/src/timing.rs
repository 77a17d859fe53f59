//! What busybox `time` prints in a guest ("real 0m 1.23s"), read back.

/// Each `real` time in `out`, in seconds, in order.
pub fn busybox_times(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("real"))
        .filter_map(|t| {
            let (m, s) = t.trim().split_once('m')?;
            Some(
                m.trim().parse::<f64>().ok()? * 60.0
                    + s.trim().trim_end_matches('s').parse::<f64>().ok()?,
            )
        })
        .collect()
}

/// The first `real` time after the first line that is `marker` ("": from the start).
pub fn busybox_time_after(out: &str, marker: &str) -> Option<f64> {
    let out = out.replace('\r', "");
    let rest = if marker.is_empty() {
        out.as_str()
    } else {
        out.split(&format!("{marker}\n")).nth(1)?
    };
    busybox_times(rest).first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_after_markers() {
        let out = "x\r\nreal\t0m 0.50s\r\ndd-1\r\nuser 0m 0.1s\nreal\t1m 2.25s\nreal 0m 3s\n";
        assert_eq!(busybox_times(out), vec![0.5, 62.25, 3.0]);
        assert_eq!(busybox_time_after(out, ""), Some(0.5));
        assert_eq!(busybox_time_after(out, "dd-1"), Some(62.25));
        assert_eq!(busybox_time_after(out, "dd-2"), None);
    }
}
