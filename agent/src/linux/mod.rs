//! The Linux layer: read the log stream, keep it in the persistent ring, upload on schedule.
//!
//! One reader thread follows kmsg and sends records over a bounded channel; the main thread
//! appends them to the ring and hands the oldest unacknowledged chunk to an upload thread, one
//! at a time, until none is left or a send fails. Appending never waits for the network: a
//! request that hangs until its timeout (the network just went away) does not keep records
//! out of the ring, where a panic would still find them.
//!
//! At start-up, before anything of the current boot is stored, the agent settles what the
//! previous boot left: the ring's unacknowledged blocks (uploaded under that boot's id),
//! records a PRINTK_PERSIST kernel shows again in /dev/kmsg (those the ring already holds are
//! skipped, the rest added to the previous boot), and pstore dumps (lines the ring does not hold
//! are added, origin `pstore`; the files are unlinked once the server acknowledged them).
//!
//! The device's identity ([`identity`]) is a key and a self-signed certificate in
//! `STATE_DIR/identity`, made on first start. With an `https://` server ([`Link::MutualTls`])
//! the agent presents that certificate: the server admits the device when the certificate's
//! fingerprint is on its allowlist and takes the device id from its subject CN, so the device
//! id is the identity's (`--device-id` only names a new identity, or is checked against it).
//! Plain `http://` ([`Link::PlainHttp`]) is for development: the device names itself in the
//! `x-blackbox-device` header, and the server accepts that only with `--insecure-http`, on
//! loopback.
pub mod config;
pub mod identity;
pub mod logos;
pub mod pstore_files;
pub mod ringbuf;
pub mod source;
pub mod sys;
pub mod syslogd;
pub mod upload;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;
use blackbox_protocol::{BootId, ChunkId, DeviceId, Origin, Record, SyncPoint};

use crate::buffer::{BATCH_BYTES, BATCH_CHUNKS, LogBuffer, Sealed};
use crate::kmsg::KmsgRecord;
use crate::ring::{Ring, RingConfig};
use crate::schedule::Schedule;
use identity::{Identity, Obtained};
use ringbuf::RingBuffer;
use source::Event;
use sys::{Mapping, RingSpec};
use upload::{Answer, Scheme, Uploader};

/// How the agent reaches the server and says which device it is.
#[derive(Debug, Clone)]
pub enum Link {
    /// `https://`: mutual TLS; the device is the one `identity`'s certificate names.
    MutualTls {
        /// The device's key and certificate.
        identity: Box<Identity>,
        /// The CA file the server's certificate is checked against (`None`: the built-in web
        /// PKI roots).
        server_ca: Option<PathBuf>,
        /// The roots read from `server_ca` (or the web PKI roots).
        roots: ureq::tls::RootCerts,
    },
    /// `http://`, for development: the device names itself in the `x-blackbox-device` header.
    PlainHttp,
}

/// Settles how to reach `server` and which device this is.
///
/// `https://`: loads (or makes) the identity in `state_dir` (`wanted_device` must match an
/// existing one) and reads `server_ca`. `http://`: the device is `wanted_device` or the host
/// name, and a note that this is a development mode goes to stderr. Any other scheme, or
/// `server_ca` with `http://`, is an error.
pub fn link_for(
    server: &str,
    state_dir: &Path,
    wanted_device: Option<&DeviceId>,
    server_ca: Option<PathBuf>,
) -> anyhow::Result<(DeviceId, Link)> {
    match Scheme::of(server)? {
        Scheme::Https => {
            let roots = match &server_ca {
                Some(p) => upload::load_server_ca(p)?,
                None => ureq::tls::RootCerts::WebPki,
            };
            let (identity, obtained) = Identity::load_or_create(state_dir, wanted_device)?;
            match obtained {
                Obtained::Loaded => {}
                Obtained::Created | Obtained::NewCertificate => eprintln!(
                    "blackbox-agent: {} device identity in {}; until the server's allowlist \
                     has this line, uploads are refused (and retried):\n{}",
                    if obtained == Obtained::Created {
                        "made a new"
                    } else {
                        "made a new certificate for the"
                    },
                    identity.dir.display(),
                    identity.allowlist_line()
                ),
            }
            Ok((
                identity.device.clone(),
                Link::MutualTls {
                    identity: Box::new(identity),
                    server_ca,
                    roots,
                },
            ))
        }
        Scheme::Http => {
            if let Some(p) = server_ca {
                anyhow::bail!(
                    "--server-ca {} is for an https:// server; {server} is plain HTTP",
                    p.display()
                );
            }
            eprintln!(
                "blackbox-agent: plain HTTP is a development mode: the server accepts it only \
                 with --insecure-http, on loopback; use an https:// server (mutual TLS) otherwise"
            );
            let device = wanted_device.cloned().unwrap_or_else(default_device_id);
            Ok((device, Link::PlainHttp))
        }
    }
}

