//! Copying an image into another format: raw and qcow2 natively (only the data is
//! written, so the copy is thin), VMDK, VDI, VHD, VHDX, QED and qcow version 1
//! through `qemu-img convert`.

use std::path::Path;
use std::process::Command;

use crate::DiskError;
use crate::create::{CreateOptions, create};
use crate::format::{Detected, Foreign, Format, detect};
use crate::image::{Image, OpenOptions};

/// Bytes moved per step.
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    pub format: Format,
    pub cluster_size: Option<u64>,
}

/// Copies `input` (any recognised format, its whole backing chain flattened) into a
/// new image `output`, which must not exist.
pub fn convert(input: &Path, output: &Path, opts: ConvertOptions) -> Result<(), DiskError> {
    if output.exists() {
        return Err(DiskError::Usage(format!(
            "{} exists: vessel never overwrites an image (remove it first)",
            output.display()
        )));
    }
    let file = std::fs::File::open(input).map_err(DiskError::io(input))?;
    if let Detected::Foreign(foreign) = detect(&file).map_err(DiskError::io(input))? {
        return qemu_img_convert(input, output, foreign, opts.format);
    }
    drop(file);
    let from = Image::open(
        input,
        OpenOptions {
            format: None,
            readonly: true,
        },
    )?;
    create(
        output,
        &CreateOptions {
            format: opts.format,
            size: Some(from.size()),
            backing: None,
            cluster_size: opts.cluster_size,
        },
    )?;
    let result = copy_data(&from, output, opts.format);
    if result.is_err() {
        let _ = std::fs::remove_file(output);
    }
    result
}

fn copy_data(from: &Image, output: &Path, format: Format) -> Result<(), DiskError> {
    let to = Image::open(
        output,
        OpenOptions {
            format: Some(format),
            readonly: false,
        },
    )?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < from.size() {
        let n = (from.size() - at).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        from.read_into(chunk, at)
            .map_err(DiskError::io(from.path()))?;
        // Zeroes stay holes (raw) or unallocated clusters (qcow2).
        if chunk.iter().any(|&b| b != 0) {
            to.write_from(chunk, at).map_err(DiskError::io(output))?;
        }
        at += n as u64;
    }
    to.flush().map_err(DiskError::io(output))
}

fn qemu_img_convert(
    input: &Path,
    output: &Path,
    from: Foreign,
    to: Format,
) -> Result<(), DiskError> {
    let out = Command::new("qemu-img")
        .args(["convert", "-f", from.qemu_name(), "-O", to.name()])
        .arg(input)
        .arg(output)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DiskError::MissingTool {
                tool: "qemu-img",
                package: "qemu-utils",
            },
            _ => DiskError::io(Path::new("qemu-img"))(e),
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(output);
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(DiskError::ToolFailed {
            tool: "qemu-img convert",
            message: said
                .lines()
                .last()
                .unwrap_or("no message")
                .trim()
                .to_string(),
        });
    }
    Ok(())
}
