//! `cargo xtask dist --smoke`: does each cross-built agent work on its CPU? Run under
//! qemu-user (installed from Debian when missing; binfmt_misc is not assumed, so the emulator
//! is called explicitly), each agent:
//!
//! 1. prints `--version`;
//! 2. makes an identity in an empty state directory (P-256 key generation in ring) and finds the
//!    same one the second time;
//! 3. `logos` writes lines from stdin, and a command's output with its exit status, into a file
//!    standing in for /dev/kmsg;
//! 4. uploads: a host `blackbox-server` with its own CA, the agent's fingerprint on the
//!    allowlist, `run` over mutual TLS reading kmsg records from a file, until the records are
//!    in the store.
//!
//! Everything lives in `target/dist-build/smoke/` (made afresh; kept afterwards, to read the
//! logs). One server serves every target in turn.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::run::{Proc, ServerTls, allow_agent, target_dir, wait_healthy};
use crate::{cargo, project_root, run_cmd, show};

/// How long the records may take to reach the store (an upload a second, a group commit a
/// second, and an emulated CPU doing the TLS handshake).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the store is looked at.
const POLL: Duration = Duration::from_millis(500);
/// Records the agent uploads.
const RECORDS: u64 = 3;

/// The qemu-user emulator for `target`'s CPU; `None` runs it directly (x86_64 on this host).
fn emulator(target: &str) -> Option<&'static str> {
    let arch = target.split('-').next()?;
    match arch {
        "aarch64" => Some("qemu-aarch64-static"),
        a if a.starts_with("arm") => Some("qemu-arm-static"),
        "mipsel" => Some("qemu-mipsel-static"),
        "mips" => Some("qemu-mips-static"),
        // This machine's own CPU (the dist targets are x86_64 and the above).
        _ => None,
    }
}

