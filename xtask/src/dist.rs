//! Cross builds of the static agent: the toolchains they need, installed idempotently, and one
//! function that returns a stripped, static musl binary for a target.
//!
//! Every target links with zig (from PyPI, through cargo-zigbuild): it carries musl for every
//! CPU, so no Debian cross gcc is needed, and it builds ring's C and assembly too. The 64-bit
//! targets have prebuilt std from rustup; 32-bit ARM and MIPS musl do not, so their std is built
//! with the nightly toolchain's `-Zbuild-std` (see `../shared/notes/cross-compile.md`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root, run_cmd, tools};

/// The agent's device targets, in the order tables list them.
pub(crate) const AGENT_TARGETS: &[&str] = &[
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-musl",
    "armv7-unknown-linux-musleabihf",
    "mipsel-unknown-linux-musl",
];

/// Pinned so a new zig cannot change what links.
const ZIGBUILD_REQUIREMENTS: &[&str] = &["ziglang==0.13.0", "cargo-zigbuild==0.24.0"];

/// Where cross builds go: apart from `target/`, so a cross build never waits for (or
/// invalidates) the debug builds the tests use.
pub(crate) fn target_dir() -> PathBuf {
    project_root().join("target/dist-build")
}

/// Whether `target` has no prebuilt std in rustup and needs nightly `-Zbuild-std`.
pub(crate) fn needs_build_std(target: &str) -> bool {
    target.starts_with("armv7-") || target.starts_with("arm-") || target.starts_with("mips")
}

/// Makes sure zig and cargo-zigbuild are in the tools venv; returns the `cargo-zigbuild` path.
pub(crate) fn ensure_zigbuild() -> Result<PathBuf> {
    let python = tools::ensure_venv()?;
    let bin = python
        .parent()
        .context("the venv's python has no directory")?
        .to_path_buf();
    let zigbuild = bin.join("cargo-zigbuild");
    let zig_ok = Command::new(&python)
        .args(["-m", "ziglang", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if zig_ok && zigbuild.exists() {
        return Ok(zigbuild);
    }
    for req in ZIGBUILD_REQUIREMENTS {
        tools::pip_install(&python, req)
            .with_context(|| format!("could not install {req} from PyPI"))?;
    }
    Ok(zigbuild)
}

/// Makes sure rustup can build for `target`: the prebuilt std, or nightly with rust-src.
pub(crate) fn ensure_rust_target(target: &str) -> Result<()> {
    if needs_build_std(target) {
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("could not install the nightly toolchain")?;
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("could not add rust-src to nightly")?;
    } else {
        run_cmd(Command::new("rustup").args(["target", "add", target]))
            .with_context(|| format!("could not add the Rust target {target}"))?;
    }
    Ok(())
}

/// Builds `package`'s binary `bin` for `target` with the `dist` profile (size-optimised,
/// LTO, panic=abort, stripped) and returns its path.
pub(crate) fn build(package: &str, bin: &str, target: &str) -> Result<PathBuf> {
    if !AGENT_TARGETS.contains(&target) && target != "mips-unknown-linux-musl" {
        bail!(
            "unknown target {target}; known: {}",
            AGENT_TARGETS.join(", ")
        );
    }
    ensure_rust_target(target)?;
    let zigbuild = ensure_zigbuild()?;
    let venv_bin = zigbuild
        .parent()
        .context("cargo-zigbuild has no directory")?;
    let mut cmd = if needs_build_std(target) {
        // Through rustup's `cargo`, which RUSTUP_TOOLCHAIN=nightly (below) steers: `cargo()`
        // runs $CARGO, the stable cargo that started xtask, which refuses -Z.
        let mut cmd = Command::new("cargo");
        cmd.arg("zigbuild").current_dir(project_root());
        cmd
    } else {
        cargo(["zigbuild"])
    };
    // cargo-zigbuild is found as a cargo subcommand on PATH; zig as `python -m ziglang`.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![venv_bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths).context("PATH")?);
    cmd.env("CARGO_TARGET_DIR", target_dir());
    cmd.args([
        "--profile",
        "dist",
        "--locked",
        "-p",
        package,
        "--bin",
        bin,
        "--target",
        target,
    ]);
    let mut flags = vec!["-C", "link-self-contained=no"];
    if needs_build_std(target) {
        cmd.env("RUSTUP_TOOLCHAIN", "nightly");
        cmd.args(["-Zbuild-std=std,panic_abort"]);
        if target.starts_with("mips") {
            // MIPS musl defaults to dynamic linking.
            flags.extend(["-C", "target-feature=+crt-static"]);
        }
    }
    if needs_build_std(target) || target.starts_with("aarch64") {
        let var = format!(
            "CARGO_TARGET_{}_RUSTFLAGS",
            target.to_uppercase().replace('-', "_")
        );
        cmd.env(var, flags.join(" "));
    }
    run_cmd(&mut cmd).with_context(|| format!("building {bin} for {target} failed"))?;
    let out = target_dir().join(target).join("dist").join(bin);
    if !out.exists() {
        bail!(
            "the build said it succeeded but {} is missing",
            out.display()
        );
    }
    Ok(out)
}

/// The static agent for `target`.
pub(crate) fn build_agent(target: &str) -> Result<PathBuf> {
    build("blackbox-agent", "blackbox-agent", target)
}
