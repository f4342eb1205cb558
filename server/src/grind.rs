//! `blackbox-server grind`: follows the store, applies the rules to every new line, writes
//! structured events back into the store, and counts them for `/metrics`.
//!
//! **Events** are NDJSON, gzip-compressed, one object per source object:
//! `events/YYYY-MM-DD/HH/<source name>.ndjson.gz` (the source's ingest hour and name), one line
//! per event: `{"name","labels":{…},"device","boot","seq","ts","wall_us","level","msg"}`.
//! DuckDB (`read_json('events/*/*/*.ndjson.gz')`), Trino (Hive JSON tables), Spark
//! (`spark.read.json`) and `zcat | jq` read them as they are. NDJSON rather than Parquet: the
//! grinder writes small objects every second (Parquet's footer and column chunks cost more
//! than a small file's data, and the arrow/parquet crates would double the server's build),
//! and the raw segments already are gzip NDJSON, so one toolchain reads both.
//!
//! **Exactly once.** The output key is a function of the source, so grinding a source again
//! overwrites the same object. The checkpoint object (`grind/checkpoint.json`) holds, per open
//! ingest hour, the sources done, and the identities (device, boot, sequence runs) already
//! ground, so a duplicate record in a later object yields no second event. It is written
//! *after* the events it covers; a grinder killed anywhere restarts from the last checkpoint
//! with exactly the state that produced what is stored after it, and grinds the same sources
//! again into the same keys. An hour is closed (dropped from the checkpoint) once it is
//! `--close-after` past its end and every source in it is done.
//!
//! **Compaction** replaces an hour's raw segments by compacted objects: when the manifest's
//! inputs were all ground, its outputs count as ground; otherwise they are ground with the
//! identities already seen dropped. A day roll-up's outputs are sources of the day's last hour
//! (events `…/23/day-<name>.ndjson.gz`) and count as ground the same way: when every object
//! its manifest replaced was (in a closed hour, or done in its open one).
//!
//! **Re-grinding** (`--from DATE` with a fresh checkpoint) starts at DATE's hour and deletes an
//! hour's old events before grinding it again (recorded in the checkpoint, so a restart does
//! not delete what it has just written).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use blackbox_protocol::Limits;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::dedup::{Overlap, Runs, Seen};
use crate::lease::{LockLost, Scope, StoreLock};
use crate::reader::{self, Decoded, Filter, Member, Shard, Source, SourceRead, get_opt};
use crate::reducer::{Reducer, SeriesKey};
use crate::rules::{Hit, Rules};
use crate::scan;
use crate::store::Store;
use crate::timespec::{HOUR_US, hour_of, hour_path, now_us, rfc3339};

/// One structured event: the shape of an events line. The grinder writes the lines itself
/// ([`grind_chunk`]), byte for byte as `serde_json` writes this struct; readers parse them into it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Event {
    /// The rule's name.
    pub name: String,
    /// Fixed labels and captures.
    pub labels: BTreeMap<String, String>,
    /// Device id.
    pub device: String,
    /// Boot id.
    pub boot: String,
    /// Sequence number of the line.
    pub seq: u64,
    /// Wall time, RFC 3339.
    pub ts: String,
    /// Wall time, µs since the epoch.
    pub wall_us: i64,
    /// Syslog severity of the line.
    pub level: u8,
    /// The line's message.
    pub msg: String,
}

/// Grinder settings.
#[derive(Debug, Clone)]
pub struct GrindConfig {
    /// Rules file (`None`: the built-in rules). Re-read when it changes.
    pub rules_path: Option<PathBuf>,
    /// Where events go.
    pub events_prefix: String,
    /// The checkpoint object.
    pub checkpoint_key: String,
    /// How often to look for new objects.
    pub poll: Duration,
    /// Write the checkpoint at most this often (and at exit).
    pub checkpoint_every: Duration,
    /// An hour is closed this long after its end (µs): receivers' clocks and slow writes.
    pub close_after_us: i64,
    /// Identities are remembered this many hours after last seen.
    pub dedup_hours: i64,
    /// Start (or restart) at this hour with a fresh checkpoint: re-grind history.
    pub from_hour: Option<i64>,
    /// Exit once every object present is ground.
    pub once: bool,
    /// Objects read and ground at once.
    pub parallel: usize,
    /// A source larger than this (compressed bytes) is read and ground in pieces of about
    /// this size, so the grinder holds `parallel` pieces rather than whole objects.
    pub piece_bytes: u64,
    /// Test hook: abort at a named point (`after-events-put`, `after-checkpoint`), after it
    /// was passed this many times.
    pub fault: Option<(String, u64)>,
    /// How long the checkpoint's lock lasts unless extended ([`crate::lease`]): one grinder
    /// per checkpoint grinds, the others wait. `None`: no lock (the caller makes sure).
    pub lock_ttl: Option<Duration>,
    /// Grind only the devices of this shard ([`Shard`]): its events objects carry the shard
    /// in their names, and it needs a checkpoint of its own.
    pub shard: Option<Shard>,
}

impl Default for GrindConfig {
    fn default() -> Self {
        Self {
            rules_path: None,
            events_prefix: "events/".into(),
            checkpoint_key: "grind/checkpoint.json".into(),
            poll: Duration::from_millis(250),
            checkpoint_every: Duration::from_secs(1),
            close_after_us: 300_000_000,
            dedup_hours: 24,
            from_hour: None,
            once: false,
            parallel: std::thread::available_parallelism().map_or(2, |n| n.get()),
            piece_bytes: reader::PIECE_BYTES,
            fault: None,
            lock_ttl: Some(Duration::from_secs(60)),
            shard: None,
        }
    }
}

/// What the grinder has done: written to the store after the events it covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version (1).
    pub version: u32,
    /// Every hour before this one is finished.
    pub next_hour: i64,
    /// Open hours (`next_hour` and later): what is done in each.
    pub hours: BTreeMap<i64, HourState>,
    /// Identities ground recently.
    pub seen: Vec<SeenEntry>,
    /// The shard (`K/N`) whose devices it covers; absent: all devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

/// One open hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourState {
    /// Its old events were deleted (done once, when the hour is first ground).
    pub cleared: bool,
    /// Sources ground.
    pub done: BTreeSet<String>,
}

/// The runs of one (device, boot) and the last hour they grew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenEntry {
    /// Device.
    pub device: String,
    /// Boot.
    pub boot: String,
    /// Ingest hour of the last object that had its lines.
    pub hour: i64,
    /// Sequence numbers ground.
    pub runs: Runs,
}

