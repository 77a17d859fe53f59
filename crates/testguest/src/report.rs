//! BENCHMARKS.md at the workspace root: each benchmark owns one section, delimited by
//! markers, and rewrites only that section, so benchmarks run separately still share
//! one file.

use std::path::PathBuf;

fn benchmarks_md() -> PathBuf {
    // crates/testguest -> workspace root
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md")
}

const HEADER: &str = "# vessel benchmarks\n\nFigures written by the benchmarks themselves \
(`cargo bench`); each section says how it was measured. Ratios compare against a \
baseline measured in the same run, since these machines are noisy.\n";

/// Replaces (or appends) the section `name` with `body` (markdown).
pub fn update_section(name: &str, body: &str) -> std::io::Result<()> {
    let path = benchmarks_md();
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| HEADER.to_string());
    let begin = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}{}", &old[..b], section, &old[e + end.len()..])
        }
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    std::fs::write(&path, new)?;
    println!("updated section {name:?} of {}", path.display());
    Ok(())
}

/// Median of `samples` (sorted in place).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The p-th percentile (0..=100) of `samples` (sorted in place).
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() - 1) as f64 * p / 100.0).round() as usize;
    samples[i]
}

/// Milliseconds logged by vessel's boot timer (`boot-timer: X ms`), in order.
pub fn boot_marks(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| l.split("boot-timer: ").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}
