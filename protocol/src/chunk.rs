//! Building chunks and the one checked parse for untrusted chunk bytes.
use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

use crate::error::{DecodeError, EncodeError};
use crate::header::{BootId, ChunkHeader, ChunkId, DeviceId, GZIP_TRAILER_LEN, SyncPoint};
use crate::line;
use crate::record::Record;

/// Hard limits a decoder enforces (and an encoder respects, so its chunks are accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most records in one chunk.
    pub max_records: u32,
    /// Longest message in bytes (kmsg lines are under 1 KiB; pstore console lines can be longer).
    pub max_msg: u32,
    /// Largest inflated payload in bytes: the decompression-bomb guard.
    pub max_decompressed: u32,
}

impl Limits {
    /// The defaults agent and server share.
    pub const DEFAULT: Self = Self {
        max_records: 100_000,
        max_msg: 16 * 1024,
        max_decompressed: 8 << 20,
    };

    /// Longest JSON line a message of `max_msg` bytes can produce (every byte escaped as
    /// `\u00XX` plus the base64 copy, plus the fixed fields).
    fn max_line(&self) -> usize {
        self.max_msg as usize * 6 + (self.max_msg as usize).div_ceil(3) * 4 + 512
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Deflate cannot expand more than about 1032:1; a header that claims more lies.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// A decoded (or to-be-encoded) chunk: identity, sync point and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The chunk's identity.
    pub id: ChunkId,
    /// Wall-clock/monotonic sync point.
    pub sync: SyncPoint,
    /// Records in strictly increasing sequence order, all within `id.first_seq..=id.last_seq`,
    /// the first at `id.first_seq`.
    pub records: Vec<Record>,
}

/// Builds chunks record by record, tracking the inflated size so a caller can cut a chunk
/// before it passes a limit.
#[derive(Debug)]
pub struct ChunkBuilder {
    device: DeviceId,
    boot: BootId,
    sync: SyncPoint,
    records: Vec<Record>,
    raw_len: usize,
    limits: Limits,
}

impl ChunkBuilder {
    /// A builder for records of `device` in `boot`, stamped with `sync`.
    pub fn new(device: DeviceId, boot: BootId, sync: SyncPoint, limits: Limits) -> Self {
        Self {
            device,
            boot,
            sync,
            records: Vec::new(),
            raw_len: 0,
            limits,
        }
    }

    /// Would `rec` still fit under the limits?
    pub fn fits(&self, rec: &Record) -> bool {
        self.records.len() < self.limits.max_records as usize
            && self.raw_len + estimate_line(rec) <= self.limits.max_decompressed as usize
    }

    /// Adds a record. A full builder hands the record back instead of dropping it.
    pub fn push(&mut self, rec: Record) -> Result<(), (EncodeError, Record)> {
        if let Some(prev) = self.records.last()
            && rec.seq <= prev.seq
        {
            let e = EncodeError::SequenceNotIncreasing {
                previous: prev.seq,
                next: rec.seq,
            };
            return Err((e, rec));
        }
        if rec.msg.len() > self.limits.max_msg as usize {
            return Err((EncodeError::LimitExceeded("message length"), rec));
        }
        if !self.fits(&rec) {
            return Err((EncodeError::LimitExceeded("chunk size"), rec));
        }
        self.raw_len += estimate_line(&rec);
        self.records.push(rec);
        Ok(())
    }

