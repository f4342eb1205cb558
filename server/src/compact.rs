//! Compaction: many small objects become few large ones, switched by a manifest, so long-term
//! storage is a few objects per device per day.
//!
//! - `compact --hour H` ([`compact_hour`]): an ingest hour's raw segments (and the hour's
//!   previous generation) become one object per device (or per device group);
//! - `compact --day D` ([`compact_day`]): a day's hourly outputs, raw segments of hours not
//!   compacted yet and the day's previous generation become one object per device (or group)
//!   for the day;
//! - `compact --auto` ([`compact_auto`]): every closed hour with raw segments, then every
//!   closed day with anything not rolled up: what cron runs.
//!
//! ```text
//! compact/YYYY-MM-DD/HH/d-<device>.g<generation>.seg.gz    an hour of the device's chunks, in order
//! compact/YYYY-MM-DD/HH/d-<device>.g<generation>.idx       its index (same format as raw .idx)
//! compact/YYYY-MM-DD/HH/manifest.json                      generation, inputs, outputs
//! compact/YYYY-MM-DD/day/d-<device>.g<generation>.seg.gz   a day of the device's chunks, in order
//! compact/YYYY-MM-DD/day/d-<device>.g<generation>.idx
//! compact/YYYY-MM-DD/day/manifest.json                     generation, inputs, outputs, hours taken in
//! ```
//! (`--groups N`: `h<NNN>.g<generation>.…` for N groups by device hash instead.)
//!
//! **Steps, each durable before the next** (a crash anywhere leaves a state every reader reads
//! correctly, see [`crate::reader`]), the same for an hour and a day:
//! 1. finish a previous run's deletions (a manifest whose inputs are still there);
//! 2. plan the current sources (raw segments, compacted objects of earlier runs);
//! 3. merge them into the outputs, streaming ([`merge`]): duplicates dropped by identity, each
//!    device's chunks ordered by boot and sequence number, each output and its index written
//!    (readers ignore them: no manifest names them yet);
//! 4. write the manifest (readers switch: outputs instead of the inputs it names);
//! 5. delete the inputs and older generations; for a day, also the hourly manifests it took
//!    in (each after that hour's inputs), recording their generations in the day manifest so
//!    an hour compacted again later never reuses a key.
//!
//! Chunks stay whole: an untouched chunk is copied byte for byte (its gzip member), a chunk
//! with some records already seen is re-encoded with the rest and its own sync point, so every
//! line reads exactly as before. A raw segment with damage is left in place and not named as
//! an input (readers keep reading it; its intact chunks, copied too, are dropped there as
//! duplicates by identity); the manifest lists it as `kept`, so it alone does not make the
//! hour or day worth compacting again.
//!
//! Memory: the index entries of what is merged (about 150 bytes a chunk), plus, per group
//! being written (`parallel` at a time), two runs of chunks of at most 4 MiB, one chunk
//! inflated and three upload parts of `part_size` ([`merge`]): about 40 MiB, whatever the
//! size of the hour or day.
//!
//! One compaction at a time per store: `blackbox-server compact` takes the store's lock
//! ([`lock`], an object in the store, so it holds across hosts) and checks it before every step
//! that deletes or switches readers. Two compactions running over the same hour or day would fail
//! with "vanished" or delete each other's outputs.
pub use crate::lease as lock;
mod merge;

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use futures::StreamExt;
use object_store::path::Path;

use crate::reader::{
    self, COMPACT, DAY, MANIFEST, Manifest, RAW, Source, compact_prefix, day_prefix, idx_key,
};
use crate::store::Store;
use crate::timespec::{
    HOUR_US, day_hours, day_path, hour_path, now_us, parse_day_path, parse_hour_path,
};

