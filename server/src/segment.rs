//! Group commit: accepted chunks are appended to the open segment, which is written as one
//! object when it reaches a size or age limit; only then is every chunk in it acknowledged.
//!
//! A segment is the chunks' gzip members back to back (`zcat` prints every line). Beside it goes
//! an index object, one JSON line per chunk: device, boot, sequence range, wall-time range, byte
//! offset and length. Keys sort by ingest time:
//! `raw/2026-11-21/14/<receiver>-<ulid>.seg.gz` and `…/<receiver>-<ulid>.idx`.
//!
//! Write order is segment, then index, then acknowledgements. The index is derived data: a
//! segment whose index is missing (the receiver died between the two writes) is re-indexed at
//! start-up by walking its gzip headers, so its chunks are recognised as already stored.
//!
//! All deduplication runs in the single committer task, so it needs no locks: a chunk whose
//! identity was stored recently, or is waiting in the open segment, is answered "duplicate".
//!
//! Memory: the open segment (at most `max_bytes`, or one chunk if a chunk is larger), the
//! submissions queued for the committer (each still holding its share of the receiver's body
//! budget, released when its bytes are copied into the segment), and the recent identities
//! (16 bytes each, [`ChunkKey`]). A submission carries a summary of its chunk ([`Accepted`]),
//! never the decoded records.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use blackbox_protocol::chunk::walk_members;
use blackbox_protocol::{BootId, Chunk, ChunkId, DeviceId, Limits};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::store::Store;

/// One line of a segment's index object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Device id.
    pub device: String,
    /// Boot id (UUID text).
    pub boot: String,
    /// First sequence number.
    pub first_seq: u64,
    /// Last sequence number.
    pub last_seq: u64,
    /// Number of records.
    pub records: u32,
    /// Earliest record wall time, µs since the epoch.
    pub wall_min_us: i64,
    /// Latest record wall time, µs since the epoch.
    pub wall_max_us: i64,
    /// Byte offset of the chunk's gzip member in the segment.
    pub byte_offset: u64,
    /// Length of the gzip member.
    pub byte_len: u64,
}

impl IndexEntry {
    /// The chunk identity this entry describes, if its fields are well formed.
    pub fn chunk_id(&self) -> Option<ChunkId> {
        Some(ChunkId {
            device: DeviceId::new(&self.device).ok()?,
            boot: BootId::parse(&self.boot)?,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
        })
    }

    /// The entry of a chunk stored at `offset` of a segment, `len` bytes long.
    pub fn of(chunk: &Accepted, offset: u64, len: u64) -> Self {
        Self {
            device: chunk.id.device.to_string(),
            boot: chunk.id.boot.to_string(),
            first_seq: chunk.id.first_seq,
            last_seq: chunk.id.last_seq,
            records: chunk.records,
            wall_min_us: chunk.wall_min_us,
            wall_max_us: chunk.wall_max_us,
            byte_offset: offset,
            byte_len: len,
        }
    }
}

/// What the committer needs of a validated chunk: its identity and what its index line says.
/// The decoded records stay with the handler (and are freed before the chunk waits for its
/// segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The chunk's identity.
    pub id: ChunkId,
    /// Number of records.
    pub records: u32,
    /// Earliest record wall time, µs since the epoch.
    pub wall_min_us: i64,
    /// Latest record wall time, µs since the epoch.
    pub wall_max_us: i64,
}

impl Accepted {
    /// The summary of a decoded chunk.
    pub fn of(chunk: &Chunk) -> Self {
        let (lo, hi) = chunk.wall_range();
        Self {
            id: chunk.id.clone(),
            records: u32::try_from(chunk.records.len()).unwrap_or(u32::MAX),
            wall_min_us: lo,
            wall_max_us: hi,
        }
    }
}

/// A chunk identity in 16 bytes (the first half of the SHA-256 of its fields): what the
/// committer remembers of every chunk it stored recently. Two different identities share a key
/// with probability 2^-128 per pair, far below any hardware fault rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey([u8; 16]);

impl ChunkKey {
    /// The key of an identity.
    pub fn of(id: &ChunkId) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        // A device id never contains a NUL byte, so the fields cannot run into each other.
        ctx.update(id.device.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(&id.boot.0);
        ctx.update(&id.first_seq.to_le_bytes());
        ctx.update(&id.last_seq.to_le_bytes());
        let mut k = [0u8; 16];
        k.copy_from_slice(&ctx.finish().as_ref()[..16]);
        Self(k)
    }
}

