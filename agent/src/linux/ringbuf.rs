//! The ring as the agent's [`LogBuffer`]: records in, chunks out, acknowledgements back.
//!
//! Each sealed ring block becomes one chunk (its identity fixed by the block's boot and
//! sequence range, so it survives a reboot unchanged); each gap entry becomes a chunk holding
//! one gap record. A chunk the server rejects as invalid is written to `STATE/rejected/` and
//! then treated as delivered, so it neither blocks the chunks behind it nor disappears (where
//! it cannot be written, a full disk say, the agent names the records lost instead).
use std::path::PathBuf;

use blackbox_protocol::{BootId, Chunk, ChunkId, DeviceId, Limits, Origin, Record, SyncPoint};

use crate::buffer::{LogBuffer, Sealed};
use crate::ring::{self, Entry, Item, Kind, Region, Ring};

/// Errors of the ring buffer.
#[derive(Debug, thiserror::Error)]
pub enum RingBufError {
    /// Building a chunk failed (a bug: the ring only holds valid records).
    #[error("building a chunk: {0}")]
    Encode(blackbox_protocol::EncodeError),
    /// Appending broke the ring's rules (a bug in the caller).
    #[error("ring append: {0}")]
    Append(ring::AppendError),
    /// Writing a rejected chunk aside failed (it is dropped, and the agent says which records).
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
}

/// What an append did besides storing the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendNote {
    /// A block of unacknowledged records was dropped from the middle of an outage.
    pub dropped: Option<ring::GapInfo>,
    /// Bytes cut from an over-long message.
    pub truncated: usize,
}

/// Writes a rejected chunk and the reason to `dir` (`BOOT-FIRST-LAST.gz` and `.why`).
fn set_aside(
    dir: &std::path::Path,
    id: &ChunkId,
    bytes: &[u8],
    reason: &str,
) -> Result<PathBuf, RingBufError> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| RingBufError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("{}-{}-{}", id.boot, id.first_seq, id.last_seq);
    let path = dir.join(format!("{name}.gz"));
    std::fs::write(&path, bytes).map_err(io(&path))?;
    let _ = std::fs::write(dir.join(format!("{name}.why")), reason);
    Ok(path)
}

/// The ring buffer.
pub struct RingBuffer<M> {
    ring: Box<Ring<M>>,
    device: DeviceId,
    boot: BootId,
    level: u8,
    limits: Limits,
    rejected_dir: PathBuf,
    /// The items handed out by the last `next_batch`, in order, with their encodings (retries
    /// send the same bytes).
    current: Vec<(Item, Sealed)>,
    last_note: AppendNote,
}

impl<M> std::fmt::Debug for RingBuffer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingBuffer")
            .field("ring", &self.ring)
            .field("device", &self.device)
            .field("boot", &self.boot)
            .finish()
    }
}

fn origin_of(b: u8) -> Origin {
    match b {
        ring::origin::PSTORE => Origin::Pstore,
        ring::origin::AGENT => Origin::Agent,
        _ => Origin::Kmsg,
    }
}

/// The ring's byte for an origin.
pub fn origin_byte(o: Origin) -> u8 {
    match o {
        Origin::Pstore => ring::origin::PSTORE,
        Origin::Agent => ring::origin::AGENT,
        _ => ring::origin::KMSG,
    }
}

/// The gap record for a gap entry.
pub fn gap_record(g: &ring::GapInfo) -> Record {
    let mut why = String::from("the ring was full during an outage; dropped from the middle");
    if g.other > 0 {
        why.push_str(&format!(
            " (and {} records of later boots, gap table full)",
            g.other
        ));
    }
    Record::gap(g.first, g.last, g.count, g.mono_us, &why)
}