/// Compaction settings.
#[derive(Debug, Clone)]
pub struct CompactConfig {
    /// 0: one object per device; N: N objects by device hash.
    pub groups: u32,
    /// Compact an hour receivers may still write to (its late segments stay readable as raw).
    pub allow_open: bool,
    /// An hour counts as closed this long after its end (µs).
    pub close_after_us: i64,
    /// Objects read at once.
    pub parallel: usize,
    /// Outputs are uploaded in parts of this many bytes (one PUT when smaller).
    pub part_size: usize,
    /// Test hook: abort at `mid-output` (an output's upload under way), `after-output`,
    /// `after-manifest` or `after-delete`.
    pub fault: Option<String>,
    /// The store's compaction lock, checked (and extended) before every step that deletes or
    /// switches readers ([`lock`]); `None`: the caller makes sure no other compaction runs.
    pub lock: Option<std::sync::Arc<lock::StoreLock>>,
}

impl Default for CompactConfig {
    fn default() -> Self {
        Self {
            groups: 0,
            allow_open: false,
            close_after_us: 300_000_000,
            parallel: 8,
            part_size: 8 << 20,
            fault: None,
            lock: None,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The generation written (0: nothing to do).
    pub generation: u64,
    /// Objects replaced (raw segments; for a day also compacted objects).
    pub inputs: usize,
    /// Raw segments left in place because of damage.
    pub kept: usize,
    /// Objects written.
    pub outputs: usize,
    /// Chunks read.
    pub chunks_in: usize,
    /// Chunks written.
    pub chunks_out: usize,
    /// Duplicate records dropped.
    pub duplicates: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

/// Before a step that deletes objects or switches readers: is the store's lock still ours?
async fn hold(store: &Store, cfg: &CompactConfig) -> anyhow::Result<()> {
    match &cfg.lock {
        Some(l) => l.hold(store).await,
        None => Ok(()),
    }
}

fn fault(cfg: &CompactConfig, point: &str) {
    if cfg.fault.as_deref() == Some(point) {
        tracing::error!(point, "fault injection: aborting");
        std::process::abort();
    }
}

/// FNV-1a: a stable device → group mapping (never changes across versions).
pub(crate) fn group_of(device: &str, groups: u32) -> String {
    if groups == 0 {
        return format!("d-{device}");
    }
    let h = device.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("h{:03}", h % u64::from(groups))
}

/// Deletes objects a listing found, aborting at `after-delete` after the first (test hook).
struct Deleter<'a> {
    store: &'a Store,
    cfg: &'a CompactConfig,
    present: BTreeSet<String>,
    deleted: usize,
}

impl<'a> Deleter<'a> {
    /// Lists `prefixes` (one LIST each).
    async fn list(
        store: &'a Store,
        cfg: &'a CompactConfig,
        prefixes: &[String],
    ) -> anyhow::Result<Self> {
        let mut present = BTreeSet::new();
        for p in prefixes {
            present.extend(store.list(p).await?);
        }
        Ok(Self {
            store,
            cfg,
            present,
            deleted: 0,
        })
    }

    /// Deletes `key` if the listing found it.
    async fn delete(&mut self, key: &str) -> anyhow::Result<()> {
        if self.present.remove(key) {
            reader::delete(self.store, key).await?;
            self.deleted += 1;
            if self.deleted == 1 {
                fault(self.cfg, "after-delete");
            }
        }
        Ok(())
    }

    /// Deletes a segment and its index.
    async fn delete_segment(&mut self, key: &str) -> anyhow::Result<()> {
        self.delete(key).await?;
        self.delete(&idx_key(key)).await
    }

    /// Deletes every listed key under `prefix` that its manifest `m` does not name (its
    /// outputs, their indexes and itself): older generations, unfinished outputs.
    async fn sweep_unnamed(&mut self, prefix: &str, m: &Manifest) -> anyhow::Result<()> {
        let keep: BTreeSet<String> = m
            .outputs
            .iter()
            .flat_map(|o| [o.clone(), idx_key(o)])
            .chain([format!("{prefix}{MANIFEST}")])
            .collect();
        self.sweep(prefix, |k| keep.contains(k)).await
    }

    /// Deletes every listed key under `prefix` that `keep` says no to.
    async fn sweep(&mut self, prefix: &str, keep: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let doomed: Vec<String> = self
            .present
            .iter()
            .filter(|k| k.starts_with(prefix) && !keep(k))
            .cloned()
            .collect();
        for k in doomed {
            self.delete(&k).await?;
        }
        Ok(())
    }
}

/// Deletes the inputs an hour's manifest names and every compacted object of the hour it does
/// not.
async fn cleanup_hour(
    store: &Store,
    hour: i64,
    m: &Manifest,
    cfg: &CompactConfig,
) -> anyhow::Result<()> {
    let prefix = compact_prefix(hour);
    let mut d = Deleter::list(store, cfg, &[reader::raw_prefix(hour), prefix.clone()]).await?;
    for k in &m.inputs {
        d.delete_segment(k).await?;
    }
    d.sweep_unnamed(&prefix, m).await
}

/// What a compaction covers.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// An ingest hour.
    Hour(i64),
    /// A day.
    Day(i64),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hour(h) => write!(f, "hour {}", hour_path(*h)),
            Self::Day(d) => write!(f, "day {}", day_path(*d)),
        }
    }
}