/// Parses an index object (JSON lines). Lines that do not parse are skipped and counted.
pub fn parse_index(bytes: &[u8]) -> (Vec<IndexEntry>, usize) {
    let mut bad = 0;
    let entries = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).map_err(|_| bad += 1).ok())
        .collect();
    (entries, bad)
}

/// Group-commit settings.
#[derive(Debug, Clone)]
pub struct SegmentConfig {
    /// Receiver name, part of every key (so N receivers never collide).
    pub receiver: String,
    /// Write the segment once it holds this many bytes.
    pub max_bytes: usize,
    /// Write the segment once its first chunk is this old.
    pub max_age: Duration,
    /// How many recent chunk identities to remember for deduplication.
    pub dedup_capacity: usize,
    /// How many hours of index objects to read back at start-up.
    pub recover_hours: u32,
    /// Test hook: abort the process at a named point (`after-segment-put`, `after-index-put`).
    pub fault: Option<String>,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            receiver: "r0".into(),
            max_bytes: 16 << 20,
            max_age: Duration::from_secs(1),
            dedup_capacity: 1_000_000,
            recover_hours: 2,
            fault: None,
        }
    }
}

/// What became of a submitted chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durably stored now, in this segment.
    Stored {
        /// Segment key.
        segment: String,
    },
    /// Already stored earlier (a retry); nothing was written.
    Duplicate,
}

/// Why a chunk could not be committed. The client should retry later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// Writing to the object store failed.
    #[error("object store write failed: {0}")]
    Store(String),
    /// The committer is shutting down.
    #[error("receiver is shutting down")]
    ShuttingDown,
}

type Reply = oneshot::Sender<Result<Outcome, CommitError>>;

struct Submit {
    chunk: Accepted,
    bytes: bytes::Bytes,
    /// The body budget this chunk's bytes hold; released once they are in the segment.
    budget: Option<OwnedSemaphorePermit>,
    done: Reply,
}

/// Handle to the committer task.
#[derive(Clone, Debug)]
pub struct Committer {
    tx: mpsc::Sender<Submit>,
    close: Arc<watch::Sender<bool>>,
    metrics: Arc<Metrics>,
}

/// A chunk handed to the committer: await [`Pending::outcome`] for its acknowledgement.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<Outcome, CommitError>>);

impl Pending {
    /// Waits until the chunk is durably stored (or recognised as already stored).
    pub async fn outcome(self) -> Result<Outcome, CommitError> {
        self.0.await.map_err(|_| CommitError::ShuttingDown)?
    }
}

impl Committer {
    /// Recovers recent identities from the store (re-indexing orphan segments), then starts the
    /// committer task. The returned join handle finishes after [`Committer::close`] (or once
    /// every handle is dropped) when the last segment is written.
    pub async fn start(
        store: Store,
        cfg: SegmentConfig,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        Self::start_with_metrics(store, cfg, Arc::default()).await
    }

    /// Like [`Committer::start`], counting into `metrics`.
    pub async fn start_with_metrics(
        store: Store,
        cfg: SegmentConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let recent = recover(&store, &cfg).await?;
        let (tx, rx) = mpsc::channel(4096);
        let (close, closed) = watch::channel(false);
        let task = tokio::spawn(run(store, cfg, rx, recent, closed, metrics.clone()));
        Ok((
            Self {
                tx,
                close: Arc::new(close),
                metrics,
            },
            task,
        ))
    }

    /// The counters this committer writes to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Hands a validated chunk to the committer, with the body budget its bytes hold. Waits
    /// only while the committer's queue is full.
    pub async fn enqueue(
        &self,
        chunk: Accepted,
        bytes: bytes::Bytes,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Result<Pending, CommitError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Submit {
                chunk,
                bytes,
                budget,
                done,
            })
            .await
            .map_err(|_| CommitError::ShuttingDown)?;
        Ok(Pending(rx))
    }

    /// Stops taking chunks: what is already queued is still written and answered, later
    /// submissions fail with [`CommitError::ShuttingDown`], then the last segment is written and
    /// the task ends.
    pub fn close(&self) {
        self.close.send_replace(true);
    }
}