/// Everything `blackbox-agent run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Server base URL.
    pub server: String,
    /// How to reach it (from [`link_for`]).
    pub link: Link,
    /// State directory (rejected chunks; the default file ring).
    pub state_dir: PathBuf,
    /// Where the ring lives.
    pub ring: RingSpec,
    /// Ring settings (share kept from the start of an outage; block size of a new ring).
    pub ring_cfg: RingConfig,
    /// Where pstore is mounted.
    pub pstore_dir: PathBuf,
    /// Deflate level.
    pub level: u8,
    /// The log stream: /dev/kmsg or a file/FIFO in the same format.
    pub kmsg: PathBuf,
    /// Upload interval.
    pub interval: Duration,
    /// Random spread around the interval.
    pub jitter: Duration,
    /// This device's id (with [`Link::MutualTls`], the identity's).
    pub device: DeviceId,
    /// This boot's id.
    pub boot: BootId,
    /// File whose existence means the wall clock is NTP-synchronised.
    pub synced_flag: PathBuf,
    /// Request timeout.
    pub timeout: Duration,
    /// Syslog sockets to listen on (none: no listener).
    pub syslog: Vec<syslogd::SocketSpec>,
    /// Whether the sockets were asked for: then failing to listen stops the agent; for the
    /// default (/dev/log) it is a warning and the agent runs without a listener, so a device
    /// whose syslogd owns /dev/log still has its kernel log kept and uploaded.
    pub syslog_required: bool,
    /// Where syslog messages are written: /dev/kmsg, or a stand-in.
    pub syslog_kmsg: PathBuf,
    /// The configuration file's contents (per-tag limits).
    pub config: config::Config,
}

/// The machine's boot id.
pub fn boot_id() -> anyhow::Result<BootId> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("reading /proc/sys/kernel/random/boot_id")?;
    BootId::parse(&s).context("boot_id is not a UUID")
}

/// A device id from the host name (characters outside `[A-Za-z0-9._:-]` become `-`).
pub fn default_device_id() -> DeviceId {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(DeviceId::MAX_LEN)
        .collect();
    DeviceId::new(&clean)
        .unwrap_or_else(|_| DeviceId::new("unnamed").unwrap_or_else(|_| unreachable!()))
}

/// The current monotonic/wall-clock pair. Both clocks are read through rustix's
/// `clock_gettime64`, whose seconds are 64-bit on 32-bit devices too: std's `SystemTime` goes
/// through the libc crate's `time_t`, still 32-bit for 32-bit musl (armv7, MIPS), which runs
/// out in January 2038, within a router's or camera's service life.
pub fn sync_point(flag: &Path) -> SyncPoint {
    // `tv_nsec` is a 32-bit `c_long` with rustix's libc backend (big-endian MIPS).
    #[allow(clippy::useless_conversion)]
    let us = |c| {
        let ts = rustix::time::clock_gettime(c);
        ts.tv_sec
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(ts.tv_nsec) / 1_000)
    };
    let mono_us = u64::try_from(us(rustix::time::ClockId::Monotonic)).unwrap_or(0);
    let wall_us = us(rustix::time::ClockId::Realtime);
    SyncPoint {
        mono_us,
        wall_us,
        synced: flag.exists(),
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    match rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()) {
        Ok(_) => u32::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    }
}

/// Opens (or formats) the ring and reports what recovery found.
fn open_ring(cfg: &RunConfig) -> anyhow::Result<Box<Ring<Mapping>>> {
    let map = Mapping::open(&cfg.ring).with_context(|| format!("mapping ring {}", cfg.ring))?;
    match &cfg.ring {
        RingSpec::Mem { .. } => eprintln!(
            "blackbox-agent: ring {}: reserved memory, survives a panic and a warm reboot",
            cfg.ring
        ),
        RingSpec::File { path, .. } => eprintln!(
            "blackbox-agent: ring {}: a file ring survives an agent crash{}",
            cfg.ring,
            if Mapping::on_tmpfs(path) {
                " but NOT a reboot (it is on tmpfs)"
            } else {
                "; it survives a reboot only as far as its file system does"
            }
        ),
    }
    let (ring, rec, reinit) = Ring::open_or_format(map, cfg.boot, cfg.ring_cfg)
        .map_err(|e| anyhow::anyhow!("ring {}: {e}", cfg.ring))?;
    if let Some(why) = reinit {
        eprintln!("blackbox-agent: ring {}: re-initialised: {why}", cfg.ring);
    }
    if rec.torn > 0 || rec.bad_blocks > 0 || rec.torn_header || rec.covered > 0 {
        eprintln!(
            "blackbox-agent: ring recovery: {} torn record(s) cut off, {} damaged block(s) \
             discarded, {} block(s) already counted in a gap{}",
            rec.torn,
            rec.bad_blocks,
            rec.covered,
            if rec.torn_header {
                ", one header copy was torn (the other was used)"
            } else {
                ""
            }
        );
    }
    eprintln!(
        "blackbox-agent: ring recovered {} record(s) in {} block(s){}",
        rec.records,
        rec.blocks,
        ring.previous_boot()
            .map_or(String::new(), |b| format!("; previous boot {b}"))
    );
    Ok(Box::new(ring))
}