impl Scope {
    fn prefix(self) -> String {
        match self {
            Self::Hour(h) => compact_prefix(h),
            Self::Day(d) => day_prefix(d),
        }
    }

    /// Does the manifest name `s` as an input once it is merged? An hour's earlier outputs are
    /// not named (its cleanup sweeps the hour's unnamed objects); a day names everything.
    fn replaces(self, s: &Source) -> bool {
        match self {
            Self::Hour(_) => s.key.starts_with(RAW),
            Self::Day(_) => true,
        }
    }

    async fn cleanup(self, store: &Store, m: &Manifest, cfg: &CompactConfig) -> anyhow::Result<()> {
        match self {
            Self::Hour(h) => cleanup_hour(store, h, m, cfg).await,
            Self::Day(d) => cleanup_day(store, d, m, cfg).await,
        }
    }
}

/// Steps 3 to 5: merges `sources` into the outputs of `draft.generation` (durable first),
/// writes the manifest that switches readers to them (`draft.inputs` plus the merged sources
/// the scope replaces, except raw ones with damage, which are kept), then deletes.
async fn finish(
    store: &Store,
    scope: Scope,
    sources: &[Source],
    mut draft: Manifest,
    cfg: &CompactConfig,
    report: &mut CompactReport,
) -> anyhow::Result<()> {
    let prefix = scope.prefix();
    let merged = merge::merge(store, sources, &prefix, draft.generation, cfg, report).await?;
    let mut inputs: BTreeSet<String> = std::mem::take(&mut draft.inputs).into_iter().collect();
    for s in sources.iter().filter(|s| scope.replaces(s)) {
        if merged.damaged.contains(&s.key) {
            draft.kept.push(s.key.clone());
            report.kept += 1;
        } else if inputs.insert(s.key.clone()) {
            report.inputs += 1;
        }
    }
    draft.inputs = inputs.into_iter().collect();
    draft.outputs = merged.outputs;
    let key = format!("{prefix}{MANIFEST}");
    hold(store, cfg).await?;
    store
        .put(&key, serde_json::to_vec_pretty(&draft)?)
        .await
        .with_context(|| format!("writing {key}"))?;
    fault(cfg, "after-manifest");
    hold(store, cfg).await?;
    scope.cleanup(store, &draft, cfg).await?;
    report.generation = draft.generation;
    tracing::info!(%scope, ?report, "compacted");
    Ok(())
}

fn not_closed(what: &str, end_us: i64, cfg: &CompactConfig) -> anyhow::Result<()> {
    if !cfg.allow_open && now_us() < end_us + cfg.close_after_us {
        bail!(
            "{what} is not closed yet (receivers may still write to it until {} min after its end); wait, or pass --allow-open",
            cfg.close_after_us / 60_000_000
        );
    }
    Ok(())
}

