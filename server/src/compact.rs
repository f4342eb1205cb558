//! `blackbox-server compact --hour H`: an hour's many small segments become one object per
//! device (or per device group), deduplicated and in sequence order, each with its index.
//!
//! ```text
//! compact/YYYY-MM-DD/HH/d-<device>.g<generation>.seg.gz   the device's chunks, in order
//! compact/YYYY-MM-DD/HH/d-<device>.g<generation>.idx      its index (same format as raw .idx)
//! compact/YYYY-MM-DD/HH/manifest.json                     generation, inputs, outputs
//! ```
//! (`--groups N`: `h<NNN>.g<generation>.…` for N groups by device hash instead.)
//!
//! **Steps, each durable before the next** (a crash anywhere leaves a state every reader reads
//! correctly, see [`crate::reader`]):
//! 1. finish a previous run's deletions (a manifest whose inputs are still there);
//! 2. read the hour's current sources (raw segments and a previous generation's outputs), drop
//!    duplicate records by identity, order each device's chunks by boot and sequence number;
//! 3. write every output and its index (readers ignore them: no manifest names them yet);
//! 4. write the manifest (readers switch: outputs instead of the inputs it names);
//! 5. delete the inputs and a previous generation's outputs.
//!
//! Chunks stay whole: an untouched chunk is copied byte for byte (its gzip member), a chunk
//! with some records already seen is re-encoded with the rest and its own sync point, so every
//! line reads exactly as before. A raw segment with damage is left in place and not named as
//! an input (readers keep reading it; its intact chunks, copied too, are dropped there as
//! duplicates by identity).
//!
//! One hour of one group is held in memory while it is written; the hour's chunk headers and
//! the deduplication state for all of it.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use blackbox_protocol::{Chunk, Limits};
use futures::StreamExt;

use crate::dedup::Seen;
use crate::reader::{self, Decoded, Filter, Manifest, RAW, compact_prefix, idx_key};
use crate::scan;
use crate::segment::IndexEntry;
use crate::store::Store;
use crate::timespec::{HOUR_US, hour_path, now_us};

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
    /// Test hook: abort at `after-output`, `after-manifest` or `after-delete`.
    pub fault: Option<String>,
}