/// The lines of one chunk that matched, before deduplication (the parallel part of grinding).
#[derive(Debug)]
pub struct GroundChunk {
    /// Device.
    pub device: String,
    /// Boot.
    pub boot: String,
    /// Every sequence number in the chunk, in order.
    pub seqs: Vec<u64>,
    /// The events as NDJSON lines, back to back, in line order: what [`events_bytes`] takes.
    pub ndjson: Vec<u8>,
    /// One per event, in the same order.
    pub events: Vec<EventMeta>,
    /// The metric series the events count in, each once ([`EventMeta::series`] indexes it).
    pub series: Vec<SeriesKey>,
    /// Lines that did not parse.
    pub bad_lines: u64,
}

/// What the grinder keeps of one event besides its line.
#[derive(Debug)]
pub struct EventMeta {
    /// Sequence number of the line.
    pub seq: u64,
    /// Wall time, µs since the epoch.
    pub wall_us: i64,
    /// Its NDJSON line (with the `\n`) in [`GroundChunk::ndjson`].
    pub line: std::ops::Range<usize>,
    /// The metric series it counts in: its index in [`GroundChunk::series`].
    pub series: usize,
}

/// Applies the rules to every line of a chunk and writes the events' lines.
pub fn grind_chunk(c: &Decoded, rules: &Rules) -> GroundChunk {
    let mut g = GroundChunk {
        device: c.header.id.device.to_string(),
        boot: c.boot.clone(),
        seqs: Vec::with_capacity(c.header.record_count as usize),
        ndjson: Vec::new(),
        events: Vec::new(),
        series: Vec::new(),
        bad_lines: 0,
    };
    // The fields every event of the chunk shares, escaped once.
    let mut shared = Vec::new();
    shared.extend_from_slice(b",\"device\":\"");
    json_str(&mut shared, g.device.as_bytes());
    shared.extend_from_slice(b"\",\"boot\":\"");
    json_str(&mut shared, g.boot.as_bytes());
    shared.extend_from_slice(b"\",\"seq\":");
    let mut fields = Vec::with_capacity(c.header.record_count as usize);
    for text in c.lines() {
        match scan::scan(text) {
            Some(f) => {
                g.seqs.push(f.seq);
                fields.push(f);
            }
            None => g.bad_lines += 1,
        }
    }
    let msgs: Vec<&[u8]> = fields.iter().map(|f| f.msg.as_bytes()).collect();
    let (ndjson, events, series) = (&mut g.ndjson, &mut g.events, &mut g.series);
    // Series by rule: the places in `series` of each rule's series met so far.
    let mut by_rule: Vec<Vec<usize>> = vec![Vec::new(); rules.len()];
    rules.for_each_match(&msgs, |i, h| {
        let Some(f) = fields.get(i) else {
            return;
        };
        let wall_us = c.header.sync.wall_of(f.mono_us);
        let start = ndjson.len();
        write_event(ndjson, &h, &shared, f.seq, wall_us, f.level, &f.msg);
        let Some(known) = by_rule.get_mut(h.index) else {
            return;
        };
        let same = |k: &usize| {
            series.get(*k).is_some_and(|(_, labels): &SeriesKey| {
                labels
                    .iter()
                    .all(|(name, v)| h.label(name).unwrap_or_default() == v.as_str())
            })
        };
        let at = match known.iter().copied().find(same) {
            Some(k) => k,
            None => {
                let rule = h.rule;
                series.push((
                    rule.name.clone(),
                    rule.metric_labels
                        .iter()
                        .map(|k| (k.clone(), h.label(k).unwrap_or_default().into_owned()))
                        .collect(),
                ));
                known.push(series.len() - 1);
                series.len() - 1
            }
        };
        events.push(EventMeta {
            seq: f.seq,
            wall_us,
            line: start..ndjson.len(),
            series: at,
        });
    });
    g
}

/// Appends one event's NDJSON line: the fields of [`Event`] in its order, escaped as
/// `serde_json` escapes them. `shared` is `,"device":"…","boot":"…","seq":`.
fn write_event(
    out: &mut Vec<u8>,
    h: &Hit<'_, '_>,
    shared: &[u8],
    seq: u64,
    wall_us: i64,
    level: u8,
    msg: &str,
) {
    out.extend_from_slice(b"{\"name\":\"");
    json_str(out, h.rule.name.as_bytes());
    out.extend_from_slice(b"\",\"labels\":{");
    for (i, (k, v)) in h.labels().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        json_str(out, k.as_bytes());
        out.extend_from_slice(b"\":\"");
        json_str(out, v.as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
    out.extend_from_slice(shared);
    write_u64(out, seq);
    out.extend_from_slice(b",\"ts\":\"");
    write_ts(out, wall_us);
    out.extend_from_slice(b"\",\"wall_us\":");
    write_i64(out, wall_us);
    out.extend_from_slice(b",\"level\":");
    write_u64(out, level.into());
    out.extend_from_slice(b",\"msg\":\"");
    json_str(out, msg.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

/// Appends the body of a JSON string holding `s` (UTF-8), escaped as `serde_json` escapes:
/// `"` and `\\`, `\b \f \n \r \t`, other control characters as `\u00XX`; nothing else.
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    let special = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    // Most messages need no escape: one pass that the compiler vectorises, then one copy.
    if !s.iter().fold(false, |any, &b| any | special(b)) {
        out.extend_from_slice(s);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        if !special(b) {
            continue;
        }
        out.extend_from_slice(&s[start..i]);
        start = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
    }
    out.extend_from_slice(&s[start..]);
}

/// Appends an unsigned integer in decimal.
fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let len = n.checked_ilog10().map_or(1, |l| l as usize + 1);
    let mut digits = [0u8; 20];
    for d in digits.iter_mut().take(len).rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    // A copy of fixed length is a few moves where one of the number's length is a call.
    let at = out.len();
    out.extend_from_slice(&digits);
    out.truncate(at + len);
}

/// Appends a signed integer in decimal.
fn write_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    write_u64(out, v.unsigned_abs());
}

/// Appends `wall_us` as RFC 3339, as [`rfc3339`] writes it, without formatting machinery.
fn write_ts(out: &mut Vec<u8>, wall_us: i64) {
    let secs = wall_us.div_euclid(1_000_000);
    let micros = wall_us.rem_euclid(1_000_000);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = blackbox_protocol::time::civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&y) {
        out.extend_from_slice(rfc3339(wall_us).as_bytes());
        return;
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y as u64);
    put(5, 2, m.into());
    put(8, 2, d.into());
    put(11, 2, (sod / 3600) as u64);
    put(14, 2, (sod / 60 % 60) as u64);
    put(17, 2, (sod % 60) as u64);
    put(20, 6, micros as u64);
    out.extend_from_slice(&b);
}

