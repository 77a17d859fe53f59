//! `vessel image build|ls|rm`, and what `--image` does for `create` and `run`: give a VM
//! its own copy of an image, with its hostname, user and SSH keys on a seed disk.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Subcommand};
use image::{BuildRequest, Image, ImageStore, Provision, Provisioned};
use manager::Home;

use super::{CliResult, Failure};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a bootable root disk from Debian's packages (mmdebstrap).
    Build(BuildArgs),
    /// List the images.
    Ls(LsArgs),
    /// Delete an image (VMs made from it keep their own copies).
    Rm(RmArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// What to build: debian-12.
    recipe: String,
    /// Store it under this name (default: the recipe's).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The disk's size (sparse: only what the files take is allocated).
    #[arg(long, default_value = "8G", value_name = "SIZE")]
    size: String,
    /// More packages, comma-separated.
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    packages: Vec<String>,
    /// Rebuild an image that already exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct LsArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RmArgs {
    name: String,
}

impl From<image::ImageError> for Failure {
    fn from(e: image::ImageError) -> Self {
        Failure::usage(e)
    }
}

pub fn main(cmd: ImageCommand) -> CliResult {
    let store = ImageStore::from_env()?;
    match cmd {
        ImageCommand::Build(a) => build(&store, a),
        ImageCommand::Ls(a) => list(&store, a),
        ImageCommand::Rm(a) => {
            store.remove(&a.name)?;
            println!("removed image {}", a.name);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn build(store: &ImageStore, a: BuildArgs) -> CliResult {
    let size = vmm::parse_size(&a.size).map_err(|e| Failure::usage(format!("--size: {e}")))?;
    let req = BuildRequest {
        recipe: a.recipe,
        name: a.name,
        size,
        packages: a.packages.into_iter().filter(|p| !p.is_empty()).collect(),
        agent: agent::install::beside_exe(),
    };
    let started = Instant::now();
    let existing = if a.force {
        image::Existing::Replace
    } else {
        image::Existing::Refuse
    };
    let image = store.build(&req, existing, &mut |line| {
        eprintln!(
            "vessel: image: [{:5.1}s] {line}",
            started.elapsed().as_secs_f64()
        );
    })?;
    println!(
        "built {} in {:.1} s: {} ({} disk, {} allocated), kernel {}",
        image.name,
        started.elapsed().as_secs_f64(),
        image.dir.display(),
        image::human_size(image.manifest.size),
        image::human_size(image.allocated()),
        image.manifest.kernel_version
    );
    Ok(ExitCode::SUCCESS)
}

fn list(store: &ImageStore, a: LsArgs) -> CliResult {
    let images = store.list()?;
    if a.json {
        let rows: Vec<serde_json::Value> = images
            .iter()
            .map(|(name, r)| match r {
                Ok(i) => serde_json::json!({
                    "name": name, "recipe": i.manifest.recipe,
                    "kernel": i.manifest.kernel_version, "size": i.manifest.size,
                    "allocated": i.allocated(), "packages": i.manifest.packages,
                    "built_unix": i.manifest.built_unix, "path": i.dir,
                }),
                Err(e) => serde_json::json!({"name": name, "error": e.to_string()}),
            })
            .collect();
        return super::print_json(&rows);
    }
    println!(
        "{:<16} {:<10} {:<22} {:>8} {:>10}",
        "NAME", "RECIPE", "KERNEL", "SIZE", "ALLOCATED"
    );
    for (name, r) in &images {
        match r {
            Ok(i) => println!(
                "{:<16} {:<10} {:<22} {:>8} {:>10}",
                name,
                i.manifest.recipe,
                i.manifest.kernel_version,
                image::human_size(i.manifest.size),
                image::human_size(i.allocated())
            ),
            Err(e) => println!("{name:<16} invalid    {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An image that must exist (`--image NAME`).
pub fn open(name: &str) -> Result<Image, Failure> {
    Ok(ImageStore::from_env()?.open(name)?)
}

/// Fills a VM folder from `image` for a VM called `hostname`.
pub fn provision(
    home: &Home,
    image: &Image,
    dir: &Path,
    hostname: &str,
    ssh_key: Option<&PathBuf>,
) -> Result<Provisioned, Failure> {
    let p = Provision {
        hostname: hostname.to_string(),
        user: manager::ssh::user_name(),
        authorized_keys: manager::ssh::authorized_keys(home, ssh_key.map(PathBuf::as_path))?,
    };
    Ok(image::provision(image, dir, &p)?)
}

/// The --disk specs of a VM made from an image: its root disk first (/dev/vda), the
/// user's disks, then the seed disk.
pub fn disks(p: &Provisioned, dir: Option<&Path>, extra: &[String]) -> Vec<String> {
    let at = |f: &str| dir.map_or_else(|| f.to_string(), |d| d.join(f).display().to_string());
    let mut v = vec![format!("path={},format=raw", at(p.disk))];
    v.extend(extra.iter().cloned());
    v.push(format!(
        "path={},format=raw,readonly=on,id={}",
        at(p.seed),
        image::SEED_SERIAL
    ));
    v
}