impl Default for CompactConfig {
    fn default() -> Self {
        Self {
            groups: 0,
            allow_open: false,
            close_after_us: 300_000_000,
            parallel: 8,
            fault: None,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The generation written (0: nothing to do).
    pub generation: u64,
    /// Raw segments replaced.
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
    /// Bytes read and written.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

fn fault(cfg: &CompactConfig, point: &str) {
    if cfg.fault.as_deref() == Some(point) {
        tracing::error!(point, "fault injection: aborting");
        std::process::abort();
    }
}

/// FNV-1a: a stable device → group mapping (never changes across versions).
fn group_of(device: &str, groups: u32) -> String {
    if groups == 0 {
        return format!("d-{device}");
    }
    let h = device.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("h{:03}", h % u64::from(groups))
}

/// A chunk as it goes out.
struct Out {
    member: bytes::Bytes,
    entry: IndexEntry,
}

/// Deletes the inputs a manifest names and every compacted object of the hour it does not.
async fn cleanup(
    store: &Store,
    hour: i64,
    m: &Manifest,
    cfg: &CompactConfig,
) -> anyhow::Result<()> {
    let raw_now: BTreeSet<String> = store
        .list(&reader::raw_prefix(hour))
        .await?
        .into_iter()
        .collect();
    let mut first = true;
    for k in &m.inputs {
        if raw_now.contains(k) {
            reader::delete(store, k).await?;
            if first {
                fault(cfg, "after-delete");
                first = false;
            }
        }
        let idx = idx_key(k);
        if raw_now.contains(&idx) {
            reader::delete(store, &idx).await?;
        }
    }
    let keep: BTreeSet<String> = m
        .outputs
        .iter()
        .flat_map(|o| [o.clone(), idx_key(o)])
        .chain([format!("{}{}", compact_prefix(hour), reader::MANIFEST)])
        .collect();
    for k in store.list(&compact_prefix(hour)).await? {
        if !keep.contains(&k) {
            reader::delete(store, &k).await?;
        }
    }
    Ok(())
}

/// Compacts one ingest hour (see the module doc).
pub async fn compact_hour(
    store: &Store,
    hour: i64,
    cfg: &CompactConfig,
) -> anyhow::Result<CompactReport> {
    if !cfg.allow_open && now_us() < (hour + 1) * HOUR_US + cfg.close_after_us {
        bail!(
            "hour {} is not closed yet (receivers may still write to it); wait, or pass --allow-open",
            hour_path(hour)
        );
    }
    let mut report = CompactReport::default();
    let prev = reader::read_manifest(store, hour).await?;
    if let Some(m) = &prev {
        cleanup(store, hour, m, cfg).await?;
    }
    let sources = reader::hour_plan(store, hour).await?.sources;
    let new_raw = sources.iter().filter(|s| s.key.starts_with(RAW)).count();
    if new_raw == 0 {
        tracing::info!(hour = %hour_path(hour), "nothing to compact");
        return Ok(report);
    }
    let generation = prev.as_ref().map_or(1, |m| m.generation + 1);
    let mut inputs: BTreeSet<String> = prev
        .map(|m| m.inputs.into_iter().collect())
        .unwrap_or_default();

    // Read everything; a damaged raw segment stays where it is.
    let filter = Filter::all();
    let reads: Vec<_> = futures::stream::iter(
        sources
            .iter()
            .map(|s| reader::read_source(store, s, &filter, &Limits::DEFAULT)),
    )
    .buffered(cfg.parallel.max(1))
    .collect()
    .await;
    let mut chunks: Vec<Decoded> = Vec::new();
    for r in reads {
        let r = r?;
        report.bytes_in += r.fetched;
        if r.vanished {
            bail!(
                "{} vanished while being compacted: is another compaction of this hour running?",
                r.source.key
            );
        }
        let raw = r.source.key.starts_with(RAW);
        if !r.problems.is_empty() {
            for p in &r.problems {
                tracing::error!("{p}");
            }
            if !raw {
                bail!(
                    "compacted object {} is damaged; not compacting over it",
                    r.source.key
                );
            }
            report.kept += 1;
        } else if raw {
            inputs.insert(r.source.key.clone());
            report.inputs += 1;
        }
        chunks.extend(r.chunks);
    }
    report.chunks_in = chunks.len();

    // Per chunk: its sequence numbers and wall range; boots ordered by their first wall time.
    let mut info = Vec::with_capacity(chunks.len());
    for c in &chunks {
        let mut seqs = Vec::with_capacity(c.header.record_count as usize);
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for l in c.lines() {
            let Some(f) = scan::scan(l) else {
                bail!("{} at byte {}: a line does not parse", c.key, c.offset);
            };
            seqs.push(f.seq);
            let w = c.header.sync.wall_of(f.mono_us);
            lo = lo.min(w);
            hi = hi.max(w);
        }
        info.push((seqs, lo, hi));
    }
    let mut boot_start: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (c, (_, lo, _)) in chunks.iter().zip(&info) {
        let e = boot_start
            .entry((c.header.id.device.to_string(), c.boot.clone()))
            .or_insert(*lo);
        *e = (*e).min(*lo);
    }
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by_key(|&i| {
        let c = &chunks[i];
        let dev = c.header.id.device.to_string();
        let start = boot_start.get(&(dev.clone(), c.boot.clone())).copied();
        (
            dev,
            start,
            c.boot.clone(),
            c.header.id.first_seq,
            std::cmp::Reverse(c.header.id.last_seq),
        )
    });

    // Deduplicate in that order; group.
    let mut seen = Seen::default();
    let mut groups: BTreeMap<String, Vec<Out>> = BTreeMap::new();
    for i in order {
        let c = &chunks[i];
        let (seqs, lo, hi) = &info[i];
        let runs = seen.runs(c.header.id.device.as_str(), &c.boot);
        let new: Vec<bool> = seqs.iter().map(|&s| runs.insert(s)).collect();
        let kept = new.iter().filter(|n| **n).count();
        report.duplicates += (seqs.len() - kept) as u64;
        if kept == 0 {
            continue;
        }
        let device = c.header.id.device.to_string();
        let out = if kept == seqs.len() {
            Out {
                member: c.member.clone(),
                entry: IndexEntry {
                    device: device.clone(),
                    boot: c.boot.clone(),
                    first_seq: c.header.id.first_seq,
                    last_seq: c.header.id.last_seq,
                    records: c.header.record_count,
                    wall_min_us: *lo,
                    wall_max_us: *hi,
                    byte_offset: 0,
                    byte_len: c.member.len() as u64,
                },
            }
        } else {
            let full = Chunk::decode(&c.member, &Limits::DEFAULT).with_context(|| {
                format!("{} at byte {}: chunk does not decode", c.key, c.offset)
            })?;
            let records: Vec<_> = full
                .records
                .into_iter()
                .zip(&new)
                .filter_map(|(r, n)| n.then_some(r))
                .collect();
            let part = Chunk::new(full.id.device, full.id.boot, full.sync, records)
                .map_err(|e| anyhow::anyhow!("{} at byte {}: {e}", c.key, c.offset))?;
            let bytes = part
                .encode(6, &Limits::DEFAULT)
                .map_err(|e| anyhow::anyhow!("{} at byte {}: re-encoding: {e}", c.key, c.offset))?;
            let (wlo, whi) = part.wall_range();
            Out {
                entry: IndexEntry {
                    device: device.clone(),
                    boot: c.boot.clone(),
                    first_seq: part.id.first_seq,
                    last_seq: part.id.last_seq,
                    records: part.records.len() as u32,
                    wall_min_us: wlo,
                    wall_max_us: whi,
                    byte_offset: 0,
                    byte_len: bytes.len() as u64,
                },
                member: bytes::Bytes::from(bytes),
            }
        };
        groups
            .entry(group_of(&device, cfg.groups))
            .or_default()
            .push(out);
    }
    drop(chunks);

    // Outputs, then the manifest, then the deletions.
    let prefix = compact_prefix(hour);
    let mut outputs = Vec::new();
    for (group, outs) in groups {
        let key = format!("{prefix}{group}.g{generation}.seg.gz");
        let mut body = Vec::with_capacity(outs.iter().map(|o| o.member.len()).sum());
        let mut idx = Vec::new();
        for mut o in outs {
            o.entry.byte_offset = body.len() as u64;
            body.extend_from_slice(&o.member);
            serde_json::to_writer(&mut idx, &o.entry)?;
            idx.push(b'\n');
            report.chunks_out += 1;
        }
        report.bytes_out += body.len() as u64;
        store
            .put(&key, body)
            .await
            .with_context(|| format!("writing {key}"))?;
        store
            .put(&idx_key(&key), idx)
            .await
            .with_context(|| format!("writing {}", idx_key(&key)))?;
        fault(cfg, "after-output");
        outputs.push(key);
    }
    report.outputs = outputs.len();
    let manifest = Manifest {
        version: 1,
        generation,
        inputs: inputs.into_iter().collect(),
        outputs,
        ..Default::default()
    };
    let mkey = format!("{prefix}{}", reader::MANIFEST);
    store
        .put(&mkey, serde_json::to_vec_pretty(&manifest)?)
        .await
        .with_context(|| format!("writing {mkey}"))?;
    fault(cfg, "after-manifest");
    cleanup(store, hour, &manifest, cfg).await?;
    report.generation = generation;
    tracing::info!(hour = %hour_path(hour), ?report, "hour compacted");
    Ok(report)
}