/// A source read and ground (before deduplication).
#[derive(Debug)]
struct Ground {
    read: SourceRead,
    chunks: Vec<GroundChunk>,
    inflated: u64,
    /// All the events of `chunks` gzipped, one gzip member (empty when there are none).
    gz: Vec<u8>,
}

impl Ground {
    /// Events in its chunks.
    fn events(&self) -> usize {
        self.chunks.iter().map(|c| c.events.len()).sum()
    }
}

/// Inflates and grinds the chunks of a read ([`grind_members`]), and gzips all their events
/// as one gzip member, here on the grinding threads: deduplication (in order, afterwards)
/// almost always keeps them all, and then takes the member as it is.
fn grind_read(mut read: SourceRead, rules: &Rules, limits: &Limits, filter: &Filter) -> Ground {
    let mut members = std::mem::take(&mut read.members);
    // An object read whole (no index) holds other shards' devices too: leave them out by
    // their headers, before inflating.
    if filter.shard.is_some() || filter.devices.is_some() {
        members.retain(|m| {
            blackbox_protocol::ChunkHeader::parse(&m.bytes)
                .map_or(true, |h| filter.wants_device(h.id.device.as_str()))
        });
    }
    let (chunks, inflated) = grind_members(members, rules, limits, &mut read.problems);
    let mut g = Ground {
        read,
        chunks,
        inflated,
        gz: Vec::new(),
    };
    if g.events() > 0 {
        g.gz = events_bytes(g.chunks.iter().map(|c| c.ndjson.as_slice()));
    }
    g
}

/// Inflates and grinds chunks one by one, each into the same buffer while its text is in the
/// cache. A chunk that does not decode is a problem. Returns the ground chunks and the bytes
/// inflated.
pub fn grind_members(
    members: Vec<Member>,
    rules: &Rules,
    limits: &Limits,
    problems: &mut Vec<String>,
) -> (Vec<GroundChunk>, u64) {
    let mut buf = Vec::new();
    let mut chunks = Vec::with_capacity(members.len());
    let mut inflated = 0;
    for m in members {
        match m.decode(limits, std::mem::take(&mut buf)) {
            Ok(d) => {
                chunks.push(grind_chunk(&d, rules));
                inflated += d.raw.len() as u64;
                buf = d.raw;
            }
            Err(e) => problems.push(e),
        }
    }
    (chunks, inflated)
}

/// Where the events of a source go: `…/<source name>.ndjson.gz`, or for a shard's grinder
/// `…/<source name>.shard-K-of-N.ndjson.gz` (each shard writes the events of its devices).
pub fn events_key(prefix: &str, src: &Source, shard: Option<Shard>) -> String {
    let name = src.key.rsplit('/').next().unwrap_or(&src.key);
    let name = name.strip_suffix(".seg.gz").unwrap_or(name);
    // A day roll-up's outputs are named like an hour's: keep their events apart.
    let day = if reader::is_day_key(&src.key) {
        "day-"
    } else {
        ""
    };
    let part = shard.map_or(String::new(), |s| {
        format!(".shard-{}-of-{}", s.index, s.count)
    });
    format!(
        "{prefix}{}/{day}{name}{part}.ndjson.gz",
        hour_path(src.hour)
    )
}

/// Is `key` an events object of `shard`'s grinder (`None`: of an unsharded one)?
pub fn is_shards_events(key: &str, shard: Option<Shard>) -> bool {
    let Some(stem) = key.strip_suffix(".ndjson.gz") else {
        return false;
    };
    let of_shard = stem.rsplit_once(".shard-").and_then(|(_, p)| {
        let (k, n) = p.split_once("-of-")?;
        Some(Shard {
            index: k.parse().ok()?,
            count: n.parse().ok()?,
        })
    });
    of_shard == shard
}

/// Was the object at `key` ground (its hour closed, or the object done in it)?
fn was_ground(ckpt: &Checkpoint, key: &str) -> bool {
    match reader::key_hour(key) {
        Some(h) if h < ckpt.next_hour => true,
        Some(h) => ckpt.hours.get(&h).is_some_and(|s| s.done.contains(key)),
        None => false,
    }
}

/// Gzip of NDJSON lines given in a few large parts (each chunk's [`GroundChunk::ndjson`], or
/// runs of it), compressed in large writes: tiny writes into the encoder cost more than
/// everything else the grinder does. Level 1 (zlib-rs's quick deflate) compresses the events
/// about 11 to 1 at about 1 GB/s; level 2 makes them 23 % smaller at 1.4 times the time, level 6
/// 35 % smaller at five times the time (measured on the bench's events).
pub fn events_bytes<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    use std::io::Write;
    let parts: Vec<&[u8]> = parts.into_iter().collect();
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(len / 8 + 64),
        flate2::Compression::fast(),
    );
    for p in parts {
        // Writing into memory cannot fail.
        let _ = enc.write_all(p);
    }
    enc.finish().unwrap_or_default()
}

/// Names the rules that run on every line (no literal prefilter applies to them).
fn warn_unfiltered(rules: &Rules) {
    let names: Vec<&str> = rules.unfiltered().map(|r| r.name.as_str()).collect();
    if !names.is_empty() {
        tracing::warn!(
            rules = ?names,
            "these rules require no literal of 3 bytes or more, so they run on every line and cost far more than the others"
        );
    }
}

/// The rules file, re-read when it changes; a file that does not compile is reported and the
/// previous rules stay.
#[derive(Debug)]
pub struct RulesWatch {
    path: Option<PathBuf>,
    text: String,
    current: Arc<Rules>,
}

impl RulesWatch {
    /// Loads the rules (the built-in ones without a path). An error at start is fatal.
    pub fn load(path: Option<PathBuf>) -> anyhow::Result<Self> {
        let text = match &path {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
            }
            None => crate::rules::DEFAULT_RULES.to_owned(),
        };
        let rules = Rules::parse(&text).with_context(|| match &path {
            Some(p) => format!("rules file {}", p.display()),
            None => "built-in rules".into(),
        })?;
        warn_unfiltered(&rules);
        Ok(Self {
            path,
            text,
            current: Arc::new(rules),
        })
    }

    /// The rules in force, after reloading them if the file changed.
    pub fn current(&mut self) -> Arc<Rules> {
        if let Some(p) = &self.path {
            match std::fs::read_to_string(p) {
                Ok(t) if t != self.text => {
                    match Rules::parse(&t) {
                        Ok(r) => {
                            tracing::info!(rules = r.len(), file = %p.display(), "rules reloaded");
                            warn_unfiltered(&r);
                            self.current = Arc::new(r);
                        }
                        Err(e) => {
                            tracing::error!(file = %p.display(), error = %e, "rules file does not compile; keeping the previous rules")
                        }
                    }
                    self.text = t;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "cannot read the rules file; keeping the previous rules")
                }
            }
        }
        self.current.clone()
    }
}