impl<M: Region> RingBuffer<M> {
    /// Wraps an opened ring for `device`, appending records of `boot`.
    pub fn new(
        ring: Box<Ring<M>>,
        device: DeviceId,
        boot: BootId,
        state_dir: &std::path::Path,
    ) -> Self {
        Self {
            ring,
            device,
            boot,
            level: 6,
            limits: Limits::DEFAULT,
            rejected_dir: state_dir.join("rejected"),
            current: Vec::new(),
            last_note: AppendNote::default(),
        }
    }

    /// Deflate level for chunks.
    pub fn with_level(mut self, level: u8) -> Self {
        self.level = level;
        self
    }

    /// The ring.
    pub fn ring(&self) -> &Ring<M> {
        &self.ring
    }

    /// The ring, mutably (flushing the backing).
    pub fn ring_mut(&mut self) -> &mut Ring<M> {
        &mut self.ring
    }

    /// What the last append did besides storing.
    pub fn last_note(&self) -> AppendNote {
        self.last_note
    }

    /// Appends a record of any boot (`sync` stamps a block this starts).
    pub fn append_to(
        &mut self,
        boot: &BootId,
        rec: &Record,
        sync: &SyncPoint,
    ) -> Result<AppendNote, RingBufError> {
        let max = (self.limits.max_msg as usize).min(ring::max_msg(self.ring.block_size()) - 16);
        let (msg, cut) = if rec.msg.len() > max {
            (&rec.msg[..max], rec.msg.len() - max)
        } else {
            (&rec.msg[..], 0)
        };
        let e = Entry {
            kind: Kind::Log,
            seq: rec.seq,
            mono_us: rec.mono_us,
            level: rec.level,
            facility: rec.facility,
            origin: origin_byte(rec.origin),
            msg,
        };
        self.push(boot, &e, sync, cut)
    }

    fn push(
        &mut self,
        boot: &BootId,
        e: &Entry<'_>,
        sync: &SyncPoint,
        cut: usize,
    ) -> Result<AppendNote, RingBufError> {
        let a = self
            .ring
            .append(boot, e, sync)
            .map_err(RingBufError::Append)?;
        let note = AppendNote {
            dropped: a.dropped,
            truncated: cut + a.truncated,
        };
        self.last_note = note;
        Ok(note)
    }

    /// Appends a gap record (records `first..=last`, `count` of them, lost for `reason`).
    pub fn append_gap(
        &mut self,
        boot: &BootId,
        first: u64,
        last: u64,
        mono_us: u64,
        reason: &str,
        sync: &SyncPoint,
    ) -> Result<AppendNote, RingBufError> {
        let e = Entry {
            kind: Kind::Gap {
                last,
                count: last - first + 1,
            },
            seq: first,
            mono_us,
            level: 4,
            facility: 0,
            origin: ring::origin::AGENT,
            msg: reason.as_bytes(),
        };
        self.push(boot, &e, sync, 0)
    }

    /// The records of `boot` the ring holds (acknowledged or not), oldest first.
    pub fn records_of(&self, boot: &BootId) -> Vec<Record> {
        let mut out = Vec::new();
        for i in self.ring.block_order() {
            if self.ring.block_meta(i).is_some_and(|m| m.boot == *boot) {
                out.extend(self.ring.records(i).map(|e| to_record(&e)));
            }
        }
        out
    }

    /// True once every record of `boot` up to `seq` is acknowledged (or accounted for by an
    /// acknowledged gap).
    pub fn delivered(&self, boot: &BootId, seq: u64) -> bool {
        let r = &self.ring;
        let in_block = r.block_order().any(|i| {
            r.block_meta(i)
                .is_some_and(|m| !m.acked && m.boot == *boot && m.records > 0 && m.first_seq <= seq)
        });
        let in_gap = r.gaps().iter().any(|g| g.boot == *boot && g.first <= seq);
        !in_block && !in_gap
    }

    /// Seals the open block if it holds records and nothing sealed is waiting.
    pub fn seal_if_idle(&mut self, sync: SyncPoint) -> bool {
        if !self.current.is_empty() || self.ring.next_unacked().is_some() {
            return false;
        }
        self.ring.seal(&sync)
    }

