//! The streaming merge under both compactions: the chunks of some sources, deduplicated by
//! identity and ordered per device (boots by their first wall time, then by sequence number),
//! written as one object per group with its index, holding a few chunks' bytes at a time.
//!
//! 1. **Plan.** Every source's index object (a source without a usable one is read once and
//!    its gzip headers walked) gives its chunks' identities, wall ranges and byte ranges; they
//!    are split by output group and sorted. Memory: the index entries, about 150 bytes a chunk.
//! 2. **Copy**, group by group (`parallel` groups at a time): consecutive chunks of one source
//!    are fetched with one ranged GET of at most [`RUN_BYTES`] (two in flight per group), each
//!    chunk is checked (inflate, CRCs, the identity its index names) and its records compared
//!    with the identities already written. The output is uploaded as it is written (object_store's
//!    `BufWriter`: one PUT when small, else a multipart upload in parts of `part_size`, two in
//!    flight); its index lines are kept and written after it. Memory per group: two runs, one
//!    chunk inflated, three parts.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, bail};
use blackbox_protocol::{Chunk, Limits};
use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use tokio::io::AsyncWriteExt;

use super::{CompactConfig, CompactReport, fault, group_of};
use crate::dedup::Seen;
use crate::reader::{Decoded, RAW, Source, decode_all, decode_member, get_opt, idx_key};
use crate::scan;
use crate::segment::{IndexEntry, parse_index};
use crate::store::Store;

/// The longest ranged GET (a chunk longer than this is fetched alone).
const RUN_BYTES: u64 = 4 << 20;

/// What merging wrote and found.
#[derive(Debug, Default)]
pub(super) struct Merged {
    /// Output keys, sorted.
    pub outputs: Vec<String>,
    /// Sources with damage (each problem was logged). Their intact chunks were copied.
    pub damaged: BTreeSet<String>,
}

/// One chunk to copy: which source holds it and what its index says.
struct Piece {
    src: usize,
    entry: IndexEntry,
}

/// A source's chunks, as its index (or a walk of its gzip headers) describes them.
#[derive(Default)]
struct Planned {
    entries: Vec<IndexEntry>,
    problems: Vec<String>,
    fetched: u64,
}

/// A checked chunk: its bytes as stored and what deduplication and the index need.
struct Facts {
    member: Bytes,
    key: Arc<str>,
    offset: u64,
    device: String,
    boot: String,
    first_seq: u64,
    last_seq: u64,
    records: u32,
    seqs: Vec<u64>,
    wall: (i64, i64),
}

impl Facts {
    /// Scans the chunk's lines for their sequence numbers and wall times.
    fn of(c: &Decoded) -> Result<Self, String> {
        let mut seqs = Vec::with_capacity(c.header.record_count as usize);
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for l in c.lines() {
            let Some(f) = scan::scan(l) else {
                return Err(format!(
                    "{} at byte {}: a line does not parse",
                    c.key, c.offset
                ));
            };
            seqs.push(f.seq);
            let w = c.header.sync.wall_of(f.mono_us);
            lo = lo.min(w);
            hi = hi.max(w);
        }
        Ok(Self {
            member: c.member.clone(),
            key: c.key.clone(),
            offset: c.offset,
            device: c.header.id.device.to_string(),
            boot: c.boot.clone(),
            first_seq: c.header.id.first_seq,
            last_seq: c.header.id.last_seq,
            records: c.header.record_count,
            seqs,
            wall: (lo, hi),
        })
    }

    /// Its index entry, with the position it had.
    fn entry(&self) -> IndexEntry {
        IndexEntry {
            device: self.device.clone(),
            boot: self.boot.clone(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            records: self.records,
            wall_min_us: self.wall.0,
            wall_max_us: self.wall.1,
            byte_offset: self.offset,
            byte_len: self.member.len() as u64,
        }
    }

    /// The chunk with only the records `new` marks, re-encoded with its own sync point.
    fn part(&self, new: &[bool]) -> anyhow::Result<(Bytes, IndexEntry)> {
        let at = || format!("{} at byte {}", self.key, self.offset);
        let full = Chunk::decode(&self.member, &Limits::DEFAULT)
            .with_context(|| format!("{}: chunk does not decode", at()))?;
        let records: Vec<_> = full
            .records
            .into_iter()
            .zip(new)
            .filter_map(|(r, n)| n.then_some(r))
            .collect();
        let part = Chunk::new(full.id.device, full.id.boot, full.sync, records)
            .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let bytes = part
            .encode(6, &Limits::DEFAULT)
            .map_err(|e| anyhow::anyhow!("{}: re-encoding: {e}", at()))?;
        let (lo, hi) = part.wall_range();
        let entry = IndexEntry {
            device: self.device.clone(),
            boot: self.boot.clone(),
            first_seq: part.id.first_seq,
            last_seq: part.id.last_seq,
            records: part.records.len() as u32,
            wall_min_us: lo,
            wall_max_us: hi,
            byte_offset: 0,
            byte_len: bytes.len() as u64,
        };
        Ok((Bytes::from(bytes), entry))
    }
}

fn vanished(key: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{key} vanished while being compacted: is another compaction of this hour or day running?"
    )
}