/// The grinder's state between steps.
pub struct Grinder {
    store: Store,
    cfg: GrindConfig,
    ckpt: Checkpoint,
    seen: Seen,
    stamps: HashMap<(String, String), i64>,
    dirty: bool,
    saved_at: Instant,
    faults_passed: u64,
    reducer: Arc<Reducer>,
    /// The checkpoint's lock, checked before every write.
    lock: Option<Arc<StoreLock>>,
}

impl std::fmt::Debug for Grinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grinder")
            .field("next_hour", &self.ckpt.next_hour)
            .finish()
    }
}

impl Grinder {
    /// Loads the checkpoint (or starts one at `--from`, or at the current hour).
    pub async fn open(
        store: Store,
        cfg: GrindConfig,
        reducer: Arc<Reducer>,
    ) -> anyhow::Result<Self> {
        let mine = cfg.shard.map(|s| s.to_string());
        let stored = retry_store(
            !cfg.once,
            &reducer,
            "cannot read the checkpoint",
            async || get_opt(&store, &cfg.checkpoint_key).await,
        )
        .await?;
        let ckpt = match (cfg.from_hour, stored) {
            (Some(h), _) => {
                tracing::info!(from = %hour_path(h), "grinding again from this hour with a fresh checkpoint");
                Checkpoint {
                    version: 1,
                    next_hour: h,
                    shard: mine.clone(),
                    ..Default::default()
                }
            }
            (None, Some(bytes)) => serde_json::from_slice::<Checkpoint>(&bytes).with_context(|| {
                format!(
                    "checkpoint {} is damaged; start again with --from DATE (events from DATE on are re-ground)",
                    cfg.checkpoint_key
                )
            })?,
            (None, None) => Checkpoint {
                version: 1,
                next_hour: hour_of(now_us()),
                shard: mine.clone(),
                ..Default::default()
            },
        };
        if ckpt.shard != mine {
            let of = |s: &Option<String>| {
                s.as_ref()
                    .map_or("all devices".into(), |s| format!("shard {s}"))
            };
            anyhow::bail!(
                "checkpoint {} covers {}, but this grinder grinds {}: give it its own --checkpoint \
                 (the default for --shard K/N is grind/checkpoint.shard-K-of-N.json)",
                cfg.checkpoint_key,
                of(&ckpt.shard),
                of(&mine)
            );
        }
        let mut seen = Seen::default();
        let mut stamps = HashMap::new();
        for e in &ckpt.seen {
            seen.restore(e.device.clone(), e.boot.clone(), e.runs.clone());
            stamps.insert((e.device.clone(), e.boot.clone()), e.hour);
        }
        tracing::info!(next_hour = %hour_path(ckpt.next_hour), open_hours = ckpt.hours.len(), identities = seen.len(), "grinder starting");
        let dirty = cfg.from_hour.is_some();
        Ok(Self {
            store,
            cfg,
            ckpt,
            seen,
            stamps,
            dirty,
            saved_at: Instant::now(),
            faults_passed: 0,
            reducer,
            lock: None,
        })
    }

    /// Before a write: is the checkpoint's lock still this grinder's? (Asks the store at most
    /// every quarter of the lease, and extends the lease.)
    async fn keep_lock(&self) -> anyhow::Result<()> {
        match &self.lock {
            Some(l) => l.keep(&self.store).await,
            None => Ok(()),
        }
    }

    fn fault(&mut self, point: &str) {
        if let Some((p, after)) = &self.cfg.fault
            && p == point
        {
            self.faults_passed += 1;
            if self.faults_passed > *after {
                tracing::error!(point, "fault injection: aborting");
                std::process::abort();
            }
        }
    }

    /// Writes the checkpoint.
    pub async fn save(&mut self) -> anyhow::Result<()> {
        let mut seen: Vec<SeenEntry> = self
            .seen
            .iter()
            .map(|((d, b), runs)| SeenEntry {
                device: d.clone(),
                boot: b.clone(),
                hour: self
                    .stamps
                    .get(&(d.clone(), b.clone()))
                    .copied()
                    .unwrap_or(self.ckpt.next_hour),
                runs: runs.clone(),
            })
            .collect();
        seen.sort_by(|a, b| (&a.device, &a.boot).cmp(&(&b.device, &b.boot)));
        self.ckpt.seen = seen;
        self.keep_lock().await?;
        let bytes = serde_json::to_vec(&self.ckpt)?;
        self.ckpt.seen = Vec::new();
        self.store
            .put(&self.cfg.checkpoint_key, bytes)
            .await
            .with_context(|| format!("writing checkpoint {}", self.cfg.checkpoint_key))?;
        self.dirty = false;
        self.saved_at = Instant::now();
        self.fault("after-checkpoint");
        Ok(())
    }

    async fn save_if_due(&mut self) -> anyhow::Result<()> {
        if self.dirty && self.saved_at.elapsed() >= self.cfg.checkpoint_every {
            self.save().await?;
        }
        Ok(())
    }

