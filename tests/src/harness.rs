//! Processes and readers for the end-to-end tests.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use blackbox_server::Store;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Runs a DuckDB SQL query with the Python DuckDB that `cargo xtask test` installs (or the
/// Python in `BLACKBOX_PYTHON`) and returns what `fetchall()` prints: DuckDB reads the stored
/// objects without any of our code.
pub fn duckdb(sql: &str) -> String {
    let python = std::env::var("BLACKBOX_PYTHON").unwrap_or_else(|_| {
        root()
            .join("target/tools/venv/bin/python")
            .display()
            .to_string()
    });
    let program = format!("import duckdb; print(duckdb.sql({sql:?}).fetchall())");
    let out = std::process::Command::new(&python)
        .args(["-c", &program])
        .output()
        .expect("python for DuckDB (cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "DuckDB failed (run `cargo xtask install-test-deps`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Path of a workspace binary, built once per test process (so `cargo test -p blackbox-tests`
/// alone works too). With `BLACKBOX_BIN_DIR` set (the flood uses release binaries) the binary is
/// taken from there and nothing is built.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("BLACKBOX_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "blackbox-server",
                "-p",
                "blackbox-agent",
            ])
            .current_dir(root());
        // Cargo sets these for the test binary. ring's build script tracks several of them, so
        // passing them on made this build (and the next plain `cargo build` after it) rebuild
        // ring and everything above it.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_") || k.starts_with("CARGO_MANIFEST_") {
                build.env_remove(&*k);
            }
        }
        let st = build.status().expect("running cargo build");
        assert!(st.success(), "building the binaries failed");
    });
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"));
    target.join("debug").join(name)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The files of a TLS server: made by `blackbox-server tls init`, plus an allowlist.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub allowlist: PathBuf,
}