    /// Records so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No records yet?
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Upper bound of the inflated size so far.
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// The chunk of everything pushed so far.
    pub fn finish(self) -> Result<Chunk, EncodeError> {
        Chunk::new(self.device, self.boot, self.sync, self.records)
    }
}

/// Upper bound of a record's JSON line length.
fn estimate_line(rec: &Record) -> usize {
    // fixed fields ~ 200 bytes; worst case escaping 6x, plus base64 when not UTF-8.
    let esc = rec
        .msg
        .iter()
        .filter(|b| **b < 0x20 || **b == b'"' || **b == b'\\' || **b >= 0x7f)
        .count();
    256 + rec.msg.len()
        + esc * 5
        + if core::str::from_utf8(&rec.msg).is_err() {
            rec.msg.len() * 3
        } else {
            0
        }
}

impl Chunk {
    /// A chunk of `records` covering exactly their sequence range. Fails if empty or if the
    /// sequence numbers do not strictly increase.
    pub fn new(
        device: DeviceId,
        boot: BootId,
        sync: SyncPoint,
        records: Vec<Record>,
    ) -> Result<Self, EncodeError> {
        let first = records.first().ok_or(EncodeError::Empty)?.seq;
        for w in records.windows(2) {
            if w[1].seq <= w[0].seq {
                return Err(EncodeError::SequenceNotIncreasing {
                    previous: w[0].seq,
                    next: w[1].seq,
                });
            }
        }
        let last = records.last().map_or(first, |r| r.seq);
        Ok(Self {
            id: ChunkId {
                device,
                boot,
                first_seq: first,
                last_seq: last,
            },
            sync,
            records,
        })
    }

    /// Wall-clock range (µs) of the records, from the sync point.
    pub fn wall_range(&self) -> (i64, i64) {
        let mut lo = i64::MAX;
        let mut hi = i64::MIN;
        for r in &self.records {
            let w = self.sync.wall_of(r.mono_us);
            lo = lo.min(w);
            hi = hi.max(w);
        }
        (lo, hi)
    }

    /// Encodes as one gzip member at deflate `level` (0–10; 1 is fastest, 6 the usual balance).
    pub fn encode(&self, level: u8, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        if self.records.is_empty() {
            return Err(EncodeError::Empty);
        }
        if self.records.len() > limits.max_records as usize {
            return Err(EncodeError::LimitExceeded("record count"));
        }
        let mut raw = Vec::with_capacity(self.records.len() * 200);
        for r in &self.records {
            if r.msg.len() > limits.max_msg as usize {
                return Err(EncodeError::LimitExceeded("message length"));
            }
            line::emit(&mut raw, r, &self.id.device, &self.id.boot, &self.sync);
        }
        if raw.len() > limits.max_decompressed as usize {
            return Err(EncodeError::LimitExceeded("inflated size"));
        }
        let deflated = miniz_oxide::deflate::compress_to_vec(&raw, level.min(10));
        let header = ChunkHeader {
            id: self.id.clone(),
            sync: self.sync,
            record_count: self.records.len() as u32,
            raw_len: raw.len() as u32,
            deflate_len: u32::try_from(deflated.len())
                .map_err(|_| EncodeError::LimitExceeded("deflate size"))?,
            header_len: 0,
        };
        let mut out = Vec::with_capacity(header.encoded_len() + deflated.len() + GZIP_TRAILER_LEN);
        header.emit(&mut out);
        out.extend_from_slice(&deflated);
        out.extend_from_slice(&crc32fast::hash(&raw).to_le_bytes());
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        Ok(out)
    }

    /// **The** checked parse for untrusted bytes: `bytes` must be exactly one chunk.
    ///
    /// Checks, in order: header (magic, version, CRC32, field sanity), declared sizes against
    /// `limits` and the byte count (before allocating anything), inflates into a buffer of the
    /// declared size only (a bomb stops there), the trailer's CRC32 and length, then every record
    /// line (JSON shape, device and boot equal to the header, sequence numbers strictly
    /// increasing inside the declared range, message length). On success every field of the
    /// returned chunk is consistent and no accessor can panic.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        let header = ChunkHeader::parse(bytes)?;
        Self::decode_with_header(bytes, &header, limits)
    }

    fn decode_with_header(
        bytes: &[u8],
        header: &ChunkHeader,
        limits: &Limits,
    ) -> Result<Self, DecodeError> {
        let raw = inflate_checked(bytes, header, limits, inflate_exact)?;
        let records = parse_lines(&raw, header, limits)?;
        Ok(Self {
            id: header.id.clone(),
            sync: header.sync,
            records,
        })
    }