/// Smoke-tests each `(target, agent binary)`; prints one PASS/FAIL line per target and fails if
/// any failed.
pub(super) fn run(agents: &[(&str, &Path)]) -> Result<()> {
    if agents.iter().any(|(t, _)| emulator(t).is_some()) {
        ensure_qemu_user()?;
    }
    let work = project_root().join("target/dist-build/smoke");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    // The server runs on this machine: an ordinary debug build (CI has it already).
    let mut build = cargo(["build", "-p", "blackbox-server"]);
    println!("==> smoke: building the host server: {}", show(&build));
    run_cmd(&mut build).context("building blackbox-server for the host failed")?;
    let server_bin = target_dir(&project_root()).join("debug/blackbox-server");
    let tls = ServerTls::ensure(&server_bin, work.join("tls"))?;
    let store = work.join("store");
    let listen = free_loopback_port()?;
    let mut serve = tls.serve(&server_bin, listen, &store.to_string_lossy());
    let log = log_file(&work.join("server.log"))?;
    serve.stdout(log.try_clone()?).stderr(log);
    let mut server = Proc::spawn("blackbox-server", serve)?;
    wait_healthy(listen, &mut server, &AtomicBool::new(false))
        .with_context(|| format!("see {}", work.join("server.log").display()))?;

    let ctx = Ctx {
        server_bin,
        tls,
        url: format!("https://{listen}"),
        store,
    };
    let mut results = Vec::new();
    for &(target, bin) in agents {
        println!("==> smoke: {target}");
        let dir = work.join(target);
        let result = std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {}", dir.display()))
            .and_then(|()| smoke_one(target, bin, &dir, &ctx));
        results.push((target, result));
    }
    server.stop();

    println!();
    let mut failed = 0;
    for (target, result) in &results {
        match result {
            Ok(summary) => println!("PASS  {target:<32} {summary}"),
            Err(e) => {
                failed += 1;
                println!("FAIL  {target:<32} {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} targets failed the smoke test; logs in {}",
            results.len(),
            work.display()
        );
    }
    Ok(())
}

/// What every target's test shares.
struct Ctx {
    server_bin: PathBuf,
    tls: ServerTls,
    url: String,
    store: PathBuf,
}

/// The four checks for one target; returns a one-line summary.
fn smoke_one(target: &str, bin: &Path, dir: &Path, ctx: &Ctx) -> Result<String> {
    let agent = || match emulator(target) {
        Some(qemu) => {
            let mut c = Command::new(qemu);
            c.arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let arch = target.split('-').next().unwrap_or(target);
    let device = format!("smoke-{arch}");
    let mut done = Vec::new();

    // 1. It starts at all.
    let out = checked(agent().arg("--version"), None, "--version")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        version.starts_with("blackbox-agent "),
        "--version printed {version:?}"
    );
    done.push(version);

    // 2. An identity: made once, the same after.
    let state = dir.join("state");
    let line = |out: &Output| String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut id = agent();
    id.arg("identity")
        .arg("--state-dir")
        .arg(&state)
        .arg("--device-id")
        .arg(&device);
    let first = line(&checked(&mut id, None, "identity")?);
    let ok = first
        .strip_prefix("sha256:")
        .and_then(|rest| rest.split_once("  "))
        .is_some_and(|(hex, dev)| {
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && dev == device
        });
    ensure!(
        ok,
        "identity printed {first:?}, not `sha256:<hex>  {device}`"
    );
    let again = line(&checked(&mut id, None, "identity (again)")?);
    ensure!(
        again == first,
        "identity changed: {first:?}, then {again:?}"
    );
    done.push("identity".to_owned());

    // 3. logos, from stdin and around a command.
    let kmsg_out = dir.join("logos-kmsg");
    let logos = |cmd: &[&str]| {
        let mut c = agent();
        c.args(["logos", "smoke", "--kmsg"])
            .arg(&kmsg_out)
            // Not this machine's /etc/blackbox/agent.toml.
            .args(["--config", "/dev/null"]);
        if !cmd.is_empty() {
            c.arg("--").args(cmd);
        }
        c
    };
    std::fs::write(&kmsg_out, "").context("creating the logos kmsg file")?;
    checked(&mut logos(&[]), Some(b"one\ntwo\n"), "logos (stdin)")?;
    let got = std::fs::read_to_string(&kmsg_out)?;
    ensure!(
        got == "<14>smoke: one\n<14>smoke: two\n",
        "logos from stdin wrote {got:?}"
    );
    std::fs::write(&kmsg_out, "").context("emptying the logos kmsg file")?;
    let script = "echo out; echo '<3>err' >&2; exit 3";
    let mut wrapped = logos(&["sh", "-c", script]);
    let out = output(&mut wrapped, None)?;
    ensure!(
        out.status.code() == Some(3),
        "logos -- sh -c '{script}' exited with {}, not 3: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let got = std::fs::read_to_string(&kmsg_out)?;
    let mut lines: Vec<&str> = got.lines().collect();
    lines.sort_unstable();
    let pid_of = |l: &str, pri: &str, text: &str| {
        l.strip_prefix(pri)
            .and_then(|l| l.strip_prefix("smoke["))
            .and_then(|l| l.strip_suffix(text))
            .and_then(|l| l.strip_suffix("]: "))
            .is_some_and(|pid| pid.parse::<u32>().is_ok())
    };
    ensure!(
        lines.len() == 2 && pid_of(lines[0], "<11>", "err") && pid_of(lines[1], "<14>", "out"),
        "logos around a command wrote {got:?}"
    );
    done.push("logos".to_owned());

    // 4. A real upload over mutual TLS.
    allow_agent(
        agent(),
        &ctx.server_bin,
        &state,
        &device,
        &ctx.tls.allowlist(),
    )?;
    let kmsg = dir.join("kmsg");
    let mut records = String::new();
    for seq in 0..RECORDS {
        writeln!(records, "6,{seq},{},-;{device} hello {seq}", 1000 + seq)?;
    }
    std::fs::write(&kmsg, &records).context("writing the kmsg records")?;
    let mut run = agent();
    run.arg("run")
        .args(["--server", &ctx.url, "--server-ca"])
        .arg(ctx.tls.ca())
        .arg("--state-dir")
        .arg(&state)
        .arg("--kmsg")
        .arg(&kmsg)
        .arg("--ring")
        .arg(format!("file:{}:1M", dir.join("ring").display()))
        .args(["--interval", "1", "--device-id", &device])
        // Never this machine's /sys/fs/pstore: the agent deletes what it uploaded.
        .arg("--pstore-dir")
        .arg(dir.join("pstore"));
    let log = log_file(&dir.join("agent.log"))?;
    run.stdout(log.try_clone()?).stderr(log);
    let started = Instant::now();
    let mut proc = Proc::spawn("blackbox-agent", run)?;
    let mut missing = Vec::new();
    let mut stored = Vec::new();
    while started.elapsed() < UPLOAD_TIMEOUT {
        if let Some(status) = proc.exited()? {
            bail!(
                "upload: the agent exited ({status}); see {}",
                dir.join("agent.log").display()
            );
        }
        stored = stored_lines(&ctx.store, &device)?;
        missing = (0..RECORDS)
            .filter(|seq| {
                let msg = format!("\"msg\":\"{device} hello {seq}\"");
                !stored.iter().any(|l| l.contains(&msg))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(POLL);
    }
    proc.stop();
    ensure!(
        missing.is_empty(),
        "upload: records {missing:?} not in the store after {} s; see {}",
        UPLOAD_TIMEOUT.as_secs(),
        dir.join("agent.log").display()
    );
    // The records are from 1 ms after this machine's boot: placed on the wall clock through
    // the agent's sync point, they fall in this year or the last few (not in -78037, as when
    // the agent misread its clock).
    let year = this_year();
    if let Some(bad) = stored
        .iter()
        .find(|l| !ts_year(l).is_some_and(|y| (year - 5..=year + 1).contains(&y)))
    {
        bail!("upload: a stored record has an impossible time (the agent's clock?): {bad}");
    }
    done.push(format!(
        "upload ({RECORDS} records stored in {:.1} s, times plausible)",
        started.elapsed().as_secs_f64()
    ));
    Ok(done.join(", "))
}

/// The stored JSON lines of `device`: every segment under `store/raw/`, through `gzip -dc`
/// (segments are gzip members back to back, as `zcat` reads them).
fn stored_lines(store: &Path, device: &str) -> Result<Vec<String>> {
    let mut segments = Vec::new();
    collect_segments(&store.join("raw"), &mut segments)?;
    let tag = format!("\"device\":\"{device}\"");
    let mut lines = Vec::new();
    for seg in segments {
        let mut cmd = Command::new("gzip");
        cmd.arg("-dc").arg(&seg);
        let out = output(&mut cmd, None)?;
        ensure!(out.status.success(), "`{}` failed", show(&cmd));
        lines.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(&tag))
                .map(str::to_owned),
        );
    }
    Ok(lines)
}

/// The year of a stored line's `ts` (`"ts":"2026-11-21T…"`), if it is a plain 4-digit one.
fn ts_year(line: &str) -> Option<i64> {
    let (_, rest) = line.split_once("\"ts\":\"")?;
    let (year, _) = rest.split_once('-')?;
    if year.len() != 4 {
        return None;
    }
    year.parse().ok()
}

/// This year, near enough for [`ts_year`]'s check (a mean Gregorian year of seconds).
fn this_year() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i64::try_from(secs / 31_556_952).unwrap_or(0)
}

fn collect_segments(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect_segments(&path, out)?;
        } else if path.to_string_lossy().ends_with(".seg.gz") {
            out.push(path);
        }
    }
    Ok(())
}

/// Runs `cmd` with `stdin` (or none) and returns its output.
fn output(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .with_context(|| format!("writing to `{}`", show(cmd)))?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", show(cmd)))
}

/// [`output`], failing (with its stderr) unless it exits with 0.
fn checked(cmd: &mut Command, stdin: Option<&[u8]>, what: &str) -> Result<Output> {
    let out = output(cmd, stdin)?;
    ensure!(
        out.status.success(),
        "{what}: `{}` failed ({}): {}",
        show(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// A loopback address with a port nobody listens on right now.
fn free_loopback_port() -> Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    l.local_addr().context("finding a free port")
}

/// Makes sure qemu-user's static emulators are installed (Debian's qemu-user-static).
fn ensure_qemu_user() -> Result<()> {
    let present = Command::new("qemu-aarch64-static")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    let mut install = Command::new("apt-get");
    install
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "qemu-user-static",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive");
    println!("==> smoke: installing qemu-user: {}", show(&install));
    if run_cmd(&mut install).is_err() {
        // A fresh machine may have no package lists yet.
        run_cmd(Command::new("apt-get").arg("update")).context("apt-get update failed")?;
        run_cmd(&mut install)
            .context("could not install qemu-user-static (run as root, or install it yourself)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times() {
        let line = r#"{"ts":"2026-11-21T12:49:28.124238Z","device":"d","seq":0}"#;
        assert_eq!(ts_year(line), Some(2026));
        assert_eq!(ts_year(r#"{"ts":"-78037-11-05T16:25:12Z"}"#), None);
        assert_eq!(ts_year(r#"{"ts":"+12345-01-01T00:00:00Z"}"#), None);
        assert_eq!(ts_year(r#"{"device":"d"}"#), None);
        assert!(this_year() >= 2025);
    }

    #[test]
    fn emulators() {
        assert_eq!(
            emulator("aarch64-unknown-linux-musl"),
            Some("qemu-aarch64-static")
        );
        assert_eq!(
            emulator("armv7-unknown-linux-musleabihf"),
            Some("qemu-arm-static")
        );
        assert_eq!(
            emulator("mips-unknown-linux-musl"),
            Some("qemu-mips-static")
        );
        assert_eq!(emulator("x86_64-unknown-linux-musl"), None);
    }
}
