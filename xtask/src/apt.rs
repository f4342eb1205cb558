//! Debian packages, through apt's own clients: host tools installed with `apt-get install`,
//! packages of any architecture fetched with `apt-get download` into a cache under
//! `target/debs` (never fetched again while the file is there) and unpacked with `dpkg -x`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{project_root, run_cmd, show};

/// Where downloaded `.deb` files are kept.
pub(crate) fn cache_dir() -> PathBuf {
    project_root().join("target/debs")
}

/// Whether `program` is an executable file on PATH.
pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Installs the packages of the `(program, package)` pairs whose program is not on PATH.
pub(crate) fn ensure_programs(pairs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = pairs
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let install = |update_first: bool| -> Result<()> {
        if update_first {
            update()?;
        }
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_cmd(&mut cmd)
    };
    // A fresh machine may have no package lists yet, or stale ones.
    install(false)
        .or_else(|_| install(true))
        .with_context(|| format!("could not install {}", missing.join(" ")))
}

/// `apt-get update`. A failing index (a mirror in sync, say) does not stop the others from
/// being usable, so a failure is reported and not returned.
fn update() -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.arg("update");
    eprintln!("    {}", show(&cmd));
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => {
            eprintln!("    (apt-get update: {s}; going on with the indexes it did fetch)");
            Ok(())
        }
        Err(e) => Err(e).context("could not run apt-get update"),
    }
}

/// Makes sure dpkg knows `arch` (adding it as a foreign architecture, then updating the
/// indexes, if it does not).
fn ensure_architecture(arch: &str) -> Result<()> {
    let native = output(Command::new("dpkg").arg("--print-architecture"))?;
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if native.trim() == arch || foreign.split_whitespace().any(|a| a == arch) {
        return Ok(());
    }
    run_cmd(Command::new("dpkg").args(["--add-architecture", arch]))?;
    update()
}

/// The cached `.deb` of `package` for `arch`, if there is one (`package_*_arch.deb`).
fn cached(package: &str, arch: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    let suffix = format!("_{arch}.deb");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache_dir())
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The `.deb` of `package` for Debian architecture `arch`: from the cache, or downloaded into it.
pub(crate) fn download(package: &str, arch: &str) -> Result<PathBuf> {
    if let Some(deb) = cached(package, arch) {
        return Ok(deb);
    }
    ensure_architecture(arch)?;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fetch = || {
        // Sandboxing the download as `_apt` fails on a root-owned target/: say it is root.
        let mut cmd = Command::new("apt-get");
        cmd.args(["-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{package}:{arch}"))
            .current_dir(&dir);
        run_cmd(&mut cmd)
    };
    fetch()
        .or_else(|_| {
            update()?;
            fetch()
        })
        .with_context(|| format!("could not download {package}:{arch}"))?;
    cached(package, arch).with_context(|| {
        format!(
            "apt-get download {package}:{arch} left no {package}_*_{arch}.deb in {}",
            dir.display()
        )
    })
}

/// A field of a `.deb`'s control file (`dpkg-deb -f`).
pub(crate) fn field(deb: &Path, name: &str) -> Result<String> {
    Ok(
        output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?
            .trim()
            .to_owned(),
    )
}

/// `deb` unpacked into `dest` (once: an existing `dest` is taken as done). The unpacking goes
/// to a temporary directory first, so an interrupted one is not mistaken for a finished one.
pub(crate) fn unpack(deb: &Path, dest: &Path) -> Result<()> {
    if dest.is_dir() {
        return Ok(());
    }
    let tmp = dest.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    run_cmd(Command::new("dpkg").arg("-x").arg(deb).arg(&tmp))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))
}

/// What `cmd` printed on stdout; fails unless it exits with status 0.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