    /// The checked parse without the per-line one: header, declared sizes against `limits`,
    /// bounded inflate, CRC32 and length, exactly as [`Chunk::decode`] checks them. Returns the
    /// header and the inflated payload (one JSON line per record, each ending in `\n`), for
    /// readers that scan lines themselves. The lines are *not* checked.
    pub fn inflate(bytes: &[u8], limits: &Limits) -> Result<(ChunkHeader, Vec<u8>), DecodeError> {
        Self::inflate_with(bytes, limits, inflate_exact)
    }

    /// [`Chunk::inflate`] with another inflater (a faster one where std is available). Every
    /// check stays here; `inflater(deflated, raw_len)` must return exactly `raw_len` bytes
    /// inflated from all of `deflated`, writing no more than `raw_len` (the bomb guard), or an
    /// error.
    pub fn inflate_with(
        bytes: &[u8],
        limits: &Limits,
        inflater: impl FnOnce(&[u8], usize) -> Result<Vec<u8>, DecodeError>,
    ) -> Result<(ChunkHeader, Vec<u8>), DecodeError> {
        let header = ChunkHeader::parse(bytes)?;
        let raw = inflate_checked(bytes, &header, limits, inflater)?;
        Ok((header, raw))
    }
}

/// Everything [`Chunk::decode`] checks before the lines; returns the inflated payload.
fn inflate_checked(
    bytes: &[u8],
    header: &ChunkHeader,
    limits: &Limits,
    inflater: impl FnOnce(&[u8], usize) -> Result<Vec<u8>, DecodeError>,
) -> Result<Vec<u8>, DecodeError> {
    if header.record_count > limits.max_records {
        return Err(DecodeError::LimitExceeded {
            what: "record count",
            limit: limits.max_records.into(),
            value: header.record_count.into(),
        });
    }
    if header.raw_len > limits.max_decompressed {
        return Err(DecodeError::LimitExceeded {
            what: "declared inflated size",
            limit: limits.max_decompressed.into(),
            value: header.raw_len.into(),
        });
    }
    let total = header.member_len();
    let have = bytes.len() as u64;
    if have < total {
        return Err(DecodeError::Truncated { what: "payload" });
    }
    if have > total {
        return Err(DecodeError::TrailingBytes(have - total));
    }
    if u64::from(header.raw_len)
        > u64::from(header.deflate_len).saturating_mul(MAX_DEFLATE_RATIO) + 64
    {
        return Err(DecodeError::SizeMismatch {
            what: "inflated size (beyond deflate's maximum ratio)",
            declared: header.raw_len.into(),
            actual: u64::from(header.deflate_len) * MAX_DEFLATE_RATIO,
        });
    }
    let start = header.header_len as usize;
    let end = start + header.deflate_len as usize;
    let deflated = bytes
        .get(start..end)
        .ok_or(DecodeError::Truncated { what: "payload" })?;
    let trailer = bytes.get(end..).ok_or(DecodeError::Truncated {
        what: "gzip trailer",
    })?;
    let raw = inflater(deflated, header.raw_len as usize)?;
    if raw.len() != header.raw_len as usize {
        return Err(DecodeError::SizeMismatch {
            what: "inflated size",
            declared: header.raw_len.into(),
            actual: raw.len() as u64,
        });
    }
    let (crc, isize) = match trailer {
        [a, b, c, d, e, f, g, h] => (
            u32::from_le_bytes([*a, *b, *c, *d]),
            u32::from_le_bytes([*e, *f, *g, *h]),
        ),
        _ => {
            return Err(DecodeError::Truncated {
                what: "gzip trailer",
            });
        }
    };
    if isize != header.raw_len {
        return Err(DecodeError::SizeMismatch {
            what: "gzip ISIZE",
            declared: header.raw_len.into(),
            actual: isize.into(),
        });
    }
    if crc32fast::hash(&raw) != crc {
        return Err(DecodeError::PayloadCrcMismatch);
    }
    Ok(raw)
}