/// Pstore files waiting for their lines to be acknowledged.
struct PstorePending {
    boot: BootId,
    upto: u64,
    files: Vec<pstore_files::PstoreFile>,
}

/// Runs the agent until the log source fails.
pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let (uploader, how) = match &cfg.link {
        Link::MutualTls {
            identity,
            server_ca,
            roots,
        } => {
            anyhow::ensure!(
                identity.device == cfg.device,
                "device {} is not the identity's ({})",
                cfg.device,
                identity.device
            );
            (
                Uploader::mutual_tls(&cfg.server, identity, roots.clone(), cfg.timeout)?,
                format!(
                    "mutual TLS as {}, server checked against {}",
                    identity.fingerprint,
                    server_ca
                        .as_ref()
                        .map_or("the web PKI roots".into(), |p| p.display().to_string())
                ),
            )
        }
        Link::PlainHttp => (
            Uploader::plain_http(&cfg.server, &cfg.device, cfg.timeout)?,
            "plain HTTP, development only".to_owned(),
        ),
    };
    let _syslog = if cfg.syslog.is_empty() {
        None
    } else {
        let socks: Vec<String> = cfg.syslog.iter().map(|s| s.to_string()).collect();
        match syslogd::listen(&cfg.syslog, &cfg.syslog_kmsg, cfg.config.clone()) {
            Ok(l) => {
                eprintln!(
                    "blackbox-agent: syslog: listening on {}, writing to {}",
                    socks.join(", "),
                    cfg.syslog_kmsg.display()
                );
                Some(l)
            }
            Err(e) if !cfg.syslog_required => {
                eprintln!(
                    "blackbox-agent: syslog: NOT listening ({e:#}); running without the \
                     syslog listener (set --syslog-socket, or `syslog` in [run], to make this \
                     an error, or `none` to silence it)"
                );
                None
            }
            Err(e) => return Err(e.context("starting the syslog listener")),
        }
    };
    let ring = open_ring(&cfg)?;
    let previous = ring.previous_boot();
    let mut buf =
        RingBuffer::new(ring, cfg.device.clone(), cfg.boot, &cfg.state_dir).with_level(cfg.level);
    let resume = buf.ring().resume_after(&cfg.boot);
    eprintln!(
        "blackbox-agent: device {} boot {}; reading {} after seq {}; {} chunk(s) waiting; uploading to {} ({how})",
        cfg.device,
        cfg.boot,
        cfg.kmsg.display(),
        resume.map_or("(start)".into(), |s| s.to_string()),
        buf.unacked_chunks(),
        cfg.server
    );
    let (tx, rx) = mpsc::sync_channel(65_536);
    let _reader = source::spawn(cfg.kmsg.clone(), resume, tx)
        .with_context(|| format!("opening {}", cfg.kmsg.display()))?;
    let interval_ms = cfg.interval.as_millis().max(1) as u64;
    let min_backoff = (interval_ms / 16).clamp(1, 1_000);
    let mut sched = Schedule::new(interval_ms, cfg.jitter.as_millis() as u64, min_backoff);
    let mut next_upload = Instant::now() + Duration::from_millis(sched.first_delay(random_u32()));
    // Until the backlog is read, hold events: the backlog may start with a previous boot.
    let mut held: Option<Vec<Event>> = Some(Vec::new());
    let mut held_bytes = 0usize;
    let mut pstore: Option<PstorePending> = None;
    let mut dropped_reported = 0u64;
    let mut sender = Sender::spawn(uploader)?;
    // After a refused batch: uploads left to send one chunk at a time.
    let mut singles = 0usize;
    // Most bytes in one request: less once the server refused a batch as too large (413).
    let mut batch_bytes = BATCH_BYTES;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing the SIGTERM handler")?;
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            return stop_gracefully(&mut buf, &mut sender, &cfg, held.is_none(), batch_bytes);
        }
        // Wake at least every 250 ms to see a stop request.
        let mut wait = next_upload
            .saturating_duration_since(Instant::now())
            .min(STOP_POLL);
        if sender.in_flight.is_some() {
            wait = wait.min(ANSWER_POLL);
        }
        match rx.recv_timeout(wait) {
            Ok(ev) => {
                let mut batch = vec![ev];
                while batch.len() < 4096
                    && let Ok(ev) = rx.try_recv()
                {
                    batch.push(ev);
                }
                // One clock reading per batch (it costs a stat of the NTP flag file).
                let sync = sync_point(&cfg.synced_flag);
                for ev in batch {
                    match (&mut held, ev) {
                        (Some(h), ev) => {
                            let caught_up = matches!(ev, Event::CaughtUp);
                            if !caught_up {
                                held_bytes += event_size(&ev);
                                h.push(ev);
                            }
                            let full = held_bytes > HELD_MAX_BYTES;
                            if full {
                                // The kernel's buffer is far smaller than this: records are
                                // arriving as fast as they are read. Settle what is held; what
                                // follows belongs to this boot.
                                eprintln!(
                                    "blackbox-agent: the start-up backlog passed {} MiB before the reader caught up; settling it now",
                                    HELD_MAX_BYTES >> 20
                                );
                            }
                            if caught_up || full {
                                let h = std::mem::take(h);
                                held = None;
                                settle_backlog(&mut buf, &cfg, previous, resume, h)?;
                                pstore = collect_pstore(&mut buf, &cfg, previous)?;
                            }
                        }
                        (None, ev) => handle(&mut buf, &cfg.boot, ev, &sync)?,
                    }
                    report_drops(&buf, &mut dropped_reported);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("log reader stopped"),
        }
        if let Some((ids, answer)) = sender.answer() {
            buf.set_in_flight(false);
            let what = Batch(&ids);
            match answer {
                Answer::Acked { duplicates } => {
                    for id in &ids {
                        buf.ack(id)?;
                    }
                    match (duplicates, ids.len()) {
                        (0, _) => {}
                        (_, 1) => eprintln!("blackbox-agent: {what} was already stored"),
                        (d, n) => eprintln!(
                            "blackbox-agent: {what}: {} already stored",
                            if d >= n {
                                "all".to_owned()
                            } else {
                                format!("{d} of them")
                            }
                        ),
                    }
                    // The next chunks go at once.
                    next_upload = Instant::now();
                }
                Answer::Retry { after, why } => {
                    eprintln!("blackbox-agent: upload of {what} failed: {why}");
                    let d = sched.after_failure(after.map(|a| a.as_millis() as u64), random_u32());
                    eprintln!(
                        "blackbox-agent: retrying in {d} ms ({} chunk(s) waiting)",
                        buf.unacked_chunks()
                    );
                    next_upload = Instant::now() + Duration::from_millis(d);
                }
                Answer::Rejected { why, max_body } => match ids.as_slice() {
                    [id] => {
                        buf.reject(id, &why)?;
                        next_upload = Instant::now();
                    }
                    _ => match max_body {
                        // Refused for its size alone: smaller requests pass.
                        Some(max) => {
                            batch_bytes = smaller_batches(sender.sent_bytes, max);
                            next_upload = Instant::now();
                        }
                        None => {
                            // Which chunk? Send them one by one: only the bad one is set aside.
                            eprintln!(
                                "blackbox-agent: server refused {what} ({why}); sending them \
                                 one at a time"
                            );
                            singles = ids.len();
                            next_upload = Instant::now();
                        }
                    },
                },
            }
            if let Err(e) = buf.ring_mut().backing_mut().flush() {
                eprintln!("blackbox-agent: ring flush: {e}");
            }
            if let Some(p) = &pstore
                && buf.delivered(&p.boot, p.upto)
            {
                for (path, e) in pstore_files::unlink(&p.files) {
                    eprintln!("blackbox-agent: unlinking {}: {e}", path.display());
                }
                eprintln!(
                    "blackbox-agent: pstore dump(s) delivered; {} file(s) unlinked",
                    p.files.len()
                );
                pstore = None;
            }
        }
        if sender.in_flight.is_none() && Instant::now() >= next_upload {
            buf.seal_if_idle(sync_point(&cfg.synced_flag));
            let max = if singles > 0 { 1 } else { BATCH_CHUNKS };
            let batch = buf.next_batch(max, batch_bytes)?;
            singles = singles.saturating_sub(1);
            let sent = sender.send(batch)?;
            buf.set_in_flight(sent);
            if !sent {
                // All delivered: the normal interval.
                next_upload =
                    Instant::now() + Duration::from_millis(sched.after_success(random_u32()));
            }
        }
    }
}

