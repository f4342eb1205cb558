//! The flood: a fleet of simulated devices coming back after an outage, each with a backlog of
//! chunks built from real logs, uploading with the real agent's retry schedule.
//!
//! - [`Fleet::build`]: for each device a P-256 certificate (CN = device id) and a backlog of
//!   chunks. The records are lines of the loghub corpus in `../shared/corpus/loghub/`
//!   (<https://github.com/logpai/loghub>; Zhu et al., "Loghub: A Large Collection of System Log
//!   Datasets for AI-driven Log Analytics", ISSRE 2023), each device starting at another line,
//!   cut into chunks the way the agent's ring cuts blocks (`--block-bytes` of ring records), and
//!   deflated at the agent's level.
//! - [`drive`]: one task per device, on one tokio runtime. A device behaves as `blackbox-agent
//!   run` does after a long outage: its [`Schedule`] has backed off to the cap (the interval),
//!   its first attempt comes within the arrival window, it uploads its chunks in order on one
//!   keep-alive connection (HTTPS with its certificate, or plain HTTP), in batches as the agent
//!   sends them (up to 64 chunks and 256 KiB a request, back to back; or one chunk a request,
//!   [`ClientConfig::batch`] off, as nginx takes them), moves on only on 201/200, and on any
//!   failure (503, refused or closed connection, timeout) waits what the schedule says
//!   (Retry-After honoured within the cap), as the agent does. A pooled
//!   connection is reused if it was idle less than 15 s (ureq's default), unless the server
//!   said `connection: close`.
//! - [`check_segments`] / [`check_files`]: every chunk must be in the store exactly once, byte
//!   for byte.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use blackbox_agent::buffer::{BATCH_BYTES, BATCH_CHUNKS};
use blackbox_agent::ring::{BLOCK_HDR, REC_HDR};
use blackbox_agent::schedule::Schedule;
use blackbox_protocol::chunk::walk_members;
use blackbox_protocol::{
    BootId, ChunkBuilder, ChunkId, DeviceId, Limits, Origin, Record, SyncPoint,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::tlsclient::{DeviceCert, client_config};

/// What the fleet looks like.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Devices.
    pub devices: usize,
    /// Chunks each device holds when it comes back.
    pub backlog: usize,
    /// Bytes of one ring block (one chunk): records are cut as the agent's ring cuts them.
    pub block_bytes: usize,
    /// Deflate level (the agent's default is 6).
    pub level: u8,
    /// Make a certificate per device (for mutual TLS).
    pub certs: bool,
    /// Seed of the boot ids and schedules' randomness.
    pub seed: u64,
}

/// One chunk as the device sends it.
pub struct Sent {
    /// Its identity.
    pub id: ChunkId,
    /// The encoded chunk (the request body).
    pub bytes: Bytes,
}

/// One simulated device.
pub struct Device {
    /// Device id (the certificate's CN).
    pub name: String,
    /// Its certificate, for mutual TLS.
    pub cert: Option<DeviceCert>,
    /// Its backlog, in upload order.
    pub chunks: Vec<Sent>,
}

/// The simulated devices.
pub struct Fleet {
    /// Devices.
    pub devices: Vec<Device>,
}

impl Fleet {
    /// Builds the fleet on all CPUs.
    pub fn build(cfg: &FleetConfig) -> anyhow::Result<Self> {
        Self::build_cached(cfg, None)
    }

    /// Like [`Fleet::build`], keeping the encoded chunks in `cache` (deflating 10,000 backlogs
    /// takes minutes; a later run with the same settings and corpus loads them in seconds).
    /// Certificates are made afresh every time.
    pub fn build_cached(cfg: &FleetConfig, cache: Option<&Path>) -> anyhow::Result<Self> {
        let lines = corpus_lines()?;
        let file = cache.map(|dir| {
            let mut h = crc32fast::Hasher::new();
            lines.iter().for_each(|l| h.update(l));
            dir.join(format!(
                "fleet-{}x{}-{}-{}-{}-{:08x}.bin",
                cfg.devices,
                cfg.backlog,
                cfg.block_bytes,
                cfg.level,
                cfg.seed,
                h.finalize()
            ))
        });
        let cached = file.as_deref().and_then(|f| load_chunks(f, cfg).ok());
        let hit = cached.is_some();
        let mut chunks = cached.map(|c| c.into_iter());
        let devices = par_map(cfg.devices, |i| {
            let name = format!("flood-{i:05}");
            Device {
                cert: cfg.certs.then(|| DeviceCert::new(&name)),
                chunks: if hit {
                    Vec::new()
                } else {
                    build_chunks(cfg, i, &name, &lines)
                },
                name,
            }
        });
        let mut fleet = Self { devices };
        if let Some(c) = chunks.as_mut() {
            for (d, ch) in fleet.devices.iter_mut().zip(c) {
                d.chunks = ch;
            }
        } else if let Some(f) = &file {
            save_chunks(f, &fleet)?;
        }
        Ok(fleet)
    }

