//! `cargo xtask image`: the receiver's container image, built without a Docker daemon and
//! without pulling anything, then run.
//!
//! The repository's `Dockerfile` builds in two stages: a Rust builder (needs a registry) and a
//! `FROM scratch` final stage. Here the builder's work is done on this machine with the same
//! commands (a static musl binary from `cargo build --target x86_64-unknown-linux-musl`, the
//! host's CA certificates, `server/container/{passwd,group}`, laid out as the build stage's
//! `/out/`), and the Dockerfile's final stage itself is built from that with buildah (vfs
//! storage, chroot isolation, runc: see `../shared/notes/cross-compile.md`). The image is then
//! run (`--version`, and a write into `/data` as its non-root user), and saved as an OCI
//! archive that `podman load` or `skopeo copy` take.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::apt::{self, output};
use crate::{cargo, project_root, run_cmd};

const TARGET: &str = "x86_64-unknown-linux-musl";
const IMAGE: &str = "localhost/blackbox-server";
/// The user the Dockerfile's final stage runs as.
const USER: &str = "10001:10001";
/// crun fails on this machine kind's cgroups; runc works.
const RUNTIME: &str = "/usr/sbin/runc";

pub(crate) fn run() -> Result<()> {
    apt::ensure_programs(&[
        ("buildah", "buildah"),
        ("runc", "runc"),
        ("musl-gcc", "musl-tools"),
        ("update-ca-certificates", "ca-certificates"),
    ])
    .context("installing the image tools")?;
    run_cmd(Command::new("rustup").args(["target", "add", TARGET]))?;
    run_cmd(&mut cargo([
        "build",
        "--release",
        "--locked",
        "--target",
        TARGET,
        "-p",
        "blackbox-server",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project_root().join("target"), PathBuf::from);
    let binary = target_dir.join(TARGET).join("release/blackbox-server");
    let version = output(Command::new(&binary).arg("--version"))?;
    let tag = version
        .split_whitespace()
        .nth(1)
        .context("`blackbox-server --version` printed no version")?
        .to_owned();

    // The build context: out/root/ and out/data/, as the Dockerfile's build stage makes them.
    let ctx = target_dir.join("image");
    let out = ctx.join("out");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let root = project_root();
    for (from, to) in [
        (binary.as_path(), "root/blackbox-server"),
        (
            Path::new("/etc/ssl/certs/ca-certificates.crt"),
            "root/etc/ssl/certs/ca-certificates.crt",
        ),
        (&root.join("server/container/passwd"), "root/etc/passwd"),
        (&root.join("server/container/group"), "root/etc/group"),
    ] {
        let to = out.join(to);
        std::fs::create_dir_all(to.parent().context("a path in the context")?)?;
        std::fs::copy(from, &to)
            .with_context(|| format!("copying {} into the image", from.display()))?;
    }
    std::fs::create_dir_all(out.join("data"))?;
    std::fs::write(out.join("data/.keep"), b"")?;
    let containerfile = ctx.join("Containerfile");
    std::fs::write(&containerfile, final_stage(&root.join("Dockerfile"))?)?;

    let reference = format!("{IMAGE}:{tag}");
    run_cmd(
        buildah([
            "bud",
            "--isolation",
            "chroot",
            "--runtime",
            RUNTIME,
            "-t",
            &reference,
            "-f",
        ])
        .arg(&containerfile)
        .arg(&ctx),
    )?;
    let archive = ctx.join(format!("blackbox-server-{tag}.oci.tar"));
    let _ = std::fs::remove_file(&archive);
    run_cmd(
        buildah(["push", &reference]).arg(format!("oci-archive:{}:{reference}", archive.display())),
    )?;

    let user = output(&mut buildah([
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.OCIv1.Config.User}}",
        &reference,
    ]))?;
    if user.trim() != USER {
        bail!("the image runs as {user:?}, not the non-root {USER}");
    }
    let container = output(&mut buildah(["from", &reference]))?;
    let container = container.trim();
    let run = |args: &[&str]| {
        output(
            buildah([
                "run",
                "--isolation",
                "chroot",
                "--runtime",
                RUNTIME,
                container,
                "--",
            ])
            .args(args),
        )
    };
    let ran = run(&["/blackbox-server", "--version"]);
    // The image's user can write its data directory (the default store).
    let wrote = run(&[
        "/blackbox-server",
        "tls",
        "init",
        "--dir",
        "/data/write-check",
    ]);
    let _ = output(&mut buildah(["rm", container]));
    let ran = ran?;
    if ran.trim() != version.trim() {
        bail!("the image's binary printed {ran:?}, expected {version:?}");
    }
    wrote.context("the image's user cannot write /data")?;
    println!(
        "image {reference}: runs as {USER}, can write /data; /blackbox-server --version in the \
         image: {}",
        ran.trim()
    );
    println!("OCI archive: {}", archive.display());
    println!(
        "  podman load -i {}    (or: skopeo copy oci-archive:{} docker://REGISTRY/blackbox-server:{tag})",
        archive.display(),
        archive.display()
    );
    Ok(())
}

/// The Dockerfile's last stage (from its last `FROM scratch`), its COPYs reading the build
/// stage's `/out/…` from the local build context's `out/…`.
fn final_stage(dockerfile: &Path) -> Result<String> {
    let text = std::fs::read_to_string(dockerfile)
        .with_context(|| format!("reading {}", dockerfile.display()))?;
    let start = text
        .rfind("\nFROM scratch")
        .context("the Dockerfile has no `FROM scratch` final stage")?;
    let mut out = String::new();
    for line in text[start + 1..].lines() {
        if !line.starts_with("COPY ") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.contains(&"--from=build") {
            bail!("a COPY of the final stage does not read from the build stage: {line}");
        }
        let local: Vec<&str> = words
            .iter()
            .filter(|w| **w != "--from=build")
            .map(|w| if w.starts_with("/out/") { &w[1..] } else { w })
            .collect();
        out.push_str(&local.join(" "));
        out.push('\n');
    }
    Ok(out)
}

/// `buildah --storage-driver vfs ARGS…` (no overlay mounts in this kind of container).
fn buildah<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", "vfs"]).args(args);
    cmd
}