/// How often the main loop looks for the server's answer while a chunk is on its way.
const ANSWER_POLL: Duration = Duration::from_millis(50);

/// How often the main loop looks for a stop request (SIGTERM) at the least.
const STOP_POLL: Duration = Duration::from_millis(250);

/// The request size to use after a batch of `sent` bytes was refused for the server's body
/// limit `max_body`: at most that, and less than what was refused (a batch of one chunk is
/// always sent; a chunk the server still refuses alone is set aside).
fn smaller_batches(sent: usize, max_body: usize) -> usize {
    let next = max_body.min(sent.saturating_sub(1)).max(1);
    eprintln!(
        "blackbox-agent: server refused a request of {sent} bytes (its limit is {max_body}); \
         sending at most {next} bytes per request from now on"
    );
    next
}

/// The chunks of one request, for messages: `chunk ID`, or `N chunks FIRST .. LAST`.
struct Batch<'a>(&'a [ChunkId]);

impl std::fmt::Display for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            [] => f.write_str("no chunk"),
            [one] => write!(f, "chunk {one}"),
            [first, .., last] => write!(f, "{} chunks {first} .. {last}", self.0.len()),
        }
    }
}

/// Sends batches of chunks on a thread of its own, one request at a time (the chunks back to
/// back in one body, as they lie in a segment; the server stores each and answers for all). A
/// request can hang for the whole `--timeout` (a network that went away answers nothing);
/// meanwhile the main loop goes on reading the log into the ring, so a panic during the outage
/// still finds every record there.
struct Sender {
    jobs: mpsc::Sender<Vec<Sealed>>,
    answers: mpsc::Receiver<(Vec<ChunkId>, Answer)>,
    /// The chunks on their way, if any.
    in_flight: Option<Vec<ChunkId>>,
    /// Bytes of the last request sent.
    sent_bytes: usize,
}