    /// Chunks in all backlogs.
    pub fn chunks(&self) -> usize {
        self.devices.iter().map(|d| d.chunks.len()).sum()
    }

    /// Bytes of all chunks.
    pub fn bytes(&self) -> u64 {
        self.devices
            .iter()
            .flat_map(|d| &d.chunks)
            .map(|c| c.bytes.len() as u64)
            .sum()
    }

    /// The receiver's allowlist: every device's fingerprint and name.
    pub fn allowlist(&self) -> String {
        let mut out = String::from("# the flood's devices\n");
        for d in &self.devices {
            if let Some(c) = &d.cert {
                out.push_str(&format!("{} {}\n", c.fingerprint(), d.name));
            }
        }
        out
    }
}

/// Lines of the corpus (split at `\n`; a `\r` before it is dropped, a lone `\r` stays in the
/// message as devices send it).
pub fn corpus_lines() -> anyhow::Result<Vec<Vec<u8>>> {
    let dir = crate::harness::root().join("../shared/corpus/loghub");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("the corpus: {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    let max = Limits::DEFAULT.max_msg as usize;
    let mut lines = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f)?;
        lines.extend(bytes.split(|b| *b == b'\n').filter_map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            (!l.is_empty()).then(|| l[..l.len().min(max)].to_vec())
        }));
    }
    anyhow::ensure!(!lines.is_empty(), "no log lines in {}", dir.display());
    Ok(lines)
}

/// `f(0..n)` on all CPUs, in order.
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| s.spawn(move || (start..(start + per).min(n)).map(f).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a fleet builder thread panicked"))
            .collect()
    })
}

const CACHE_MAGIC: &[u8; 8] = b"BBFLOOD1";

