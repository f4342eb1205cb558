//! `cargo xtask run`: blackbox on this machine, nothing to configure.
//!
//! Builds `blackbox-server` and `blackbox-agent` (release) and goes through the same steps an
//! operator does, with real mutual TLS: makes the server's certificate once
//! (`blackbox-server tls init` into `./blackbox-data/tls`), starts the server storing into
//! `./blackbox-data`, waits until its port answers, makes the agent's identity
//! (`blackbox-agent identity`), puts its fingerprint on the allowlist (`blackbox-server devices
//! allow`), starts the agent reading `/dev/kmsg`, and supervises both until Ctrl-C. Then it stops the agent first (so its last
//! upload still reaches the server) and the server second (so it writes its last segment),
//! each with SIGTERM and, after a grace period, SIGKILL.
//!
//! The children run in their own process groups: Ctrl-C reaches only this process, which
//! decides the order of shutdown. Relative paths are taken from the workspace root.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::{cargo, project_root, run_cmd, show};

/// How long the server may take to answer `/healthz` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the supervisor looks at the children and the Ctrl-C flag.
const POLL: Duration = Duration::from_millis(100);

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Address the server listens on (use 0.0.0.0:8443 to accept devices on the network).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Where segments go: a directory (relative to the workspace root) or s3://bucket/prefix
    /// (configured by the AWS_* environment variables).
    #[arg(long, default_value = "./blackbox-data")]
    store: String,
    /// Kernel log the agent reads: /dev/kmsg, or a FILE of saved kmsg records.
    #[arg(long, default_value = "/dev/kmsg", value_name = "PATH")]
    kmsg: PathBuf,
    /// Seconds between the agent's uploads.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    interval: u64,
    /// The agent's device id [default: this machine's host name].
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,
    /// Run only the server (agents on other devices upload to it).
    #[arg(long)]
    server_only: bool,
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    let root = project_root();
    let store = StoreArg::new(&args.store, &root);
    let kmsg = root.join(&args.kmsg);
    if !args.server_only {
        check_readable(&kmsg)?;
    }
    let health_addr = loopback_for(args.listen);
    if TcpStream::connect_timeout(&health_addr, Duration::from_millis(500)).is_ok() {
        bail!(
            "something already listens on {health_addr} (an earlier `cargo xtask run`?): \
             stop it, or choose another address with --listen"
        );
    }

    let mut packages = vec!["blackbox-server"];
    if !args.server_only {
        packages.push("blackbox-agent");
    }
    let bin = build_host(&packages, true)?;

    // From here on Ctrl-C (and SIGTERM, SIGHUP) only sets this flag; the loop below stops the
    // children in order.
    let stop = stop_flag()?;

    // The server's certificate, made once and kept with the data.
    let server_bin = bin.join("blackbox-server");
    let tls = ServerTls::ensure(&server_bin, store.base_dir(&root).join("tls"))?;
    let allowlist = tls.allowlist();
    let cmd = tls.serve(&server_bin, args.listen, &store.arg);
    let mut server = Proc::spawn("blackbox-server", cmd)?;
    wait_healthy(health_addr, &mut server, &stop)?;

    let mut agent = None;
    if !args.server_only {
        let state_dir = store.agent_state_dir(&root);
        let device_id = args.device_id.clone().unwrap_or_else(host_name);
        allow_agent(
            Command::new(bin.join("blackbox-agent")),
            &server_bin,
            &state_dir,
            &device_id,
            &allowlist,
        )?;
        let mut cmd = Command::new(bin.join("blackbox-agent"));
        cmd.arg("run")
            .arg("--server")
            .arg(format!("https://{health_addr}"))
            .arg("--server-ca")
            .arg(tls.ca())
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--kmsg")
            .arg(&kmsg)
            .arg("--interval")
            .arg(args.interval.to_string())
            .arg("--device-id")
            .arg(&device_id)
            // On a workstation /sys/fs/pstore belongs to systemd-pstore: the agent must not
            // upload and unlink it. On a device the default (/sys/fs/pstore) applies.
            .arg("--pstore-dir")
            .arg(state_dir.join("pstore"));
        // Syslog: not the workstation's /dev/log (journald or rsyslogd own it) but a socket of
        // our own, and only when the agent reads and may write the real kernel log.
        let syslog = state_dir.join("log.sock");
        let kmsg_writable = kmsg == Path::new("/dev/kmsg")
            && std::fs::OpenOptions::new()
                .append(true)
                .open("/dev/kmsg")
                .is_ok();
        if kmsg_writable {
            cmd.arg("--syslog-socket").arg(&syslog);
        } else {
            cmd.args(["--syslog-socket", "none"]);
        }
        agent = Some(Proc::spawn("blackbox-agent", cmd)?);
        print_summary(&args, &store, &root, &device_id, &state_dir);
        if kmsg_writable {
            println!(
                "    syslog  `logger -u {} -t myapp hello` goes into the kernel log, then the store",
                syslog.display()
            );
        }
    } else {
        println!(
            "==> blackbox-server is running on https://{}; Ctrl-C stops it.",
            args.listen
        );
        println!(
            "    Agents need --server-ca {} and their fingerprint on {}:",
            tls.ca().display(),
            allowlist.display()
        );
        println!(
            "        target/release/blackbox-server devices pending --allowlist {}",
            allowlist.display()
        );
        print_where(&store, &root, args.interval);
    }

    let result = loop {
        if stop.load(Ordering::Relaxed) {
            println!("==> stopping");
            break Ok(());
        }
        if let Some(status) = server.exited()? {
            break Err(anyhow!("blackbox-server exited on its own ({status})"));
        }
        if let Some(agent) = agent.as_mut()
            && let Some(status) = agent.exited()?
        {
            break Err(anyhow!("blackbox-agent exited on its own ({status})"));
        }
        sleep(POLL);
    };
    // Agent first: whatever it still uploads on the way out reaches a running server.
    if let Some(agent) = agent.as_mut() {
        agent.stop();
    }
    server.stop();
    result
}

