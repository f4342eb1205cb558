//! `blackbox-server`: the receiver (and later the downstream tools) as subcommands.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use blackbox_protocol::{DeviceId, Fingerprint};
use blackbox_server::accept::{self, ServeConfig};
use blackbox_server::allowlist::{self, AllowlistFile};
use blackbox_server::devices::{self, Registry};
use blackbox_server::{
    AppState, Auth, Committer, Metrics, ReceiveConfig, SegmentConfig, Store, app, compact, grep,
    grind, narrative, ops_app, reader, timespec, tls,
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blackbox-server",
    version,
    about = "Receives device logs and stores them in object storage"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive chunks over HTTPS from allowlisted devices and group-commit them into segments.
    Serve(Box<ServeArgs>),
    /// Make the server's TLS certificate.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// The allowlist: devices waiting to be allowed, allowing and revoking them.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// The exact lines of some devices in a time range, merged by wall time, each device in
    /// sequence order.
    Narrative(NarrativeArgs),
    /// Search stored lines in a time range (like `zcat | grep -E`, without the duplicates).
    Grep(GrepArgs),
    /// Follow the store, apply regex rules to every new line, write events back into the store
    /// and serve their counts as Prometheus metrics.
    Grind(GrindArgs),
    /// Merge an hour's segments (--hour) or a day's hours (--day) into one object per device
    /// (or device group), deduplicated and in sequence order, then delete them; --auto does
    /// every closed hour and day not done yet (for cron).
    Compact(CompactArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["hour", "day", "auto"])))]
struct CompactArgs {
    /// Store URL: file:///path, s3://bucket/prefix (AWS_* variables) or a directory.
    #[arg(long, default_value = "./blackbox-data")]
    store: String,
    /// The ingest hour: 2026-11-21T14, any time inside it (RFC 3339), or relative (-2h).
    #[arg(long, allow_hyphen_values = true)]
    hour: Option<String>,
    /// The ingest day: 2026-11-21, any time inside it, or relative (-1d). Its hourly outputs
    /// and raw segments become one object per device (or group) for the day.
    #[arg(long, allow_hyphen_values = true)]
    day: Option<String>,
    /// Every closed hour with raw segments, then every closed day not rolled up yet (run it
    /// from cron, e.g. hourly at :15).
    #[arg(long)]
    auto: bool,
    /// 0: one object per device; N: N objects by device hash (for large fleets).
    #[arg(long, default_value_t = 0)]
    groups: u32,
    /// Compact an hour (or day) that receivers may still write to (late segments stay
    /// readable and a later run takes them in).
    #[arg(long, conflicts_with = "auto")]
    allow_open: bool,
    /// Objects read (and outputs written) at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Upload outputs in parts of this many bytes (one PUT when smaller; S3 needs 5 MiB or more).
    #[arg(long, default_value_t = 8 << 20, hide = true)]
    part_size: usize,
    /// Test hook: abort at mid-output, after-output, after-manifest or after-delete.
    #[arg(long, hide = true)]
    fault: Option<String>,
    /// Seconds the store's compaction lock lasts unless extended (a running compaction extends
    /// it; one that died on another host holds the store this long; on this host, not at all).
    #[arg(long, default_value_t = 600)]
    lock_ttl: u64,
}

