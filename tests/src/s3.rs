//! A real S3-compatible store for end-to-end tests: one SeaweedFS (`weed mini`) per [`Weed`].
//!
//! Each instance gets a fresh temporary directory and fresh loopback ports for all ten
//! listeners `weed mini` opens (S3, filer, master, volume server and admin, each HTTP and
//! gRPC), so tests can run many at once. The key pair `testkey`/`testsecret` is enforced and
//! the bucket `logs` exists before [`Weed::start`] returns. Dropping the value kills the
//! server and deletes its data.
//!
//! The `weed` binary comes from `BLACKBOX_WEED`, or else from the venv that
//! `cargo xtask install-test-deps` fills (`target/tools/venv/bin/weed`).

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Access key the server enforces (set through `AWS_ACCESS_KEY_ID` on the `weed` process).
pub const ACCESS_KEY: &str = "testkey";
/// Secret key the server enforces.
pub const SECRET_KEY: &str = "testsecret";
/// The one bucket, created at start-up.
pub const BUCKET: &str = "logs";
/// Region to sign with; SeaweedFS accepts any, clients need one.
pub const REGION: &str = "us-east-1";

/// How long a start may take before it is given up (about 2–3 s is usual).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop (in [`Weed::restart`]) may take before the process is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Fresh starts tried when `weed` exits at once (a chosen port was taken in the meantime).
const START_ATTEMPTS: usize = 3;
const POLL: Duration = Duration::from_millis(100);

/// Every port `weed mini` listens on, by the flag that sets it. Without an explicit flag a
/// gRPC port defaults to its HTTP port + 10000, which two instances could share.
const PORT_FLAGS: [&str; 10] = [
    "s3.port",
    "s3.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "admin.port",
    "admin.port.grpc",
];
const S3: usize = 0;
const FILER: usize = 2;
/// `weed` puts one Unix socket per gRPC server at `/tmp/seaweedfs-<name>-grpc-<port>.sock`,
/// whatever `TMPDIR` says; these are the names and the indexes of their ports.
const GRPC_SOCKETS: [(&str, usize); 5] = [
    ("s3", 1),
    ("filer", 3),
    ("master", 5),
    ("volume", 7),
    ("admin", 9),
];

/// A running SeaweedFS with the bucket [`BUCKET`]; killed when dropped.
#[derive(Debug)]
pub struct Weed {
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket that exists from the start: `logs`.
    pub bucket: String,
    bin: PathBuf,
    ports: [u16; 10],
    child: Child,
    // Last, so it is deleted after the process is gone.
    dir: tempfile::TempDir,
}