/// Builds host binaries of `packages` (`release`, or the debug profile the tests build
/// anyway); returns the directory they are in.
pub(crate) fn build_host(packages: &[&str], release: bool) -> Result<PathBuf> {
    let mut build = cargo(["build"]);
    if release {
        build.arg("--release");
    }
    for p in packages {
        build.args(["-p", p]);
    }
    println!("==> building: {}", show(&build));
    run_cmd(&mut build).context("building the binaries failed")?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir(&project_root()).join(profile))
}

/// A flag that Ctrl-C, SIGTERM and SIGHUP set (instead of ending this process), so the caller
/// can stop its children in order.
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the Ctrl-C handler")?;
    }
    Ok(stop)
}

/// The `--store` argument as the server gets it: an absolute directory, or a URL unchanged.
struct StoreArg {
    arg: String,
    dir: Option<PathBuf>,
}

impl StoreArg {
    fn new(store: &str, root: &Path) -> Self {
        if store.contains("://") && !store.starts_with("file://") {
            return Self {
                arg: store.to_owned(),
                dir: None,
            };
        }
        let dir = root.join(store.strip_prefix("file://").unwrap_or(store));
        let dir = normalize(&dir);
        Self {
            arg: dir.to_string_lossy().into_owned(),
            dir: Some(dir),
        }
    }

    /// Local files (TLS, agent state) live next to the data, or in `./blackbox-data` for a
    /// remote store.
    fn base_dir(&self, root: &Path) -> PathBuf {
        match &self.dir {
            Some(dir) => dir.clone(),
            None => root.join("blackbox-data"),
        }
    }

    fn agent_state_dir(&self, root: &Path) -> PathBuf {
        self.base_dir(root).join("agent-state")
    }
}

/// Drops `.` components, so `./blackbox-data` prints as `blackbox-data`.
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn print_summary(args: &RunArgs, store: &StoreArg, root: &Path, device_id: &str, state: &Path) {
    println!();
    println!("==> blackbox is running; Ctrl-C stops both.");
    println!(
        "    server  https://{}  storing into {}",
        args.listen, store.arg
    );
    println!(
        "    agent   device {device_id:?} reads {}, uploads every {} s; its state is in {}",
        root.join(&args.kmsg).display(),
        args.interval,
        state.display()
    );
    print_where(store, root, args.interval);
}

fn print_where(store: &StoreArg, root: &Path, interval: u64) {
    let Some(dir) = &store.dir else {
        println!(
            "    Segments go to {} under raw/YYYY-MM-DD/HH/*.seg.gz (gzip, one JSON line per record).",
            store.arg
        );
        return;
    };
    let (shown, from) = match dir.strip_prefix(root) {
        Ok(rel) => (rel.to_path_buf(), format!("  (in {})", root.display())),
        Err(_) => (dir.clone(), String::new()),
    };
    println!(
        "    Segments appear after the first upload (within about {interval} s) as gzip files, \
         one JSON line per record. The newest lines:"
    );
    println!(
        "        zcat {}/raw/*/*/*.seg.gz | tail{from}",
        shown.display()
    );
    println!();
}

/// The server's TLS files (made once by `blackbox-server tls init`) and its allowlist, in one
/// directory.
pub(crate) struct ServerTls {
    dir: PathBuf,
}

impl ServerTls {
    /// Makes the certificates and an empty allowlist in `dir`, unless they are there already.
    pub(crate) fn ensure(server_bin: &Path, dir: PathBuf) -> Result<Self> {
        let tls = Self { dir };
        if !tls.dir.join("server.pem").exists() {
            let mut init = Command::new(server_bin);
            init.args(["tls", "init", "--dir"]).arg(&tls.dir);
            println!("==> making the server certificate: {}", show(&init));
            run_cmd(&mut init).context("blackbox-server tls init failed")?;
        }
        let allowlist = tls.allowlist();
        if !allowlist.exists() {
            std::fs::write(
                &allowlist,
                "# Device certificates allowed to write: `blackbox-agent identity` prints a line.\n",
            )
            .with_context(|| format!("creating {}", allowlist.display()))?;
        }
        Ok(tls)
    }