/// Reads a source's index; without a usable one, reads the object once and walks it.
async fn plan_source(store: &Store, src: &Source) -> anyhow::Result<Planned> {
    let mut planned = Planned::default();
    let idx = idx_key(&src.key);
    if let Some(bytes) = get_opt(store, &idx).await? {
        planned.fetched += bytes.len() as u64;
        let (entries, bad) = parse_index(&bytes);
        if bad == 0 {
            planned.entries = entries;
            return Ok(planned);
        }
        planned.problems.push(format!(
            "{idx}: {bad} index lines do not parse; reading the whole segment"
        ));
    }
    let Some(bytes) = get_opt(store, &src.key).await? else {
        return Err(vanished(&src.key));
    };
    planned.fetched += bytes.len() as u64;
    let key: Arc<str> = Arc::from(src.key.as_str());
    let mut problems = std::mem::take(&mut planned.problems);
    let (entries, problems) = tokio::task::spawn_blocking(move || {
        let chunks = decode_all(&key, &bytes, &Limits::DEFAULT, &mut problems);
        let entries: Vec<IndexEntry> = chunks
            .iter()
            .filter_map(|c| match Facts::of(c) {
                Ok(f) => Some(f.entry()),
                Err(p) => {
                    problems.push(p);
                    None
                }
            })
            .collect();
        (entries, problems)
    })
    .await?;
    planned.entries = entries;
    planned.problems = problems;
    Ok(planned)
}

/// Merges `sources` into `prefix<group>.g<generation>.seg.gz` (+ `.idx`), one per group of
/// devices (see the module doc). Fails, writing no manifest, when a source vanishes or a
/// compacted source is damaged.
pub(super) async fn merge(
    store: &Store,
    sources: &[Source],
    prefix: &str,
    generation: u64,
    cfg: &CompactConfig,
    report: &mut CompactReport,
) -> anyhow::Result<Merged> {
    let parallel = cfg.parallel.max(1);
    let plans: Vec<anyhow::Result<Planned>> =
        futures::stream::iter(sources.iter().map(|s| plan_source(store, s)))
            .buffered(parallel)
            .collect()
            .await;
    let mut merged = Merged::default();
    let mut groups: BTreeMap<String, Vec<Piece>> = BTreeMap::new();
    for (i, (src, planned)) in sources.iter().zip(plans).enumerate() {
        let planned = planned?;
        report.bytes_in += planned.fetched;
        if !planned.problems.is_empty() {
            for p in &planned.problems {
                tracing::error!("{p}");
            }
            merged.damaged.insert(src.key.clone());
        }
        report.chunks_in += planned.entries.len();
        for entry in planned.entries {
            groups
                .entry(group_of(&entry.device, cfg.groups))
                .or_default()
                .push(Piece { src: i, entry });
        }
    }
    let mut results = futures::stream::iter(groups.into_iter().map(|(group, pieces)| {
        merge_group(store, sources, prefix, group, generation, pieces, cfg)
    }))
    .buffer_unordered(parallel);
    while let Some(g) = results.next().await {
        let g = g?;
        report.chunks_out += g.chunks;
        report.bytes_out += g.bytes;
        report.bytes_in += g.fetched;
        report.duplicates += g.duplicates;
        merged.damaged.extend(g.damaged);
        merged.outputs.extend(g.key);
    }
    drop(results);
    merged.outputs.sort();
    report.outputs = merged.outputs.len();
    if let Some(k) = merged.damaged.iter().find(|k| !k.starts_with(RAW)) {
        bail!("compacted object {k} is damaged; not compacting over it");
    }
    Ok(merged)
}

/// What one group's merge wrote.
#[derive(Default)]
struct GroupOut {
    key: Option<String>,
    chunks: usize,
    bytes: u64,
    fetched: u64,
    duplicates: u64,
    damaged: BTreeSet<String>,
}

/// Consecutive pieces of one source, adjacent in it, fetched with one ranged GET.
fn runs(pieces: &[Piece]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        if let Some(r) = out.last_mut() {
            let first = &pieces[r.start].entry;
            let last = &pieces[r.end - 1];
            if last.src == p.src
                && last.entry.byte_offset.saturating_add(last.entry.byte_len) == p.entry.byte_offset
                && p.entry.byte_offset.saturating_add(p.entry.byte_len) - first.byte_offset
                    <= RUN_BYTES
            {
                r.end = i + 1;
                continue;
            }
        }
        out.push(i..i + 1);
    }
    out
}

