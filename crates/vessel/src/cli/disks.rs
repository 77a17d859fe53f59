//! `vessel disk create|info|convert|snapshot`: the image tools, in the spirit of
//! qemu-img (whose images these are).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use disk::{Backing, ConvertOptions, CreateOptions, Format};
use image::human_size;

use super::{CliResult, Failure};

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Make a new image: qcow2 (thin: it grows as the guest writes) or raw (sparse),
    /// optionally a qcow2 overlay on a backing file.
    Create(CreateArgs),
    /// Show an image's format, sizes and whole backing chain.
    Info(InfoArgs),
    /// Copy an image into a new one (raw or qcow2); VMDK, VDI, VHD and VHDX images
    /// are imported through qemu-img.
    Convert(ConvertArgs),
    /// Freeze an image into a read-only base beside it and put a new qcow2 overlay in
    /// its place (an external snapshot).
    Snapshot(SnapshotArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    file: PathBuf,
    /// The virtual size (bytes, or with K, M, G, T); default: the backing file's.
    size: Option<String>,
    #[arg(long, default_value = "qcow2", value_name = "qcow2|raw")]
    format: String,
    /// An image the new one starts from (it is only read).
    #[arg(long, short = 'b', value_name = "BASE")]
    backing: Option<PathBuf>,
    /// The backing file's format (default: told by its content).
    #[arg(long, short = 'F', value_name = "qcow2|raw")]
    backing_format: Option<String>,
    /// qcow2 cluster size, 4K to 2M (default 64K).
    #[arg(long, value_name = "SIZE")]
    cluster_size: Option<String>,
}

#[derive(Args)]
pub struct InfoArgs {
    file: PathBuf,
    /// The image's format (default: told by its content).
    #[arg(long, value_name = "qcow2|raw")]
    format: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ConvertArgs {
    input: PathBuf,
    output: PathBuf,
    /// The new image's format (default: raw for .raw and .img names, else qcow2).
    #[arg(long, short = 'O', value_name = "qcow2|raw")]
    format: Option<String>,
    #[arg(long, value_name = "SIZE")]
    cluster_size: Option<String>,
}

#[derive(Args)]
pub struct SnapshotArgs {
    file: PathBuf,
    /// Name the base FILE-STEM.NAME.EXT (default: the next free snap-N).
    #[arg(long)]
    name: Option<String>,
}

impl From<disk::DiskError> for Failure {
    fn from(e: disk::DiskError) -> Self {
        Failure::usage(e)
    }
}

pub fn main(cmd: DiskCommand) -> CliResult {
    match cmd {
        DiskCommand::Create(a) => create(a),
        DiskCommand::Info(a) => info(a),
        DiskCommand::Convert(a) => convert(a),
        DiskCommand::Snapshot(a) => {
            let base = disk::snapshot(&a.file, a.name.as_deref())?;
            println!(
                "{} is now an overlay on {} (read-only)",
                a.file.display(),
                base.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn format_arg(what: &str, s: &str) -> Result<Format, Failure> {
    Format::parse(s).ok_or_else(|| Failure::usage(format!("{what} {s:?}: use qcow2 or raw")))
}

/// Sizes as qemu-img takes them: plain numbers are bytes.
fn size_arg(what: &str, s: &str) -> Result<u64, Failure> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| Failure::usage(format!("{what} {s:?} is too large")));
    }
    vmm::parse_size(s).map_err(|_| {
        Failure::usage(format!(
            "{what} {s:?}: use a number of bytes, or one with K, M, G or T (e.g. 10G)"
        ))
    })
}

fn create(a: CreateArgs) -> CliResult {
    let format = format_arg("--format", &a.format)?;
    let opts = CreateOptions {
        format,
        size: a.size.as_deref().map(|s| size_arg("size", s)).transpose()?,
        backing: match a.backing {
            Some(path) => Some(Backing {
                path,
                format: a
                    .backing_format
                    .as_deref()
                    .map(|f| format_arg("--backing-format", f))
                    .transpose()?,
            }),
            None => None,
        },
        cluster_size: a
            .cluster_size
            .as_deref()
            .map(|s| size_arg("--cluster-size", s))
            .transpose()?,
    };
    disk::create(&a.file, &opts)?;
    let top = &disk::info(&a.file, Some(format))?[0];
    println!(
        "created {} ({format}, {})",
        a.file.display(),
        human_size(top.virtual_size)
    );
    Ok(ExitCode::SUCCESS)
}

fn info(a: InfoArgs) -> CliResult {
    let format = a
        .format
        .as_deref()
        .map(|f| format_arg("--format", f))
        .transpose()?;
    let chain = disk::info(&a.file, format)?;
    if a.json {
        return super::print_json(&chain);
    }
    for (depth, l) in chain.iter().enumerate() {
        let indent = "  ".repeat(depth);
        println!("{indent}{}", l.path.display());
        println!("{indent}  format:        {}", l.format);
        println!(
            "{indent}  virtual size:  {} ({} bytes)",
            human_size(l.virtual_size),
            l.virtual_size
        );
        println!(
            "{indent}  on the host:   {} allocated",
            human_size(l.allocated)
        );
        if let Some(q) = &l.qcow2 {
            println!(
                "{indent}  qcow2:         version {}, {} clusters, {}-bit refcounts, {} compression",
                q.version,
                human_size(q.cluster_size),
                q.refcount_bits,
                q.compression
            );
            for (flag, said) in [
                (q.dirty, "dirty (not closed cleanly)"),
                (q.corrupt, "marked corrupt"),
                (q.lazy_refcounts, "lazy refcounts"),
            ] {
                if flag {
                    println!("{indent}  flag:          {said}");
                }
            }
            if q.internal_snapshots > 0 {
                println!("{indent}  snapshots:     {} internal", q.internal_snapshots);
            }
            if let Some(b) = &q.backing_file {
                let f = q.backing_format.as_deref().unwrap_or("probed");
                println!("{indent}  backing file:  {b} ({f})");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn convert(a: ConvertArgs) -> CliResult {
    let format = match a.format.as_deref() {
        Some(f) => format_arg("--format", f)?,
        None => default_format(&a.output),
    };
    let cluster_size = a
        .cluster_size
        .as_deref()
        .map(|s| size_arg("--cluster-size", s))
        .transpose()?;
    disk::convert(
        &a.input,
        &a.output,
        ConvertOptions {
            format,
            cluster_size,
        },
    )?;
    let top = &disk::info(&a.output, Some(format))?[0];
    println!(
        "wrote {} ({format}, {}, {} allocated)",
        a.output.display(),
        human_size(top.virtual_size),
        human_size(top.allocated)
    );
    Ok(ExitCode::SUCCESS)
}

fn default_format(output: &Path) -> Format {
    match output.extension().and_then(|e| e.to_str()) {
        Some("raw" | "img") => Format::Raw,
        _ => Format::Qcow2,
    }
}
