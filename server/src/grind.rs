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
use crate::reader::{self, Decoded, Filter, Source, SourceRead, get_opt};
use crate::reducer::{Reducer, SeriesKey};
use crate::rules::Rules;
use crate::scan;
use crate::store::Store;
use crate::timespec::{HOUR_US, hour_of, hour_path, now_us, rfc3339};

/// One structured event.
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
    /// Test hook: abort at a named point (`after-events-put`, `after-checkpoint`), after it
    /// was passed this many times.
    pub fault: Option<(String, u64)>,
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
            fault: None,
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
    /// Events by sequence number, with their metric series.
    pub events: Vec<(u64, Event, SeriesKey)>,
    /// Lines that did not parse.
    pub bad_lines: u64,
}

/// Applies the rules to every line of a chunk.
pub fn grind_chunk(c: &Decoded, rules: &Rules) -> GroundChunk {
    let mut g = GroundChunk {
        device: c.header.id.device.to_string(),
        boot: c.boot.clone(),
        seqs: Vec::with_capacity(c.header.record_count as usize),
        events: Vec::new(),
        bad_lines: 0,
    };
    for text in c.lines() {
        let Some(f) = scan::scan(text) else {
            g.bad_lines += 1;
            continue;
        };
        g.seqs.push(f.seq);
        for m in rules.apply(&f.msg) {
            let wall_us = c.header.sync.wall_of(f.mono_us);
            let series = (
                m.rule.name.clone(),
                m.rule
                    .metric_labels
                    .iter()
                    .map(|k| {
                        let v = m
                            .labels
                            .iter()
                            .find(|(n, _)| n == k)
                            .map(|(_, v)| v.clone());
                        (k.clone(), v.unwrap_or_default())
                    })
                    .collect(),
            );
            g.events.push((
                f.seq,
                Event {
                    name: m.rule.name.clone(),
                    labels: m.labels.into_iter().collect(),
                    device: g.device.clone(),
                    boot: g.boot.clone(),
                    seq: f.seq,
                    ts: rfc3339(wall_us),
                    wall_us,
                    level: f.level,
                    msg: f.msg.to_string(),
                },
                series,
            ));
        }
    }
    g
}

/// A source read and ground (before deduplication).
#[derive(Debug)]
struct Ground {
    read: SourceRead,
    chunks: Vec<GroundChunk>,
    inflated: u64,
}

/// Where the events of a source go.
pub fn events_key(prefix: &str, src: &Source) -> String {
    let name = src.key.rsplit('/').next().unwrap_or(&src.key);
    let name = name.strip_suffix(".seg.gz").unwrap_or(name);
    // A day roll-up's outputs are named like an hour's: keep their events apart.
    let day = if reader::is_day_key(&src.key) {
        "day-"
    } else {
        ""
    };
    format!("{prefix}{}/{day}{name}.ndjson.gz", hour_path(src.hour))
}

/// Was the object at `key` ground (its hour closed, or the object done in it)?
fn was_ground(ckpt: &Checkpoint, key: &str) -> bool {
    match reader::key_hour(key) {
        Some(h) if h < ckpt.next_hour => true,
        Some(h) => ckpt.hours.get(&h).is_some_and(|s| s.done.contains(key)),
        None => false,
    }
}