/// Fetches a run and checks each of its chunks (a chunk that is not what its index says is
/// damage of that source; a range past the object's end too).
async fn fetch_run(
    store: &Store,
    sources: &[Source],
    pieces: &[Piece],
    run: Range<usize>,
) -> anyhow::Result<(u64, Vec<Result<Facts, String>>)> {
    let ps = &pieces[run];
    let key = sources[ps[0].src].key.as_str();
    let start = ps[0].entry.byte_offset;
    let end = ps
        .iter()
        .map(|p| p.entry.byte_offset.saturating_add(p.entry.byte_len))
        .max()
        .unwrap_or(start);
    let bytes = match store.get_range(key, start..end).await {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => return Err(vanished(key)),
        Err(e) => {
            // A lying index (a range past the end) is damage; anything else a store failure.
            return match store.object_store().head(&Path::from(key)).await {
                Ok(meta) if meta.size < end => Ok((
                    0,
                    ps.iter()
                        .map(|p| {
                            Err(format!(
                                "{key} at byte {}: the index names bytes past the end ({e})",
                                p.entry.byte_offset
                            ))
                        })
                        .collect(),
                )),
                Err(object_store::Error::NotFound { .. }) => Err(vanished(key)),
                _ => Err(anyhow::Error::from(e).context(format!("reading {key}"))),
            };
        }
    };
    let fetched = bytes.len() as u64;
    let key: Arc<str> = Arc::from(key);
    let wanted: Vec<IndexEntry> = ps.iter().map(|p| p.entry.clone()).collect();
    let facts = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .map(|e| {
                let at = usize::try_from(e.byte_offset - start).unwrap_or(usize::MAX);
                let len = usize::try_from(e.byte_len).unwrap_or(usize::MAX);
                let Some(member) = at
                    .checked_add(len)
                    .and_then(|end| bytes.get(at..end))
                    .map(|m| bytes.slice_ref(m))
                else {
                    return Err(format!("{key} at byte {}: short read", e.byte_offset));
                };
                let c = decode_member(&key, e.byte_offset, member, &Limits::DEFAULT)?;
                let id = &c.header.id;
                if id.device.as_str() != e.device
                    || c.boot != e.boot
                    || id.first_seq != e.first_seq
                    || id.last_seq != e.last_seq
                {
                    return Err(format!(
                        "{key} at byte {}: the chunk there is not the one its index names",
                        e.byte_offset
                    ));
                }
                Facts::of(&c)
            })
            .collect()
    })
    .await?;
    Ok((fetched, facts))
}

/// The output object being written: created at its first chunk.
struct Output {
    key: String,
    part_size: usize,
    writer: Option<BufWriter>,
    written: u64,
    index: Vec<u8>,
    chunks: usize,
}

impl Output {
    async fn write(
        &mut self,
        store: &Store,
        member: Bytes,
        mut entry: IndexEntry,
        cfg: &CompactConfig,
    ) -> anyhow::Result<()> {
        let writer = self.writer.get_or_insert_with(|| {
            BufWriter::with_capacity(
                store.object_store().clone(),
                Path::from(self.key.as_str()),
                self.part_size,
            )
            .with_max_concurrency(2)
        });
        entry.byte_offset = self.written;
        entry.byte_len = member.len() as u64;
        self.written += entry.byte_len;
        writer
            .put(member)
            .await
            .with_context(|| format!("writing {}", self.key))?;
        serde_json::to_writer(&mut self.index, &entry)?;
        self.index.push(b'\n');
        self.chunks += 1;
        if self.written > self.part_size as u64 {
            fault(cfg, "mid-output");
        }
        Ok(())
    }

    /// Abandons a half-written output (its multipart upload, if one was started).
    async fn abort(&mut self) {
        if let Some(w) = self.writer.as_mut()
            && let Err(e) = w.abort().await
        {
            tracing::warn!(key = self.key, error = %e, "could not abort the upload");
        }
    }

    /// Completes the upload, then writes the index.
    async fn finish(self, store: &Store) -> anyhow::Result<Option<(String, u64, usize)>> {
        let Some(mut writer) = self.writer else {
            return Ok(None);
        };
        writer
            .shutdown()
            .await
            .with_context(|| format!("writing {}", self.key))?;
        let idx = idx_key(&self.key);
        store
            .put(&idx, self.index)
            .await
            .with_context(|| format!("writing {idx}"))?;
        Ok(Some((self.key, self.written, self.chunks)))
    }
}