    /// The chunks of the last batch are on their way to the server (`true`, once sent) or
    /// answered (`false`): while they are, the ring drops other blocks first.
    pub fn set_in_flight(&mut self, yes: bool) {
        let items = self.current.iter().map(|(it, _)| it).filter(|_| yes);
        self.ring.set_in_flight(items);
    }

    /// Number of chunks waiting (the open block included).
    pub fn unacked_chunks(&self) -> usize {
        self.ring.unacked()
    }

    fn build(&self, item: &Item) -> Result<Sealed, RingBufError> {
        let chunk = match item {
            Item::Gap(g) => {
                let sync = self.ring.last_sync(&g.boot).unwrap_or_default();
                Chunk::new(self.device.clone(), g.boot, sync, vec![gap_record(g)])
                    .map(|mut c| {
                        c.id.last_seq = g.last;
                        c
                    })
                    .map_err(RingBufError::Encode)?
            }
            Item::Block { index, .. } => {
                let meta = self
                    .ring
                    .block_meta(*index)
                    .ok_or(RingBufError::Encode(blackbox_protocol::EncodeError::Empty))?;
                let records: Vec<Record> =
                    self.ring.records(*index).map(|e| to_record(&e)).collect();
                let mut c = Chunk::new(self.device.clone(), meta.boot, meta.sync, records)
                    .map_err(RingBufError::Encode)?;
                c.id.last_seq = meta.last_seq;
                c
            }
        };
        let bytes = chunk
            .encode(self.level, &self.limits)
            .map_err(RingBufError::Encode)?;
        Ok(Sealed {
            id: chunk.id,
            bytes,
        })
    }
}

fn to_record(e: &Entry<'_>) -> Record {
    match e.kind {
        Kind::Log => Record {
            seq: e.seq,
            mono_us: e.mono_us,
            level: e.level.min(Record::MAX_LEVEL),
            facility: e.facility,
            origin: origin_of(e.origin),
            msg: e.msg.to_vec(),
        },
        Kind::Gap { last, count } => Record::gap(
            e.seq,
            last,
            count,
            e.mono_us,
            &String::from_utf8_lossy(e.msg),
        ),
    }
}

impl<M: Region> LogBuffer for RingBuffer<M> {
    type Error = RingBufError;

    fn resume_after(&self, boot: &BootId) -> Option<u64> {
        self.ring.resume_after(boot)
    }

    fn append(&mut self, rec: Record, sync: SyncPoint) -> Result<(), RingBufError> {
        let boot = self.boot;
        self.append_to(&boot, &rec, &sync).map(|_| ())
    }

    fn pending_bytes(&self) -> usize {
        self.ring.pending_bytes()
    }

    fn seal(&mut self, sync: SyncPoint) -> Result<(), RingBufError> {
        self.ring.seal(&sync);
        Ok(())
    }

    fn next_unacked(&mut self) -> Result<Option<Sealed>, RingBufError> {
        Ok(self.next_batch(1, usize::MAX)?.into_iter().next())
    }

    fn next_batch(
        &mut self,
        max_chunks: usize,
        max_bytes: usize,
    ) -> Result<Vec<Sealed>, RingBufError> {
        let mut items = Vec::new();
        let mut next = self.ring.next_unacked();
        while let Some(item) = next
            && items.len() < max_chunks.max(1)
        {
            items.push(item);
            next = self.ring.unacked_after(&item);
        }
        // A dropped block's index may hold a newer block now: the cache is keyed by item
        // (index and generation), so it is rebuilt then.
        let mut cached = std::mem::take(&mut self.current);
        let mut bytes = 0usize;
        for item in items {
            let sealed = match cached.iter().position(|(it, _)| *it == item) {
                Some(k) => cached.swap_remove(k).1,
                None => self.build(&item)?,
            };
            if !self.current.is_empty() && bytes.saturating_add(sealed.bytes.len()) > max_bytes {
                break;
            }
            bytes += sealed.bytes.len();
            self.current.push((item, sealed));
        }
        Ok(self.current.iter().map(|(_, s)| s.clone()).collect())
    }

