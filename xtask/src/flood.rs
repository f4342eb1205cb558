//! `cargo xtask flood [-- FLOOD-ARGS]`: the fibre-repair load test. Installs nginx (the bench
//! baseline) if missing, builds the receiver and the load generator in release mode, and runs
//! `flood` (`tests/src/bin/flood.rs`; `cargo xtask flood -- --help` lists its options), which
//! prints the figures and fails unless every chunk is stored exactly once and the receiver's
//! peak RSS stays within 256 MiB.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{apt, cargo, project_root, run_cmd};

/// Arguments after `--` go to the flood binary.
#[derive(clap::Args)]
pub(crate) struct FloodArgs {
    /// Options of the flood binary (`cargo xtask flood -- --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub(crate) fn run(a: FloodArgs) -> Result<()> {
    apt::ensure_programs(&[("nginx", "nginx")]).context("installing nginx, the bench baseline")?;
    run_cmd(&mut cargo([
        "build",
        "--release",
        "--locked",
        "-p",
        "blackbox-server",
        "-p",
        "blackbox-tests",
        "--bin",
        "blackbox-server",
        "--bin",
        "flood",
    ]))?;
    let bin_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project_root().join("target"), PathBuf::from)
        .join("release");
    let mut cmd = Command::new(bin_dir.join("flood"));
    cmd.args(&a.args)
        .env("BLACKBOX_BIN_DIR", &bin_dir)
        .current_dir(project_root());
    run_cmd(&mut cmd)
}
