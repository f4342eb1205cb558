//! `cargo xtask dist`: the static agent for every device target, the static server, one
//! firmware overlay tarball per board, a size table and checksums, all in `dist/`; with
//! `--smoke`, each agent then runs under qemu-user against a real server.
//!
//! Every target links with zig (from PyPI, through cargo-zigbuild): it carries musl for every
//! CPU, so no Debian cross gcc is needed, and it builds ring's C and assembly too. The 64-bit
//! targets have prebuilt std from rustup; 32-bit ARM and MIPS musl do not, so their std is built
//! from rust-src with `-Zbuild-std` (see `../shared/notes/cross-compile.md`), by the same stable
//! compiler as the other targets.
//!
//! - [`overlay`]: the per-board tarballs (agent, init scripts, agent.toml, kernel fragments).
//! - [`smoke`]: `--version`, `identity`, `logos` and an upload over mutual TLS, per target.
//! - [`elf`]: checks that what we ship is static, stripped and for the right CPU.

mod elf;
mod overlay;
mod smoke;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root, run_cmd, show, tools};

/// The agent's device targets, in the order tables list them.
pub(crate) const AGENT_TARGETS: &[&str] = &[
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-musl",
    "armv7-unknown-linux-musleabihf",
    "mipsel-unknown-linux-musl",
];

/// Targets built only when asked for with `--target`. Big-endian MIPS builds and passes the
/// smoke test, but its monotonic clock has whole-second resolution (see [`build`]), so the
/// sync points that place its lines on the wall clock can be a second off.
const OPTIONAL_TARGETS: &[&str] = &["mips-unknown-linux-musl"];

/// The server's (only) target.
const SERVER_TARGET: &str = "x86_64-unknown-linux-musl";

/// Pinned so a new zig cannot change what links. cargo-zigbuild 0.24 names the 32-bit MIPS musl
/// ABI `musleabi` (soft float, as Rust's mips*-unknown-linux-musl targets are), which zig knows
/// from 0.15 on.
const ZIG_VERSION: &str = "0.15.2";
const ZIGBUILD_VERSION: &str = "0.24.0";

#[derive(clap::Args)]
pub(crate) struct DistArgs {
    /// A Rust target triple for the agent (repeatable; default: every device target except
    /// big-endian MIPS, plus the server).
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
    /// Build the static server too (implied when no --target is given).
    #[arg(long)]
    server: bool,
    /// Then smoke-test each agent under qemu-user: --version, identity, logos, and an upload
    /// to a real server over mutual TLS.
    #[arg(long)]
    smoke: bool,
    /// Build the agents with this opt-level instead of z (measured smallest on every target),
    /// to measure again.
    #[arg(long, value_name = "LEVEL")]
    opt_level: Option<String>,
}

/// One binary `dist` built.
struct Built {
    bin: &'static str,
    target: String,
    opt_level: String,
    path: PathBuf,
}