#[derive(clap::Args)]
struct GrindArgs {
    /// Store URL: file:///path, s3://bucket/prefix (AWS_* variables) or a directory.
    #[arg(long, default_value = "./blackbox-data")]
    store: String,
    /// Rules file (TOML; re-read when it changes). Default: the built-in rules
    /// (server/rules/default.toml).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Serve the event counts as Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Grind again from this time's hour (a date, RFC 3339 or -2d): starts a fresh checkpoint
    /// and replaces the events of those hours.
    #[arg(long, allow_hyphen_values = true)]
    from: Option<String>,
    /// Exit once everything stored so far is ground.
    #[arg(long)]
    once: bool,
    /// Key prefix of the events objects.
    #[arg(long, default_value = "events/")]
    events_prefix: String,
    /// Key of the checkpoint object [default: grind/checkpoint.json; with --shard K/N:
    /// grind/checkpoint.shard-K-of-N.json].
    #[arg(long)]
    checkpoint: Option<String>,
    /// Grind only the devices of shard K of N (by a hash of the device id), to spread the
    /// fleet over N grinders: run one with each K from 0 to N-1. Each has its own checkpoint
    /// (and lock); its events objects are named `….shard-K-of-N.ndjson.gz`.
    #[arg(long, value_parser = blackbox_server::reader::Shard::parse)]
    shard: Option<blackbox_server::reader::Shard>,
    /// Milliseconds between looks at the store when idle.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    /// Write the checkpoint at most this often (milliseconds).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every_ms: u64,
    /// Objects read and ground at once (default: the number of cores).
    #[arg(long)]
    parallel: Option<usize>,
    /// A larger object (a device's day roll-up) is read and ground in pieces of about this
    /// many compressed bytes: memory is about `--parallel` pieces, inflated, plus each
    /// object's events so far, gzipped.
    #[arg(long, default_value_t = blackbox_server::reader::PIECE_BYTES)]
    piece_bytes: u64,
    /// Seconds the checkpoint's lock lasts unless extended: one grinder per checkpoint grinds,
    /// others wait as standbys and take over within this time of it dying on another host
    /// (at once on this one).
    #[arg(long, default_value_t = 60)]
    lock_ttl: u64,
    /// Test hook: POINT[:N] aborts at POINT (after-events-put, after-checkpoint) after passing
    /// it N times.
    #[arg(long, hide = true)]
    fault: Option<String>,
}