/// S3 refuses multipart parts under 5 MiB (all but the last).
const S3_MIN_PART: usize = 5 << 20;

fn part_size(store: &Store, cfg: &CompactConfig) -> usize {
    if store.url().starts_with("s3://") {
        cfg.part_size.max(S3_MIN_PART)
    } else {
        cfg.part_size.max(1)
    }
}

/// Copies one group's chunks, in order and without duplicates, into its output.
async fn merge_group(
    store: &Store,
    sources: &[Source],
    prefix: &str,
    group: String,
    generation: u64,
    mut pieces: Vec<Piece>,
    cfg: &CompactConfig,
) -> anyhow::Result<GroupOut> {
    // A device's boots by their first wall time, each in sequence order; a chunk that covers
    // another (a rebuilt one) first, so the other is dropped whole.
    let mut boot_start: BTreeMap<(String, String), i64> = BTreeMap::new();
    for p in &pieces {
        let e = boot_start
            .entry((p.entry.device.clone(), p.entry.boot.clone()))
            .or_insert(p.entry.wall_min_us);
        *e = (*e).min(p.entry.wall_min_us);
    }
    pieces.sort_by_cached_key(|p| {
        let e = &p.entry;
        let start = boot_start.get(&(e.device.clone(), e.boot.clone())).copied();
        (
            e.device.clone(),
            start,
            e.boot.clone(),
            e.first_seq,
            std::cmp::Reverse(e.last_seq),
            p.src,
            e.byte_offset,
        )
    });
    let mut out = Output {
        key: format!("{prefix}{group}.g{generation}.seg.gz"),
        part_size: part_size(store, cfg),
        writer: None,
        written: 0,
        index: Vec::new(),
        chunks: 0,
    };
    let mut result = GroupOut::default();
    let copied = copy(store, sources, &pieces, cfg, &mut out, &mut result).await;
    if let Err(e) = copied {
        out.abort().await;
        return Err(e);
    }
    if let Some((key, bytes, chunks)) = out.finish(store).await? {
        fault(cfg, "after-output");
        result.key = Some(key);
        result.bytes = bytes;
        result.chunks = chunks;
    }
    Ok(result)
}

/// The copy loop of [`merge_group`].
async fn copy(
    store: &Store,
    sources: &[Source],
    pieces: &[Piece],
    cfg: &CompactConfig,
    out: &mut Output,
    result: &mut GroupOut,
) -> anyhow::Result<()> {
    let mut seen = Seen::default();
    let mut fetches = futures::stream::iter(
        runs(pieces)
            .into_iter()
            .map(|r| async move { (r.start, fetch_run(store, sources, pieces, r).await) }),
    )
    .buffered(2);
    while let Some((start, fetched)) = fetches.next().await {
        let (bytes, facts) = fetched?;
        result.fetched += bytes;
        for (p, f) in pieces[start..].iter().zip(facts) {
            let f = match f {
                Ok(f) => f,
                Err(problem) => {
                    tracing::error!("{problem}");
                    result.damaged.insert(sources[p.src].key.clone());
                    continue;
                }
            };
            let runs = seen.runs(&f.device, &f.boot);
            let new: Vec<bool> = f.seqs.iter().map(|&s| runs.insert(s)).collect();
            let kept = new.iter().filter(|n| **n).count();
            result.duplicates += (f.seqs.len() - kept) as u64;
            if kept == 0 {
                continue;
            }
            let (member, entry) = if kept == f.seqs.len() {
                let entry = f.entry();
                (f.member, entry)
            } else {
                f.part(&new)?
            };
            out.write(store, member, entry, cfg).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(src: usize, byte_offset: u64, byte_len: u64) -> Piece {
        Piece {
            src,
            entry: IndexEntry {
                device: "d".into(),
                boot: "b".into(),
                first_seq: 0,
                last_seq: 0,
                records: 1,
                wall_min_us: 0,
                wall_max_us: 0,
                byte_offset,
                byte_len,
            },
        }
    }

    #[test]
    fn runs_join_adjacent_chunks_of_one_source_up_to_a_bound() {
        let big = RUN_BYTES / 2;
        let pieces = [
            piece(0, 0, 100),
            piece(0, 100, 50),
            piece(1, 150, 10), // another source
            piece(1, 200, 10), // a gap
            piece(1, 210, big),
            piece(1, 210 + big, big), // would pass the bound
            piece(1, 210 + 2 * big, 1),
        ];
        assert_eq!(runs(&pieces), vec![0..2, 2..3, 3..5, 5..7]);
        assert!(runs(&[]).is_empty());
    }
}