impl TlsFiles {
    /// Runs `blackbox-server tls init` in `dir` and creates an empty allowlist.
    pub fn init(dir: &Path) -> Self {
        let out = Command::new(bin("blackbox-server"))
            .args(["tls", "init", "--dir"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tls init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let allowlist = dir.join("allowlist");
        std::fs::write(&allowlist, "# device certificates allowed to write\n").unwrap();
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            allowlist,
        }
    }

    /// Runs `blackbox-server devices ARGS… --allowlist …` and returns its stdout.
    pub fn devices(&self, args: &[&str]) -> String {
        let out = Command::new(bin("blackbox-server"))
            .arg("devices")
            .args(args)
            .arg("--allowlist")
            .arg(&self.allowlist)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "devices {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A `blackbox-server serve` process.
pub struct Server {
    pub port: u16,
    pub store: String,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub tls: Option<TlsFiles>,
    /// How the last process ended, once [`Server::wait_exit`] saw it end.
    pub exit: Option<std::process::ExitStatus>,
    child: Option<Child>,
}

impl Server {
    /// A server in development mode (`--insecure-http`, device named by a header).
    pub fn start(store: &str, env: Vec<(String, String)>, extra: &[&str], log_dir: &Path) -> Self {
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra.push("--insecure-http".into());
        Self::spawn(store, env, extra, None, log_dir)
    }

    /// A server with TLS and an allowlist (`TlsFiles::init` in `dir`).
    pub fn start_tls(store: &str, extra: &[&str], dir: &Path) -> Self {
        Self::start_tls_allowing(store, extra, dir, "")
    }

    /// Like [`Server::start_tls`], with these allowlist lines in place before it starts.
    pub fn start_tls_allowing(store: &str, extra: &[&str], dir: &Path, allowlist: &str) -> Self {
        let files = TlsFiles::init(&dir.join("tls"));
        if !allowlist.is_empty() {
            std::fs::write(&files.allowlist, allowlist).unwrap();
        }
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for (flag, path) in [
            ("--tls-cert", &files.cert),
            ("--tls-key", &files.key),
            ("--allowlist", &files.allowlist),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        Self::spawn(store, vec![], args, Some(files), dir)
    }

    fn spawn(
        store: &str,
        env: Vec<(String, String)>,
        extra: Vec<String>,
        tls: Option<TlsFiles>,
        log_dir: &Path,
    ) -> Self {
        let mut s = Self {
            port: free_port(),
            store: store.to_owned(),
            extra,
            env,
            log: log_dir.join(format!("server-{}.log", free_port())),
            tls,
            exit: None,
            child: None,
        };
        s.restart();
        s
    }

    /// The URL agents use.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The TLS files (panics for a development-mode server).
    pub fn tls(&self) -> &TlsFiles {
        self.tls.as_ref().expect("a TLS server")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (Re)starts the process on the same port and store, and waits until it answers.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    pub fn restart_with(&mut self, more: &[&str]) {
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("blackbox-server"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--store",
                &self.store,
            ])
            .args(&self.extra)
            .args(more)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning blackbox-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // A TLS port answers plain HTTP with a 400 of its own: that says it is up, too.
        let ready = if self.tls.is_some() { 400 } else { 200 };
        let plain = format!("http://127.0.0.1:{}/healthz", self.port);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        while Instant::now() < deadline {
            if let Ok(r) = agent.get(&plain).call()
                && r.status() == ready
            {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "server exited with {st} during start-up; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not answer /healthz in 30 s");
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM (a graceful shutdown); [`Server::wait_exit`] then waits for it.
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            let st = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
            assert!(st.success(), "kill -TERM {pid}");
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself (fault injection aborts it).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait().unwrap()
            {
                self.exit = Some(st);
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `blackbox-agent run` process reading a kmsg-format file.
pub struct Agent {
    pub args: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    pub fn start(server: &str, state: &Path, kmsg: &Path, device: &str, extra: &[&str]) -> Self {
        Self::start_boot(server, state, kmsg, device, BOOT, extra)
    }

    /// An agent of boot `boot`. Unless `extra` says otherwise it reads pstore from
    /// `<state>.pstore` (never the host's /sys/fs/pstore) and keeps its ring in the state dir.
    pub fn start_boot(
        server: &str,
        state: &Path,
        kmsg: &Path,
        device: &str,
        boot: &str,
        extra: &[&str],
    ) -> Self {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--server".into(),
            server.into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--kmsg".into(),
            kmsg.display().to_string(),
            "--device-id".into(),
            device.into(),
            "--boot-id".into(),
            boot.into(),
        ];
        if !extra.contains(&"--pstore-dir") {
            args.push("--pstore-dir".into());
            args.push(state.with_extension("pstore").display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = state.with_extension("log");
        let mut a = Self {
            args,
            log,
            child: None,
        };
        a.restart();
        a
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(bin("blackbox-agent"))
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawning blackbox-agent"),
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (as init does at shutdown) and waits for the agent to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .ok()?;
        assert!(st.success(), "kill -TERM failed");
        c.wait().ok()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The boot id the tests' agents use.
pub const BOOT: &str = "0badc0de-0000-4000-8000-000000000001";

/// A kmsg-format file a test appends numbered records to.
pub struct KmsgFile {
    pub path: PathBuf,
    pub next: u64,
}

impl KmsgFile {
    pub fn new(path: PathBuf) -> Self {
        std::fs::write(&path, b"").unwrap();
        Self { path, next: 0 }
    }

    /// Appends `n` records `line <seq>` (user facility, level 6) at 1 s + 100 µs × seq.
    pub fn append(&mut self, n: u64, tag: &str) {
        self.append_at(n, tag, |s| 1_000_000 + s * 100);
    }

    /// Appends `n` records `line <seq>` with timestamps `usec(seq)`.
    pub fn append_at(&mut self, n: u64, tag: &str, usec: impl Fn(u64) -> u64) {
        let mut buf = Vec::new();
        for _ in 0..n {
            let s = self.next;
            buf.extend(format!("14,{s},{},-;{tag}: line {s}\n", usec(s)).as_bytes());
            self.next += 1;
        }
        self.append_raw(&buf);
    }

    /// Appends raw bytes.
    pub fn append_raw(&mut self, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .unwrap();
        f.write_all(bytes).unwrap();
    }
}

/// One stored record line, as DuckDB or jq would see it.
#[derive(Debug, Clone)]
pub struct StoredLine {
    pub device: String,
    pub boot: String,
    pub seq: u64,
    pub mono_us: u64,
    pub origin: String,
    pub msg: String,
}

/// Reads every segment in the store in key order (ingest order) with a plain gzip reader,
/// as `zcat` would, and returns the lines.
pub fn read_store(store_url: &str, env: &[(String, String)]) -> Vec<StoredLine> {
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = Store::open_with(store_url, env).unwrap();
            let mut out = Vec::new();
            for key in store.list("raw/").await.unwrap() {
                if !key.ends_with(".seg.gz") {
                    continue;
                }
                let text = gunzip(&store.get(&key).await.unwrap());
                for l in text.lines() {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    out.push(StoredLine {
                        device: v["device"].as_str().unwrap().to_owned(),
                        boot: v["boot"].as_str().unwrap().to_owned(),
                        seq: v["seq"].as_u64().unwrap(),
                        mono_us: v["mono_us"].as_u64().unwrap(),
                        origin: v["origin"].as_str().unwrap().to_owned(),
                        msg: v["msg"].as_str().unwrap().to_owned(),
                    });
                }
            }
            out
        })
    }
}

/// The text of gzip members back to back (a segment or an events object), as `zcat` reads it.
pub fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// Keys in the store under `prefix`.
pub fn list_store(store_url: &str, env: &[(String, String)], prefix: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        Store::open_with(store_url, env)
            .unwrap()
            .list(prefix)
            .await
            .unwrap()
    })
}

/// Per device: the sequence numbers stored, in ingest order.
pub fn seqs_by_device(lines: &[StoredLine]) -> HashMap<String, Vec<u64>> {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    for l in lines {
        m.entry(l.device.clone()).or_default().push(l.seq);
    }
    m
}

/// A receiver (development mode) on `store` for tests where the store fails under uploads: it
/// writes a segment every 100 ms, asks for retries after 1 s, takes `extra` arguments, and
/// serves `/metrics` on the address returned beside it.
pub fn receiver_for_store_failures(
    store: &str,
    env: Vec<(String, String)>,
    extra: &[&str],
    log_dir: &Path,
) -> (Server, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--segment-max-age-ms",
        "100",
        "--retry-after",
        "1",
        "--metrics-listen",
        &metrics,
    ];
    args.extend(extra);
    let server = Server::start(store, env, &args, log_dir);
    (server, metrics)
}

/// An agent of `device` (state in `state`, its kernel log a file in `dir`, more arguments in
/// `extra`) uploading every second to `server`, once its first 100 lines ("before") are stored.
pub fn agent_with_100_lines_stored(
    server: &Server,
    dir: &Path,
    state: &Path,
    device: &str,
    extra: &[&str],
) -> (KmsgFile, Agent) {
    let mut kmsg = KmsgFile::new(dir.join(format!("{device}.kmsg")));
    kmsg.append(100, "before");
    let agent = Agent::start(
        &server.url(),
        state,
        &kmsg.path,
        device,
        &[&["--interval", "1"], extra].concat(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || read_store(
            &server.store,
            &server.env
        )
        .len()
            == 100),
        "{}",
        agent.log_text()
    );
    (kmsg, agent)
}

/// The body of a plain-HTTP GET, or `""` when it fails (for `/metrics` and `/healthz`).
pub fn http_text(url: &str) -> String {
    ureq::get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

/// A metric in Prometheus text: the sum of the samples named `name` (with any labels, or with
/// the labels `name` ends in), `None` when there is none.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix(' ') {
                Some(v) => v,
                None => rest.strip_prefix('{')?.rsplit_once("} ")?.1,
            };
            value.trim().parse::<u64>().ok()
        })
        .reduce(|a, b| a + b)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}