    fn ack(&mut self, id: &ChunkId) -> Result<(), RingBufError> {
        let Some(k) = self.current.iter().position(|(_, s)| s.id == *id) else {
            return Ok(());
        };
        let (item, _) = self.current.remove(k);
        if !self.ring.ack(&item) {
            eprintln!("blackbox-agent: chunk {id} was acknowledged after the ring dropped it");
        }
        Ok(())
    }

    fn reject(&mut self, id: &ChunkId, reason: &str) -> Result<(), RingBufError> {
        if let Some((_, s)) = self.current.iter().find(|(_, s)| s.id == *id) {
            match set_aside(&self.rejected_dir, id, &s.bytes, reason) {
                Ok(path) => eprintln!(
                    "blackbox-agent: server rejected chunk {id} ({reason}); kept in {}",
                    path.display()
                ),
                // Kept in the ring, it would be sent and refused again for ever, holding back
                // every chunk behind it (and an error here would stop the agent at each start).
                Err(e) => eprintln!(
                    "blackbox-agent: server rejected chunk {id} ({reason}) and it could not be \
                     kept: {e}; records {}..={} of boot {} are lost",
                    id.first_seq, id.last_seq, id.boot
                ),
            }
        }
        self.ack(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(state: &std::path::Path) -> RingBuffer<Vec<u8>> {
        let cfg = ring::RingConfig {
            block_size: Some(4096),
            ..Default::default()
        };
        let ring = Ring::format(vec![0u8; 64 << 10], BootId([1; 16]), cfg)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
        RingBuffer::new(
            Box::new(ring),
            DeviceId::new("dev").unwrap(),
            BootId([1; 16]),
            state,
        )
    }

    fn two_chunks(buf: &mut RingBuffer<Vec<u8>>) -> Vec<Sealed> {
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: 1_795_269_785_000_000,
            synced: true,
        };
        for seq in 0..2 {
            let rec = Record {
                seq,
                mono_us: seq,
                level: 6,
                facility: 0,
                origin: Origin::Kmsg,
                msg: format!("line {seq}").into_bytes(),
            };
            buf.append(rec, sync).unwrap();
            buf.seal(sync).unwrap();
        }
        buf.next_batch(8, usize::MAX).unwrap()
    }

    /// A rejected chunk goes to `STATE/rejected/` with its reason, and the next chunk is next.
    #[test]
    fn a_rejected_chunk_is_set_aside_and_the_rest_goes_on() {
        let state = tempfile::tempdir().unwrap();
        let mut buf = buffer(state.path());
        let batch = two_chunks(&mut buf);
        assert_eq!(batch.len(), 2);
        buf.reject(&batch[0].id, "bad").unwrap();
        let dir = state.path().join("rejected");
        let kept = std::fs::read(dir.join(format!("{}-0-0.gz", batch[0].id.boot))).unwrap();
        assert_eq!(kept, batch[0].bytes);
        let why = std::fs::read_to_string(dir.join(format!("{}-0-0.why", batch[0].id.boot)));
        assert_eq!(why.unwrap(), "bad");
        assert_eq!(
            buf.next_unacked().unwrap().map(|s| s.id),
            Some(batch[1].id.clone())
        );
    }

    /// Where it cannot be written (here `rejected` is a file; a full disk does the same), the
    /// rejected chunk is still let go: kept, it would be refused again for ever, and an error
    /// would stop the agent at every start.
    #[test]
    fn a_rejected_chunk_that_cannot_be_kept_does_not_hold_the_rest_back() {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join("rejected"), b"in the way").unwrap();
        let mut buf = buffer(state.path());
        let batch = two_chunks(&mut buf);
        buf.reject(&batch[0].id, "bad").unwrap();
        assert_eq!(
            buf.next_unacked().unwrap().map(|s| s.id),
            Some(batch[1].id.clone())
        );
    }
}