fn save_chunks(path: &Path, fleet: &Fleet) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(fleet.bytes() as usize + 4 * fleet.chunks() + 64);
    out.extend_from_slice(CACHE_MAGIC);
    for d in &fleet.devices {
        out.extend_from_slice(&(d.chunks.len() as u32).to_le_bytes());
        for c in &d.chunks {
            out.extend_from_slice(&(c.bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&c.bytes);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The chunks a previous build saved, per device; each must still parse, and the first must
/// decode completely (the chunk format has not changed since).
fn load_chunks(path: &Path, cfg: &FleetConfig) -> anyhow::Result<Vec<Vec<Sent>>> {
    let all = Bytes::from(std::fs::read(path)?);
    anyhow::ensure!(all.starts_with(CACHE_MAGIC), "not a fleet cache");
    let mut at = CACHE_MAGIC.len();
    let mut take = |n: usize| -> anyhow::Result<Bytes> {
        let b = all.get(at..at + n).context("fleet cache truncated")?;
        at += n;
        Ok(all.slice_ref(b))
    };
    let mut out = Vec::with_capacity(cfg.devices);
    for _ in 0..cfg.devices {
        let n = u32::from_le_bytes(take(4)?[..].try_into()?) as usize;
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u32::from_le_bytes(take(4)?[..].try_into()?) as usize;
            let bytes = take(len)?;
            let id = blackbox_protocol::ChunkHeader::parse(&bytes)?.id;
            chunks.push(Sent { id, bytes });
        }
        out.push(chunks);
    }
    if let Some(first) = out.first().and_then(|c| c.first()) {
        blackbox_protocol::Chunk::decode(&first.bytes, &Limits::DEFAULT)?;
    }
    Ok(out)
}

fn build_chunks(cfg: &FleetConfig, i: usize, name: &str, lines: &[Vec<u8>]) -> Vec<Sent> {
    let device = DeviceId::new(name).expect("flood device ids are valid");
    let mut rng = Rng::new(cfg.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut boot = [0u8; 16];
    boot[..8].copy_from_slice(&rng.next().to_le_bytes());
    boot[8..].copy_from_slice(&rng.next().to_le_bytes());
    // Wall time: an hour ago, when the outage began.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let sync = SyncPoint {
        mono_us: 1_000_000,
        wall_us: now_us - 3_600_000_000,
        synced: true,
    };
    let room = cfg.block_bytes.saturating_sub(BLOCK_HDR).max(REC_HDR + 1);
    let mut at = i.wrapping_mul(7919) % lines.len();
    let mut seq = 0u64;
    let mut chunks = Vec::with_capacity(cfg.backlog);
    while chunks.len() < cfg.backlog {
        let mut b = ChunkBuilder::new(device.clone(), BootId(boot), sync, Limits::DEFAULT);
        let mut used = 0;
        loop {
            let msg = &lines[at];
            if !b.is_empty() && used + REC_HDR + msg.len() > room {
                break;
            }
            let rec = Record {
                seq,
                mono_us: 1_000_000 + seq * 1_500,
                level: 6,
                facility: 3,
                origin: Origin::Kmsg,
                msg: msg.clone(),
            };
            if b.push(rec).is_err() {
                break;
            }
            used += REC_HDR + msg.len();
            seq += 1;
            at = (at + 1) % lines.len();
        }
        let chunk = b.finish().expect("a chunk of at least one record");
        let bytes = chunk
            .encode(cfg.level, &Limits::DEFAULT)
            .expect("the corpus fits the limits");
        chunks.push(Sent {
            id: chunk.id,
            bytes: Bytes::from(bytes),
        });
    }
    chunks
}

/// SplitMix64: the devices' randomness (jitter, arrival), reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }
}

/// Which server the devices talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `POST /v1/chunks` to blackbox-server.
    Blackbox,
    /// `PUT /dav/<device>/<first>-<last>.gz` to nginx.
    Nginx,
}

/// How the devices reach the server and when they try.
#[derive(Clone)]
pub struct ClientConfig {
    /// Server address.
    pub addr: SocketAddr,
    /// The kind of server.
    pub target: Target,
    /// The CA the server's certificate chains to (`None`: plain HTTP).
    pub ca: Option<PathBuf>,
    /// The agent's `--interval` (the longest any wait can be).
    pub interval: Duration,
    /// Devices make their first attempt at a random point of this window.
    pub arrival: Duration,
    /// The agent's request timeout.
    pub timeout: Duration,
    /// Give up after this long.
    pub deadline: Duration,
    /// Send the backlog in batches, as the agent does (the receiver only); else one chunk a
    /// request.
    pub batch: bool,
}

/// How many of `chunks` (the unacknowledged backlog, in order) the agent sends in its next
/// request: up to [`BATCH_CHUNKS`] and [`BATCH_BYTES`], at least one.
pub fn batch_len(chunks: &[Sent]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for c in chunks.iter().take(BATCH_CHUNKS) {
        bytes += c.bytes.len();
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// What the devices saw, counted as it happens.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Answers 201.
    pub created: AtomicU64,
    /// Answers 200 (already stored).
    pub duplicate: AtomicU64,
    /// Answers 503.
    pub shed: AtomicU64,
    /// Any other answer (a chunk the agent would drop as rejected).
    pub other: AtomicU64,
    /// Connections refused, closed or failed before a request could be sent.
    pub connect_failed: AtomicU64,
    /// Requests that failed without an answer (connection closed, timeout).
    pub no_answer: AtomicU64,
    /// Connections opened.
    pub connections: AtomicU64,
    /// Chunks acknowledged (201 or 200).
    pub acked: AtomicUsize,
    /// Bytes of the chunks acknowledged.
    pub acked_bytes: AtomicU64,
    /// Devices whose whole backlog is acknowledged.
    pub done: AtomicUsize,
    /// Per chunk, in fleet order: how many times it was acknowledged.
    acks: Vec<AtomicU64>,
    /// Where each device's chunks start in `acks`.
    offsets: Vec<usize>,
}

impl Tally {
    /// A tally for `fleet`.
    pub fn new(fleet: &Fleet) -> Self {
        let mut offsets = Vec::with_capacity(fleet.devices.len());
        let mut n = 0;
        for d in &fleet.devices {
            offsets.push(n);
            n += d.chunks.len();
        }
        Self {
            acks: (0..n).map(|_| AtomicU64::new(0)).collect(),
            offsets,
            ..Self::default()
        }
    }

    /// Chunks acknowledged more than once (a device never sends an acknowledged chunk again).
    pub fn acked_twice(&self) -> usize {
        self.acks.iter().filter(|a| a.load(Relaxed) > 1).count()
    }

    /// Which chunks have been acknowledged, by device index and chunk index.
    pub fn acked_set(&self, fleet: &Fleet) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (d, dev) in fleet.devices.iter().enumerate() {
            for c in 0..dev.chunks.len() {
                if self.acks[self.offsets[d] + c].load(Relaxed) > 0 {
                    out.push((d, c));
                }
            }
        }
        out
    }
}

