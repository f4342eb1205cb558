//! The file spool: a `LogBuffer` in the state directory.
//!
//! ```text
//! STATE/cursor                 "<boot-uuid> <last sealed seq> <next file number>"
//! STATE/outbox/0000000042.gz   sealed chunks, oldest first, one gzip member each
//! STATE/outbox/0000000043.gap-1234.gz  a gap record standing for 1234 dropped records
//! STATE/rejected/…             chunks the server refused as invalid, kept for inspection
//! ```
//!
//! Pending (unsealed) records live in memory only: after a crash they are read again from
//! /dev/kmsg, starting after the cursor. Every file is written to a temporary name, fsync'd,
//! renamed, and the directory fsync'd, so a crash leaves either the old or the new state.
//!
//! **Overflow** (a long outage): when the outbox passes its byte cap, chunks are dropped from
//! the *middle*, keeping the oldest part (what happened just before the network went away) and
//! the newest; dropped chunks are replaced by a chunk holding one gap record with the exact
//! number and sequence range of the records lost (adjacent gaps merge into one).
use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use blackbox_protocol::{BootId, Chunk, ChunkHeader, ChunkId, DeviceId, Limits, Record, SyncPoint};

use crate::buffer::{LogBuffer, Sealed};

/// Spool errors: local I/O, or a chunk that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing the state directory failed.
    #[error("state directory {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Building a chunk failed (a bug: records are checked before they are appended).
    #[error("building a chunk: {0}")]
    Encode(blackbox_protocol::EncodeError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Largest inflated size of one chunk.
    pub chunk_max_bytes: usize,
    /// Outbox byte cap; past it, chunks are dropped from the middle.
    pub max_bytes: u64,
    /// Share of the cap kept for the oldest chunks (0.0..=1.0; the rest is the newest).
    pub keep_oldest: f64,
    /// Deflate level.
    pub level: u8,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            chunk_max_bytes: 256 << 10,
            max_bytes: 16 << 20,
            keep_oldest: 0.5,
            level: 6,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    number: u64,
    id: ChunkId,
    size: u64,
    /// For a gap chunk: how many records it stands for (0 for a data chunk).
    lost: u64,
    gap: bool,
}

