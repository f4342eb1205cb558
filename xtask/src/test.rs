//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::{apt, cargo, qemu, run_cmd, show, tools};

/// A bare-metal target with no std, for the no_std check.
const NO_STD_TARGET: &str = "thumbv7em-none-eabihf";

/// Number of steps, for the `[n/STEPS]` progress prefix.
const STEPS: usize = 7;

pub(crate) fn run() -> Result<()> {
    announce(
        1,
        "install-test-deps",
        "SeaweedFS (the S3 server the end-to-end tests start), DuckDB, busybox",
    );
    let weed = tools::ensure_weed().context("step `install-test-deps` failed")?;
    let python = tools::ensure_duckdb().context("step `install-test-deps` failed")?;
    // The syslog test's senders: busybox `logger` and util-linux `logger`.
    apt::ensure_programs(&[("busybox", "busybox-static"), ("logger", "bsdutils")])
        .context("step `install-test-deps` failed")?;

    step(
        2,
        "fmt",
        &mut cargo(["fmt", "--all", "--", "--check"]),
        "run `cargo fmt --all` to fix the formatting",
    )?;
    step(
        3,
        "clippy",
        &mut cargo([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "fix the warnings above",
    )?;
    // no_std must stay true: the wire format and the agent core build for bare metal.
    announce(4, "no_std", "cargo check for thumbv7em-none-eabihf");
    run_cmd(Command::new("rustup").args(["target", "add", NO_STD_TARGET]))
        .context("step `no_std` failed: could not add the bare-metal target")?;
    run_cmd(&mut cargo([
        "check",
        "-p",
        "blackbox-protocol",
        "--target",
        NO_STD_TARGET,
    ]))
    .context("step `no_std` failed: blackbox-protocol needs std somewhere")?;
    run_cmd(&mut cargo([
        "check",
        "-p",
        "blackbox-agent",
        "--no-default-features",
        "--target",
        NO_STD_TARGET,
    ]))
    .context("step `no_std` failed: the agent core needs std somewhere")?;
    let mut test = cargo(["test", "--workspace"]);
    test.env("BLACKBOX_WEED", &weed);
    test.env("BLACKBOX_PYTHON", &python);
    step(5, "test", &mut test, "see the failing tests above")?;
    // The agent on real kernels: a panic and a reboot on x86_64 and aarch64 (armv7 and mipsel
    // are `cargo xtask qemu --arch armv7|mipsel --panic` away).
    announce(
        6,
        "qemu",
        "cargo xtask qemu --panic, --arch x86_64 and --arch aarch64",
    );
    for arch in ["x86_64", "aarch64"] {
        qemu::ci(arch)
            .with_context(|| format!("step `qemu` failed on {arch}: see the report above"))?;
    }
    // The static agents for the 64-bit targets, run under qemu-user against a real server. The
    // 32-bit targets build std from source (minutes more each): `cargo xtask dist --smoke`.
    step(
        7,
        "dist-smoke",
        &mut cargo([
            "xtask",
            "dist",
            "--target",
            "x86_64-unknown-linux-musl",
            "--target",
            "aarch64-unknown-linux-musl",
            "--smoke",
        ]),
        "see the FAIL lines above",
    )?;

    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    println!("==> all {STEPS} steps passed in {}:{:02}", t / 60, t % 60);
    Ok(())
}

/// Prints the step's header, and how long the whole run has taken so far (CI has a budget of
/// 30 minutes on two cores: this shows where it goes).
fn announce(n: usize, name: &str, what: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    println!(
        "==> [{n}/{STEPS}] {name} (at {}:{:02}): {what}",
        t / 60,
        t % 60
    );
}

/// When `cargo xtask test` started (its first step).
static START: OnceLock<Instant> = OnceLock::new();

fn step(n: usize, name: &str, cmd: &mut Command, hint: &str) -> Result<()> {
    announce(n, name, &show(cmd));
    run_cmd(cmd).with_context(|| format!("step `{name}` failed: {hint}"))
}