    /// Drops duplicates (by identity) from a piece of a source: what the grinder has seen, and
    /// what `local` (the source's earlier pieces) holds. Returns its events in order, each with
    /// the chunk whose `ndjson` holds its line, and adds its identities to `local` (they join
    /// the seen ones when the whole source is done).
    fn dedupe_piece<'g>(
        &mut self,
        g: &'g Ground,
        local: &mut Seen,
    ) -> Vec<(&'g GroundChunk, &'g EventMeta)> {
        let mut out = Vec::new();
        for c in &g.chunks {
            self.stamps
                .insert((c.device.clone(), c.boot.clone()), g.read.source.hour);
            let (Some(&lo), Some(&hi)) = (c.seqs.iter().min(), c.seqs.iter().max()) else {
                continue;
            };
            let seen = self.seen.get(&c.device, &c.boot);
            let runs = local.runs(&c.device, &c.boot);
            let before = seen.map_or(Overlap::None, |r| r.overlap(lo, hi));
            match (before, runs.overlap(lo, hi)) {
                (Overlap::All, _) | (_, Overlap::All) => {}
                (Overlap::None, Overlap::None) => {
                    for &s in &c.seqs {
                        runs.insert_run(s, s);
                    }
                    out.extend(c.events.iter().map(|e| (c, e)));
                }
                _ => {
                    let mut new = BTreeSet::new();
                    for &s in &c.seqs {
                        if !seen.is_some_and(|r| r.contains(s)) && runs.insert(s) {
                            new.insert(s);
                        }
                    }
                    out.extend(
                        c.events
                            .iter()
                            .filter(|e| new.contains(&e.seq))
                            .map(|e| (c, e)),
                    );
                }
            }
        }
        out
    }

    /// Counts the events of objects already ground in the last hour into the reducer's wall-time
    /// windows, so the window gauges are right after a restart. Only objects the checkpoint
    /// calls done count: the others are ground (and counted) again.
    pub async fn seed_windows(&self, rules: &Rules) -> anyhow::Result<()> {
        let mut labels: HashMap<&str, &[String]> = HashMap::new();
        for r in rules.rules() {
            labels
                .entry(r.name.as_str())
                .or_insert(r.metric_labels.as_slice());
        }
        let now = now_us();
        let mut seeded = 0;
        for hour in hour_of(now - HOUR_US) - 1..=hour_of(now) {
            let done: Option<BTreeSet<String>> = match self.ckpt.hours.get(&hour) {
                Some(h) => Some(
                    h.done
                        .iter()
                        .map(|k| {
                            let src = Source {
                                key: k.clone(),
                                hour,
                                device: None,
                            };
                            events_key(&self.cfg.events_prefix, &src, self.cfg.shard)
                        })
                        .collect(),
                ),
                None if hour < self.ckpt.next_hour => None,
                None => continue,
            };
            let prefix = format!("{}{}/", self.cfg.events_prefix, hour_path(hour));
            for key in self.store.list(&prefix).await? {
                if done.as_ref().is_some_and(|d| !d.contains(&key))
                    || !is_shards_events(&key, self.cfg.shard)
                {
                    continue;
                }
                let Some(bytes) = get_opt(&self.store, &key).await? else {
                    continue;
                };
                let mut text = String::new();
                if let Err(e) = std::io::Read::read_to_string(
                    &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
                    &mut text,
                ) {
                    tracing::warn!(key, error = %e, "events object does not decompress; not counted");
                    continue;
                }
                for line in text.lines() {
                    let Ok(e) = serde_json::from_str::<Event>(line) else {
                        tracing::warn!(key, "an events line does not parse; not counted");
                        continue;
                    };
                    let keep = labels.get(e.name.as_str()).copied().unwrap_or_default();
                    let series = (
                        e.name.clone(),
                        keep.iter()
                            .map(|k| (k.clone(), e.labels.get(k).cloned().unwrap_or_default()))
                            .collect(),
                    );
                    self.reducer.seed(series, e.wall_us);
                    seeded += 1;
                }
            }
        }
        tracing::info!(
            events = seeded,
            "wall-time windows seeded from the last hour's events"
        );
        Ok(())
    }

    async fn clear_hour(&mut self, hour: i64) -> anyhow::Result<()> {
        let prefix = format!("{}{}/", self.cfg.events_prefix, hour_path(hour));
        // This grinder's own events only: other shards' stay.
        let mut old = self.store.list(&prefix).await?;
        old.retain(|k| is_shards_events(k, self.cfg.shard));
        self.keep_lock().await?;
        for k in &old {
            reader::delete(&self.store, k).await?;
        }
        if !old.is_empty() {
            tracing::info!(hour = %hour_path(hour), objects = old.len(), "deleted the hour's old events before grinding it again");
        }
        self.ckpt.hours.entry(hour).or_default().cleared = true;
        self.save().await
    }

    /// Grinds everything new in the open hours. Returns true when nothing was left to do.
    pub async fn step(&mut self, rules: &Arc<Rules>) -> anyhow::Result<bool> {
        let now = now_us();
        let current = hour_of(now);
        let mut idle = true;
        let mut hour = self.ckpt.next_hour;
        while hour <= current {
            let plan = reader::hour_plan(&self.store, hour).await?;
            let (sources, manifest) = (plan.sources, plan.manifest);
            if !self.ckpt.hours.get(&hour).is_some_and(|h| h.cleared) {
                self.clear_hour(hour).await?;
            }
            let day_ground = plan
                .day
                .filter(|_| hour == reader::last_hour(crate::timespec::day_of_hour(hour)))
                .filter(|d| d.inputs.iter().all(|k| was_ground(&self.ckpt, k)));
            let state = self.ckpt.hours.entry(hour).or_default();
            if let Some(m) = &manifest
                && m.inputs.iter().all(|k| state.done.contains(k))
            {
                for o in &m.outputs {
                    if state.done.insert(o.clone()) {
                        self.dirty = true;
                    }
                }
            }
            if let Some(d) = day_ground {
                for o in d.outputs {
                    if state.done.insert(o) {
                        self.dirty = true;
                    }
                }
            }
            let todo: Vec<Source> = sources
                .into_iter()
                .filter(|s| !state.done.contains(&s.key))
                .collect();
            if !todo.is_empty() {
                idle = false;
            }
            let pending = todo.len();
            let done = self.grind_sources(todo, rules).await?;
            let closable = hour == self.ckpt.next_hour
                && hour < current
                && now >= (hour + 1) * HOUR_US + self.cfg.close_after_us
                && done == pending;
            if closable {
                self.ckpt.hours.remove(&hour);
                self.ckpt.next_hour = hour + 1;
                self.dirty = true;
                let cutoff = hour - self.cfg.dedup_hours;
                let stale: BTreeSet<(String, String)> = self
                    .stamps
                    .iter()
                    .filter(|(_, h)| **h < cutoff)
                    .map(|(k, _)| k.clone())
                    .collect();
                self.seen.retain(|k| !stale.contains(k));
                self.stamps.retain(|k, _| !stale.contains(k));
                tracing::info!(hour = %hour_path(hour), "hour closed");
            }
            hour += 1;
        }
        self.save_if_due().await?;
        Ok(idle)
    }

    /// Reads, grinds and gzips `todo` (`parallel` pieces at a time, a large source in pieces
    /// of `piece_bytes`), then in order: drops duplicates (a piece that had some is gzipped
    /// again without them), appends each piece's gzip member, and when a source's last piece is
    /// done writes its events object, counts them and marks the source done. Returns how many
    /// were done (vanished ones are not: nothing of them counts).
    async fn grind_sources(
        &mut self,
        todo: Vec<Source>,
        rules: &Arc<Rules>,
    ) -> anyhow::Result<usize> {
        let store = self.store.clone();
        let filter = Filter {
            shard: self.cfg.shard,
            ..Filter::all()
        };
        let limits = Limits::DEFAULT;
        let parallel = self.cfg.parallel.max(1);
        let mut stream =
            reader::read_pieces(&store, &todo, &filter, None, parallel, self.cfg.piece_bytes)
                .map(|read| {
                    let (rules, filter) = (rules.clone(), filter.clone());
                    async move {
                        let read = read?;
                        let ground = tokio::task::spawn_blocking(move || {
                            grind_read(read, &rules, &limits, &filter)
                        })
                        .await?;
                        anyhow::Ok(ground)
                    }
                })
                .buffered(parallel);
        let mut done = 0;
        let mut source: Option<SourceGrind> = None;
        while let Some(g) = stream.next().await {
            let g = g?;
            for p in &g.read.problems {
                tracing::error!("{p}");
            }
            let sg = source.get_or_insert_with(SourceGrind::default);
            sg.problems += g.read.problems.len() as u64;
            if g.read.vanished {
                sg.vanished = true;
            } else if !sg.vanished {
                let events = self.dedupe_piece(&g, &mut sg.seen);
                if events.len() == g.events() {
                    sg.events.extend_from_slice(&g.gz);
                } else if !events.is_empty() {
                    // Duplicates dropped: gzip what is left.
                    sg.events
                        .extend_from_slice(&events_bytes(event_lines(&events)));
                }
                sg.counts.events(
                    events
                        .iter()
                        .filter_map(|(c, e)| Some((c.series.get(e.series)?, e.wall_us))),
                );
                sg.lines += g.chunks.iter().map(|c| c.seqs.len() as u64).sum::<u64>();
                sg.bad += g.chunks.iter().map(|c| c.bad_lines).sum::<u64>();
                sg.inflated += g.inflated;
            }
            if !g.read.last {
                continue;
            }
            let Some(sg) = source.take() else { continue };
            let src = &g.read.source;
            if sg.vanished {
                tracing::info!(key = %src.key, "object compacted away before it was ground; its hour is planned again");
                continue;
            }
            if !sg.events.is_empty() {
                let key = events_key(&self.cfg.events_prefix, src, self.cfg.shard);
                self.keep_lock().await?;
                self.store
                    .put(&key, sg.events)
                    .await
                    .with_context(|| format!("writing events {key}"))?;
                self.fault("after-events-put");
            }
            self.seen.absorb(sg.seen);
            self.reducer.absorb(sg.counts);
            self.reducer.object(
                sg.lines,
                sg.inflated,
                sg.bad + sg.problems,
                stored_at(&src.key).map(|t| now_us() - t),
            );
            self.ckpt
                .hours
                .entry(src.hour)
                .or_default()
                .done
                .insert(src.key.clone());
            self.dirty = true;
            done += 1;
            self.save_if_due().await?;
        }
        Ok(done)
    }
}

