//! Debian packages some commands need (nginx for the flood's baseline; buildah, runc and
//! musl-tools for the container image), installed with apt-get when missing. Idempotent: an
//! installed package is not touched, and the package lists are refreshed only if an install
//! fails without them.

use std::process::Command;

use anyhow::{Context, Result};

use crate::run_cmd;

/// Makes sure every package in `packages` is installed.
pub(crate) fn ensure(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("    already installed: {}", packages.join(", "));
        return Ok(());
    }
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    if run_cmd(&mut install()).is_err() {
        run_cmd(Command::new("apt-get").arg("update"))
            .context("apt-get update failed (is this Debian or Ubuntu, and are you root?)")?;
        run_cmd(&mut install())
            .with_context(|| format!("could not install {}", missing.join(", ")))?;
    }
    Ok(())
}

/// Whether dpkg says `package` is installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}
