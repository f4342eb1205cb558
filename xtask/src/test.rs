//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, run_cmd, show, tools};

/// Number of steps, for the `[n/STEPS]` progress prefix.
const STEPS: usize = 4;

pub(crate) fn run() -> Result<()> {
    announce(
        1,
        "install-test-deps",
        "SeaweedFS (the S3 server the end-to-end tests start)",
    );
    let weed = tools::ensure_weed().context("step `install-test-deps` failed")?;

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
    let mut test = cargo(["test", "--workspace"]);
    test.env("BLACKBOX_WEED", &weed);
    step(4, "test", &mut test, "see the failing tests above")?;

    println!("==> all {STEPS} steps passed");
    Ok(())
}

fn announce(n: usize, name: &str, what: &str) {
    println!("==> [{n}/{STEPS}] {name}: {what}");
}

fn step(n: usize, name: &str, cmd: &mut Command, hint: &str) -> Result<()> {
    announce(n, name, &show(cmd));
    run_cmd(cmd).with_context(|| format!("step `{name}` failed: {hint}"))
}