/// `cargo xtask dist`.
pub(crate) fn run(args: DistArgs) -> Result<()> {
    let mut targets: Vec<&str> = Vec::new();
    for t in &args.targets {
        let mut known = AGENT_TARGETS.iter().chain(OPTIONAL_TARGETS);
        let Some(known) = known.find(|k| **k == t.as_str()) else {
            bail!(
                "unknown target {t}; known: {}, {}",
                AGENT_TARGETS.join(", "),
                OPTIONAL_TARGETS.join(", ")
            );
        };
        if !targets.contains(known) {
            targets.push(known);
        }
    }
    if targets.is_empty() {
        targets = AGENT_TARGETS.to_vec();
    }
    let out = dist_dir();
    // Only what this run builds: a stale tarball next to fresh checksums would mislead.
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mut built = Vec::new();
    for &t in &targets {
        let opt = args.opt_level.as_deref().unwrap_or(AGENT_OPT_LEVEL);
        println!("==> blackbox-agent for {t} (opt-level {opt})");
        let path = match &args.opt_level {
            Some(level) => build_agent_at(t, level)?,
            None => build_agent(t)?,
        };
        built.push(ship("blackbox-agent", t, opt.to_owned(), &path, &out)?);
    }
    if args.server || args.targets.is_empty() {
        println!("==> blackbox-server for {SERVER_TARGET}");
        let path = build(
            "blackbox-server",
            "blackbox-server",
            SERVER_TARGET,
            "dist-server",
            None,
        )?;
        // The dist-server profile's, inherited from release.
        let opt = "3".to_owned();
        built.push(ship("blackbox-server", SERVER_TARGET, opt, &path, &out)?);
    }

    let agents: Vec<(&str, &Path)> = built
        .iter()
        .filter(|b| b.bin == "blackbox-agent")
        .map(|b| (b.target.as_str(), b.path.as_path()))
        .collect();
    let tarballs = overlay::write_all(&out, &agents)?;

    let table = sizes_table(&built)?;
    println!();
    print!("{table}");
    std::fs::write(out.join("SIZES.md"), &table).context("writing dist/SIZES.md")?;

    let mut names: Vec<String> = built.iter().map(|b| dist_name(b.bin, &b.target)).collect();
    names.extend(tarballs);
    names.sort();
    sha256sums(&out, &names, &out.join("SHA256SUMS"))?;
    println!("==> {} (SIZES.md, SHA256SUMS)", out.display());
    for n in &names {
        println!("    {n}");
    }

    if args.smoke {
        smoke::run(&agents)?;
    }
    Ok(())
}

/// The output directory, `dist/` (ignored by git).
fn dist_dir() -> PathBuf {
    project_root().join("dist")
}

fn dist_name(bin: &str, target: &str) -> String {
    format!("{bin}-{target}")
}

/// Checks that `path` is what a device can run (static, stripped, for `target`'s CPU) and
/// copies it to `dist/BIN-TARGET`.
fn ship(
    bin: &'static str,
    target: &str,
    opt_level: String,
    path: &Path,
    out: &Path,
) -> Result<Built> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let facts = elf::inspect(&bytes).with_context(|| format!("{}", path.display()))?;
    let want =
        elf::machine_of(target).with_context(|| format!("no ELF machine known for {target}"))?;
    if facts.machine != want {
        bail!(
            "{} is for ELF machine {}, not {want} ({target})",
            path.display(),
            facts.machine
        );
    }
    if facts.interpreter {
        bail!(
            "{} asks for a dynamic loader (PT_INTERP): it would not run on a device",
            path.display()
        );
    }
    if facts.symbols {
        bail!("{} still has a symbol table: not stripped", path.display());
    }
    let dest = out.join(dist_name(bin, target));
    std::fs::copy(path, &dest).with_context(|| format!("copying to {}", dest.display()))?;
    Ok(Built {
        bin,
        target: target.to_owned(),
        opt_level,
        path: dest,
    })
}

/// The agent's opt-level. Measured against `s` for every target (docs/SIZES.md): `z` is
/// smaller everywhere, by under 1% on MIPS to 8% on armv7. (A test binary with only the TLS
/// stack was smaller with `s` on MIPS; the whole agent is not.) `--opt-level` measures again.
const AGENT_OPT_LEVEL: &str = "z";