/// Recently stored identities, bounded, oldest forgotten first.
struct Recent {
    set: HashSet<ChunkKey>,
    order: VecDeque<ChunkKey>,
    cap: usize,
}

impl Recent {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }
    fn insert(&mut self, id: ChunkKey) {
        if self.set.insert(id) {
            self.order.push_back(id);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
    fn contains(&self, id: &ChunkKey) -> bool {
        self.set.contains(id)
    }
}

/// Key prefix of the hour `t` falls in: `raw/YYYY-MM-DD/HH/`.
pub fn hour_prefix(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (y, m, d) = blackbox_protocol::time::civil_from_days(secs.div_euclid(86_400));
    format!(
        "raw/{y:04}-{m:02}-{d:02}/{:02}/",
        secs.rem_euclid(86_400) / 3600
    )
}

async fn recover(store: &Store, cfg: &SegmentConfig) -> anyhow::Result<Recent> {
    let mut recent = Recent::new(cfg.dedup_capacity);
    let now = SystemTime::now();
    for h in (0..=cfg.recover_hours).rev() {
        let prefix = hour_prefix(now - Duration::from_secs(3600 * u64::from(h)));
        let keys = store.list(&prefix).await?;
        let idx: HashSet<&str> = keys.iter().filter_map(|k| k.strip_suffix(".idx")).collect();
        for k in &keys {
            if k.ends_with(".idx") {
                let (entries, bad) = parse_index(&store.get(k).await?);
                if bad > 0 {
                    tracing::warn!(key = %k, bad, "index object has unreadable lines");
                }
                entries
                    .iter()
                    .filter_map(IndexEntry::chunk_id)
                    .for_each(|id| recent.insert(ChunkKey::of(&id)));
            } else if let Some(base) = k.strip_suffix(".seg.gz")
                && !idx.contains(base)
            {
                let entries = reindex(store, k).await?;
                tracing::warn!(segment = %k, chunks = entries.len(), "re-indexed a segment whose index was missing");
                entries
                    .iter()
                    .filter_map(IndexEntry::chunk_id)
                    .for_each(|id| recent.insert(ChunkKey::of(&id)));
            }
        }
    }
    tracing::info!(
        identities = recent.set.len(),
        "recovered recent chunk identities"
    );
    Ok(recent)
}

/// Rebuilds and writes the index of a segment from its chunks' headers. Writing it may fail
/// (a full disk): the receiver still knows the chunks, readers read the segment whole, and the
/// next start rebuilds the index again.
async fn reindex(store: &Store, seg_key: &str) -> anyhow::Result<Vec<IndexEntry>> {
    let bytes = store.get(seg_key).await?;
    let mut entries = Vec::new();
    for m in walk_members(&bytes) {
        let (off, h) = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(segment = %seg_key, error = %e, "segment is damaged; indexed up to the damage");
                break;
            }
        };
        let member = &bytes[off as usize..(off + h.member_len()) as usize];
        match Chunk::decode(member, &Limits::DEFAULT) {
            Ok(c) => entries.push(IndexEntry::of(&Accepted::of(&c), off, h.member_len())),
            Err(e) => {
                tracing::error!(segment = %seg_key, offset = off, error = %e, "chunk in segment does not decode")
            }
        }
    }
    let idx_key = format!("{}.idx", seg_key.trim_end_matches(".seg.gz"));
    if let Err(e) = store.put(&idx_key, index_bytes(&entries)).await {
        tracing::error!(
            key = %idx_key,
            error = %e,
            "cannot write a rebuilt index; the segment is read whole until the next start writes it"
        );
    }
    Ok(entries)
}

fn index_bytes(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 200);
    for e in entries {
        // Serialising a plain struct of strings and integers cannot fail.
        if serde_json::to_writer(&mut out, e).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

struct Open {
    bytes: Vec<u8>,
    entries: Vec<IndexEntry>,
    /// Per chunk: who waits for its acknowledgement, and whether that waiter sent a copy.
    waiters: HashMap<ChunkKey, Vec<(Reply, bool)>>,
    deadline: Option<Instant>,
}

impl Open {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            entries: Vec::new(),
            waiters: HashMap::new(),
            deadline: None,
        }
    }
}