/// A source being ground, piece by piece: what its pieces gave so far.
#[derive(Default)]
struct SourceGrind {
    /// Its events' lines, gzipped as its pieces come: one gzip member per piece with events
    /// (zcat, DuckDB and every gzip reader read members back to back as one stream).
    events: Vec<u8>,
    /// Its identities (not yet among the grinder's seen ones).
    seen: Seen,
    /// Its events' counts (not yet in the grinder's reducer).
    counts: Reducer,
    lines: u64,
    bad: u64,
    problems: u64,
    inflated: u64,
    /// A piece found the object gone: nothing of it counts.
    vanished: bool,
}

/// The lines of `events` as few slices as possible: runs of events adjacent in one chunk's
/// `ndjson` are one slice.
fn event_lines<'g>(events: &[(&'g GroundChunk, &'g EventMeta)]) -> Vec<&'g [u8]> {
    let mut out = Vec::new();
    let mut run: Option<(&GroundChunk, std::ops::Range<usize>)> = None;
    for &(c, e) in events {
        match &mut run {
            Some((rc, r)) if std::ptr::eq(*rc, c) && r.end == e.line.start => r.end = e.line.end,
            _ => {
                if let Some((rc, r)) = run.take() {
                    out.extend(rc.ndjson.get(r));
                }
                run = Some((c, e.line.clone()));
            }
        }
    }
    if let Some((rc, r)) = run {
        out.extend(rc.ndjson.get(r));
    }
    out
}

/// When a raw segment was stored: its ULID's time (µs), if the key carries one.
fn stored_at(key: &str) -> Option<i64> {
    let name = key.rsplit('/').next()?.strip_suffix(".seg.gz")?;
    let ulid = name.rsplit('-').next()?;
    let u = ulid::Ulid::from_string(ulid).ok()?;
    Some(u.timestamp_ms() as i64 * 1000)
}

/// Runs the grinder until stopped (or, with `once`, until everything present is ground).
///
/// Takes the checkpoint's lock first (unless `cfg.lock_ttl` is `None`): while another live
/// grinder holds it, this one waits as a standby (or, with `once`, says who holds it and
/// stops), so one grinder writes the checkpoint and counts events for `/metrics`. Stops
/// when `shutdown` completes, and gives the lock up.
pub async fn run(
    store: Store,
    cfg: GrindConfig,
    reducer: Arc<Reducer>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    if let Some(s) = cfg.shard {
        reducer.set_shard(s.to_string());
    }
    let mut rules = RulesWatch::load(cfg.rules_path.clone())?;
    tracing::info!(rules = rules.current().len(), "rules loaded");
    let lock = match cfg.lock_ttl {
        None => None,
        Some(ttl) => tokio::select! {
            l = wait_for_lock(&store, &cfg, ttl, &reducer) => Some(Arc::new(l?)),
            () = &mut shutdown => return Ok(()),
        },
    };
    reducer.set_active(true);
    let r = tokio::select! {
        r = grind_locked(store.clone(), cfg, reducer.clone(), rules, lock.clone()) => r,
        () = &mut shutdown => Ok(()),
    };
    reducer.set_active(false);
    if let Some(l) = lock {
        l.release(&store).await;
    }
    r
}