/// Inflates `deflated` into exactly `raw_len` bytes, consuming all of it, or fails.
fn inflate_exact(deflated: &[u8], raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; raw_len];
    let mut state: Box<DecompressorOxide> = Box::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, consumed, written) = decompress(&mut state, deflated, &mut out, 0, flags);
    match status {
        TINFLStatus::Done => {}
        TINFLStatus::HasMoreOutput => {
            return Err(DecodeError::SizeMismatch {
                what: "inflated size",
                declared: raw_len as u64,
                actual: raw_len as u64 + 1,
            });
        }
        TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
            return Err(DecodeError::Truncated {
                what: "deflate stream",
            });
        }
        _ => return Err(DecodeError::Inflate),
    }
    if written != raw_len {
        return Err(DecodeError::SizeMismatch {
            what: "inflated size",
            declared: raw_len as u64,
            actual: written as u64,
        });
    }
    if consumed != deflated.len() {
        return Err(DecodeError::SizeMismatch {
            what: "deflate length",
            declared: deflated.len() as u64,
            actual: consumed as u64,
        });
    }
    Ok(out)
}

fn parse_lines(
    raw: &[u8],
    header: &ChunkHeader,
    limits: &Limits,
) -> Result<Vec<Record>, DecodeError> {
    let body = match raw.split_last() {
        Some((b'\n', body)) => body,
        _ => {
            return Err(DecodeError::BadRecord {
                index: 0,
                reason: "payload does not end with a newline",
            });
        }
    };
    let boot = header.id.boot.to_string();
    let max_line = limits.max_line();
    let mut records = Vec::with_capacity(header.record_count as usize);
    let mut prev: Option<u64> = None;
    for (i, l) in body.split(|b| *b == b'\n').enumerate() {
        let index = i as u32;
        if records.len() >= header.record_count as usize {
            return Err(DecodeError::SizeMismatch {
                what: "record count",
                declared: header.record_count.into(),
                actual: i as u64 + 1,
            });
        }
        if l.len() > max_line {
            return Err(DecodeError::LimitExceeded {
                what: "line length",
                limit: max_line as u64,
                value: l.len() as u64,
            });
        }
        let p = line::parse(l, index, limits.max_msg as usize)?;
        let bad = |reason| DecodeError::BadRecord { index, reason };
        if p.device != header.id.device.as_str() {
            return Err(bad("device differs from the chunk header"));
        }
        if p.boot != boot {
            return Err(bad("boot id differs from the chunk header"));
        }
        let seq = p.record.seq;
        match prev {
            None if seq != header.id.first_seq => {
                return Err(bad(
                    "first record is not at the chunk's first sequence number",
                ));
            }
            Some(pr) if seq <= pr => return Err(bad("sequence numbers do not increase")),
            _ => {}
        }
        if seq > header.id.last_seq {
            return Err(bad("sequence number beyond the chunk's last"));
        }
        prev = Some(seq);
        records.push(p.record);
    }
    if records.len() != header.record_count as usize {
        return Err(DecodeError::SizeMismatch {
            what: "record count",
            declared: header.record_count.into(),
            actual: records.len() as u64,
        });
    }
    Ok(records)
}

/// Walks a segment (chunks' gzip members back to back) by the headers alone, without inflating:
/// yields each member's header and byte offset. Stops with an error at the first member whose
/// header does not parse or whose declared length runs past the end.
pub fn walk_members(
    segment: &[u8],
) -> impl Iterator<Item = Result<(u64, ChunkHeader), DecodeError>> + '_ {
    let mut pos: usize = 0;
    let mut failed = false;
    core::iter::from_fn(move || {
        if failed || pos >= segment.len() {
            return None;
        }
        let rest = segment.get(pos..)?;
        let r = ChunkHeader::parse(rest).and_then(|h| {
            let len = usize::try_from(h.member_len())
                .map_err(|_| DecodeError::Truncated { what: "member" })?;
            if len > rest.len() {
                return Err(DecodeError::Truncated { what: "member" });
            }
            Ok((len, h))
        });
        match r {
            Ok((len, h)) => {
                let at = pos as u64;
                pos += len;
                Some(Ok((at, h)))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}