impl Sender {
    fn spawn(uploader: Uploader) -> anyhow::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<Vec<Sealed>>();
        let (answer_tx, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("upload".into())
            .spawn(move || {
                for batch in job_rx {
                    let answer = match batch.as_slice() {
                        [one] => uploader.send(&one.bytes),
                        _ => uploader.send(&concat_bytes(&batch)),
                    };
                    let ids = batch.into_iter().map(|c| c.id).collect();
                    if answer_tx.send((ids, answer)).is_err() {
                        break;
                    }
                }
            })
            .context("starting the upload thread")?;
        Ok(Self {
            jobs,
            answers,
            in_flight: None,
            sent_bytes: 0,
        })
    }

    /// Sends `batch`; false if it is empty (nothing was waiting).
    fn send(&mut self, batch: Vec<Sealed>) -> anyhow::Result<bool> {
        if batch.is_empty() {
            return Ok(false);
        }
        self.in_flight = Some(batch.iter().map(|c| c.id.clone()).collect());
        self.sent_bytes = batch.iter().map(|c| c.bytes.len()).sum();
        self.jobs
            .send(batch)
            .map_err(|_| anyhow::anyhow!("the upload thread stopped"))?;
        Ok(true)
    }

    /// The answer for the chunks in flight, once it is there.
    fn answer(&mut self) -> Option<(Vec<ChunkId>, Answer)> {
        self.in_flight.as_ref()?;
        let a = self.answers.try_recv().ok()?;
        self.in_flight = None;
        Some(a)
    }

    /// The answer for the chunks in flight, waiting for it until `deadline`.
    fn answer_by(&mut self, deadline: Instant) -> Option<(Vec<ChunkId>, Answer)> {
        self.in_flight.as_ref()?;
        let wait = deadline.saturating_duration_since(Instant::now());
        let a = self.answers.recv_timeout(wait).ok()?;
        self.in_flight = None;
        Some(a)
    }
}

/// The bytes of a batch: its chunks back to back.
fn concat_bytes(batch: &[Sealed]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|c| c.bytes.len()).sum());
    for c in batch {
        out.extend_from_slice(&c.bytes);
    }
    out
}