    /// The CA certificate agents take as `--server-ca`.
    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The allowlist file.
    pub(crate) fn allowlist(&self) -> PathBuf {
        self.dir.join("allowlist")
    }

    /// `blackbox-server serve` on `listen`, storing into `store`, with these files.
    pub(crate) fn serve(&self, server_bin: &Path, listen: SocketAddr, store: &str) -> Command {
        let mut cmd = Command::new(server_bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--store")
            .arg(store)
            .arg("--tls-cert")
            .arg(self.dir.join("server.pem"))
            .arg("--tls-key")
            .arg(self.dir.join("server.key"))
            .arg("--allowlist")
            .arg(self.allowlist());
        cmd
    }
}

/// Makes the agent's identity (once) and puts its fingerprint on the allowlist, as an operator
/// would with the line `blackbox-agent identity` prints. `id` runs the agent binary (perhaps
/// under an emulator); the arguments are added here.
pub(crate) fn allow_agent(
    mut id: Command,
    server_bin: &Path,
    state_dir: &Path,
    device_id: &str,
    allowlist: &Path,
) -> Result<()> {
    id.arg("identity")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--device-id")
        .arg(device_id);
    println!("==> the agent's identity: {}", show(&id));
    let out = id
        .output()
        .with_context(|| format!("running {}", show(&id)))?;
    io::stderr().write_all(&out.stderr)?;
    if !out.status.success() {
        bail!("blackbox-agent identity failed");
    }
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let fingerprint = line
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("blackbox-agent identity printed nothing"))?;
    println!("    {line}");
    let listed = std::fs::read_to_string(allowlist)
        .with_context(|| format!("reading {}", allowlist.display()))?;
    if listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some(fingerprint))
    {
        println!("    already on the allowlist");
        return Ok(());
    }
    let mut allow = Command::new(server_bin);
    allow
        .args([
            "devices",
            "allow",
            fingerprint,
            "--name",
            device_id,
            "--allowlist",
        ])
        .arg(allowlist);
    println!("==> allowing it: {}", show(&allow));
    run_cmd(&mut allow).context("blackbox-server devices allow failed")
}

/// Fails with advice when the agent could not open `kmsg`.
fn check_readable(kmsg: &Path) -> Result<()> {
    match File::open(kmsg) {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    "reading the kernel log needs root (or CAP_SYSLOG when \
                     kernel.dmesg_restrict=1): run as root, or"
                }
                _ => "this machine has no kernel log there:",
            };
            bail!(
                "cannot read {}: {e}\n  {why} replay saved kmsg records from a file with \
                 `cargo xtask run --kmsg FILE`\n  (or run only the server with \
                 `cargo xtask run --server-only`)",
                kmsg.display()
            )
        }
    }
}

/// Where to reach a server that listens on `listen` from this machine.
fn loopback_for(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

pub(crate) fn wait_healthy(addr: SocketAddr, server: &mut Proc, stop: &AtomicBool) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = server.exited()? {
            bail!("blackbox-server exited before it was ready ({status}); its log is above");
        }
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted while waiting for blackbox-server");
        }
        // The TLS port answers a plain HTTP request with a 400 of its own: it is up.
        if let Ok(400) = http_get_status(addr, "/healthz") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "blackbox-server did not answer on {addr} within {} s",
                READY_TIMEOUT.as_secs()
            );
        }
        sleep(POLL);
    }
}

/// The status code of a plain `GET path` to `addr`.
fn http_get_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    stream.take(1024).read_to_end(&mut head)?;
    // "HTTP/1.1 200 OK"
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response"))
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        // A device id is 1-64 of [A-Za-z0-9._:-]; the agent maps a host name the same way.
        .map(|name| {
            name.trim()
                .chars()
                .take(64)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "this-host".to_owned())
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, mut cmd: Command) -> Result<Self> {
        // Its own process group: the terminal's Ctrl-C reaches only us.
        cmd.current_dir(project_root()).process_group(0);
        println!("==> starting {}", show(&cmd));
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}: `{}`", show(&cmd)))?;
        Ok(Self {
            name,
            child,
            status: None,
        })
    }

    /// The exit status, if the process has exited.
    pub(crate) fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// SIGTERM, then SIGKILL if it has not exited after [`STOP_GRACE`]. Idempotent.
    pub(crate) fn stop(&mut self) {
        if !matches!(self.exited(), Ok(None)) {
            return;
        }
        let pid = self.child.id().to_string();
        // The pid cannot have been reused: we have not reaped the child yet.
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match self.exited() {
                Ok(Some(status)) => {
                    println!("    {} stopped ({status})", self.name);
                    return;
                }
                Ok(None) => sleep(POLL),
                Err(_) => break,
            }
        }
        eprintln!(
            "    {} did not stop within {} s of SIGTERM: killing it",
            self.name,
            STOP_GRACE.as_secs()
        );
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