/// Where and when to read.
#[derive(clap::Args)]
struct RangeArgs {
    /// Store URL: file:///path, s3://bucket/prefix (AWS_* variables) or a directory.
    #[arg(long, default_value = "./blackbox-data")]
    store: String,
    /// Wall time from: RFC 3339 (2026-11-21T14:00:00Z), a date, or relative (-1h, -30m).
    #[arg(long, default_value = "-1h", allow_hyphen_values = true)]
    since: String,
    /// Wall time until (exclusive); same forms.
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    until: String,
    /// How long after its wall time a line may have been stored (a device offline that long);
    /// bounds the ingest hours read. Forms: 24h, 3d, 90m.
    #[arg(long, default_value = "24h")]
    max_delay: String,
    /// Objects read at once (a large object in pieces of 2 MiB, compressed): memory is about
    /// this many pieces, inflated, up to about 30 MiB each for log text.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

impl RangeArgs {
    /// (since, until, lookback, now) in µs.
    fn resolve(&self) -> anyhow::Result<(i64, i64, reader::Lookback, i64)> {
        let now = timespec::now_us();
        let since = timespec::parse_time(&self.since, now)?;
        let until = timespec::parse_time(&self.until, now)?;
        if until <= since {
            bail!(
                "--until ({}) is not after --since ({})",
                self.until,
                self.since
            );
        }
        let max_delay_us = timespec::parse_duration(&self.max_delay)
            .with_context(|| format!("--max-delay {:?} is not a duration", self.max_delay))?;
        let lookback = reader::Lookback {
            max_delay_us,
            ..Default::default()
        };
        Ok((since, until, lookback, now))
    }
}

#[derive(clap::Args)]
struct NarrativeArgs {
    #[command(flatten)]
    range: RangeArgs,
    /// A device (repeat the flag for several).
    #[arg(long = "device", required = true)]
    devices: Vec<String>,
    /// Print `TIME DEVICE <LEVEL> MESSAGE` instead of the stored JSON lines.
    #[arg(long)]
    text: bool,
}

#[derive(clap::Args)]
struct GrepArgs {
    /// Regular expression (Rust syntax, close to grep -E), matched against the stored line.
    pattern: String,
    #[command(flatten)]
    range: RangeArgs,
    /// Only these devices (repeat the flag).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Print only the number of matching lines.
    #[arg(long, short = 'c')]
    count: bool,
    /// Case-insensitive.
    #[arg(long, short = 'i')]
    ignore_case: bool,
    /// Match the message text only (unescaped), not the whole stored JSON line.
    #[arg(long)]
    msg: bool,
}

#[derive(Subcommand)]
enum TlsCmd {
    /// Make a private CA (ca.pem, ca.key) and a server certificate it signs (server.pem,
    /// server.key) in DIR. Agents get ca.pem as --server-ca.
    Init {
        /// Directory for the four files.
        #[arg(long, default_value = "./blackbox-tls")]
        dir: PathBuf,
        /// DNS names and IP addresses agents use to reach this server (repeat the flag).
        /// Default: localhost, 127.0.0.1, ::1 and 10.0.2.2 (the host as QEMU guests see it).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct ListArgs {
    /// The allowlist file (as given to `serve --allowlist`).
    #[arg(long)]
    allowlist: PathBuf,
    /// The record of certificates seen (default: the allowlist's path + `.devices`).
    #[arg(long)]
    devices_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// Certificates that connected but are not on the allowlist.
    Pending(ListArgs),
    /// Certificates on the allowlist, with when they were last seen.
    List(ListArgs),
    /// Add a certificate to the allowlist (the server picks it up within a second).
    Allow {
        #[command(flatten)]
        files: ListArgs,
        /// The fingerprint (`blackbox-agent identity` prints it; `devices pending` lists it).
        fingerprint: String,
        /// The device id this certificate must carry (default: the one it presented, if seen).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a certificate from the allowlist: its next request is refused.
    Revoke {
        #[command(flatten)]
        files: ListArgs,
        /// The fingerprint.
        fingerprint: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (default 0.0.0.0:8443 with TLS, 127.0.0.1:8080 with
    /// --insecure-http).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The server's certificate chain (PEM).
    #[arg(long, required_unless_present = "insecure_http")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, required_unless_present = "insecure_http")]
    tls_key: Option<PathBuf>,
    /// Fingerprints of the device certificates allowed to write, one per line (re-read when it
    /// changes).
    #[arg(long, required_unless_present = "insecure_http")]
    allowlist: Option<PathBuf>,
    /// The record of certificates seen (default: the allowlist's path + `.devices`).
    #[arg(long)]
    devices_file: Option<PathBuf>,
    /// Development only: plain HTTP on a loopback address, the device named by the
    /// x-blackbox-device header, no authentication at all.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "allowlist"])]
    insecure_http: bool,
    /// Store URL: file:///path, s3://bucket/prefix (AWS_* variables) or memory://.
    #[arg(long, default_value = "./blackbox-data")]
    store: String,
    /// This receiver's name, part of every object key.
    #[arg(long, default_value = "r0")]
    receiver_id: String,
    /// Serve GET /metrics (Prometheus text) and GET /healthz on this address, over plain HTTP
    /// and without client certificates (e.g. 127.0.0.1:9464, or 0.0.0.0:9464 in a container).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Requests being received and checked at once; more are answered 503 + Retry-After
    /// (by default as many as connections: a device that got a connection is served).
    #[arg(long, default_value_t = ReceiveConfig::default().max_inflight)]
    max_inflight: usize,
    /// Connections open at once; more are closed right after accept, before any TLS work (the
    /// cheapest way to shed a flood of devices).
    #[arg(long, default_value_t = ServeConfig::default().max_connections)]
    max_connections: usize,
    /// Bytes of request bodies in memory at once; a request whose declared length does not fit
    /// is answered 503 + Retry-After before its body is read.
    #[arg(long, default_value_t = ReceiveConfig::default().body_budget)]
    body_budget: usize,
    /// Chunks decoded at once (default: one per CPU).
    #[arg(long)]
    decoders: Option<usize>,
    /// Slowest accepted body rate in bytes per second (after a 5 s grace); slower uploads are
    /// cut off with 408.
    #[arg(long, default_value_t = ReceiveConfig::default().min_body_rate)]
    min_body_rate: u32,
    /// Seconds in-flight uploads get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Seconds a client has to send a request's headers, from connecting or from the previous
    /// answer: idle keep-alive connections are closed after it (keep it below a load
    /// balancer's idle timeout).
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    max_body: usize,
    /// Largest inflated chunk in bytes (decompression-bomb guard).
    #[arg(long, default_value_t = 8 << 20)]
    max_decompressed: u32,
    /// Seconds a shed client is told to wait.
    #[arg(long, default_value_t = 5)]
    retry_after: u32,
    /// Write a segment once it holds this many bytes.
    #[arg(long, default_value_t = 16 << 20)]
    segment_max_bytes: usize,
    /// Write a segment once its first chunk is this many milliseconds old.
    #[arg(long, default_value_t = 1000)]
    segment_max_age_ms: u64,
    /// Seconds a checked upload waits for its segment to be written before it is answered
    /// 503 + Retry-After (a hanging store; keep it below the agents' --timeout, 30 s). The
    /// write goes on: a retry of a chunk it stored is answered "duplicate".
    #[arg(long, default_value_t = 10.0)]
    commit_timeout: f64,
    /// Hours of index objects read back at start-up to recognise retries.
    #[arg(long, default_value_t = 2)]
    recover_hours: u32,
    /// Test hook: abort at a named point of the commit (after-segment-put, after-index-put).
    #[arg(long, hide = true)]
    fault: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // object_store logs each retry of a request at INFO; the error after the last
            // retry is logged where it is handled.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,object_store=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve(a) => rt.block_on(serve(*a)),
        Cmd::Tls(TlsCmd::Init { dir, names, force }) => tls_init(&dir, names, force),
        Cmd::Devices(d) => devices_cmd(d),
        Cmd::Narrative(a) => rt.block_on(narrative_cmd(a)),
        Cmd::Grep(a) => rt.block_on(grep_cmd(a)),
        Cmd::Grind(a) => rt.block_on(grind_cmd(a)),
        Cmd::Compact(a) => rt.block_on(compact_cmd(a)),
    }
}

async fn compact_cmd(a: CompactArgs) -> anyhow::Result<()> {
    let store = Store::open(&a.store)?;
    let lock = std::sync::Arc::new(
        compact::lock::StoreLock::acquire(&store, Duration::from_secs(a.lock_ttl.max(1))).await?,
    );
    let result = compact_locked(&store, a, lock.clone()).await;
    lock.release(&store).await;
    result
}

async fn compact_locked(
    store: &Store,
    a: CompactArgs,
    lock: std::sync::Arc<compact::lock::StoreLock>,
) -> anyhow::Result<()> {
    let cfg = compact::CompactConfig {
        groups: a.groups,
        allow_open: a.allow_open,
        parallel: a.parallel,
        part_size: a.part_size,
        fault: a.fault,
        lock: Some(lock),
        ..Default::default()
    };
    let now = timespec::now_us();
    if let Some(h) = &a.hour {
        let hour = timespec::hour_of(timespec::parse_time(h, now)?);
        let r = compact::compact_hour(store, hour, &cfg).await?;
        println!("{}", compact_summary(&timespec::hour_path(hour), &r));
    } else if let Some(d) = &a.day {
        let day = timespec::day_of_hour(timespec::hour_of(timespec::parse_time(d, now)?));
        let r = compact::compact_day(store, day, &cfg).await?;
        println!(
            "{} (day): {}",
            timespec::day_path(day),
            compact_summary("", &r)
        );
    } else {
        let r = compact::compact_auto(store, &cfg).await?;
        for (hour, r) in r.hours.iter().filter(|(_, r)| r.generation > 0) {
            println!("{}", compact_summary(&timespec::hour_path(*hour), r));
        }
        for (day, r) in r.days.iter().filter(|(_, r)| r.generation > 0) {
            println!(
                "{} (day): {}",
                timespec::day_path(*day),
                compact_summary("", r)
            );
        }
        if !r.failed.is_empty() {
            bail!("{} failed: {}", r.failed.len(), r.failed.join("; "));
        }
    }
    Ok(())
}

/// One line about a compaction.
fn compact_summary(label: &str, r: &compact::CompactReport) -> String {
    let sep = if label.is_empty() { "" } else { ": " };
    if r.generation == 0 {
        return format!("{label}{sep}nothing to compact");
    }
    format!(
        "{label}{sep}{} objects ({} chunks, {:.1} MB) -> {} objects ({} chunks, {:.1} MB), {} duplicate records dropped, generation {}{}",
        r.inputs,
        r.chunks_in,
        r.bytes_in as f64 / 1e6,
        r.outputs,
        r.chunks_out,
        r.bytes_out as f64 / 1e6,
        r.duplicates,
        r.generation,
        if r.kept > 0 {
            format!("; {} damaged segments kept in place", r.kept)
        } else {
            String::new()
        }
    )
}

async fn grind_cmd(a: GrindArgs) -> anyhow::Result<()> {
    let store = Store::open(&a.store)?;
    let from_hour = a
        .from
        .as_deref()
        .map(|f| timespec::parse_time(f, timespec::now_us()).map(timespec::hour_of))
        .transpose()?;
    let fault = a.fault.map(|f| match f.split_once(':') {
        Some((p, n)) => (p.to_owned(), n.parse().unwrap_or(0)),
        None => (f, 0),
    });
    let mut cfg = grind::GrindConfig {
        rules_path: a.rules,
        events_prefix: a.events_prefix,
        checkpoint_key: a.checkpoint.unwrap_or_else(|| match a.shard {
            Some(s) => format!("grind/checkpoint.shard-{}-of-{}.json", s.index, s.count),
            None => "grind/checkpoint.json".into(),
        }),
        shard: a.shard,
        poll: Duration::from_millis(a.poll_ms),
        checkpoint_every: Duration::from_millis(a.checkpoint_every_ms),
        from_hour,
        once: a.once,
        fault,
        piece_bytes: a.piece_bytes.max(1),
        lock_ttl: Some(Duration::from_secs(a.lock_ttl.max(1))),
        ..Default::default()
    };
    if let Some(p) = a.parallel {
        cfg.parallel = p;
    }
    let reducer = Arc::new(blackbox_server::reducer::Reducer::default());
    if let Some(addr) = a.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(listen = %listener.local_addr()?, "serving /metrics");
        tokio::spawn(blackbox_server::reducer::serve(listener, reducer.clone()));
    }
    grind::run(store, cfg, reducer, shutdown_signal()).await
}

async fn narrative_cmd(a: NarrativeArgs) -> anyhow::Result<()> {
    let (since, until, lookback, now) = a.range.resolve()?;
    let store = Store::open(&a.range.store)?;
    let devices = a.devices.into_iter().collect();
    let lines = narrative::collect(
        &store,
        &devices,
        since,
        until,
        &lookback,
        now,
        a.range.parallel,
    )
    .await?;
    let ordered = narrative::order(lines);
    let format = if a.text {
        narrative::Format::Text
    } else {
        narrative::Format::Json
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match narrative::print(&ordered, format, &mut out) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

async fn grep_cmd(a: GrepArgs) -> anyhow::Result<()> {
    let (since, until, lookback, now) = a.range.resolve()?;
    let store = Store::open(&a.range.store)?;
    let filter = reader::Filter {
        devices: (!a.devices.is_empty()).then(|| a.devices.into_iter().collect()),
        since_us: since,
        until_us: until,
        shard: None,
    };
    let opts = grep::GrepOptions {
        pattern: a.pattern,
        ignore_case: a.ignore_case,
        msg_only: a.msg,
        count: a.count,
        parallel: a.range.parallel,
        progress_every: Some(Duration::from_secs(2)),
    };
    let hours = lookback.hours(since, until, now);
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout());
    grep::grep(&store, &hours, &filter, &opts, &mut out).await?;
    Ok(())
}

fn tls_init(dir: &Path, mut names: Vec<String>, force: bool) -> anyhow::Result<()> {
    if names.is_empty() {
        names = ["localhost", "127.0.0.1", "::1", "10.0.2.2"]
            .map(String::from)
            .to_vec();
    }
    let f = tls::init(dir, &names, force)?;
    println!("server certificate for {}", names.join(", "));
    println!("  --tls-cert {}", f.server_cert.display());
    println!("  --tls-key  {}", f.server_key.display());
    println!("agents verify the server with:");
    println!("  --server-ca {}", f.ca_cert.display());
    println!(
        "keep {} offline: it only signs another server certificate",
        f.ca_key.display()
    );
    Ok(())
}

fn devices_file(allowlist: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let mut p = allowlist.as_os_str().to_owned();
        p.push(".devices");
        PathBuf::from(p)
    })
}

fn parse_fp(s: &str) -> anyhow::Result<Fingerprint> {
    s.parse::<Fingerprint>()
        .map_err(|e| anyhow::anyhow!("{s:?} is not a fingerprint: {e}"))
}

fn devices_cmd(cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::Pending(a) | DevicesCmd::List(a) if !a.allowlist.exists() => {
            bail!("no allowlist at {}", a.allowlist.display())
        }
        DevicesCmd::Pending(a) => {
            let list = allowlist_text(&a.allowlist)?;
            let pending = seen_by_allowance(&a, &list, false)?;
            print_seen(&pending);
            if pending.is_empty() {
                eprintln!("no pending devices");
            }
            Ok(())
        }
        DevicesCmd::List(a) => {
            let list = allowlist_text(&a.allowlist)?;
            let allowed = seen_by_allowance(&a, &list, true)?;
            print_seen(&allowed);
            eprintln!(
                "{} certificate(s) allowed, {} of them seen by this receiver",
                list.len(),
                allowed.len()
            );
            Ok(())
        }
        DevicesCmd::Allow {
            files,
            fingerprint,
            name,
        } => {
            let fp = parse_fp(&fingerprint)?;
            let name = match name {
                Some(n) => Some(n),
                None => devices::load(&devices_file(&files.allowlist, files.devices_file))?
                    .into_iter()
                    .find(|s| s.fingerprint.parse::<Fingerprint>().ok() == Some(fp))
                    .and_then(|s| s.device),
            };
            let name = name
                .map(|n| DeviceId::new(&n).map_err(|e| anyhow::anyhow!("device id {n:?}: {e}")))
                .transpose()?;
            allowlist::allow(&files.allowlist, &fp, name.as_ref())?;
            match name {
                Some(n) => println!("allowed {fp} as device {n}"),
                None => println!("allowed {fp} (device id: the certificate's CN)"),
            }
            Ok(())
        }
        DevicesCmd::Revoke { files, fingerprint } => {
            let fp = parse_fp(&fingerprint)?;
            let now = devices::rfc3339(devices::now_secs());
            allowlist::revoke(&files.allowlist, &fp, &now)?;
            println!("revoked {fp}: its next request is refused");
            Ok(())
        }
    }
}

/// The certificates seen that are (or are not) on the allowlist.
fn seen_by_allowance(
    a: &ListArgs,
    list: &allowlist::Allowlist,
    allowed: bool,
) -> anyhow::Result<Vec<devices::Seen>> {
    let seen = devices::load(&devices_file(&a.allowlist, a.devices_file.clone()))?;
    Ok(seen
        .into_iter()
        .filter(|s| {
            s.fingerprint
                .parse::<Fingerprint>()
                .is_ok_and(|fp| list.get(&fp).is_some() == allowed)
        })
        .collect())
}

fn allowlist_text(path: &Path) -> anyhow::Result<allowlist::Allowlist> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (list, errors) = allowlist::Allowlist::parse(&text);
    for e in errors {
        eprintln!("{}:{}: skipped: {}", path.display(), e.line, e.reason);
    }
    Ok(list)
}