/// Compacts one ingest hour (see the module doc).
pub async fn compact_hour(
    store: &Store,
    hour: i64,
    cfg: &CompactConfig,
) -> anyhow::Result<CompactReport> {
    not_closed(
        &format!("hour {}", hour_path(hour)),
        (hour + 1) * HOUR_US,
        cfg,
    )?;
    let mut report = CompactReport::default();
    if let Some(m) = reader::read_manifest(store, hour).await? {
        hold(store, cfg).await?;
        cleanup_hour(store, hour, &m, cfg).await?;
    }
    let plan = reader::hour_plan(store, hour).await?;
    // An hourly manifest its day roll-up took in is replaced by it: start afresh after it.
    let taken = plan.day.as_ref().map_or(0, |d| d.hour_generation(hour));
    let generation = plan
        .manifest
        .as_ref()
        .map_or(0, |m| m.generation)
        .max(taken)
        + 1;
    let prev = plan.manifest.filter(|m| m.generation > taken);
    let sources: Vec<Source> = plan
        .sources
        .into_iter()
        .filter(|s| !reader::is_day_key(&s.key))
        .collect();
    let known: BTreeSet<&str> = prev
        .iter()
        .flat_map(|m| m.kept.iter().map(String::as_str))
        .collect();
    if !sources
        .iter()
        .any(|s| s.key.starts_with(RAW) && !known.contains(s.key.as_str()))
    {
        tracing::info!(hour = %hour_path(hour), "nothing to compact");
        return Ok(report);
    }
    // An hour's manifest names the raw segments of all its generations; its earlier outputs
    // are swept as unnamed objects of the hour.
    let draft = Manifest {
        version: 1,
        generation,
        inputs: prev.map(|m| m.inputs).unwrap_or_default(),
        ..Default::default()
    };
    finish(store, Scope::Hour(hour), &sources, draft, cfg, &mut report).await?;
    Ok(report)
}

/// Deletes what a day manifest replaced: its inputs; each hourly manifest it took in, after
/// that hour's own inputs and objects; older day generations and unfinished outputs. Objects
/// of an hour without a manifest are unfinished outputs too (nothing reads them).
async fn cleanup_day(
    store: &Store,
    day: i64,
    m: &Manifest,
    cfg: &CompactConfig,
) -> anyhow::Result<()> {
    let date = day_path(day);
    let mut d = Deleter::list(
        store,
        cfg,
        &[format!("{RAW}{date}/"), format!("{COMPACT}{date}/")],
    )
    .await?;
    for k in &m.inputs {
        d.delete_segment(k).await?;
    }
    for hour in day_hours(day) {
        let prefix = compact_prefix(hour);
        let mkey = format!("{prefix}{MANIFEST}");
        if d.present.contains(&mkey) {
            let Some(hm) = reader::read_manifest(store, hour).await? else {
                continue;
            };
            if hm.generation > m.hour_generation(hour) {
                continue; // compacted again since the roll-up: the hour's own
            }
            for k in &hm.inputs {
                d.delete_segment(k).await?;
            }
        }
        d.sweep(&prefix, |k| k == mkey).await?;
        d.delete(&mkey).await?;
    }
    let prefix = day_prefix(day);
    d.sweep_unnamed(&prefix, m).await
}