/// On SIGTERM (a shutdown or a service stop): one last upload of what is waiting, the open
/// block included, within a few seconds (init sends SIGKILL soon after), then the ring is
/// flushed. Nothing depends on it: what is not acknowledged stays in the ring (and what is not
/// in the ring yet is read from kmsg again) at the next start.
fn stop_gracefully(
    buf: &mut RingBuffer<Mapping>,
    sender: &mut Sender,
    cfg: &RunConfig,
    settled: bool,
    mut batch_bytes: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + cfg.timeout.min(Duration::from_secs(5));
    if settled {
        eprintln!(
            "blackbox-agent: stopping: uploading the {} chunk(s) waiting",
            buf.unacked_chunks()
        );
        let mut singles = false;
        loop {
            if sender.in_flight.is_some() {
                match sender.answer_by(deadline) {
                    Some((ids, Answer::Acked { .. })) => {
                        for id in &ids {
                            buf.ack(id)?;
                        }
                    }
                    Some((ids, Answer::Rejected { why, max_body })) => match ids.as_slice() {
                        [id] => buf.reject(id, &why)?,
                        _ => match max_body {
                            Some(max) => batch_bytes = smaller_batches(sender.sent_bytes, max),
                            None => singles = true,
                        },
                    },
                    Some((ids, Answer::Retry { why, .. })) => {
                        eprintln!("blackbox-agent: upload of {} failed: {why}", Batch(&ids));
                        break;
                    }
                    None => break, // out of time
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            buf.seal_if_idle(sync_point(&cfg.synced_flag));
            let max = if singles { 1 } else { BATCH_CHUNKS };
            if !sender.send(buf.next_batch(max, batch_bytes)?)? {
                break;
            }
        }
    }
    if let Err(e) = buf.ring_mut().backing_mut().flush() {
        eprintln!("blackbox-agent: ring flush: {e}");
    }
    eprintln!(
        "blackbox-agent: stopped; {} chunk(s) left in the ring for the next start",
        buf.unacked_chunks()
    );
    Ok(())
}

/// Why records named by a kmsg sequence jump are missing.
const KMSG_LOST: &str = "overwritten in the kernel log before it was read";

fn report_drops(buf: &RingBuffer<Mapping>, reported: &mut u64) {
    let Some(g) = buf.last_note().dropped else {
        return;
    };
    // Say it when a gap starts and each time it doubles, not for every block.
    if g.count < *reported || g.count >= reported.saturating_mul(2).max(1) {
        eprintln!(
            "blackbox-agent: ring full of unacknowledged records: {} record(s) (seq {}..{}) \
             dropped from the middle of the outage so far",
            g.count, g.first, g.last
        );
        *reported = g.count;
    }
}

fn to_record(r: KmsgRecord) -> Record {
    Record {
        seq: r.seq,
        mono_us: r.usec,
        level: r.level,
        facility: r.facility,
        origin: Origin::Kmsg,
        msg: r.msg,
    }
}

/// Stores one event of `boot`; `sync` is the clock pair stamped on a block it starts.
/// Most bytes of events held at start-up before the backlog is settled without waiting for
/// the reader to catch up. Routers' kernels keep 16-512 KiB of log (`CONFIG_LOG_BUF_SHIFT`
/// 14-19): a reader that has not caught up after this much is reading a flood as it happens,
/// and waiting longer would only grow the agent.
const HELD_MAX_BYTES: usize = 8 << 20;

/// What an event held at start-up costs in memory, roughly.
fn event_size(ev: &Event) -> usize {
    std::mem::size_of::<Event>()
        + match ev {
            Event::Record(r) => r.msg.len(),
            Event::Failed(e) => e.len(),
            Event::Gap { .. } | Event::CaughtUp => 0,
        }
}

fn handle(
    buf: &mut RingBuffer<Mapping>,
    boot: &BootId,
    ev: Event,
    sync: &SyncPoint,
) -> anyhow::Result<()> {
    match ev {
        Event::Record(r) => {
            let note = buf.append_to(boot, &to_record(r), sync)?;
            if note.truncated > 0 {
                eprintln!(
                    "blackbox-agent: a record was {} bytes too long for the ring; truncated",
                    note.truncated
                );
            }
        }
        Event::Gap { first, last, usec } => {
            eprintln!(
                "blackbox-agent: records {first}..{last} were lost before they could be read"
            );
            buf.append_gap(boot, first, last, usec, KMSG_LOST, sync)?;
        }
        Event::CaughtUp => {}
        Event::Failed(e) => anyhow::bail!("log source failed: {e}"),
    }
    Ok(())
}

/// A stable stand-in id for a boot the ring knows nothing about (derived from what it logged,
/// so a restart derives the same one and retries stay idempotent).
fn derived_boot(device: &DeviceId, salt: &[u8]) -> BootId {
    let mut out = [0u8; 16];
    for (k, chunk) in out.chunks_mut(4).enumerate() {
        let mut h = crc32fast::Hasher::new_with_initial(k as u32 * 0x9e37_79b9);
        h.update(device.as_str().as_bytes());
        h.update(salt);
        chunk.copy_from_slice(&h.finalize().to_le_bytes());
    }
    // Mark it as a UUID of the "name-based" kind (version 5, RFC 4122 variant).
    out[6] = (out[6] & 0x0f) | 0x50;
    out[8] = (out[8] & 0x3f) | 0x80;
    BootId(out)
}

/// The backlog read at start-up: on a PRINTK_PERSIST kernel it begins with earlier boots'
/// records (the current boot begins at the kernel's banner). Records of the previous
/// boot that the ring already holds (or had acknowledged) are skipped; the rest are added to
/// that boot. Then the current boot's records are stored as usual.
fn settle_backlog(
    buf: &mut RingBuffer<Mapping>,
    cfg: &RunConfig,
    previous: Option<BootId>,
    resume: Option<u64>,
    held: Vec<Event>,
) -> anyhow::Result<()> {
    // An agent restart within this boot already stored this boot's start: nothing earlier
    // can follow it in the stream.
    let starts = if resume.is_some() {
        Vec::new()
    } else {
        crate::kmsg::boot_starts(held.iter().filter_map(|e| match e {
            Event::Record(r) => Some((r.facility, r.usec, &r.msg[..])),
            _ => None,
        }))
    };
    let now = sync_point(&cfg.synced_flag);
    if starts.is_empty() {
        for ev in held {
            handle(buf, &cfg.boot, ev, &now)?;
        }
        return Ok(());
    }
    // Split held events into segments at the records where boots start.
    let mut segments: Vec<Vec<Event>> = vec![Vec::new()];
    let mut rec_index = 0usize;
    for ev in held {
        if let Event::Record(_) = ev {
            if starts.contains(&rec_index) {
                segments.push(Vec::new());
            }
            rec_index += 1;
        }
        if let Some(s) = segments.last_mut() {
            s.push(ev);
        }
    }
    let current = segments.pop().unwrap_or_default();
    let n_earlier = segments.len();
    let mut replayed = 0usize;
    let mut skipped = 0usize;
    for (k, seg) in segments.into_iter().enumerate() {
        // The segment right before this boot is the ring's previous boot; older ones (or any,
        // when the ring knows no previous boot) get a stable derived id.
        let boot = match previous {
            Some(b) if k + 1 == n_earlier => b,
            _ => {
                let salt = seg
                    .iter()
                    .find_map(|e| match e {
                        Event::Record(r) => Some(format!(
                            "{} {} {}",
                            r.seq,
                            r.usec,
                            String::from_utf8_lossy(&r.msg)
                        )),
                        _ => None,
                    })
                    .unwrap_or_default();
                derived_boot(&cfg.device, salt.as_bytes())
            }
        };
        let sync = buf.ring().last_sync(&boot).unwrap_or_default();
        let known: HashSet<(u64, Vec<u8>)> = buf
            .records_of(&boot)
            .into_iter()
            .map(|r| (r.mono_us, r.msg))
            .collect();
        for ev in seg {
            let held_upto = buf.ring().resume_after(&boot);
            match ev {
                Event::Record(r) => {
                    if held_upto.is_some_and(|h| r.seq <= h)
                        || known.contains(&(r.usec, r.msg.clone()))
                    {
                        skipped += 1;
                        continue;
                    }
                    buf.append_to(&boot, &to_record(r), &sync)?;
                    replayed += 1;
                }
                Event::Gap { first, last, usec } => {
                    let first = held_upto.map_or(first, |h| first.max(h.saturating_add(1)));
                    if first <= last {
                        buf.append_gap(&boot, first, last, usec, KMSG_LOST, &sync)?;
                    }
                }
                Event::CaughtUp => {}
                Event::Failed(e) => anyhow::bail!("log source failed: {e}"),
            }
        }
    }
    eprintln!(
        "blackbox-agent: the kernel log holds {n_earlier} earlier boot(s): {skipped} record(s) \
         already in the ring or acknowledged, {replayed} added to their boot"
    );
    // The previous boot's block is complete (the ring keeps its own clock pair for it).
    buf.ring_mut().seal(&SyncPoint::default());
    for ev in current {
        handle(buf, &cfg.boot, ev, &now)?;
    }
    Ok(())
}

/// Adds the pstore lines the ring does not hold to the previous boot.
fn collect_pstore(
    buf: &mut RingBuffer<Mapping>,
    cfg: &RunConfig,
    previous: Option<BootId>,
) -> anyhow::Result<Option<PstorePending>> {
    let (files, skipped) = match pstore_files::collect(&cfg.pstore_dir, 4 << 20) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("blackbox-agent: reading {}: {e}", cfg.pstore_dir.display());
            return Ok(None);
        }
    };
    for (path, why) in &skipped {
        eprintln!("blackbox-agent: pstore {}: {why}", path.display());
    }
    if files.is_empty() {
        return Ok(None);
    }
    let boot = previous.unwrap_or_else(|| {
        let mut salt = Vec::new();
        for f in &files {
            salt.extend_from_slice(f.path.as_os_str().as_encoded_bytes());
            for l in f.dump.lines.iter().take(4) {
                salt.extend_from_slice(&l.text);
            }
        }
        derived_boot(&cfg.device, &salt)
    });
    let held = buf.records_of(&boot);
    let known: HashSet<(u64, &[u8])> = held.iter().map(|r| (r.mono_us, &r.msg[..])).collect();
    let newest = held.iter().map(|r| r.mono_us).max();
    let mut lines: Vec<(u64, u8, u8, Vec<u8>)> = Vec::new();
    let mut last_mono = newest.unwrap_or(0);
    for f in &files {
        for l in &f.dump.lines {
            let mono = l.mono_us.unwrap_or(last_mono);
            last_mono = last_mono.max(mono);
            lines.push((mono, l.level.unwrap_or(6), l.facility, l.text.clone()));
        }
    }
    // Timestamped lines in time order (dmesg and console overlap: keep one copy of each).
    lines.sort_by_key(|l| l.0);
    let mut seen: HashSet<(u64, Vec<u8>)> = HashSet::new();
    lines.retain(|l| seen.insert((l.0, l.3.clone())));
    let mut sync = buf.ring().last_sync(&boot);
    if sync.is_none() {
        // The ring knows nothing of that boot's clock: a pstore file's time is when the
        // kernel wrote the dump, at about the last line's monotonic time.
        sync = files.iter().find_map(|f| {
            let wall = f.mtime?.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(SyncPoint {
                mono_us: last_mono,
                wall_us: wall.as_micros() as i64,
                synced: false,
            })
        });
    }
    let sync = sync.unwrap_or_default();
    let mut seq = buf
        .ring()
        .resume_after(&boot)
        .map_or(0, |s| s.saturating_add(1));
    let mut added = 0usize;
    for (mono, level, facility, text) in lines {
        let newer = newest.is_none_or(|n| mono > n);
        let at_edge = newest == Some(mono) && !known.contains(&(mono, &text[..]));
        if !(newer || at_edge) {
            continue;
        }
        let rec = Record {
            seq,
            mono_us: mono,
            level: level.min(Record::MAX_LEVEL),
            facility,
            origin: Origin::Pstore,
            msg: text,
        };
        if let Err(e) = buf.append_to(&boot, &rec, &sync) {
            eprintln!("blackbox-agent: pstore line not added: {e}");
            break;
        }
        seq = seq.saturating_add(1);
        added += 1;
    }
    buf.ring_mut().seal(&sync);
    let reasons: Vec<String> = files.iter().filter_map(|f| f.dump.reason.clone()).collect();
    eprintln!(
        "blackbox-agent: pstore: {} file(s) ({}), {added} line(s) the ring did not hold added to boot {boot}",
        files.len(),
        if reasons.is_empty() {
            "no dump header".to_string()
        } else {
            reasons.join(", ")
        }
    );
    let upto = buf.ring().resume_after(&boot).unwrap_or(0);
    Ok(Some(PstorePending { boot, upto, files }))
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    fn now_us() -> i64 {
        i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap()
    }

    /// A sync point reads the wall clock as std does (on this 64-bit host, where std's
    /// `time_t` is 64-bit too) and the monotonic clock; no flag file, not synced.
    #[test]
    fn sync_points_read_the_wall_and_monotonic_clocks() {
        let before = now_us();
        let s = super::sync_point(std::path::Path::new("/nonexistent/synced"));
        let after = now_us();
        assert!(
            before <= s.wall_us && s.wall_us <= after,
            "{before} {s:?} {after}"
        );
        assert!(s.mono_us > 0);
        assert!(!s.synced);
        let later = super::sync_point(std::path::Path::new("/nonexistent/synced"));
        assert!(later.mono_us >= s.mono_us);
    }
}