fn print_seen(rows: &[devices::Seen]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "{:<71}  {:<24}  {:<20}  {:<20}  {:>8}  FROM",
        "FINGERPRINT", "DEVICE", "FIRST SEEN", "LAST SEEN", "REQUESTS"
    );
    for s in rows {
        println!(
            "{:<71}  {:<24}  {:<20}  {:<20}  {:>8}  {}",
            s.fingerprint,
            s.device.as_deref().unwrap_or("-"),
            devices::rfc3339(s.first_seen),
            devices::rfc3339(s.last_seen),
            s.requests,
            s.last_addr
        );
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    raise_fd_limit(a.max_connections);
    let store = Store::open(&a.store)?;
    let seg_cfg = SegmentConfig {
        receiver: a.receiver_id,
        max_bytes: a.segment_max_bytes,
        max_age: Duration::from_millis(a.segment_max_age_ms),
        recover_hours: a.recover_hours,
        fault: a.fault,
        ..SegmentConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let (committer, task) = Committer::start_with_metrics(store.clone(), seg_cfg, metrics.clone())
        .await
        .context("recovering from the store")?;
    let limits = blackbox_protocol::Limits {
        max_decompressed: a.max_decompressed,
        ..Default::default()
    };
    let rcfg = ReceiveConfig {
        max_body: a.max_body,
        max_inflight: a.max_inflight,
        body_budget: a.body_budget,
        decoders: a
            .decoders
            .unwrap_or_else(blackbox_server::receive::default_decoders),
        min_body_rate: a.min_body_rate,
        retry_after_secs: a.retry_after,
        limits,
        commit_wait: Duration::try_from_secs_f64(a.commit_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--commit-timeout must be a positive number of seconds")?,
        ..ReceiveConfig::default()
    };
    let serve_cfg = ServeConfig {
        max_connections: a.max_connections,
        drain_timeout: Duration::from_secs(a.drain_timeout),
        header_timeout: Duration::from_secs(a.header_timeout.max(1)),
        ..ServeConfig::default()
    };
    let state = AppState::new(committer.clone(), rcfg);
    if let Some(addr) = a.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-listen {addr}"))?;
        tracing::info!(listen = %l.local_addr()?, "metrics and health on plain HTTP");
        let ops = ops_app(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, ops).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    let drain = state.clone();
    let shutdown = async move {
        shutdown_signal().await;
        drain.begin_drain();
    };
    let mut registry = None;
    if a.insecure_http {
        let listen = a
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        if !listen.ip().is_loopback() {
            bail!(
                "--insecure-http trusts any client to name its device, so it only listens on \
                 loopback; {listen} is not (use --tls-cert, --tls-key and --allowlist)"
            );
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::warn!(listen = %listener.local_addr()?, store = store.url(),
            "blackbox-server receiving over plain HTTP (development mode: devices are not authenticated)");
        accept::serve(
            listener,
            None,
            app(state),
            serve_cfg,
            Arc::new(|| {}),
            metrics,
            shutdown,
        )
        .await?;
    } else {
        let (Some(cert), Some(key), Some(list_path)) = (a.tls_cert, a.tls_key, a.allowlist) else {
            bail!("--tls-cert, --tls-key and --allowlist are required (or --insecure-http)");
        };
        let tls_cfg = tls::server_config(&cert, &key)?;
        let allowlist = AllowlistFile::open(&list_path)?;
        let reg = Registry::open(&devices_file(&list_path, a.devices_file))?;
        let _watch = allowlist.watch(Duration::from_millis(250));
        let _flush = reg.flush_every(Duration::from_secs(1));
        let state = state.with_auth(Auth::Certificate {
            allowlist: allowlist.clone(),
            registry: reg.clone(),
        });
        registry = Some(reg);
        let listen = a
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8443)));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(listen = %listener.local_addr()?, store = store.url(),
            allowlist = %list_path.display(), devices = allowlist.current().len(),
            "blackbox-server receiving over HTTPS (device certificates on the allowlist)");
        let al = allowlist.clone();
        accept::serve(
            listener,
            Some(tls_cfg),
            app(state),
            serve_cfg,
            Arc::new(move || al.refresh()),
            metrics,
            shutdown,
        )
        .await?;
    }
    // Requests still queued are written and answered; then the last segment, then exit.
    committer.close();
    task.await?;
    if let Some(reg) = registry
        && let Err(e) = reg.flush()
    {
        tracing::warn!(error = %format!("{e:#}"), "cannot write the record of seen devices");
    }
    tracing::info!("stopped; last segment written");
    Ok(())
}

/// Raises the soft limit of open files to what `--max-connections` needs (up to the hard
/// limit), as most servers do at start-up; warns if the hard limit is too low.
fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Connections, plus the store's files, the listeners and some slack.
    let want = max_connections as u64 + 256;
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= want {
        return;
    }
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let new = want.min(hard);
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(new),
            maximum: lim.maximum,
        },
    );
    if raised.is_err() || new < want {
        tracing::warn!(
            soft,
            hard,
            want,
            "the open-file limit is below --max-connections; accepts will fail with EMFILE"
        );
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight uploads");
}