/// Takes the checkpoint's lock, waiting while another live grinder holds it (`once`: says who
/// holds it instead).
async fn wait_for_lock(
    store: &Store,
    cfg: &GrindConfig,
    ttl: Duration,
    reducer: &Reducer,
) -> anyhow::Result<StoreLock> {
    let scope = Scope::grinder(&cfg.checkpoint_key);
    let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut said: Option<Instant> = None;
    loop {
        let tried = retry_store(
            !cfg.once,
            reducer,
            "cannot take the checkpoint's lock",
            async || StoreLock::try_acquire_in(store, scope.clone(), ttl).await,
        );
        match tried.await? {
            Ok(l) => {
                if said.is_some() {
                    tracing::info!("the other grinder is gone: this standby grinds now");
                }
                return Ok(l);
            }
            Err(busy) if cfg.once => anyhow::bail!("{busy}"),
            Err(busy) => {
                if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!("{busy}; waiting as a standby, to take over when it stops");
                    said = Some(Instant::now());
                }
                tokio::time::sleep(every).await;
            }
        }
    }
}

async fn grind_locked(
    store: Store,
    cfg: GrindConfig,
    reducer: Arc<Reducer>,
    mut rules: RulesWatch,
    lock: Option<Arc<StoreLock>>,
) -> anyhow::Result<()> {
    let once = cfg.once;
    let poll = cfg.poll;
    let mut g = Grinder::open(store, cfg, reducer).await?;
    g.lock = lock;
    if let Err(e) = g.seed_windows(&rules.current()).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot seed the metrics windows from the stored events");
    }
    let mut failures = 0u32;
    loop {
        let r = rules.current();
        let pass = async {
            let idle = g.step(&r).await?;
            if once && idle {
                g.save().await?;
            } else if idle {
                // Idle, the lease is still extended (and a lost one noticed).
                g.keep_lock().await?;
            }
            anyhow::Ok(idle)
        };
        match pass.await {
            Ok(true) if once => return Ok(()),
            Ok(idle) => {
                if failures > 0 {
                    tracing::info!(failures, "grinding again after store errors");
                    failures = 0;
                }
                if idle {
                    tokio::time::sleep(poll).await;
                }
            }
            // A batch run reports the error; a lost lock means another grinder grinds now.
            Err(e) if once || LockLost::is(&e) => return Err(e),
            Err(e) => {
                // A store error (a full disk, an unreachable or failing S3): nothing after the
                // last events object written was marked done, so trying again from here
                // loses and doubles nothing, as a restart would not.
                failures += 1;
                store_failed(&g.reducer, failures, &e, "grinding failed").await;
            }
        }
    }
}

/// Runs a store operation of a grinder's start (taking its lock, reading its checkpoint).
/// A following grinder (`follow`) rides out store errors there as it does while grinding
/// (logged, counted in `blackbox_grind_errors_total`, tried again after [`retry_wait`]), so
/// it can start before its store is reachable or while its disk is full; a batch run stops.
async fn retry_store<T, E>(
    follow: bool,
    reducer: &Reducer,
    what: &str,
    mut op: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E>
where
    E: Into<anyhow::Error>,
{
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(failures, "the store answers again");
                }
                return Ok(v);
            }
            Err(e) if !follow => return Err(e),
            Err(e) => {
                failures += 1;
                store_failed(reducer, failures, &e.into(), what).await;
            }
        }
    }
}

/// A following grinder's `failures`-th store error in a row: logged (`what`; trying again),
/// counted in `blackbox_grind_errors_total`, then waited out ([`retry_wait`]).
async fn store_failed(reducer: &Reducer, failures: u32, e: &anyhow::Error, what: &str) {
    reducer.error();
    let wait = retry_wait(failures);
    tracing::error!(
        error = %format!("{e:#}"),
        failures,
        retry_in_s = wait.as_secs_f64(),
        "{what}; trying again"
    );
    tokio::time::sleep(wait).await;
}