/// `dist/SIZES.md`: stripped bytes per binary and target, and what built them.
fn sizes_table(built: &[Built]) -> Result<String> {
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "rustc (version unknown)".to_owned());
    let mut s = String::new();
    writeln!(s, "# Stripped binary sizes")?;
    writeln!(s)?;
    writeln!(
        s,
        "Made by `cargo xtask dist` with {rustc}, linked by zig {ZIG_VERSION} (cargo-zigbuild \
         {ZIGBUILD_VERSION}). Static musl binaries, LTO, one codegen unit, stripped; the agent \
         with panic=abort at the opt-level shown."
    )?;
    writeln!(s)?;
    writeln!(s, "| binary | target | opt-level | bytes | MiB |")?;
    writeln!(s, "|---|---|---|---:|---:|")?;
    for b in built {
        let len = std::fs::metadata(&b.path)
            .with_context(|| format!("{}", b.path.display()))?
            .len();
        writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} |",
            b.bin,
            b.target,
            b.opt_level,
            thousands(len),
            len as f64 / f64::from(1u32 << 20)
        )?;
    }
    Ok(s)
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes `sha256sum NAMES...` (run in `dir`) to `file`: the standard `SHA256SUMS` format,
/// checked with `sha256sum -c`.
pub(crate) fn sha256sums(dir: &Path, names: &[String], file: &Path) -> Result<()> {
    let mut cmd = Command::new("sha256sum");
    cmd.arg("--").args(names).current_dir(dir);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}` (coreutils)", show(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            show(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(file, &out.stdout).with_context(|| format!("writing {}", file.display()))
}

/// Where `dist` works: apart from `target/`, so a cross build never waits for (or invalidates)
/// the debug builds the tests use. Holds the zig venv, the overlay stages, the smoke test's
/// files and two cargo target directories ([`cargo_target_dir`]).
pub(crate) fn target_dir() -> PathBuf {
    project_root().join("target/dist-build")
}

/// The cargo target directory for `target`: one for targets with a prebuilt std and one for
/// those that build it. Apart, because `RUSTC_BOOTSTRAP` changes the build scripts' view of the
/// compiler (proc-macro2, thiserror, anyhow probe for nightly): shared, every switch between the
/// two kinds would rebuild the proc-macros and everything after them.
fn cargo_target_dir(target: &str) -> PathBuf {
    target_dir().join(if needs_build_std(target) {
        "std-from-source"
    } else {
        "std-prebuilt"
    })
}

/// Whether `target` has no prebuilt std in rustup and needs `-Zbuild-std`.
pub(crate) fn needs_build_std(target: &str) -> bool {
    target.starts_with("armv7-") || target.starts_with("arm-") || target.starts_with("mips")
}

/// Makes sure the pinned zig and cargo-zigbuild are in the dist venv; returns the
/// `cargo-zigbuild` path.
///
/// The venv is `target/dist-build/venv`, not the shared tools venv: a checkout that moves the
/// pin must not swap the zig under another checkout's build.
pub(crate) fn ensure_zigbuild() -> Result<PathBuf> {
    let python = tools::ensure_venv_at(&target_dir().join("venv"))?;
    let bin = python
        .parent()
        .context("the venv's python has no directory")?
        .to_path_buf();
    let zigbuild = bin.join("cargo-zigbuild");
    let version = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let zig = version(Command::new(&python).args(["-m", "ziglang", "version"]));
    if zig.as_deref() != Some(ZIG_VERSION) {
        tools::pip_install(&python, &format!("ziglang=={ZIG_VERSION}"))
            .context("could not install zig (ziglang) from PyPI")?;
    }
    let want = format!("cargo-zigbuild {ZIGBUILD_VERSION}");
    if version(Command::new(&zigbuild).arg("--version")).as_deref() != Some(want.as_str()) {
        tools::pip_install(&python, &format!("cargo-zigbuild=={ZIGBUILD_VERSION}"))
            .context("could not install cargo-zigbuild from PyPI")?;
    }
    Ok(zigbuild)
}

/// Makes sure rustup can build for `target`: the prebuilt std, or (for `-Zbuild-std`) the
/// standard library's source.
pub(crate) fn ensure_rust_target(target: &str) -> Result<()> {
    if needs_build_std(target) {
        run_cmd(Command::new("rustup").args(["component", "add", "rust-src"]))
            .context("could not add rust-src (the standard library's source) to the toolchain")?;
    } else {
        run_cmd(Command::new("rustup").args(["target", "add", target]))
            .with_context(|| format!("could not add the Rust target {target}"))?;
    }
    Ok(())
}

/// Builds `package`'s binary `bin` for `target` with cargo profile `profile` (and, if given,
/// that opt-level instead of the profile's) and returns its path.
fn build(
    package: &str,
    bin: &str,
    target: &str,
    profile: &str,
    opt_level: Option<&str>,
) -> Result<PathBuf> {
    ensure_rust_target(target)?;
    let zigbuild = ensure_zigbuild()?;
    let venv_bin = zigbuild
        .parent()
        .context("cargo-zigbuild has no directory")?;
    let mut cmd = cargo(["zigbuild"]);
    // cargo-zigbuild is found as a cargo subcommand on PATH; zig as `python -m ziglang`.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![venv_bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths).context("PATH")?);
    cmd.env("CARGO_TARGET_DIR", cargo_target_dir(target));
    if let Some(level) = opt_level {
        cmd.env(
            format!("CARGO_PROFILE_{}_OPT_LEVEL", env_name(profile)),
            level,
        );
    }
    cmd.args([
        "--profile",
        profile,
        "--locked",
        "-p",
        package,
        "--bin",
        bin,
        "--target",
        target,
    ]);
    // The build machine's paths stay out of the binary (panic locations name source files).
    let mut flags = vec![format!(
        "--remap-path-prefix={}=/blackbox",
        project_root().display()
    )];
    if needs_build_std(target) || target.starts_with("aarch64") {
        // Zig's musl supplies the C runtime objects (rust-src has none).
        flags.push("-Clink-self-contained=no".into());
    }
    if needs_build_std(target) {
        // The same (stable) compiler as every other target, allowed its unstable flags: a
        // nightly would drift on every `rustup update`, and `$CARGO` is the stable cargo anyway.
        cmd.env("RUSTC_BOOTSTRAP", "1");
        cmd.args(["-Zbuild-std=std,panic_abort"]);
        if target.starts_with("mips") {
            // MIPS musl defaults to dynamic linking.
            flags.push("-Ctarget-feature=+crt-static".into());
        }
        // The agent reads CLOCK_MONOTONIC through rustix. Its libc backend (where it has no
        // raw-syscall one) hands its 64-bit timespec to libc's clock_gettime as the libc
        // crate's timespec, which on 32-bit musl is still the old 32-bit one: the clock reads
        // as garbage (found by the smoke test's wall-clock check). So: the raw-syscall
        // backend, as on every other target (MIPS inline assembly is unstable, hence the
        // opt-in). rustix has none for big-endian MIPS; there the libc crate gets musl 1.2's
        // 64-bit time_t (zig's musl is 1.2.5): the seconds are right, but rustix reads the
        // nanoseconds from the padding that precedes them on big endian, so whole seconds.
        if target.starts_with("mipsel") {
            flags.push("--cfg=rustix_use_experimental_asm".into());
        } else if target.starts_with("mips") {
            flags.push("--cfg=libc_unstable_musl_v1_2".into());
        }
    }
    cmd.env(
        format!("CARGO_TARGET_{}_RUSTFLAGS", env_name(target)),
        flags.join(" "),
    );
    run_cmd(&mut cmd).with_context(|| format!("building {bin} for {target} failed"))?;
    let out = cargo_target_dir(target)
        .join(target)
        .join(profile)
        .join(bin);
    if !out.exists() {
        bail!(
            "the build said it succeeded but {} is missing",
            out.display()
        );
    }
    Ok(out)
}

/// `dist-server` as cargo's environment variables spell it: `DIST_SERVER`.
fn env_name(s: &str) -> String {
    s.to_uppercase().replace('-', "_")
}

/// The static agent for `target`, as `dist` ships it.
pub(crate) fn build_agent(target: &str) -> Result<PathBuf> {
    build_agent_at(target, AGENT_OPT_LEVEL)
}

fn build_agent_at(target: &str, opt_level: &str) -> Result<PathBuf> {
    build(
        "blackbox-agent",
        "blackbox-agent",
        target,
        "dist",
        Some(opt_level),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_041_234), "2,041,234");
    }

    #[test]
    fn every_board_has_an_agent_target() {
        for b in blackbox_board::BOARDS {
            assert!(
                AGENT_TARGETS.contains(&b.rust_target),
                "{} is for {}, which dist does not build",
                b.name,
                b.rust_target
            );
            assert!(elf::machine_of(b.rust_target).is_some());
        }
    }
}