impl Weed {
    /// Starts a fresh instance and waits until its bucket accepts requests.
    pub fn start() -> Result<Self> {
        let bin = weed_binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("blackbox-weed-")
                .tempdir()
                .context("creating a directory for SeaweedFS")?;
            let ports = free_ports()?;
            let child = spawn(&bin, dir.path(), &ports)?;
            let mut weed = Self {
                endpoint: format!("http://127.0.0.1:{}", ports[S3]),
                bucket: BUCKET.to_owned(),
                bin: bin.clone(),
                ports,
                child,
                dir,
            };
            match weed.wait_ready() {
                Ok(()) => return Ok(weed),
                // Exited at once: most likely a port we picked was taken before it bound.
                Err(e) if weed.child.try_wait().ok().flatten().is_some() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("SeaweedFS did not start")))
    }

    /// Environment variables that point an S3 client (the server's `AmazonS3Builder::from_env`)
    /// at this instance: endpoint, key pair, region, and plain HTTP allowed.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The store URL for keys under `prefix` in the bucket: `s3://logs/<prefix>`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_matches('/'))
    }

    /// Stops the server gracefully (SIGTERM) and starts it again on the same data and the same
    /// ports, so [`Weed::endpoint`] and [`Weed::env`] stay valid. Returns once it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_gracefully();
        self.start_again()
    }

    /// Stops the server gracefully (SIGTERM): its endpoint refuses connections until
    /// [`Weed::start_again`].
    pub fn stop(&mut self) {
        self.stop_gracefully();
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the kernel, but no
    /// request is answered until [`Weed::resume`], as with a store that hangs.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} SeaweedFS failed");
    }

    /// Starts a stopped server again on the same data and ports; returns once it is ready.
    pub fn start_again(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.child = spawn(&self.bin, self.dir.path(), &self.ports)?;
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                // A port can stay busy for a moment after the old process is gone.
                Err(_)
                    if Instant::now() < deadline
                        && self.child.try_wait().ok().flatten().is_some() =>
                {
                    sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.context("restarting SeaweedFS")),
            }
        }
    }

    /// The directory holding the data and logs (`data/`, `logs/`, `weed.out`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Ready when the S3 port answers HTTP and the filer lists the bucket's directory (the
    /// bucket exists); a signed `PUT` then succeeds.
    fn wait_ready(&mut self) -> Result<()> {
        let s3 = loopback(self.ports[S3]);
        let filer = loopback(self.ports[FILER]);
        let bucket_dir = format!("/buckets/{}/", self.bucket);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for weed")? {
                bail!(
                    "SeaweedFS exited during start-up ({status}){}",
                    self.log_tail()
                );
            }
            let s3_up = matches!(http_get_status(s3, "/"), Ok(code) if code < 500);
            if s3_up && http_get_status(filer, &bucket_dir).ok() == Some(200) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "SeaweedFS was not ready after {} s (S3 answering: {s3_up}){}",
                    READY_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            sleep(POLL);
        }
    }

    /// The last lines of `weed`'s own output and of its INFO log, for error messages.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for file in ["weed.out", "logs/weed.INFO"] {
            let path = self.dir.path().join(file);
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            out.push_str(&format!("\n--- last lines of {} ---\n", path.display()));
            out.push_str(&tail.join("\n"));
        }
        out
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; always reaps the process.
    fn stop_gracefully(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // The pid is still ours: the child has not been reaped.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                sleep(POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // SIGKILL leaves the gRPC sockets in /tmp behind; these ports were ours until now.
        for (name, port) in GRPC_SOCKETS {
            let path = PathBuf::from(format!(
                "/tmp/seaweedfs-{name}-grpc-{}.sock",
                self.ports[port]
            ));
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// `BLACKBOX_WEED`, or the binary `cargo xtask install-test-deps` installs.
fn weed_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BLACKBOX_WEED") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "BLACKBOX_WEED={} is not a file; run `cargo xtask install-test-deps` \
                 (or `cargo xtask test`)",
                path.display()
            );
        }
        return Ok(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate lives one directory below the workspace root")?;
    let path = root.join("target/tools/venv/bin/weed");
    if !path.is_file() {
        bail!(
            "SeaweedFS not found at {} and BLACKBOX_WEED is not set: run \
             `cargo xtask install-test-deps` (or `cargo xtask test`)",
            path.display()
        );
    }
    Ok(path)
}

/// Ten distinct ports that were free a moment ago. All listeners are held until every port
/// is chosen, so the kernel cannot hand out the same one twice.
fn free_ports() -> Result<[u16; 10]> {
    let listeners = (0..PORT_FLAGS.len())
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .context("finding free ports")?;
    let mut ports = [0; 10];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().context("finding free ports")?.port();
    }
    Ok(ports)
}

fn spawn(bin: &Path, dir: &Path, ports: &[u16; 10]) -> Result<Child> {
    let logs = dir.join("logs");
    let data = dir.join("data");
    fs::create_dir_all(&logs).context("creating weed's log directory")?;
    fs::create_dir_all(&data).context("creating weed's data directory")?;
    let out = File::options()
        .create(true)
        .append(true)
        .open(dir.join("weed.out"))
        .context("creating weed.out")?;
    let err = out.try_clone().context("creating weed.out")?;

    let mut cmd = Command::new(bin);
    cmd.arg(format!("-logdir={}", logs.display()))
        .arg("mini")
        .arg(format!("-dir={}", data.display()))
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ])
        .arg(format!("-bucket={BUCKET}"))
        .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
        .arg(format!(
            "-filer.localSocket={}",
            dir.join("filer.sock").display()
        ))
        .args(
            PORT_FLAGS
                .iter()
                .zip(ports)
                .map(|(flag, port)| format!("-{flag}={port}")),
        )
        // These two create the key pair and make the server enforce it.
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env_remove("S3_BUCKET")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd.spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// The status code of an unsigned `GET path`, or an error if nothing answers HTTP.
fn http_get_status(addr: SocketAddr, path: &str) -> Result<u16, ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let resp = agent
        .get(format!("http://{addr}{path}"))
        .header("Accept", "application/json")
        .call()?;
    Ok(resp.status().as_u16())
}