/// Runs every device until its backlog is acknowledged or the deadline passes. Returns the
/// time from the first request to the last acknowledgement.
pub async fn drive(fleet: Arc<Fleet>, cfg: ClientConfig, tally: Arc<Tally>, seed: u64) -> Duration {
    let t0 = Instant::now();
    let last_ack = Arc::new(AtomicU64::new(0));
    let tls: Vec<Option<Arc<rustls::ClientConfig>>> = fleet
        .devices
        .iter()
        .map(|d| {
            let ca = cfg.ca.as_ref()?;
            Some(client_config(ca, d.cert.as_ref()))
        })
        .collect();
    let tasks: Vec<_> = (0..fleet.devices.len())
        .map(|i| {
            let (fleet, cfg, tally, tls, last_ack) = (
                fleet.clone(),
                cfg.clone(),
                tally.clone(),
                tls[i].clone(),
                last_ack.clone(),
            );
            tokio::spawn(async move {
                let mut rng = Rng::new(seed ^ 0x5eed ^ (i as u64) << 20);
                run_device(&fleet, i, &cfg, tls, &tally, &mut rng, t0, &last_ack).await;
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    Duration::from_micros(last_ack.load(Relaxed))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    idle_since: Instant,
}

/// How long a pooled connection may sit idle and still be reused (ureq's default).
const POOL_IDLE: Duration = Duration::from_secs(15);

enum Try {
    Acked,
    Failed(Option<u64>),
}

#[allow(clippy::too_many_arguments)]
async fn run_device(
    fleet: &Fleet,
    i: usize,
    cfg: &ClientConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    tally: &Tally,
    rng: &mut Rng,
    t0: Instant,
    last_ack: &AtomicU64,
) {
    let dev = &fleet.devices[i];
    // The agent's schedule (agent/src/linux: min backoff = interval / 16, at most 1 s; jitter
    // a twelfth of the interval), after a long outage: backed off to the cap.
    let interval_ms = cfg.interval.as_millis().max(1) as u64;
    let mut sched = Schedule::new(
        interval_ms,
        interval_ms / 12,
        (interval_ms / 16).clamp(1, 1000),
    );
    for _ in 0..64 {
        sched.after_failure(None, rng.u32());
    }
    let arrival = (cfg.arrival.as_micros() as u64).max(1);
    tokio::time::sleep_until(t0 + Duration::from_micros(rng.next() % arrival)).await;
    let give_up = t0 + cfg.deadline;
    let mut conn: Option<Conn> = None;
    let mut next = 0;
    while next < dev.chunks.len() && Instant::now() < give_up {
        let failed = loop {
            let rest = dev.chunks.get(next..).unwrap_or_default();
            let Some(chunk) = rest.first() else {
                break None;
            };
            let n = if cfg.batch { batch_len(rest) } else { 1 };
            // A batch is its chunks back to back, as in a segment.
            let body = if n == 1 {
                chunk.bytes.clone()
            } else {
                Bytes::from(rest.iter().take(n).fold(Vec::new(), |mut b, c| {
                    b.extend_from_slice(&c.bytes);
                    b
                }))
            };
            let reusable = conn
                .as_ref()
                .is_some_and(|c| !c.sender.is_closed() && c.idle_since.elapsed() < POOL_IDLE);
            if !reusable {
                conn = match connect(cfg, tls.as_ref()).await {
                    Ok(c) => {
                        tally.connections.fetch_add(1, Relaxed);
                        Some(c)
                    }
                    Err(_) => {
                        tally.connect_failed.fetch_add(1, Relaxed);
                        break Some(None);
                    }
                };
            }
            let Some(c) = conn.as_mut() else {
                break Some(None);
            };
            match send(c, cfg, &dev.name, &chunk.id, body, tally).await {
                (Try::Acked, close) => {
                    for (k, acked) in rest.iter().take(n).enumerate() {
                        let times = tally.acks[tally.offsets[i] + next + k].fetch_add(1, Relaxed);
                        if times == 0 {
                            tally.acked.fetch_add(1, Relaxed);
                            tally
                                .acked_bytes
                                .fetch_add(acked.bytes.len() as u64, Relaxed);
                        }
                    }
                    last_ack.fetch_max(t0.elapsed().as_micros() as u64, Relaxed);
                    next += n;
                    if close {
                        conn = None;
                    }
                }
                (Try::Failed(retry_after), close) => {
                    if close {
                        conn = None;
                    }
                    break Some(retry_after);
                }
            }
        };
        match failed {
            None => break,
            Some(retry_after) => {
                let wait = sched.after_failure(retry_after.map(|s| s * 1000), rng.u32());
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
    if next == dev.chunks.len() {
        tally.done.fetch_add(1, Relaxed);
    }
}

async fn connect(
    cfg: &ClientConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Conn> {
    let io = tokio::time::timeout(cfg.timeout, async {
        let tcp = tokio::net::TcpStream::connect(cfg.addr).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match tls {
            Some(t) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                Box::new(
                    tokio_rustls::TlsConnector::from(t.clone())
                        .connect(name, tcp)
                        .await?,
                )
            }
            None => Box::new(tcp),
        };
        anyhow::Ok(io)
    })
    .await??;
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = driver.await;
    });
    Ok(Conn {
        sender,
        idle_since: Instant::now(),
    })
}

/// One upload (`body`: one chunk, `first`, or a batch starting with it); also says whether
/// the connection must not be reused.
async fn send(
    c: &mut Conn,
    cfg: &ClientConfig,
    device: &str,
    first: &ChunkId,
    body: Bytes,
    tally: &Tally,
) -> (Try, bool) {
    use hyper::header;
    let req = match cfg.target {
        Target::Blackbox => hyper::Request::post("/v1/chunks"),
        Target::Nginx => hyper::Request::put(format!(
            "/dav/{device}/{}-{}.gz",
            first.first_seq, first.last_seq
        )),
    }
    .header(header::HOST, "localhost")
    .header(header::CONTENT_TYPE, "application/gzip")
    .header(header::CONTENT_LENGTH, body.len());
    let req = if cfg.ca.is_none() && cfg.target == Target::Blackbox {
        req.header("x-blackbox-device", device)
    } else {
        req
    };
    let Ok(req) = req.body(Full::new(body)) else {
        return (Try::Failed(None), true);
    };
    tally.requests.fetch_add(1, Relaxed);
    let answer = tokio::time::timeout(cfg.timeout, async {
        c.sender.ready().await?;
        let resp = c.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let h = resp.headers();
        let retry_after = h
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let close = h
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        resp.into_body().collect().await?;
        anyhow::Ok((status, retry_after, close))
    })
    .await;
    c.idle_since = Instant::now();
    match answer {
        Ok(Ok((status, retry_after, close))) => {
            let t = match status {
                200 | 204 => {
                    tally.duplicate.fetch_add(1, Relaxed);
                    Try::Acked
                }
                201 => {
                    tally.created.fetch_add(1, Relaxed);
                    Try::Acked
                }
                503 => {
                    tally.shed.fetch_add(1, Relaxed);
                    Try::Failed(retry_after)
                }
                _ => {
                    tally.other.fetch_add(1, Relaxed);
                    Try::Failed(retry_after)
                }
            };
            (t, close)
        }
        _ => {
            tally.no_answer.fetch_add(1, Relaxed);
            (Try::Failed(None), true)
        }
    }
}

/// What the store holds, compared with what the fleet sent.
#[derive(Debug, Default, Clone)]
pub struct StoreCheck {
    /// Chunks found exactly once, byte for byte.
    pub once: usize,
    /// Chunks of the fleet not found.
    pub missing: usize,
    /// Chunks found more than once (counting each extra copy).
    pub extra_copies: usize,
    /// Chunks whose stored bytes differ from those sent, or stored data that is no chunk of
    /// the fleet.
    pub damaged: usize,
}

impl StoreCheck {
    /// Every chunk exactly once and nothing else.
    pub fn exact(&self) -> bool {
        self.missing == 0 && self.extra_copies == 0 && self.damaged == 0
    }
}

/// Copies stored in the segments of a `file://` store directory: per chunk of the fleet (by
/// device and chunk index) the number of byte-identical copies, and the number of stored
/// members that are no chunk of the fleet or differ from what was sent.
pub type SegmentCounts = (HashMap<(usize, usize), usize>, usize);

/// Walks every segment of the store in `dir` (by the gzip headers, as `walk_members` does).
pub fn count_in_segments(fleet: &Fleet, dir: &Path) -> anyhow::Result<SegmentCounts> {
    let index: HashMap<&ChunkId, (usize, usize)> = fleet
        .devices
        .iter()
        .enumerate()
        .flat_map(|(d, dev)| {
            dev.chunks
                .iter()
                .enumerate()
                .map(move |(c, s)| (&s.id, (d, c)))
        })
        .collect();
    let mut counts = HashMap::new();
    let mut damaged = 0;
    for path in files_under(&dir.join("raw"))? {
        if !path.to_string_lossy().ends_with(".seg.gz") {
            continue;
        }
        let seg = std::fs::read(&path)?;
        for m in walk_members(&seg) {
            let Ok((off, h)) = m else {
                damaged += 1;
                break;
            };
            let member = &seg[off as usize..(off + h.member_len()) as usize];
            match index.get(&h.id) {
                Some(&(d, c)) if fleet.devices[d].chunks[c].bytes[..] == *member => {
                    *counts.entry((d, c)).or_insert(0) += 1;
                }
                _ => damaged += 1,
            }
        }
    }
    Ok((counts, damaged))
}

/// Checks the segments of a `file://` store directory against the fleet.
pub fn check_segments(fleet: &Fleet, dir: &Path) -> anyhow::Result<StoreCheck> {
    let (counts, damaged) = count_in_segments(fleet, dir)?;
    let mut check = StoreCheck {
        damaged,
        ..StoreCheck::default()
    };
    for (d, dev) in fleet.devices.iter().enumerate() {
        for c in 0..dev.chunks.len() {
            match counts.get(&(d, c)).copied().unwrap_or(0) {
                0 => check.missing += 1,
                n => {
                    check.once += 1;
                    check.extra_copies += n - 1;
                }
            }
        }
    }
    Ok(check)
}

/// Checks nginx's files (one per chunk) against the fleet.
pub fn check_files(fleet: &Fleet, path_of: impl Fn(&str, &ChunkId) -> PathBuf) -> StoreCheck {
    let mut check = StoreCheck::default();
    for d in &fleet.devices {
        for c in &d.chunks {
            match std::fs::read(path_of(&d.name, &c.id)) {
                Ok(b) if b[..] == c.bytes[..] => check.once += 1,
                Ok(_) => check.damaged += 1,
                Err(_) => check.missing += 1,
            }
        }
    }
    check
}

fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sizes: &[usize]) -> Vec<Sent> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Sent {
                id: ChunkId {
                    device: DeviceId::new("d").unwrap(),
                    boot: BootId([1; 16]),
                    first_seq: i as u64,
                    last_seq: i as u64,
                },
                bytes: Bytes::from(vec![0; n]),
            })
            .collect()
    }

    /// Batches as the agent makes them: at most 64 chunks and 256 KiB, but always one.
    #[test]
    fn batches_follow_the_agents_limits() {
        assert_eq!(batch_len(&sent(&[100 << 10; 3])), 2);
        assert_eq!(batch_len(&sent(&[128 << 10, 128 << 10, 1])), 2);
        assert_eq!(batch_len(&sent(&[300 << 10, 1])), 1);
        assert_eq!(batch_len(&sent(&[1 << 10; 100])), 64);
        assert_eq!(batch_len(&[]), 0);
    }
}