async fn run(
    store: Store,
    cfg: SegmentConfig,
    mut rx: mpsc::Receiver<Submit>,
    mut recent: Recent,
    mut closed: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut open = Open::new();
    let mut closing = false;
    loop {
        let deadline = open.deadline;
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(s) => {
                    let key = ChunkKey::of(&s.chunk.id);
                    if recent.contains(&key) {
                        metrics.duplicate();
                        let _ = s.done.send(Ok(Outcome::Duplicate));
                        continue;
                    }
                    if let Some(w) = open.waiters.get_mut(&key) {
                        w.push((s.done, true));
                        continue;
                    }
                    // Write the open segment first if this chunk would take it over the limit,
                    // so a segment stays within its limit (unless one chunk alone is larger).
                    if !open.entries.is_empty() && open.bytes.len() + s.bytes.len() > cfg.max_bytes {
                        flush(&store, &cfg, &mut open, &mut recent, &metrics).await;
                    }
                    if open.bytes.capacity() == 0 {
                        open.bytes.reserve_exact(cfg.max_bytes.max(s.bytes.len()));
                    }
                    let offset = open.bytes.len() as u64;
                    open.bytes.extend_from_slice(&s.bytes);
                    open.entries.push(IndexEntry::of(&s.chunk, offset, s.bytes.len() as u64));
                    open.waiters.insert(key, vec![(s.done, false)]);
                    open.deadline.get_or_insert_with(|| Instant::now() + cfg.max_age);
                    // The bytes are in the segment now: give their budget back.
                    drop((s.bytes, s.budget));
                    if open.bytes.len() >= cfg.max_bytes {
                        flush(&store, &cfg, &mut open, &mut recent, &metrics).await;
                    }
                }
                None => {
                    flush(&store, &cfg, &mut open, &mut recent, &metrics).await;
                    return;
                }
            },
            _ = sleep_until(deadline), if deadline.is_some() => {
                flush(&store, &cfg, &mut open, &mut recent, &metrics).await;
            }
            _ = closed.changed(), if !closing => {
                // Refuse new submissions; those queued are still received, then `None` ends.
                closing = true;
                rx.close();
            }
        }
    }
}

async fn sleep_until(d: Option<Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn fault(cfg: &SegmentConfig, point: &str) {
    if cfg.fault.as_deref() == Some(point) {
        tracing::error!(point, "fault injection: aborting");
        std::process::abort();
    }
}

async fn flush(
    store: &Store,
    cfg: &SegmentConfig,
    open: &mut Open,
    recent: &mut Recent,
    metrics: &Metrics,
) {
    if open.entries.is_empty() {
        return;
    }
    let seg = std::mem::replace(open, Open::new());
    let base = format!(
        "{}{}-{}",
        hour_prefix(SystemTime::now()),
        cfg.receiver,
        ulid::Ulid::new()
    );
    let seg_key = format!("{base}.seg.gz");
    let started = Instant::now();
    let seg_len = seg.bytes.len();
    let result = store.put(&seg_key, seg.bytes).await;
    metrics.segment_put(started.elapsed(), seg_len, result.is_ok());
    if result.is_ok() {
        fault(cfg, "after-segment-put");
        // The segment is durable, so its chunks are acknowledged whatever happens to the
        // index: a missing index is rebuilt from the segment at the next start-up.
        let idx = index_bytes(&seg.entries);
        for attempt in 1..=3 {
            match store.put(&format!("{base}.idx"), idx.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(segment = %seg_key, attempt, error = %e, "index write failed")
                }
            }
        }
        fault(cfg, "after-index-put");
    }
    match result {
        Ok(()) => {
            tracing::debug!(segment = %seg_key, chunks = seg.entries.len(), ms = started.elapsed().as_millis() as u64, "segment stored");
            metrics.stored(seg.entries.len());
            for (id, waiters) in seg.waiters {
                recent.insert(id);
                for (w, dup) in waiters {
                    let o = if dup {
                        metrics.duplicate();
                        Outcome::Duplicate
                    } else {
                        Outcome::Stored {
                            segment: seg_key.clone(),
                        }
                    };
                    let _ = w.send(Ok(o));
                }
            }
        }
        Err(e) => {
            tracing::error!(segment = %seg_key, error = %e, "segment write failed; chunks not acknowledged");
            let err = CommitError::Store(e.to_string());
            for (w, _) in seg.waiters.into_values().flatten() {
                let _ = w.send(Err(err.clone()));
            }
        }
    }
}