/// Rolls a day up (see the module doc): its hours' sources and its previous generation become
/// one object per device (or group) for the day.
pub async fn compact_day(
    store: &Store,
    day: i64,
    cfg: &CompactConfig,
) -> anyhow::Result<CompactReport> {
    not_closed(
        &format!("day {} (its last hour)", day_path(day)),
        day_hours(day).end * HOUR_US,
        cfg,
    )?;
    let mut report = CompactReport::default();
    if let Some(m) = reader::read_day_manifest(store, day).await? {
        hold(store, cfg).await?;
        cleanup_day(store, day, &m, cfg).await?;
    }
    let listed: Vec<reader::Listed> =
        futures::stream::iter(day_hours(day).map(|h| reader::list_hour(store, h)))
            .buffered(cfg.parallel.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
    // Read after the listings (see the reader's module doc).
    let prev = reader::read_day_manifest(store, day).await?;
    let mut sources = prev
        .as_ref()
        .map(|m| reader::day_sources(day, m))
        .unwrap_or_default();
    for l in &listed {
        sources.extend(l.sources(prev.as_ref()));
    }
    let known: BTreeSet<&str> = prev
        .iter()
        .chain(listed.iter().filter_map(|l| l.manifest.as_ref()))
        .flat_map(|m| m.kept.iter().map(String::as_str))
        .collect();
    if !sources
        .iter()
        .any(|s| !reader::is_day_key(&s.key) && !known.contains(s.key.as_str()))
    {
        tracing::info!(day = %day_path(day), "nothing to roll up");
        return Ok(report);
    }
    let generation = prev.as_ref().map_or(0, |m| m.generation) + 1;
    let mut hours = prev.map(|m| m.hours).unwrap_or_default();
    for l in &listed {
        if let Some(m) = &l.manifest {
            let hh = format!("{:02}", l.hour - day_hours(day).start);
            let g = hours.entry(hh).or_default();
            *g = (*g).max(m.generation);
        }
    }
    let draft = Manifest {
        version: 1,
        generation,
        hours,
        ..Default::default()
    };
    finish(store, Scope::Day(day), &sources, draft, cfg, &mut report).await?;
    Ok(report)
}

/// What [`compact_auto`] did.
#[derive(Debug, Clone, Default)]
pub struct AutoReport {
    /// Hours compacted (nothing to do: generation 0).
    pub hours: Vec<(i64, CompactReport)>,
    /// Days rolled up.
    pub days: Vec<(i64, CompactReport)>,
    /// Hours and days that failed (logged; the rest went on).
    pub failed: Vec<String>,
}

/// The names one level under `prefix` (delimiter listing): date or hour "directories".
async fn dirs(store: &Store, prefix: &str) -> anyhow::Result<Vec<String>> {
    let l = store
        .object_store()
        .list_with_delimiter(Some(&Path::from(prefix)))
        .await?;
    Ok(l.common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_owned))
        .collect())
}

/// Does a day hold anything a roll-up has not taken in? (Cheap: delimiter listings. Any
/// hour "directory" counts; the roll-up itself finds out whether it is only damage it kept.)
async fn day_pending(store: &Store, day: i64) -> anyhow::Result<bool> {
    let date = day_path(day);
    for top in [RAW, COMPACT] {
        if dirs(store, &format!("{top}{date}/"))
            .await?
            .iter()
            .any(|d| d != DAY)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Compacts every closed hour that has raw segments, then rolls up every closed day that has
/// anything not rolled up yet: `compact --auto`, for cron. A failing hour or day is logged and
/// the others go on.
pub async fn compact_auto(store: &Store, cfg: &CompactConfig) -> anyhow::Result<AutoReport> {
    let cfg = CompactConfig {
        allow_open: false,
        ..cfg.clone()
    };
    let now = now_us();
    let mut report = AutoReport::default();
    let mut days = BTreeSet::new();
    for date in dirs(store, RAW).await? {
        let Some(day) = parse_day_path(&date) else {
            continue;
        };
        days.insert(day);
        for hh in dirs(store, &format!("{RAW}{date}/")).await? {
            let Some(hour) = parse_hour_path(&format!("{date}/{hh}")) else {
                continue;
            };
            if now < (hour + 1) * HOUR_US + cfg.close_after_us {
                continue;
            }
            match compact_hour(store, hour, &cfg).await {
                Ok(r) => report.hours.push((hour, r)),
                Err(e) => {
                    tracing::error!(hour = %hour_path(hour), error = %format!("{e:#}"), "compaction failed");
                    report
                        .failed
                        .push(format!("hour {}: {e:#}", hour_path(hour)));
                }
            }
        }
    }
    for date in dirs(store, COMPACT).await? {
        days.extend(parse_day_path(&date));
    }
    for day in days {
        if now < day_hours(day).end * HOUR_US + cfg.close_after_us
            || !day_pending(store, day).await?
        {
            continue;
        }
        match compact_day(store, day, &cfg).await {
            Ok(r) => report.days.push((day, r)),
            Err(e) => {
                tracing::error!(day = %day_path(day), error = %format!("{e:#}"), "roll-up failed");
                report.failed.push(format!("day {}: {e:#}", day_path(day)));
            }
        }
    }
    Ok(report)
}
