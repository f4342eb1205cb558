//! The reader layer under narrative, grep, grind and compaction: which objects hold the lines
//! of a time range, which chunks of them to fetch, and the lines inside.
//!
//! **Layout.** The receiver writes `raw/YYYY-MM-DD/HH/<receiver>-<ulid>.seg.gz` (chunks'
//! gzip members back to back) and `….idx` beside it (one JSON line per chunk: device, boot,
//! sequence range, wall-time range, byte offset, length). Compaction writes
//! `compact/YYYY-MM-DD/HH/<group>.g<generation>.seg.gz` + `.idx` in the same formats, then
//! `compact/YYYY-MM-DD/HH/manifest.json` naming the generation and the raw inputs it
//! replaces; only after that are the inputs deleted (see [`crate::compact`]). The day roll-up
//! does the same for a whole day: `compact/YYYY-MM-DD/day/<group>.g<generation>.seg.gz` +
//! `.idx`, then `compact/YYYY-MM-DD/day/manifest.json` naming the objects it replaces (raw
//! segments and hourly outputs of any hour of the day).
//!
//! **Which objects.** Keys carry the *ingest* hour. A line's wall time can precede its ingest
//! time by a whole outage (the device keeps its ring and uploads later) and can follow it by
//! a device clock running ahead. For a wall-time range `[since, until)` the reader looks at
//! ingest hours from `since - skew` to `until + max_delay` (capped at now), defaults 1 h and
//! 24 h ([`Lookback`]); the wall ranges in the index objects then skip every chunk outside the
//! range without fetching it. Lines delayed more than `max_delay` are found with a larger
//! `--max-delay`.
//!
//! **The hour's sources** ([`hour_plan`], [`plan_hours`]): one LIST of the hour's raw
//! segments, then one GET of its manifest, then one GET of its day's roll-up manifest (in that
//! order: a compaction deletes objects only after the manifest that replaces them is durable,
//! so a manifest read after the LIST covers every object the LIST missed). With an hourly
//! manifest: the current generation's compacted objects, plus raw segments the manifest does
//! not name (written after the compaction); without one, the raw segments (half-written
//! compaction outputs are ignored). With a day manifest: its outputs once for the day (as
//! sources of the day's last hour), and of each hour only the objects it does not name. A
//! source that vanishes while being read (its hour was compacted or rolled up in between)
//! makes the reader plan that hour again; records already passed on are dropped by identity,
//! so a reader sees every line exactly once before, during and after a compaction.
//!
//! **Which chunks** ([`read_source`]): the index object selects the chunks of the wanted devices
//! and wall range, fetched with ranged GETs (adjacent ranges coalesced); a source whose chunks
//! are all wanted is fetched with one GET. A missing or damaged index falls back to walking the
//! segment's gzip headers. Every chunk goes through [`Chunk::inflate`] (header CRC, declared
//! sizes, bounded inflate, payload CRC): a damaged object is reported by key and offset, and
//! reading goes on with the next chunk.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blackbox_protocol::chunk::walk_members;
use blackbox_protocol::{Chunk, ChunkHeader, Limits};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::dedup::{Overlap, Seen};
use crate::scan::{self, Fields};
use crate::segment::{IndexEntry, parse_index};
use crate::store::Store;
use crate::timespec::{
    DAY_HOURS, HOUR_US, day_hours, day_of_hour, day_path, hour_of, hour_path, parse_day_path,
};

/// Prefix of the receiver's segments.
pub const RAW: &str = "raw/";
/// Prefix of compaction's outputs and manifests.
pub const COMPACT: &str = "compact/";
/// Name of an hour's (or a day's) compaction manifest.
pub const MANIFEST: &str = "manifest.json";
/// The "hour" part of a day roll-up's keys: `compact/YYYY-MM-DD/day/`.
pub const DAY: &str = "day";

/// How far ingest time may lie from wall time (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Lookback {
    /// A line may be stored this long after its wall time (an outage), in µs.
    pub max_delay_us: i64,
    /// A device clock may run this far ahead of the receiver's, in µs.
    pub skew_us: i64,
}

impl Default for Lookback {
    fn default() -> Self {
        Self {
            max_delay_us: 24 * HOUR_US,
            skew_us: HOUR_US,
        }
    }
}

impl Lookback {
    /// The ingest hours that can hold lines with wall times in `[since, until)`.
    pub fn hours(&self, since: i64, until: i64, now: i64) -> Vec<i64> {
        let first = hour_of(since.saturating_sub(self.skew_us));
        let last = hour_of(
            until
                .saturating_add(self.max_delay_us)
                .min(now.saturating_add(self.skew_us)),
        );
        (first..=last).collect()
    }
}

/// `raw/YYYY-MM-DD/HH/`.
pub fn raw_prefix(hour: i64) -> String {
    format!("{RAW}{}/", hour_path(hour))
}

/// `compact/YYYY-MM-DD/HH/`.
pub fn compact_prefix(hour: i64) -> String {
    format!("{COMPACT}{}/", hour_path(hour))
}

/// `compact/YYYY-MM-DD/day/`: a day roll-up's outputs and manifest.
pub fn day_prefix(day: i64) -> String {
    format!("{COMPACT}{}/{DAY}/", day_path(day))
}

/// The last hour of a day: a day roll-up's outputs are sources of that hour.
pub fn last_hour(day: i64) -> i64 {
    (day + 1) * DAY_HOURS - 1
}

/// Is this a day roll-up's object (`compact/YYYY-MM-DD/day/…`)?
pub fn is_day_key(key: &str) -> bool {
    let mut parts = key.split('/');
    parts.next() == Some(COMPACT.trim_end_matches('/'))
        && parts.next().is_some()
        && parts.next() == Some(DAY)
}

/// The ingest hour a source key belongs to: `raw/` and `compact/` keys name theirs, a day
/// roll-up's object belongs to the day's last hour.
pub fn key_hour(key: &str) -> Option<i64> {
    let mut parts = key.split('/');
    let top = parts.next()?;
    if top != RAW.trim_end_matches('/') && top != COMPACT.trim_end_matches('/') {
        return None;
    }
    let date = parts.next()?;
    match parts.next()? {
        DAY => Some(last_hour(parse_day_path(date)?)),
        hh => crate::timespec::parse_hour_path(&format!("{date}/{hh}")),
    }
}

/// The index key beside an object key (`….seg.gz` → `….idx`).
pub fn idx_key(seg_key: &str) -> String {
    format!("{}.idx", seg_key.strip_suffix(".seg.gz").unwrap_or(seg_key))
}

/// An hour's (or a day roll-up's) compaction manifest: written after every output of its
/// generation is durable, before any input is deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// Outputs of this generation are the current ones.
    pub generation: u64,
    /// Keys of the objects the outputs replace (deleted once the manifest is durable): an
    /// hour's raw segments (all generations'); for a day, this generation's raw segments,
    /// hourly outputs and the previous day generation's outputs.
    pub inputs: Vec<String>,
    /// Keys of the outputs of this generation.
    pub outputs: Vec<String>,
    /// Raw segments with damage left in place (readers keep reading them): their intact
    /// chunks are in the outputs too, so only new segments make the hour or day worth
    /// compacting again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
    /// Day roll-up only: the generation of each hour's manifest it took in (`"HH"` →
    /// generation). Those hourly manifests are deleted with the inputs; an hour compacted
    /// again later continues after this generation, so no key is ever reused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hours: BTreeMap<String, u64>,
}