/// Gzip of NDJSON lines of `events`: serialised into memory, then compressed in one call (tiny
/// writes into the encoder cost more than everything else the grinder does).
pub fn events_bytes<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<u8> {
    use std::io::Write;
    let mut ndjson = Vec::new();
    for e in events {
        // Serialising plain strings and numbers into memory cannot fail.
        let _ = serde_json::to_writer(&mut ndjson, e);
        ndjson.push(b'\n');
    }
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(ndjson.len() / 4),
        flate2::Compression::fast(),
    );
    let _ = enc.write_all(&ndjson);
    enc.finish().unwrap_or_default()
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
        let ckpt = match (cfg.from_hour, get_opt(&store, &cfg.checkpoint_key).await?) {
            (Some(h), _) => {
                tracing::info!(from = %hour_path(h), "grinding again from this hour with a fresh checkpoint");
                Checkpoint {
                    version: 1,
                    next_hour: h,
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
                ..Default::default()
            },
        };
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
        })
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

    /// Drops duplicates (by identity) from a ground source; returns its events in order.
    fn dedupe<'g>(&mut self, g: &'g Ground) -> Vec<&'g (u64, Event, SeriesKey)> {
        let mut out = Vec::new();
        for c in &g.chunks {
            self.stamps
                .insert((c.device.clone(), c.boot.clone()), g.read.source.hour);
            let runs = self.seen.runs(&c.device, &c.boot);
            let (Some(&lo), Some(&hi)) = (c.seqs.iter().min(), c.seqs.iter().max()) else {
                continue;
            };
            match runs.overlap(lo, hi) {
                Overlap::All => {}
                Overlap::None => {
                    for &s in &c.seqs {
                        runs.insert_run(s, s);
                    }
                    out.extend(c.events.iter());
                }
                Overlap::Some => {
                    let mut new = BTreeSet::new();
                    for &s in &c.seqs {
                        if runs.insert(s) {
                            new.insert(s);
                        }
                    }
                    out.extend(c.events.iter().filter(|(s, _, _)| new.contains(s)));
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
                            events_key(&self.cfg.events_prefix, &src)
                        })
                        .collect(),
                ),
                None if hour < self.ckpt.next_hour => None,
                None => continue,
            };
            let prefix = format!("{}{}/", self.cfg.events_prefix, hour_path(hour));
            for key in self.store.list(&prefix).await? {
                if done.as_ref().is_some_and(|d| !d.contains(&key)) {
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
        let old = self.store.list(&prefix).await?;
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

    /// Reads and grinds `todo` (`parallel` at a time), then in order: drops duplicates, writes
    /// each source's events, marks it done. Returns how many were done (vanished ones are not).
    async fn grind_sources(
        &mut self,
        todo: Vec<Source>,
        rules: &Arc<Rules>,
    ) -> anyhow::Result<usize> {
        let store = self.store.clone();
        let mut stream = futures::stream::iter(todo.into_iter().map(|src| {
            let store = store.clone();
            let rules = rules.clone();
            async move {
                let read =
                    reader::read_source(&store, &src, &Filter::all(), &Limits::DEFAULT).await?;
                let ground = tokio::task::spawn_blocking(move || {
                    let chunks = read.chunks.iter().map(|c| grind_chunk(c, &rules)).collect();
                    let inflated = read.chunks.iter().map(|c| c.raw.len() as u64).sum();
                    Ground {
                        read,
                        chunks,
                        inflated,
                    }
                })
                .await?;
                anyhow::Ok(ground)
            }
        }))
        .buffered(self.cfg.parallel.max(1));
        let mut done = 0;
        while let Some(g) = stream.next().await {
            let mut g = g?;
            for p in &g.read.problems {
                tracing::error!("{p}");
            }
            if g.read.vanished {
                tracing::info!(key = %g.read.source.key, "object compacted away before it was ground; its hour is planned again");
                continue;
            }
            let events = self.dedupe(&g);
            let key = events_key(&self.cfg.events_prefix, &g.read.source);
            if !events.is_empty() {
                self.store
                    .put(&key, events_bytes(events.iter().map(|(_, e, _)| e)))
                    .await
                    .with_context(|| format!("writing events {key}"))?;
                self.fault("after-events-put");
            }
            for (_, e, series) in events {
                self.reducer.event(series.clone(), e.wall_us);
            }
            let lines: u64 = g.chunks.iter().map(|c| c.seqs.len() as u64).sum();
            let bad: u64 =
                g.chunks.iter().map(|c| c.bad_lines).sum::<u64>() + g.read.problems.len() as u64;
            self.reducer.object(
                lines,
                g.inflated,
                bad,
                stored_at(&g.read.source.key).map(|t| now_us() - t),
            );
            g.read.chunks.clear();
            self.ckpt
                .hours
                .entry(g.read.source.hour)
                .or_default()
                .done
                .insert(g.read.source.key.clone());
            self.dirty = true;
            done += 1;
            self.save_if_due().await?;
        }
        Ok(done)
    }
}

/// When a raw segment was stored: its ULID's time (µs), if the key carries one.
fn stored_at(key: &str) -> Option<i64> {
    let name = key.rsplit('/').next()?.strip_suffix(".seg.gz")?;
    let ulid = name.rsplit('-').next()?;
    let u = ulid::Ulid::from_string(ulid).ok()?;
    Some(u.timestamp_ms() as i64 * 1000)
}

/// Runs the grinder until stopped (or, with `once`, until everything present is ground).
pub async fn run(store: Store, cfg: GrindConfig, reducer: Arc<Reducer>) -> anyhow::Result<()> {
    let mut rules = RulesWatch::load(cfg.rules_path.clone())?;
    tracing::info!(rules = rules.current().len(), "rules loaded");
    let once = cfg.once;
    let poll = cfg.poll;
    let mut g = Grinder::open(store, cfg, reducer).await?;
    if let Err(e) = g.seed_windows(&rules.current()).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot seed the metrics windows from the stored events");
    }
    loop {
        let r = rules.current();
        let idle = g.step(&r).await?;
        if once && idle {
            g.save().await?;
            return Ok(());
        }
        if idle {
            tokio::time::sleep(poll).await;
        }
    }
}