/// The file spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    device: DeviceId,
    boot: BootId,
    cfg: SpoolConfig,
    limits: Limits,
    pending: Vec<Record>,
    pending_bytes: usize,
    cursor: Option<(BootId, u64)>,
    next_number: u64,
    outbox: VecDeque<Entry>,
    outbox_bytes: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir` for the current `device` and `boot`.
    pub fn open(
        dir: &Path,
        device: DeviceId,
        boot: BootId,
        cfg: SpoolConfig,
    ) -> Result<Self, SpoolError> {
        let outbox_dir = dir.join("outbox");
        fs::create_dir_all(&outbox_dir).map_err(io(&outbox_dir))?;
        let cursor_path = dir.join("cursor");
        let (cursor, mut next_number) = match fs::read_to_string(&cursor_path) {
            Ok(s) => parse_cursor(&s).map_or((None, 0), |(b, seq, n)| (Some((b, seq)), n)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
            Err(e) => return Err(io(&cursor_path)(e)),
        };
        let mut files: Vec<(u64, PathBuf, Option<u64>)> = Vec::new();
        for ent in fs::read_dir(&outbox_dir).map_err(io(&outbox_dir))? {
            let ent = ent.map_err(io(&outbox_dir))?;
            let path = ent.path();
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let lost = name
                .split('.')
                .nth(1)
                .and_then(|p| p.strip_prefix("gap-"))
                .and_then(|n| n.parse::<u64>().ok());
            match name.split('.').next().and_then(|n| n.parse::<u64>().ok()) {
                Some(n) => files.push((n, path, lost)),
                None => eprintln!(
                    "blackbox-agent: ignoring unexpected file {}",
                    path.display()
                ),
            }
        }
        files.sort();
        let mut outbox = VecDeque::new();
        let mut outbox_bytes = 0;
        for (number, path, lost) in files {
            let bytes = fs::read(&path).map_err(io(&path))?;
            match ChunkHeader::parse(&bytes) {
                Ok(h) => {
                    outbox_bytes += bytes.len() as u64;
                    let (gap, lost) = (lost.is_some(), lost.unwrap_or(0));
                    outbox.push_back(Entry {
                        number,
                        id: h.id,
                        size: bytes.len() as u64,
                        lost,
                        gap,
                    });
                }
                Err(e) => {
                    eprintln!(
                        "blackbox-agent: spool file {} is damaged ({e}); moved to rejected/",
                        path.display()
                    );
                    set_aside(dir, &path)?;
                }
            }
            next_number = next_number.max(number + 1);
        }
        Ok(Self {
            dir: dir.to_owned(),
            device,
            boot,
            cfg,
            limits: Limits::DEFAULT,
            pending: Vec::new(),
            pending_bytes: 0,
            cursor,
            next_number,
            outbox,
            outbox_bytes,
        })
    }

    /// Number of sealed chunks waiting for an acknowledgement.
    pub fn unacked_chunks(&self) -> usize {
        self.outbox.len()
    }

    /// Bytes of sealed chunks waiting for an acknowledgement.
    pub fn unacked_bytes(&self) -> u64 {
        self.outbox_bytes
    }

    fn chunk_path(&self, e: &Entry) -> PathBuf {
        let name = if e.gap {
            format!("{:010}.gap-{}.gz", e.number, e.lost)
        } else {
            format!("{:010}.gz", e.number)
        };
        self.dir.join("outbox").join(name)
    }

    fn write_cursor(&self) -> Result<(), SpoolError> {
        let Some((boot, seq)) = self.cursor else {
            return Ok(());
        };
        write_atomic(
            &self.dir.join("cursor"),
            format!("{boot} {seq} {}\n", self.next_number).as_bytes(),
        )
    }

    fn seal_records(&mut self, records: Vec<Record>, sync: SyncPoint) -> Result<(), SpoolError> {
        let chunk = Chunk::new(self.device.clone(), self.boot, sync, records)
            .map_err(SpoolError::Encode)?;
        let bytes = chunk
            .encode(self.cfg.level, &self.limits)
            .map_err(SpoolError::Encode)?;
        let e = Entry {
            number: self.next_number,
            id: chunk.id,
            size: bytes.len() as u64,
            lost: 0,
            gap: false,
        };
        self.next_number += 1;
        write_atomic(&self.chunk_path(&e), &bytes)?;
        self.cursor = Some((self.boot, e.id.last_seq));
        self.write_cursor()?;
        self.outbox_bytes += e.size;
        self.outbox.push_back(e);
        Ok(())
    }

    /// Drops chunks from the middle until the outbox is under its cap.
    fn enforce_cap(&mut self) -> Result<(), SpoolError> {
        while self.outbox_bytes > self.cfg.max_bytes {
            // The oldest chunks up to keep_oldest × cap stay; the victim is the first data chunk
            // after them (the newest chunks are at the back and stay too).
            let keep = (self.cfg.max_bytes as f64 * self.cfg.keep_oldest.clamp(0.0, 1.0)) as u64;
            let mut acc = 0;
            let mut victim = None;
            for (i, e) in self.outbox.iter().enumerate() {
                acc += e.size;
                if !e.gap && acc > keep && i + 1 < self.outbox.len() {
                    victim = Some(i);
                    break;
                }
            }
            let Some(i) = victim else { break };
            self.replace_with_gap(i)?;
        }
        Ok(())
    }

    /// Replaces data chunk `i` by a gap chunk, merged with a gap chunk just before it if any.
    fn replace_with_gap(&mut self, i: usize) -> Result<(), SpoolError> {
        let Some(victim) = self.outbox.get(i).cloned() else {
            return Ok(());
        };
        let victim_path = self.chunk_path(&victim);
        let bytes = fs::read(&victim_path).map_err(io(&victim_path))?;
        let (count, mono, sync) = match Chunk::decode(&bytes, &self.limits) {
            Ok(c) => (
                c.records.len() as u64,
                c.records.first().map_or(0, |r| r.mono_us),
                c.sync,
            ),
            Err(_) => (
                victim.id.last_seq - victim.id.first_seq + 1,
                0,
                SyncPoint::default(),
            ),
        };
        eprintln!(
            "blackbox-agent: spool over {} bytes: dropped {count} records (seq {}..{}) of boot {}",
            self.cfg.max_bytes, victim.id.first_seq, victim.id.last_seq, victim.id.boot
        );
        // Merge into the gap chunk just before, when it covers the same boot.
        let prev = i
            .checked_sub(1)
            .and_then(|p| self.outbox.get(p).cloned())
            .filter(|p| p.gap && p.id.boot == victim.id.boot);
        let (slot, first, lost, number) = match &prev {
            Some(p) => (i - 1, p.id.first_seq, p.lost + count, p.number),
            None => (i, victim.id.first_seq, count, victim.number),
        };
        let last = victim.id.last_seq;
        let gap = Record::gap(first, last, lost, mono, "agent spool full during an outage");
        let mut chunk = Chunk::new(victim.id.device.clone(), victim.id.boot, sync, vec![gap])
            .map_err(SpoolError::Encode)?;
        chunk.id.last_seq = last;
        let new_bytes = chunk
            .encode(self.cfg.level, &self.limits)
            .map_err(SpoolError::Encode)?;
        let new = Entry {
            number,
            id: chunk.id,
            size: new_bytes.len() as u64,
            lost,
            gap: true,
        };
        write_atomic(&self.chunk_path(&new), &new_bytes)?;
        fs::remove_file(&victim_path).map_err(io(&victim_path))?;
        self.outbox_bytes -= victim.size;
        if let Some(p) = &prev {
            let p_path = self.chunk_path(p);
            fs::remove_file(&p_path).map_err(io(&p_path))?;
            self.outbox_bytes -= p.size;
            self.outbox.remove(i);
        }
        self.outbox_bytes += new.size;
        self.outbox[slot] = new;
        Ok(())
    }
}

impl LogBuffer for Spool {
    type Error = SpoolError;

    fn resume_after(&self, boot: &BootId) -> Option<u64> {
        let from_cursor = self.cursor.filter(|(b, _)| b == boot).map(|(_, s)| s);
        let from_outbox = self
            .outbox
            .iter()
            .filter(|e| e.id.boot == *boot)
            .map(|e| e.id.last_seq)
            .max();
        from_cursor.max(from_outbox)
    }

    fn append(&mut self, mut rec: Record) -> Result<(), SpoolError> {
        rec.msg.truncate(self.limits.max_msg as usize);
        self.pending_bytes += rec.msg.len() + 200;
        self.pending.push(rec);
        Ok(())
    }

    fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    fn seal(&mut self, sync: SyncPoint) -> Result<(), SpoolError> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let mut batch: Vec<Record> = Vec::new();
        let mut size = 0;
        for rec in pending {
            let line = rec.msg.len() * 4 + 256;
            if !batch.is_empty()
                && (size + line > self.cfg.chunk_max_bytes
                    || batch.len() >= self.limits.max_records as usize)
            {
                self.seal_records(std::mem::take(&mut batch), sync)?;
                size = 0;
            }
            size += line;
            batch.push(rec);
        }
        if !batch.is_empty() {
            self.seal_records(batch, sync)?;
        }
        self.enforce_cap()
    }

    fn next_unacked(&mut self) -> Result<Option<Sealed>, SpoolError> {
        let Some(e) = self.outbox.front() else {
            return Ok(None);
        };
        let path = self.chunk_path(e);
        let bytes = fs::read(&path).map_err(io(&path))?;
        Ok(Some(Sealed {
            id: e.id.clone(),
            bytes,
        }))
    }

    fn ack(&mut self, id: &ChunkId) -> Result<(), SpoolError> {
        if let Some(pos) = self.outbox.iter().position(|e| e.id == *id) {
            if let Some(e) = self.outbox.remove(pos) {
                let path = self.chunk_path(&e);
                fs::remove_file(&path).map_err(io(&path))?;
                self.outbox_bytes -= e.size;
            }
        }
        Ok(())
    }

    fn reject(&mut self, id: &ChunkId, reason: &str) -> Result<(), SpoolError> {
        if let Some(pos) = self.outbox.iter().position(|e| e.id == *id) {
            if let Some(e) = self.outbox.remove(pos) {
                let path = self.chunk_path(&e);
                eprintln!(
                    "blackbox-agent: server rejected chunk {id} ({reason}); kept in rejected/"
                );
                set_aside(&self.dir, &path)?;
                self.outbox_bytes -= e.size;
            }
        }
        Ok(())
    }
}

fn parse_cursor(s: &str) -> Option<(BootId, u64, u64)> {
    let mut it = s.split_whitespace();
    let boot = BootId::parse(it.next()?)?;
    let seq = it.next()?.parse().ok()?;
    let next = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    Some((boot, seq, next))
}

fn set_aside(dir: &Path, path: &Path) -> Result<(), SpoolError> {
    let rej = dir.join("rejected");
    fs::create_dir_all(&rej).map_err(io(&rej))?;
    let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    fs::rename(path, rej.join(name)).map_err(io(path))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, directory fsync.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blackbox_protocol::Origin;

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            mono_us: seq * 1000,
            level: 6,
            facility: 1,
            origin: Origin::Kmsg,
            msg: format!(
                "line {seq} {:x}",
                (seq + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            )
            .repeat(4)
            .into_bytes(),
        }
    }

    fn open(dir: &Path, cfg: SpoolConfig) -> Spool {
        Spool::open(dir, DeviceId::new("d").unwrap(), BootId([1; 16]), cfg).unwrap()
    }

    #[test]
    fn sealed_chunks_survive_reopen_and_leave_only_on_ack() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = open(
            tmp.path(),
            SpoolConfig {
                chunk_max_bytes: 2000,
                ..Default::default()
            },
        );
        for i in 0..20 {
            s.append(rec(i)).unwrap();
        }
        s.seal(SyncPoint::default()).unwrap();
        let n = s.unacked_chunks();
        assert!(n > 1);
        let first = s.next_unacked().unwrap().unwrap();
        drop(s);
        let mut s = open(tmp.path(), SpoolConfig::default());
        assert_eq!(s.unacked_chunks(), n);
        assert_eq!(s.resume_after(&BootId([1; 16])), Some(19));
        assert_eq!(s.resume_after(&BootId([2; 16])), None);
        assert_eq!(s.next_unacked().unwrap().unwrap(), first);
        s.ack(&first.id).unwrap();
        assert_eq!(s.unacked_chunks(), n - 1);
        assert_ne!(s.next_unacked().unwrap().unwrap().id, first.id);
    }

    #[test]
    fn overflow_keeps_oldest_and_newest_with_exact_gaps() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            chunk_max_bytes: 4000,
            max_bytes: 20_000,
            ..Default::default()
        };
        let mut s = open(tmp.path(), cfg);
        let total = 2000u64;
        for i in 0..total {
            s.append(rec(i)).unwrap();
            if i % 50 == 49 {
                s.seal(SyncPoint::default()).unwrap();
            }
        }
        assert!(s.unacked_bytes() <= 20_000);
        // Walk the outbox: every sequence number is either delivered or counted in a gap.
        let mut delivered = Vec::new();
        let mut lost = 0;
        while let Some(c) = s.next_unacked().unwrap() {
            let chunk = Chunk::decode(&c.bytes, &Limits::DEFAULT).unwrap();
            for r in &chunk.records {
                if r.origin == Origin::Agent {
                    let text = String::from_utf8(r.msg.clone()).unwrap();
                    lost += text
                        .split_whitespace()
                        .nth(1)
                        .unwrap()
                        .parse::<u64>()
                        .unwrap();
                } else {
                    delivered.push(r.seq);
                }
            }
            s.ack(&c.id).unwrap();
        }
        assert_eq!(delivered.len() as u64 + lost, total);
        assert_eq!(delivered.first(), Some(&0), "the oldest records are kept");
        assert_eq!(
            delivered.last(),
            Some(&(total - 1)),
            "the newest records are kept"
        );
        assert!(lost > 0);
        assert!(delivered.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn damaged_spool_file_is_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = open(tmp.path(), SpoolConfig::default());
        s.append(rec(1)).unwrap();
        s.seal(SyncPoint::default()).unwrap();
        drop(s);
        fs::write(tmp.path().join("outbox/0000000000.gz"), b"garbage").unwrap();
        let s = open(tmp.path(), SpoolConfig::default());
        assert_eq!(s.unacked_chunks(), 0);
        assert!(tmp.path().join("rejected/0000000000.gz").exists());
        assert_eq!(
            s.resume_after(&BootId([1; 16])),
            Some(1),
            "the cursor still knows what was read"
        );
    }
}