impl Manifest {
    /// The hourly generation a day manifest took in for `hour` (0: none).
    pub fn hour_generation(&self, hour: i64) -> u64 {
        self.hours
            .get(&format!("{:02}", hour.rem_euclid(DAY_HOURS)))
            .copied()
            .unwrap_or(0)
    }
}

/// One object to read: a raw segment or a compaction output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The object key (`….seg.gz`).
    pub key: String,
    /// Its ingest hour (a day roll-up's outputs: the day's last hour).
    pub hour: i64,
    /// Set when every chunk in it is this device's (a per-device compaction output).
    pub device: Option<String>,
}

/// The device a per-device compaction output holds (`d-<device>.g<gen>.seg.gz`).
pub fn output_device(key: &str) -> Option<&str> {
    let name = key.rsplit('/').next()?.strip_prefix("d-")?;
    Some(name.strip_suffix(".seg.gz")?.rsplit_once(".g")?.0)
}

/// Errors reading the store. Damage inside an object is not an error here: it is reported as
/// a [`SourceRead::problems`] line and reading goes on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The store failed (network, permissions): retry later.
    #[error("store: {0}")]
    Store(#[from] object_store::Error),
}

/// The hours of `wanted` that hold any object (raw or compacted). A long range is narrowed by
/// listing the date and hour "directories" (delimiter listings) instead of one LIST per hour.
/// A day with a roll-up counts with its last wanted hour (whose plan brings the day's outputs).
pub async fn existing_hours(store: &Store, wanted: &[i64]) -> Result<Vec<i64>, ReadError> {
    if wanted.len() <= 48 {
        return Ok(wanted.to_vec());
    }
    let want: BTreeSet<i64> = wanted.iter().copied().collect();
    let mut found = BTreeSet::new();
    for top in [RAW, COMPACT] {
        let dates = store
            .object_store()
            .list_with_delimiter(Some(&Path::from(top)))
            .await?;
        for d in dates.common_prefixes {
            let date = d.filename().unwrap_or_default().to_owned();
            let Some(day) = parse_day_path(&date) else {
                continue;
            };
            let Some(&last_wanted) = want.range(day_hours(day)).next_back() else {
                continue;
            };
            let hours = store.object_store().list_with_delimiter(Some(&d)).await?;
            for h in hours.common_prefixes {
                let name = h.filename().unwrap_or_default();
                if name == DAY {
                    found.insert(last_wanted);
                } else if let Some(h) = crate::timespec::parse_hour_path(&format!("{date}/{name}"))
                    && want.contains(&h)
                {
                    found.insert(h);
                }
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// Reads an object, `None` if it does not exist.
pub async fn get_opt(store: &Store, key: &str) -> Result<Option<bytes::Bytes>, ReadError> {
    match store.get(key).await {
        Ok(b) => Ok(Some(b)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Deletes an object; one already gone is fine.
pub async fn delete(store: &Store, key: &str) -> Result<(), ReadError> {
    match store.object_store().delete(&Path::from(key)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The manifest at `key`, if any. One that does not parse is reported and treated as absent
/// (its inputs are deleted only after it was written whole, so they are still there unless
/// the object was damaged later).
async fn manifest_at(store: &Store, key: &str) -> Result<Option<Manifest>, ReadError> {
    let Some(bytes) = get_opt(store, key).await? else {
        return Ok(None);
    };
    match serde_json::from_slice::<Manifest>(&bytes) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            tracing::error!(key, error = %e, "compaction manifest does not parse; ignoring it");
            Ok(None)
        }
    }
}

/// The hour's compaction manifest, if any (see [`manifest_at`] for one that does not parse).
pub async fn read_manifest(store: &Store, hour: i64) -> Result<Option<Manifest>, ReadError> {
    manifest_at(store, &format!("{}{MANIFEST}", compact_prefix(hour))).await
}

/// The day's roll-up manifest, if any.
pub async fn read_day_manifest(store: &Store, day: i64) -> Result<Option<Manifest>, ReadError> {
    manifest_at(store, &format!("{}{MANIFEST}", day_prefix(day))).await
}

/// What an hour holds: its raw segments (one LIST) and its manifest (one GET, after the LIST).
#[derive(Debug, Clone)]
pub struct Listed {
    /// The hour.
    pub hour: i64,
    /// Its raw keys, sorted.
    pub raw: Vec<String>,
    /// Its compaction manifest.
    pub manifest: Option<Manifest>,
}

/// Lists an hour, then reads its manifest: in that order (see the module doc).
pub async fn list_hour(store: &Store, hour: i64) -> Result<Listed, ReadError> {
    let raw = store.list(&raw_prefix(hour)).await?;
    let manifest = read_manifest(store, hour).await?;
    Ok(Listed {
        hour,
        raw,
        manifest,
    })
}

impl Listed {
    /// The hour's own sources under its day's roll-up manifest `day`: its compacted outputs,
    /// then its raw segments, each in key order, leaving out what either manifest replaced.
    pub fn sources(&self, day: Option<&Manifest>) -> Vec<Source> {
        let by_day: HashSet<&str> = day
            .map(|d| d.inputs.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut replaced: HashSet<&str> = HashSet::new();
        if let Some(m) = &self.manifest {
            for key in &m.outputs {
                if !by_day.contains(key.as_str()) {
                    out.push(Source {
                        key: key.clone(),
                        hour: self.hour,
                        device: output_device(key).map(str::to_owned),
                    });
                }
            }
            replaced.extend(m.inputs.iter().map(String::as_str));
        }
        for key in &self.raw {
            if key.ends_with(".seg.gz")
                && !replaced.contains(key.as_str())
                && !by_day.contains(key.as_str())
            {
                out.push(Source {
                    key: key.clone(),
                    hour: self.hour,
                    device: None,
                });
            }
        }
        out
    }
}

/// A day roll-up's outputs as sources (of the day's last hour).
pub fn day_sources(day: i64, m: &Manifest) -> Vec<Source> {
    m.outputs
        .iter()
        .map(|key| Source {
            key: key.clone(),
            hour: last_hour(day),
            device: output_device(key).map(str::to_owned),
        })
        .collect()
}

/// An hour's sources and the manifests they follow.
#[derive(Debug, Clone)]
pub struct HourPlan {
    /// The objects that hold the hour's lines (see [`hour_plan`]).
    pub sources: Vec<Source>,
    /// The hour's compaction manifest.
    pub manifest: Option<Manifest>,
    /// Its day's roll-up manifest.
    pub day: Option<Manifest>,
}

/// The objects that hold an hour's lines, each line exactly once up to duplicates by
/// identity (see the module doc): for the last hour of a rolled-up day, the day's outputs
/// first; then the hour's compacted outputs, then its raw segments, each in key order.
pub async fn hour_plan(store: &Store, hour: i64) -> Result<HourPlan, ReadError> {
    let listed = list_hour(store, hour).await?;
    let day = day_of_hour(hour);
    let day_manifest = read_day_manifest(store, day).await?;
    let mut sources = match &day_manifest {
        Some(d) if hour == last_hour(day) => day_sources(day, d),
        _ => Vec::new(),
    };
    sources.extend(listed.sources(day_manifest.as_ref()));
    Ok(HourPlan {
        sources,
        manifest: listed.manifest,
        day: day_manifest,
    })
}

/// The sources of several hours, in hour order, each line exactly once up to duplicates by
/// identity: every hour listed (`parallel` at a time), then each day's roll-up manifest read
/// once, whose outputs come first among its day's sources when any of its hours is wanted.
pub async fn plan_hours(
    store: &Store,
    hours: &[i64],
    parallel: usize,
) -> Result<Vec<Source>, ReadError> {
    let listed: Vec<Listed> = futures::stream::iter(hours.iter().map(|&h| list_hour(store, h)))
        .buffered(parallel.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let days: BTreeSet<i64> = hours.iter().map(|&h| day_of_hour(h)).collect();
    let manifests: BTreeMap<i64, Option<Manifest>> = futures::stream::iter(
        days.into_iter()
            .map(|d| async move { Ok::<_, ReadError>((d, read_day_manifest(store, d).await?)) }),
    )
    .buffered(parallel.max(1))
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    let mut days_done = BTreeSet::new();
    for l in &listed {
        let day = day_of_hour(l.hour);
        let m = manifests.get(&day).and_then(Option::as_ref);
        if let Some(m) = m
            && days_done.insert(day)
        {
            out.extend(day_sources(day, m));
        }
        out.extend(l.sources(m));
    }
    Ok(out)
}

/// One of `count` disjoint parts of the devices, by a hash of the device id: grinders shard
/// the fleet this way (`grind --shard K/N`), each grinding the devices of its part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which part (0 to `count` - 1).
    pub index: u32,
    /// How many parts.
    pub count: u32,
}

impl Shard {
    /// Parses `K/N` (0 ≤ K < N).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a shard: K/N, with 0 <= K < N (such as 0/4)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse::<u32>().map_err(|_| bad())?,
            n.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Is `device` in this part? The first 8 bytes of the SHA-256 of the device id, as a
    /// big-endian number, modulo `count`: the same on every host and in every version.
    pub fn owns(&self, device: &str) -> bool {
        let d = ring::digest::digest(&ring::digest::SHA256, device.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&d.as_ref()[..8]);
        u64::from_be_bytes(first) % u64::from(self.count.max(1)) == u64::from(self.index)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Which lines a reader wants.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Only these devices (`None`: all).
    pub devices: Option<BTreeSet<String>>,
    /// Wall time from (inclusive), µs.
    pub since_us: i64,
    /// Wall time until (exclusive), µs.
    pub until_us: i64,
    /// Only the devices of this shard (`None`: all).
    pub shard: Option<Shard>,
}

impl Filter {
    /// Everything.
    pub fn all() -> Self {
        Self {
            devices: None,
            since_us: i64::MIN,
            until_us: i64::MAX,
            shard: None,
        }
    }

    /// Does it want lines of device `d`?
    pub fn wants_device(&self, d: &str) -> bool {
        self.devices.as_ref().is_none_or(|s| s.contains(d)) && self.shard.is_none_or(|s| s.owns(d))
    }

    /// Could the chunk an index entry describes hold a wanted line?
    pub fn wants(&self, e: &IndexEntry) -> bool {
        self.wants_device(&e.device)
            && e.wall_max_us >= self.since_us
            && e.wall_min_us < self.until_us
    }

    /// Is every line of the chunk inside the wall range (no per-line time check needed)?
    pub fn covers(&self, wall_min: i64, wall_max: i64) -> bool {
        wall_min >= self.since_us && wall_max < self.until_us
    }

    /// Is a wall time inside the range?
    pub fn in_range(&self, wall_us: i64) -> bool {
        wall_us >= self.since_us && wall_us < self.until_us
    }
}

/// One decoded chunk: its checked header and inflated payload.
#[derive(Debug)]
pub struct Decoded {
    /// The object it came from.
    pub key: Arc<str>,
    /// The member's byte offset there.
    pub offset: u64,
    /// Its member's length.
    pub len: u64,
    /// The header (identity, sync point).
    pub header: ChunkHeader,
    /// Boot id as text (as the lines and index write it).
    pub boot: String,
    /// The inflated payload: one record line per `\n`.
    pub raw: Vec<u8>,
    /// The chunk as stored (its gzip member; shares the fetched buffer).
    pub member: bytes::Bytes,
    /// The index entry's wall range, when the chunk was found through one.
    pub wall: Option<(i64, i64)>,
}

impl Decoded {
    /// The record lines, without their `\n`.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        // memchr rather than `split(|b| *b == b'\n')`, which looks at one byte at a time and
        // cost more than scanning the lines' fields.
        let raw = &self.raw[..];
        let mut start = 0;
        memchr::memchr_iter(b'\n', raw)
            .chain(std::iter::once(raw.len()))
            .filter_map(move |end| {
                let line = raw.get(start..end);
                start = end + 1;
                line.filter(|l| !l.is_empty())
            })
    }

    /// The member's bytes are `store[key][offset..offset + len]`.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// A fetched chunk, not yet inflated: a grinder inflates each just before it grinds it, into
/// one buffer it reuses, so the inflated text is read while it is still in the cache (inflating
/// a whole piece first, then reading it, took three times as long: page faults and memory).
#[derive(Debug)]
pub struct Member {
    /// The object it came from.
    pub key: Arc<str>,
    /// Its byte offset there.
    pub offset: u64,
    /// The chunk as stored (its gzip member; shares the fetched buffer).
    pub bytes: bytes::Bytes,
    /// The index entry's wall range, when the chunk was found through one.
    pub wall: Option<(i64, i64)>,
}

impl Member {
    /// Checks and inflates the chunk into `buf` (cleared first; reused, to keep it in the
    /// cache), naming the key and offset in any error.
    pub fn decode(&self, limits: &Limits, buf: Vec<u8>) -> Result<Decoded, String> {
        let mut d = decode_member_into(&self.key, self.offset, self.bytes.clone(), limits, buf)?;
        d.wall = self.wall;
        Ok(d)
    }
}

/// What reading one source gave.
#[derive(Debug)]
pub struct SourceRead {
    /// The source.
    pub source: Source,
    /// Its wanted chunks, in object order, inflated ([`SourceRead::inflate`]).
    pub chunks: Vec<Decoded>,
    /// Its wanted chunks as fetched, in object order: [`read_pieces`] leaves them to the
    /// caller to inflate.
    pub members: Vec<Member>,
    /// Damage found (each names the key and offset); the rest was read.
    pub problems: Vec<String>,
    /// The object was gone (compacted away after it was listed): plan its hour again.
    pub vanished: bool,
    /// Bytes fetched.
    pub fetched: u64,
    /// The last (or only) piece of its source ([`read_hours`] reads a large source in pieces
    /// of [`READ_PIECE_BYTES`]; [`read_source`] reads it whole).
    pub last: bool,
}

impl SourceRead {
    /// A read of `source` that has fetched nothing yet.
    fn nothing_yet(source: Source) -> Self {
        Self {
            source,
            chunks: Vec::new(),
            members: Vec::new(),
            problems: Vec::new(),
            vanished: false,
            fetched: 0,
            last: true,
        }
    }

    /// Inflates the fetched members into `chunks`; a member that does not decode is a problem.
    pub fn inflate(&mut self, limits: &Limits) {
        let members = std::mem::take(&mut self.members);
        let chunks = decode_members(members, limits, &mut self.problems);
        self.chunks.extend(chunks);
    }
}

/// Inflates with zlib-rs (about twice miniz_oxide's speed) into `out` (cleared; a reused
/// buffer may hold more than `raw_len`, never more than the largest chunk before it, each within
/// the limits); the protocol checks the inflated size and every other thing
/// ([`Chunk::inflate_with`]).
fn inflate_fast(
    mut out: Vec<u8>,
    deflated: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, blackbox_protocol::DecodeError> {
    use blackbox_protocol::DecodeError;
    out.clear();
    out.reserve(raw_len);
    let mut d = flate2::Decompress::new(false);
    match d.decompress_vec(deflated, &mut out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) if d.total_in() == deflated.len() as u64 => Ok(out),
        Ok(flate2::Status::StreamEnd) => Err(DecodeError::SizeMismatch {
            what: "deflate length",
            declared: deflated.len() as u64,
            actual: d.total_in(),
        }),
        // Output full before the stream ended: more than declared.
        Ok(_) if out.len() >= raw_len => Err(DecodeError::SizeMismatch {
            what: "inflated size",
            declared: raw_len as u64,
            actual: out.len() as u64 + 1,
        }),
        Ok(_) => Err(DecodeError::Truncated {
            what: "deflate stream",
        }),
        Err(_) => Err(DecodeError::Inflate),
    }
}

/// Decodes the member at `offset` of `bytes`, naming the key in any error.
pub(crate) fn decode_member(
    key: &Arc<str>,
    offset: u64,
    member: bytes::Bytes,
    limits: &Limits,
) -> Result<Decoded, String> {
    decode_member_into(key, offset, member, limits, Vec::new())
}

/// [`decode_member`], inflating into `buf`.
fn decode_member_into(
    key: &Arc<str>,
    offset: u64,
    member: bytes::Bytes,
    limits: &Limits,
    buf: Vec<u8>,
) -> Result<Decoded, String> {
    let (header, raw) = Chunk::inflate_with(&member, limits, |d, n| inflate_fast(buf, d, n))
        .map_err(|e| format!("{key} at byte {offset}: chunk does not decode: {e}"))?;
    Ok(Decoded {
        key: key.clone(),
        offset,
        len: member.len() as u64,
        member,
        boot: header.id.boot.to_string(),
        header,
        raw,
        wall: None,
    })
}

/// Every chunk of a whole object, walking the gzip headers (no index needed).
pub fn decode_all(
    key: &Arc<str>,
    bytes: &bytes::Bytes,
    limits: &Limits,
    problems: &mut Vec<String>,
) -> Vec<Decoded> {
    let members = members_all(key, bytes, problems);
    decode_members(members, limits, problems)
}

/// Inflates `members`, each into its own buffer; a member that does not decode is a problem.
fn decode_members(
    members: Vec<Member>,
    limits: &Limits,
    problems: &mut Vec<String>,
) -> Vec<Decoded> {
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        match m.decode(limits, Vec::new()) {
            Ok(d) => out.push(d),
            Err(e) => problems.push(e),
        }
    }
    out
}

/// Every chunk of a whole object, walking the gzip headers, not inflated.
pub fn members_all(
    key: &Arc<str>,
    bytes: &bytes::Bytes,
    problems: &mut Vec<String>,
) -> Vec<Member> {
    let mut out = Vec::new();
    for m in walk_members(bytes) {
        match m {
            Ok((off, h)) => {
                let end = off.saturating_add(h.member_len());
                let Some(member) = usize::try_from(off)
                    .ok()
                    .zip(usize::try_from(end).ok())
                    .and_then(|(a, b)| bytes.get(a..b))
                else {
                    problems.push(format!("{key} at byte {off}: member runs past the end"));
                    break;
                };
                out.push(Member {
                    key: key.clone(),
                    offset: off,
                    bytes: bytes.slice_ref(member),
                    wall: None,
                });
            }
            Err(e) => {
                problems.push(format!(
                    "{key}: segment damaged, read up to the damage: {e}"
                ));
                break;
            }
        }
    }
    out
}

/// Most compressed bytes of one source that the grinder reads at once (by default): a larger
/// source (a device's day roll-up can be hundreds of MB) is read in pieces of its wanted
/// chunks, one after the other, so a reader's memory stays bounded by `parallel` pieces
/// whatever the object's size. The grinder inflates a piece chunk by chunk.
pub const PIECE_BYTES: u64 = 8 << 20;

/// The piece size of [`read_hours`] (grep, narrative), which inflates each piece whole: the
/// NDJSON of log text is 8 to 15 times its gzip, so a piece holds up to about 30 MiB.
pub const READ_PIECE_BYTES: u64 = 2 << 20;

/// What a source's index says to read of it.
#[derive(Debug)]
enum Want {
    /// Nothing of it passes the filter.
    Nothing,
    /// No usable index: the whole object, walking its gzip headers.
    Whole,
    /// These chunks; `all` when they are every chunk of the object (one GET then). `alone`:
    /// they are not a piece of a larger read, so a ranged read that fails (an index that does
    /// not match its object) may fall back to reading the whole object.
    Chunks {
        entries: Vec<IndexEntry>,
        all: bool,
        alone: bool,
    },
}

/// A source (or a piece of one) with what to read of it.
#[derive(Debug)]
struct Planned {
    read: SourceRead,
    want: Want,
}

/// Fetches `src`'s index and picks the chunks `filter` wants.
async fn plan_source(store: &Store, src: &Source, filter: &Filter) -> Result<Planned, ReadError> {
    let mut read = SourceRead::nothing_yet(src.clone());
    if let Some(d) = &src.device
        && !filter.wants_device(d)
    {
        return Ok(Planned {
            read,
            want: Want::Nothing,
        });
    }
    let idx = idx_key(&src.key);
    let entries = match get_opt(store, &idx).await? {
        Some(bytes) => {
            read.fetched += bytes.len() as u64;
            let (entries, bad) = parse_index(&bytes);
            if bad > 0 {
                read.problems.push(format!(
                    "{idx}: {bad} index lines do not parse; reading the whole segment"
                ));
                None
            } else {
                Some(entries)
            }
        }
        None => None,
    };
    let want = match entries {
        None => Want::Whole,
        Some(entries) => {
            let n = entries.len();
            let wanted: Vec<IndexEntry> = entries.into_iter().filter(|e| filter.wants(e)).collect();
            if wanted.is_empty() {
                Want::Nothing
            } else {
                Want::Chunks {
                    all: wanted.len() == n,
                    entries: wanted,
                    alone: true,
                }
            }
        }
    };
    Ok(Planned { read, want })
}

/// Splits a plan into pieces of at most `max_bytes` of chunks each (a larger chunk is a piece
/// alone), in object order; the index's problems and bytes go with the first piece, and only
/// the last is marked [`SourceRead::last`].
fn pieces(p: Planned, max_bytes: u64) -> Vec<Planned> {
    let Planned { read, want } = p;
    let Want::Chunks { entries, all, .. } = want else {
        return vec![Planned { read, want }];
    };
    let mut runs: Vec<Vec<IndexEntry>> = Vec::new();
    let mut bytes = 0u64;
    for e in entries {
        match runs.last_mut() {
            Some(run) if bytes.saturating_add(e.byte_len) <= max_bytes => {
                bytes = bytes.saturating_add(e.byte_len);
                run.push(e);
            }
            _ => {
                bytes = e.byte_len;
                runs.push(vec![e]);
            }
        }
    }
    let n = runs.len();
    let source = read.source.clone();
    let mut first = Some(read);
    runs.into_iter()
        .enumerate()
        .map(|(i, entries)| {
            let mut read = first
                .take()
                .unwrap_or_else(|| SourceRead::nothing_yet(source.clone()));
            read.last = i + 1 == n;
            Planned {
                read,
                want: Want::Chunks {
                    entries,
                    all: all && n == 1,
                    alone: n == 1,
                },
            }
        })
        .collect()
}

/// Fetches `todo` in order, `parallel` reads in flight, a source larger than `piece_bytes` in
/// pieces ([`SourceRead::last`] marks a source's last piece). With `inflate`, each read also
/// inflates its chunks ([`SourceRead::chunks`]), in the same read, so that at most `parallel`
/// pieces are held; without, the chunks come as fetched ([`SourceRead::members`]), for the
/// caller to inflate where it reads them (the grinder: chunk by chunk, into one buffer).
pub fn read_pieces<'a>(
    store: &'a Store,
    todo: &'a [Source],
    filter: &'a Filter,
    inflate: Option<&'a Limits>,
    parallel: usize,
    piece_bytes: u64,
) -> impl futures::Stream<Item = Result<SourceRead, ReadError>> + 'a {
    futures::stream::iter(todo.iter().map(move |s| plan_source(store, s, filter)))
        .buffered(parallel.max(1))
        .flat_map(move |p| {
            let pieces = match p {
                Ok(p) => pieces(p, piece_bytes).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(pieces)
        })
        .map(move |p| async move {
            let read = read_planned(store, p?).await?;
            match inflate {
                Some(limits) => inflated(read, limits).await,
                None => Ok(read),
            }
        })
        .buffered(parallel.max(1))
}

/// Reads the chunks of `src` that `filter` may want (see the module doc), all at once.
pub async fn read_source(
    store: &Store,
    src: &Source,
    filter: &Filter,
    limits: &Limits,
) -> Result<SourceRead, ReadError> {
    let p = plan_source(store, src, filter).await?;
    inflated(read_planned(store, p).await?, limits).await
}

/// Inflates the members of `read` (off the async threads).
async fn inflated(mut read: SourceRead, limits: &Limits) -> Result<SourceRead, ReadError> {
    let limits = *limits;
    tokio::task::spawn_blocking(move || {
        read.inflate(&limits);
        read
    })
    .await
    .map_err(|e| ReadError::Store(object_store::Error::JoinError { source: e }))
}

/// Fetches what `p` says (not inflated).
async fn read_planned(store: &Store, p: Planned) -> Result<SourceRead, ReadError> {
    let Planned { mut read, want } = p;
    let key: Arc<str> = Arc::from(read.source.key.as_str());
    let (entries, all, alone) = match want {
        Want::Nothing => return Ok(read),
        Want::Whole => {
            read_whole(store, &key, &mut read).await?;
            return Ok(read);
        }
        Want::Chunks {
            entries,
            all,
            alone,
        } => (entries, all, alone),
    };
    let ranges: Vec<std::ops::Range<u64>> = entries
        .iter()
        .map(|e| e.byte_offset..e.byte_offset.saturating_add(e.byte_len))
        .collect();
    let path = Path::from(read.source.key.as_str());
    let fetched = if all {
        store.get(&read.source.key).await.map(|object| {
            ranges
                .iter()
                .map(|r| {
                    let (a, b) = (r.start as usize, r.end as usize);
                    object
                        .get(a..b)
                        .map(|s| object.slice_ref(s))
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
        })
    } else {
        store.object_store().get_ranges(&path, &ranges).await
    };
    let parts = match fetched {
        Ok(p) => p,
        Err(object_store::Error::NotFound { .. }) => {
            read.vanished = true;
            return Ok(read);
        }
        // A range past the end (a lying index) is damage, not a store failure.
        Err(e) if alone => {
            read.problems.push(format!(
                "{}: ranged read failed ({e}); reading the whole segment",
                read.source.key
            ));
            read_whole(store, &key, &mut read).await?;
            return Ok(read);
        }
        // A piece of a large object: reading all of it for each piece would hold it whole.
        Err(e) => {
            let (first, last) = (entries.first(), entries.last());
            read.problems.push(format!(
                "{}: ranged read of bytes {}..{} failed ({e}); its {} chunk(s) there are not \
                 read: the index does not match the object (zcat reads it whole)",
                read.source.key,
                first.map_or(0, |e| e.byte_offset),
                last.map_or(0, |e| e.byte_offset.saturating_add(e.byte_len)),
                entries.len()
            ));
            return Ok(read);
        }
    };
    read.fetched += parts.iter().map(|p| p.len() as u64).sum::<u64>();
    let walls: Vec<(u64, (i64, i64))> = entries
        .iter()
        .map(|e| (e.byte_offset, (e.wall_min_us, e.wall_max_us)))
        .collect();
    read.members = walls
        .into_iter()
        .zip(parts)
        .map(|((offset, wall), bytes)| Member {
            key: key.clone(),
            offset,
            bytes,
            wall: Some(wall),
        })
        .collect();
    Ok(read)
}

/// Reads a whole object and finds every chunk by walking its gzip headers (no index).
async fn read_whole(store: &Store, key: &Arc<str>, read: &mut SourceRead) -> Result<(), ReadError> {
    let Some(bytes) = get_opt(store, key).await? else {
        read.vanished = true;
        return Ok(());
    };
    read.fetched += bytes.len() as u64;
    read.members = members_all(key, &bytes, &mut read.problems);
    Ok(())
}

/// One line passed on by [`Scanner`]: new by identity, inside the filter.
#[derive(Debug)]
pub struct Line<'a> {
    /// The chunk it came from.
    pub chunk: &'a Decoded,
    /// The stored line, exactly (without `\n`).
    pub text: &'a [u8],
    /// Its parsed fields.
    pub fields: Fields<'a>,
    /// Wall time from the chunk's sync point, µs.
    pub wall_us: i64,
}

/// Drops duplicates by identity and lines outside the filter, chunk by chunk, in the order the
/// chunks are given.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Identities passed on so far.
    pub seen: Seen,
    /// Lines that did not scan (reported, skipped).
    pub bad_lines: u64,
}

impl Scanner {
    /// Calls `f` with every new line of `c` that `filter` wants. Lines not wanted (outside the
    /// range, other devices) are not marked as seen.
    pub fn chunk<'a>(&mut self, c: &'a Decoded, filter: &Filter, mut f: impl FnMut(Line<'a>)) {
        let id = &c.header.id;
        if !filter.wants_device(id.device.as_str()) {
            return;
        }
        let runs = self.seen.runs(id.device.as_str(), &c.boot);
        let overlap = runs.overlap(id.first_seq, id.last_seq);
        if overlap == Overlap::All {
            return;
        }
        for text in c.lines() {
            let Some(fields) = scan::scan(text) else {
                self.bad_lines += 1;
                tracing::warn!(key = %c.key, offset = c.offset, "a line of this chunk does not parse; skipped");
                continue;
            };
            let wall_us = c.header.sync.wall_of(fields.mono_us);
            if !filter.in_range(wall_us) {
                continue;
            }
            if overlap == Overlap::Some && runs.contains(fields.seq) {
                continue;
            }
            runs.insert_run(fields.seq, fields.seq);
            f(Line {
                chunk: c,
                text,
                fields,
                wall_us,
            });
        }
    }
}

/// Counters of a read in progress (for a progress line).
#[derive(Debug, Default)]
pub struct Progress {
    /// Sources planned.
    pub sources: AtomicU64,
    /// Sources read.
    pub done: AtomicU64,
    /// Bytes fetched.
    pub bytes: AtomicU64,
}

/// Plans `hours` (listing them in parallel), then reads every source with `parallel` reads in
/// flight and hands them to `f` in order, a source larger than [`READ_PIECE_BYTES`] in pieces. An hour whose objects vanish under it (compacted
/// meanwhile) is planned and read again at the end; `f` must drop what it saw already (a
/// [`Scanner`] does).
pub async fn read_hours(
    store: &Store,
    hours: &[i64],
    filter: &Filter,
    limits: &Limits,
    parallel: usize,
    progress: &Progress,
    f: impl FnMut(SourceRead),
) -> Result<(), ReadError> {
    read_hours_in(
        store,
        hours,
        filter,
        limits,
        parallel,
        READ_PIECE_BYTES,
        progress,
        f,
    )
    .await
}

/// [`read_hours`] with pieces of at most `piece_bytes`.
#[allow(clippy::too_many_arguments)]
async fn read_hours_in(
    store: &Store,
    hours: &[i64],
    filter: &Filter,
    limits: &Limits,
    parallel: usize,
    piece_bytes: u64,
    progress: &Progress,
    mut f: impl FnMut(SourceRead),
) -> Result<(), ReadError> {
    let parallel = parallel.max(1);
    let hours = existing_hours(store, hours).await?;
    let mut todo = plan_hours(store, &hours, parallel).await?;
    for _attempt in 0..4 {
        progress
            .sources
            .fetch_add(todo.len() as u64, Ordering::Relaxed);
        let mut reads = read_pieces(store, &todo, filter, Some(limits), parallel, piece_bytes);
        let mut again = BTreeSet::new();
        while let Some(r) = reads.next().await {
            let r = r?;
            if r.last {
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            progress.bytes.fetch_add(r.fetched, Ordering::Relaxed);
            for p in &r.problems {
                tracing::error!("{p}");
            }
            if r.vanished {
                again.insert(r.source.hour);
            } else {
                f(r);
            }
        }
        drop(reads);
        if again.is_empty() {
            return Ok(());
        }
        tracing::info!(
            hours = again.len(),
            "objects were compacted while being read; reading their hours again"
        );
        let again: Vec<i64> = again.into_iter().collect();
        todo = plan_hours(store, &again, parallel).await?;
    }
    tracing::error!("objects kept vanishing while being read; giving up on them");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards are fixed by the device id alone (pinned here: a grinder of another version or
    /// host must agree), split the devices without overlap, and parse only as K/N with K < N.
    #[test]
    fn shards_are_stable_disjoint_and_parsed_strictly() {
        let s = |k, n| Shard { index: k, count: n };
        // SHA-256("dev-ssh") starts d521ef1452b8f0ae: 2 modulo 4, 0 modulo 5, 3 modulo 7.
        assert!(s(2, 4).owns("dev-ssh") && s(0, 5).owns("dev-ssh") && s(3, 7).owns("dev-ssh"));
        for d in ["router-1", "cam-2", "", "ünïcode"] {
            for n in 1..9 {
                assert_eq!((0..n).filter(|&k| s(k, n).owns(d)).count(), 1, "{d} in {n}");
            }
        }
        assert_eq!(Shard::parse("3/8"), Ok(s(3, 8)));
        assert_eq!(s(3, 8).to_string(), "3/8");
        for bad in ["8/8", "0/0", "1", "-1/2", "a/b", "1/2/3", ""] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let f = Filter {
            shard: Some(s(2, 4)),
            ..Filter::all()
        };
        assert!(f.wants_device("dev-ssh") && !f.wants_device("dev-linux"));
    }
    use blackbox_protocol::{BootId, DeviceId, Origin, Record, SyncPoint};

    fn chunk(device: &str, first: u64, n: u64) -> Vec<u8> {
        let records = (first..first + n)
            .map(|seq| Record {
                seq,
                mono_us: seq * 1000,
                level: 6,
                facility: 0,
                origin: Origin::Kmsg,
                msg: format!("{device} line {seq}").into_bytes(),
            })
            .collect();
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: 1_795_269_785_000_000,
            synced: true,
        };
        Chunk::new(
            DeviceId::new(device).unwrap(),
            BootId([1; 16]),
            sync,
            records,
        )
        .unwrap()
        .encode(6, &Limits::DEFAULT)
        .unwrap()
    }

    /// Chunks decode one after another into one reused buffer, as the grinder decodes them:
    /// a chunk whose header lies about its inflated size, smaller or larger, is refused
    /// whatever room (and old text) the buffer holds, and a chunk after it reads its own lines.
    #[test]
    fn a_reused_buffer_lets_no_size_lie_through() {
        let key: Arc<str> = Arc::from("k");
        let member = |b: Vec<u8>| Member {
            key: key.clone(),
            offset: 0,
            bytes: bytes::Bytes::from(b),
            wall: None,
        };
        let good = chunk("d2", 0, 3);
        let lie = |by: i64| {
            let mut h = ChunkHeader::parse(&good).unwrap();
            let rest = good[h.header_len as usize..].to_vec();
            h.raw_len = u32::try_from(i64::from(h.raw_len) + by).unwrap();
            let mut out = Vec::new();
            h.emit(&mut out);
            out.extend(rest);
            out
        };
        let roomy = || vec![b'x'; 1 << 20];
        for by in [-5, -1, 1, 5] {
            let e = member(lie(by))
                .decode(&Limits::DEFAULT, roomy())
                .unwrap_err();
            assert!(e.contains("inflated size"), "{by}: {e}");
            assert!(
                member(lie(by))
                    .decode(&Limits::DEFAULT, Vec::new())
                    .is_err()
            );
        }
        // Room for more than it declares, not for all it holds: full before the stream ends.
        let real = ChunkHeader::parse(&good).unwrap().raw_len as usize;
        let e = member(lie(-5))
            .decode(&Limits::DEFAULT, Vec::with_capacity(real - 2))
            .unwrap_err();
        assert!(e.contains("inflated size"), "{e}");
        let d = member(good.clone())
            .decode(&Limits::DEFAULT, roomy())
            .unwrap();
        let fresh = member(good).decode(&Limits::DEFAULT, Vec::new()).unwrap();
        assert_eq!(d.raw, fresh.raw);
        assert_eq!(d.lines().count(), 3);
    }

    /// A segment of `chunks` and its index, as the receiver writes them.
    async fn put_segment(store: &Store, key: &str, chunks: &[Vec<u8>]) -> Vec<IndexEntry> {
        let mut seg = Vec::new();
        let mut idx = Vec::new();
        let mut entries = Vec::new();
        for c in chunks {
            let full = Chunk::decode(c, &Limits::DEFAULT).unwrap();
            let e = IndexEntry::of(
                &crate::segment::Accepted::of(&full),
                seg.len() as u64,
                c.len() as u64,
            );
            serde_json::to_writer(&mut idx, &e).unwrap();
            idx.push(b'\n');
            seg.extend_from_slice(c);
            entries.push(e);
        }
        store.put(key, seg).await.unwrap();
        store.put(&idx_key(key), idx).await.unwrap();
        entries
    }

    async fn put_manifest(store: &Store, prefix: &str, m: &Manifest) {
        let key = format!("{prefix}{MANIFEST}");
        store
            .put(&key, serde_json::to_vec(m).unwrap())
            .await
            .unwrap();
    }

    fn seqs(reads: &[SourceRead]) -> Vec<(String, u64)> {
        let mut scanner = Scanner::default();
        let mut out = Vec::new();
        for r in reads {
            for c in &r.chunks {
                scanner.chunk(c, &Filter::all(), |l| {
                    out.push((l.fields.device.to_string(), l.fields.seq))
                });
            }
        }
        out
    }

    async fn read_all(store: &Store, hour: i64, filter: &Filter) -> Vec<SourceRead> {
        let mut reads = Vec::new();
        read_hours(
            store,
            &[hour],
            filter,
            &Limits::DEFAULT,
            4,
            &Progress::default(),
            |r| reads.push(r),
        )
        .await
        .unwrap();
        reads
    }

    const HOUR: i64 = 498_686; // 2026-11-21T14

    #[tokio::test]
    async fn damage_is_named_and_the_rest_is_read() {
        let store = Store::open("memory://").unwrap();
        let p = raw_prefix(HOUR);
        put_segment(
            &store,
            &format!("{p}r0-a.seg.gz"),
            &[chunk("d1", 0, 5), chunk("d1", 5, 5), chunk("d2", 0, 5)],
        )
        .await;
        // Flip one byte of the second chunk's deflate stream: its CRC fails.
        let key = format!("{p}r0-a.seg.gz");
        let mut bytes = store.get(&key).await.unwrap().to_vec();
        let second = chunk("d1", 0, 5).len();
        bytes[second + 100] ^= 0x55;
        store.put(&key, bytes).await.unwrap();
        // A second segment truncated mid-chunk, without an index.
        let mut cut = chunk("d3", 0, 5);
        let whole = cut.len();
        cut.extend_from_slice(&chunk("d3", 5, 5)[..40]);
        store.put(&format!("{p}r0-b.seg.gz"), cut).await.unwrap();
        // A third whose index is garbage.
        put_segment(&store, &format!("{p}r0-c.seg.gz"), &[chunk("d4", 0, 3)]).await;
        store
            .put(&format!("{p}r0-c.idx"), b"not json\n".to_vec())
            .await
            .unwrap();

        let reads = read_all(&store, HOUR, &Filter::all()).await;
        let problems: Vec<&String> = reads.iter().flat_map(|r| &r.problems).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("{p}r0-a.seg.gz at byte {second}")),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with(&format!("{p}r0-b.seg.gz")),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with(&format!("{p}r0-c.idx")),
            "{problems:?}"
        );
        let got = seqs(&reads);
        let want: Vec<(String, u64)> = (0..5)
            .map(|s| ("d1".to_owned(), s))
            .chain((0..5).map(|s| ("d2".to_owned(), s)))
            .chain((0..5).map(|s| ("d3".to_owned(), s)))
            .chain((0..3).map(|s| ("d4".to_owned(), s)))
            .collect();
        assert_eq!(got, want);
        assert!(whole > 0);
    }

    /// A source larger than a piece is read in pieces, in order, each within the piece size
    /// (but a chunk larger than it, alone); a piece of wanted chunks skips unwanted ones; the
    /// progress counts sources, not pieces.
    #[tokio::test]
    async fn a_large_source_is_read_in_pieces_in_order() {
        let store = Store::open("memory://").unwrap();
        let p = raw_prefix(HOUR);
        let chunks: Vec<Vec<u8>> = (0..10)
            .map(|k| chunk(if k == 4 { "d2" } else { "d1" }, k * 100, 100))
            .chain([chunk("d1", 1000, 2000)])
            .collect();
        let entries = put_segment(&store, &format!("{p}r0-a.seg.gz"), &chunks).await;
        put_segment(&store, &format!("{p}r0-b.seg.gz"), &[chunk("d1", 3000, 5)]).await;
        let one = entries[0].byte_len;
        assert!(entries[10].byte_len > 3 * one, "the last chunk is larger");
        let filter = Filter {
            devices: Some(["d1".to_owned()].into()),
            since_us: i64::MIN,
            until_us: i64::MAX,
            shard: None,
        };
        let in_pieces = async |progress: &Progress| {
            let mut reads = Vec::new();
            read_hours_in(
                &store,
                &[HOUR],
                &filter,
                &Limits::DEFAULT,
                2,
                3 * one,
                progress,
                |r| reads.push(r),
            )
            .await
            .unwrap();
            reads
        };
        let progress = Progress::default();
        let reads = in_pieces(&progress).await;
        let shape: Vec<(usize, bool)> = reads.iter().map(|r| (r.chunks.len(), r.last)).collect();
        // d1's nine small chunks three to a piece, then the large one alone; then r0-b.
        assert_eq!(
            shape,
            [(3, false), (3, false), (3, false), (1, true), (1, true)]
        );
        for r in &reads[..4] {
            let bytes: u64 = r.chunks.iter().map(|c| c.len).sum();
            assert!(r.chunks.len() == 1 || bytes <= 3 * one, "{bytes}");
        }
        let want: Vec<(String, u64)> = (0..400)
            .chain(500..3005)
            .map(|s| ("d1".to_owned(), s))
            .collect();
        assert_eq!(seqs(&reads), want);
        assert_eq!(progress.done.load(Ordering::Relaxed), 2);
        assert_eq!(progress.sources.load(Ordering::Relaxed), 2);
        // An index whose last entry lies past the object's end: that piece is named as
        // damage, the others are read; a read of the whole source falls back to walking it.
        let key = format!("{p}r0-a.seg.gz");
        let mut lying = entries.clone();
        if let Some(e) = lying.last_mut() {
            e.byte_offset += 1 << 20;
        }
        let idx: Vec<u8> = lying
            .iter()
            .flat_map(|e| {
                let mut l = serde_json::to_vec(e).unwrap();
                l.push(b'\n');
                l
            })
            .collect();
        store.put(&idx_key(&key), idx).await.unwrap();
        let damaged = in_pieces(&Progress::default()).await;
        let problems: Vec<&String> = damaged.iter().flat_map(|r| &r.problems).collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("ranged read of bytes") && problems[0].contains("1 chunk(s)"),
            "{problems:?}"
        );
        let want_damaged: Vec<(String, u64)> = (0..400)
            .chain(500..1000)
            .chain(3000..3005)
            .map(|s| ("d1".to_owned(), s))
            .collect();
        assert_eq!(seqs(&damaged), want_damaged);
        let src = Source {
            key: key.clone(),
            hour: HOUR,
            device: None,
        };
        let alone = read_source(&store, &src, &filter, &Limits::DEFAULT)
            .await
            .unwrap();
        assert!(
            alone.problems[0].contains("reading the whole segment"),
            "{:?}",
            alone.problems
        );
        // Walking the whole object yields every chunk (the caller's scanner filters).
        let walked = seqs(&[alone]);
        let d1: Vec<u64> = walked
            .iter()
            .filter(|(d, _)| d == "d1")
            .map(|(_, s)| *s)
            .collect();
        assert!(
            d1.iter().copied().eq((0..400).chain(500..3000)),
            "{} d1 lines",
            d1.len()
        );
        put_segment(&store, &key, &chunks).await;
        let whole = read_all(&store, HOUR, &filter).await;
        assert_eq!(
            whole.len(),
            2,
            "below the default piece size: one read a source"
        );
        assert_eq!(seqs(&whole), want);
    }

    #[tokio::test]
    async fn device_and_time_filters_fetch_only_wanted_chunks() {
        let store = Store::open("memory://").unwrap();
        let p = raw_prefix(HOUR);
        let key = format!("{p}r0-a.seg.gz");
        let entries = put_segment(
            &store,
            &key,
            &[chunk("d1", 0, 50), chunk("d2", 0, 50), chunk("d1", 50, 50)],
        )
        .await;
        let filter = Filter {
            devices: Some(["d1".to_owned()].into()),
            since_us: entries[2].wall_min_us,
            until_us: i64::MAX,
            shard: None,
        };
        let reads = read_all(&store, HOUR, &filter).await;
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].chunks.len(), 1, "only the third chunk is fetched");
        let idx_len = store.get(&idx_key(&key)).await.unwrap().len() as u64;
        assert_eq!(reads[0].fetched, idx_len + entries[2].byte_len);
        assert_eq!(
            seqs(&reads),
            (50..100).map(|s| ("d1".to_owned(), s)).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_manifest_switches_readers_to_the_outputs() {
        let store = Store::open("memory://").unwrap();
        let (raw, comp) = (raw_prefix(HOUR), compact_prefix(HOUR));
        put_segment(&store, &format!("{raw}r0-a.seg.gz"), &[chunk("d1", 0, 10)]).await;
        put_segment(&store, &format!("{raw}r0-b.seg.gz"), &[chunk("d1", 5, 10)]).await;
        // An output nobody names yet (a compaction that died before its manifest).
        put_segment(
            &store,
            &format!("{comp}d-d1.g1.seg.gz"),
            &[chunk("d1", 0, 15)],
        )
        .await;
        let names = |s: Vec<Source>| s.into_iter().map(|s| s.key).collect::<Vec<_>>();
        assert_eq!(
            names(hour_plan(&store, HOUR).await.unwrap().sources).len(),
            2
        );
        let m = Manifest {
            version: 1,
            generation: 1,
            inputs: vec![format!("{raw}r0-a.seg.gz")],
            outputs: vec![format!("{comp}d-d1.g1.seg.gz")],
            ..Default::default()
        };
        put_manifest(&store, &comp, &m).await;
        let sources = hour_plan(&store, HOUR).await.unwrap().sources;
        assert_eq!(sources[0].device.as_deref(), Some("d1"));
        assert_eq!(
            names(sources),
            vec![format!("{comp}d-d1.g1.seg.gz"), format!("{raw}r0-b.seg.gz")]
        );
        let reads = read_all(&store, HOUR, &Filter::all()).await;
        assert_eq!(
            seqs(&reads),
            (0..15).map(|s| ("d1".to_owned(), s)).collect::<Vec<_>>()
        );
        assert_eq!(
            output_device("compact/x/y/d-cam-1.2.g12.seg.gz"),
            Some("cam-1.2")
        );
    }

    #[tokio::test]
    async fn a_day_manifest_replaces_its_inputs_in_every_hour() {
        let store = Store::open("memory://").unwrap();
        let day = day_of_hour(HOUR);
        let (h0, h1) = (day * DAY_HOURS + 3, HOUR);
        let (raw0, raw1, dayp) = (raw_prefix(h0), raw_prefix(h1), day_prefix(day));
        put_segment(&store, &format!("{raw0}r0-a.seg.gz"), &[chunk("d1", 0, 10)]).await;
        put_segment(
            &store,
            &format!("{raw1}r0-b.seg.gz"),
            &[chunk("d1", 10, 10)],
        )
        .await;
        put_segment(
            &store,
            &format!("{dayp}d-d1.g1.seg.gz"),
            &[chunk("d1", 0, 20)],
        )
        .await;
        let m = Manifest {
            version: 1,
            generation: 1,
            inputs: vec![format!("{raw0}r0-a.seg.gz"), format!("{raw1}r0-b.seg.gz")],
            outputs: vec![format!("{dayp}d-d1.g1.seg.gz")],
            ..Default::default()
        };
        put_manifest(&store, &dayp, &m).await;
        // A late segment in a rolled-up hour.
        put_segment(&store, &format!("{raw1}r0-c.seg.gz"), &[chunk("d1", 20, 5)]).await;
        let names = |s: Vec<Source>| s.into_iter().map(|s| s.key).collect::<Vec<_>>();
        assert_eq!(
            names(hour_plan(&store, h0).await.unwrap().sources),
            Vec::<String>::new()
        );
        let last = hour_plan(&store, last_hour(day)).await.unwrap();
        assert_eq!(names(last.sources), vec![format!("{dayp}d-d1.g1.seg.gz")]);
        assert_eq!(last.day, Some(m));
        // A range of some of the day's hours: the day's outputs once, then what is new.
        let planned = plan_hours(&store, &[h0, h1], 2).await.unwrap();
        assert_eq!(planned[0].hour, last_hour(day));
        assert_eq!(planned[0].device.as_deref(), Some("d1"));
        assert_eq!(
            names(planned),
            vec![
                format!("{dayp}d-d1.g1.seg.gz"),
                format!("{raw1}r0-c.seg.gz")
            ]
        );
        for (hour, lines) in [(h0, 20), (h1, 25)] {
            let reads = read_all(&store, hour, &Filter::all()).await;
            let want: Vec<(String, u64)> = (0..lines).map(|s| ("d1".to_owned(), s)).collect();
            assert_eq!(seqs(&reads), want, "{}", hour_path(hour));
        }
    }

    #[test]
    fn keys_name_their_hour() {
        let day = day_of_hour(HOUR);
        assert_eq!(
            key_hour(&format!("{}x.seg.gz", raw_prefix(HOUR))),
            Some(HOUR)
        );
        assert_eq!(
            key_hour(&format!("{}x.seg.gz", compact_prefix(HOUR))),
            Some(HOUR)
        );
        let day_key = format!("{}d-x.g1.seg.gz", day_prefix(day));
        assert_eq!(day_key, "compact/2026-11-21/day/d-x.g1.seg.gz");
        assert_eq!(key_hour(&day_key), Some(last_hour(day)));
        assert!(is_day_key(&day_key));
        assert!(!is_day_key(&format!(
            "{}d-x.g1.seg.gz",
            compact_prefix(HOUR)
        )));
        assert_eq!(key_hour("events/2026-11-21/14/x.ndjson.gz"), None);
        assert_eq!(hour_path(last_hour(day)), "2026-11-21/23");
    }

    #[test]
    fn lookback_hours() {
        let lb = Lookback::default();
        let t = HOUR * HOUR_US + 1;
        assert_eq!(lb.hours(t, t + 1, t), vec![HOUR - 1, HOUR, HOUR + 1]);
        let far = lb.hours(t - 100 * HOUR_US, t - 99 * HOUR_US, t);
        assert_eq!((far[0], *far.last().unwrap()), (HOUR - 101, HOUR - 75));
    }
}