/// How long a following grinder waits after its `failures`-th store error in a row: 1 s,
/// doubling, at most [`RETRY_MAX`].
fn retry_wait(failures: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// The longest wait between a following grinder's tries after store errors.
const RETRY_MAX: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use blackbox_protocol::{BootId, Chunk, DeviceId, Origin, Record, SyncPoint};

    #[test]
    fn store_errors_are_retried_after_doubling_waits_up_to_the_cap() {
        let waits: Vec<u64> = (1..=8).map(|n| retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_wait(u32::MAX), RETRY_MAX);
    }

    /// A shard's events objects carry the shard in their names, and each grinder knows its own
    /// among them (re-grinding deletes only those; the metrics are seeded only from those).
    #[test]
    fn events_keys_name_their_shard() {
        let src = Source {
            key: "raw/2026-11-21/14/r0-01J.seg.gz".into(),
            hour: hour_of(1_795_269_785_000_000),
            device: None,
        };
        let s = |k, n| Some(Shard { index: k, count: n });
        let plain = events_key("events/", &src, None);
        let sharded = events_key("events/", &src, s(1, 4));
        assert!(plain.ends_with("/r0-01J.ndjson.gz"), "{plain}");
        assert!(
            sharded.ends_with("/r0-01J.shard-1-of-4.ndjson.gz"),
            "{sharded}"
        );
        assert!(is_shards_events(&plain, None) && !is_shards_events(&plain, s(1, 4)));
        assert!(is_shards_events(&sharded, s(1, 4)));
        for other in [None, s(0, 4), s(1, 2)] {
            assert!(!is_shards_events(&sharded, other), "{other:?}");
        }
        assert!(!is_shards_events("events/x.json", None));
    }

    fn decoded(msgs: &[&[u8]], wall_us: i64) -> Decoded {
        let mut problems = Vec::new();
        let mut d = reader::decode_all(
            &Arc::from("k"),
            &bytes::Bytes::from(encoded(msgs, wall_us)),
            &Limits::DEFAULT,
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        d.remove(0)
    }

    fn encoded(msgs: &[&[u8]], wall_us: i64) -> Vec<u8> {
        let records = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| Record {
                seq: i as u64 + 1,
                mono_us: i as u64 * 1_000_001,
                level: (i % 8) as u8,
                facility: 1,
                origin: Origin::Kmsg,
                msg: m.to_vec(),
            })
            .collect();
        let sync = SyncPoint {
            mono_us: 0,
            wall_us,
            synced: true,
        };
        Chunk::new(
            DeviceId::new("router-7").unwrap(),
            BootId([9; 16]),
            sync,
            records,
        )
        .unwrap()
        .encode(6, &Limits::DEFAULT)
        .unwrap()
    }

    /// The chunks of a source are inflated one by one into one buffer: a damaged one is a
    /// problem that names its place, and the chunks around it (a larger one before it, a
    /// smaller one after) are ground from their own text.
    #[test]
    fn a_damaged_chunk_is_a_problem_and_the_others_are_ground() {
        let panic = b"Kernel panic - not syncing: VFS: Unable to mount root fs".as_slice();
        let long = [b"some line that matches nothing, and is long".as_slice(); 50];
        let first = encoded(&[&long[..], &[panic]].concat(), 1_795_269_785_000_000);
        let mut second = encoded(&[panic, panic], 1_795_269_785_000_000);
        let n = second.len();
        second[n - 20] ^= 0x55;
        let third = encoded(&[b"watchdog: watchdog0: watchdog did not stop!"], 0);
        let seg = bytes::Bytes::from([&first[..], &second, &third].concat());
        let key: Arc<str> = Arc::from("raw/x.seg.gz");
        let mut problems = Vec::new();
        let members = reader::members_all(&key, &seg, &mut problems);
        assert_eq!(members.len(), 3);
        let rules = Rules::default_rules();
        let (ground, inflated) = grind_members(members, &rules, &Limits::DEFAULT, &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("raw/x.seg.gz at byte {}", first.len())),
            "{problems:?}"
        );
        let names: Vec<Vec<&str>> = ground
            .iter()
            .map(|g| {
                g.events
                    .iter()
                    .map(|e| g.series[e.series].0.as_str())
                    .collect()
            })
            .collect();
        assert_eq!(names, [vec!["kernel_panic"], vec!["watchdog"]]);
        assert_eq!(ground[1].seqs, [1]);
        let lines = String::from_utf8(ground[1].ndjson.clone()).unwrap();
        assert_eq!(lines.lines().count(), 1);
        assert!(lines.contains("watchdog did not stop!\"}"), "{lines}");
        assert!(inflated > 0);
    }

    /// The hand-written lines are exactly what `serde_json` writes for the same [`Event`], and
    /// the event is the one the rules' `apply` describes.
    #[test]
    fn event_lines_are_what_serde_writes() {
        let rules = Rules::parse(
            r#"
[[rule]]
name = "anything"
regex = '^(?P<first>\S*)(?: (?P<second>\S+))?'
labels = { severity = "a \"quoted\" \\ label", zzz = "last" }
metric_labels = ["second", "severity"]

[[rule]]
name = "shadowed"
regex = 'x(?P<severity>.)'
labels = { severity = "fixed wins" }

[[rule]]
name = "cut_char"
regex = '(?P<byte>\xC3)'
"#,
        )
        .unwrap();
        let msgs: [&[u8]; 9] = [
            b"plain words",
            b"quote \" backslash \\ tab \t newline \n cr \r",
            b"\x08 backspace \x0c formfeed \x01 \x1f \x7f del x!",
            "unicode \u{e9}\u{263a} \u{1F600} caf\u{e9}".as_bytes(),
            b"not utf8 \xff\xfe end",
            b"",
            b"x",
            b"</script> / \\u0041",
            b"lone",
        ];
        for wall in [
            1_795_269_785_123_456,
            0,
            -1,
            -62_135_596_800_000_001,
            253_402_300_800_000_000,
        ] {
            let d = decoded(&msgs, wall);
            let g = grind_chunk(&d, &rules);
            assert_eq!(g.bad_lines, 0);
            let mut lines = g.ndjson.split_inclusive(|&b| b == b'\n');
            let mut n = 0;
            for (text, e) in d.lines().zip(1..) {
                let f = scan::scan(text).unwrap();
                for m in rules.apply(&f.msg) {
                    let line = lines.next().expect("an events line per match");
                    let meta = &g.events[n];
                    n += 1;
                    assert_eq!(&g.ndjson[meta.line.clone()], line);
                    let wall_us = d.header.sync.wall_of(f.mono_us);
                    let want = Event {
                        name: m.rule.name.clone(),
                        labels: m.labels.iter().cloned().collect(),
                        device: g.device.clone(),
                        boot: g.boot.clone(),
                        seq: e,
                        ts: rfc3339(wall_us),
                        wall_us,
                        level: f.level,
                        msg: f.msg.to_string(),
                    };
                    let mut serde = serde_json::to_vec(&want).unwrap();
                    serde.push(b'\n');
                    assert_eq!(
                        String::from_utf8_lossy(line),
                        String::from_utf8_lossy(&serde)
                    );
                    assert_eq!((meta.seq, meta.wall_us), (e, wall_us));
                    let series: Vec<(String, String)> = m
                        .rule
                        .metric_labels
                        .iter()
                        .map(|k| {
                            let v = want.labels.get(k).cloned().unwrap_or_default();
                            (k.clone(), v)
                        })
                        .collect();
                    assert_eq!(g.series[meta.series], (m.rule.name.clone(), series));
                }
            }
            assert_eq!(lines.next(), None);
            assert_eq!(n, g.events.len());
            assert!(n > msgs.len(), "every message matched the first rule");
        }
    }

    #[test]
    fn numbers_and_times_are_written_as_the_formatters_write_them() {
        for v in [0, 1, 9, 10, 99, 100, u64::MAX / 3, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, v);
            assert_eq!(out, v.to_string().as_bytes());
        }
        for v in [0, -1, 1, i64::MIN, i64::MAX, -1_000_000] {
            let mut out = Vec::new();
            write_i64(&mut out, v);
            assert_eq!(out, v.to_string().as_bytes());
            let mut out = Vec::new();
            write_ts(&mut out, v);
            assert_eq!(out, rfc3339(v).as_bytes(), "{v}");
        }
        let mut t = -62_167_219_200_000_000i64; // 0000-01-01
        while t < 253_402_300_800_000_000 {
            let mut out = Vec::new();
            write_ts(&mut out, t);
            assert_eq!(out, rfc3339(t).as_bytes(), "{t}");
            t += 987_654_321_987;
        }
    }

    /// What the grinder compresses is the events' lines, whole and in order.
    #[test]
    fn events_objects_hold_the_lines_in_order() {
        use std::io::Read;
        let rules = Rules::parse("[[rule]]\nname = \"a\"\nregex = 'a'\n").unwrap();
        let d = decoded(&[b"a1", b"b", b"a2", b"a3"], 0);
        let g = grind_chunk(&d, &rules);
        let all: Vec<(&GroundChunk, &EventMeta)> = g.events.iter().map(|e| (&g, e)).collect();
        assert_eq!(event_lines(&all).len(), 1, "adjacent lines are one slice");
        let some = [all[0], all[2]];
        assert_eq!(event_lines(&some).len(), 2);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&events_bytes(event_lines(&some))[..])
            .read_to_string(&mut text)
            .unwrap();
        let msgs: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Event>(l).unwrap().msg)
            .collect();
        assert_eq!(msgs, ["a1", "a3"]);
    }
}
