//! The chunk header: a gzip member header whose extra field (subfield `BB`) carries the chunk's
//! identity, sync point and declared sizes, so a reader learns them without inflating.
//!
//! ```text
//! gzip:  1f 8b 08 FLG=FEXTRA MTIME(4) XFL OS=3 XLEN(2) | 'B' 'B' LEN(2) DATA(LEN)
//! DATA:  offset  size  field
//!        0       1     version (1)
//!        1       1     flags (bit 0: wall clock NTP-synchronised)
//!        2       16    boot id (UUID bytes)
//!        18      8     first sequence number (LE)
//!        26      8     last sequence number (LE)
//!        34      4     record count (LE)
//!        38      8     sync point: monotonic µs (LE)
//!        46      8     sync point: wall clock, µs since the Unix epoch (LE, signed)
//!        54      4     inflated payload length (LE)
//!        58      4     deflate payload length (LE)
//!        62      1     device id length N (1..=64)
//!        63      N     device id ([A-Za-z0-9._:-])
//!        63+N    4     CRC32 of every header byte before it, from the gzip magic on (LE)
//! ```
//!
//! The header checksum lives in our own field rather than gzip's FHCRC flag: DuckDB's gzip
//! reader refuses that flag (it takes bit 1 for the old "multipart" flag).
use alloc::string::String;
use core::fmt;

use crate::error::DecodeError;

/// gzip magic bytes.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// gzip compression method: deflate.
pub const GZIP_CM_DEFLATE: u8 = 8;
/// gzip flag: an extra field follows.
pub const GZIP_FEXTRA: u8 = 0x04;
/// gzip OS byte: Unix.
pub const GZIP_OS_UNIX: u8 = 3;
/// Length of the fixed gzip header before XLEN.
pub const GZIP_FIXED_LEN: usize = 10;
/// Length of the gzip trailer (CRC32, ISIZE).
pub const GZIP_TRAILER_LEN: usize = 8;
/// Our extra-field subfield id.
pub const SUBFIELD_ID: [u8; 2] = *b"BB";
/// The chunk format version this crate writes and reads.
pub const VERSION: u8 = 1;

/// Offsets inside the subfield data.
mod off {
    pub(crate) const VERSION: usize = 0;
    pub(crate) const FLAGS: usize = 1;
    pub(crate) const BOOT: usize = 2;
    pub(crate) const FIRST_SEQ: usize = 18;
    pub(crate) const LAST_SEQ: usize = 26;
    pub(crate) const COUNT: usize = 34;
    pub(crate) const SYNC_MONO: usize = 38;
    pub(crate) const SYNC_WALL: usize = 46;
    pub(crate) const RAW_LEN: usize = 54;
    pub(crate) const DEFLATE_LEN: usize = 58;
    pub(crate) const DEVICE_LEN: usize = 62;
    pub(crate) const DEVICE: usize = 63;
}

/// Flag bit: the wall clock was NTP-synchronised at the sync point.
const FLAG_SYNCED: u8 = 0x01;

/// A device's name: 1 to 64 characters from `[A-Za-z0-9._:-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Longest device id.
    pub const MAX_LEN: usize = 64;

    /// Checks and wraps a device id.
    pub fn new(s: &str) -> Result<Self, DecodeError> {
        Self::check(s.as_bytes())?;
        Ok(Self(String::from(s)))
    }

    fn check(b: &[u8]) -> Result<(), DecodeError> {
        if b.is_empty() || b.len() > Self::MAX_LEN {
            return Err(DecodeError::BadHeader("device id must be 1 to 64 bytes"));
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            return Err(DecodeError::BadHeader(
                "device id has a character outside [A-Za-z0-9._:-]",
            ));
        }
        Ok(())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

/// A boot's id: the 16 bytes of the kernel's `/proc/sys/kernel/random/boot_id` UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BootId(pub [u8; 16]);

impl BootId {
    /// Parses the hyphenated (or plain) hexadecimal UUID form.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = [0u8; 16];
        let mut n = 0usize;
        let mut hi: Option<u8> = None;
        for c in s.trim().bytes() {
            if c == b'-' {
                continue;
            }
            let v = (c as char).to_digit(16)? as u8;
            match hi.take() {
                None => hi = Some(v),
                Some(h) => {
                    *out.get_mut(n)? = (h << 4) | v;
                    n += 1;
                }
            }
        }
        (n == 16 && hi.is_none()).then_some(Self(out))
    }
}

impl fmt::Display for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootId({self})")
    }
}

/// A wall-clock/monotonic pair taken at one instant, so every record's monotonic time can be
/// placed on the wall clock: `wall = wall_us + (mono - mono_us)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncPoint {
    /// Monotonic microseconds since boot.
    pub mono_us: u64,
    /// Wall-clock microseconds since the Unix epoch.
    pub wall_us: i64,
    /// Whether the wall clock was NTP-synchronised.
    pub synced: bool,
}

impl SyncPoint {
    /// Wall-clock µs of a record with monotonic time `mono_us`.
    pub fn wall_of(&self, mono_us: u64) -> i64 {
        let delta = i128::from(mono_us) - i128::from(self.mono_us);
        let wall = i128::from(self.wall_us) + delta;
        wall.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

/// What makes a chunk itself: retries of the same chunk carry the same id, so the receiver can
/// recognise them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    /// The device.
    pub device: DeviceId,
    /// The boot.
    pub boot: BootId,
    /// First sequence number covered.
    pub first_seq: u64,
    /// Last sequence number covered.
    pub last_seq: u64,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}-{}",
            self.device, self.boot, self.first_seq, self.last_seq
        )
    }
}

/// The parsed chunk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Identity.
    pub id: ChunkId,
    /// Sync point.
    pub sync: SyncPoint,
    /// Number of records.
    pub record_count: u32,
    /// Declared length of the inflated payload.
    pub raw_len: u32,
    /// Declared length of the deflate stream.
    pub deflate_len: u32,
    /// Length of the whole gzip header (where the deflate stream starts).
    pub header_len: u32,
}

impl ChunkHeader {
    /// Total length of the gzip member this header starts: header, deflate stream, trailer.
    /// This is what lets a reader walk a segment of chunks without inflating.
    pub fn member_len(&self) -> u64 {
        u64::from(self.header_len) + u64::from(self.deflate_len) + GZIP_TRAILER_LEN as u64
    }

    /// Parses and checks the header at the start of `bytes`. Checks magic, version, header CRC
    /// and field sanity; does not look at the payload.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let fixed = bytes
            .get(..GZIP_FIXED_LEN + 2)
            .ok_or(DecodeError::Truncated {
                what: "gzip header",
            })?;
        if fixed[..2] != GZIP_MAGIC || fixed[2] != GZIP_CM_DEFLATE {
            return Err(DecodeError::BadMagic);
        }
        if fixed[3] != GZIP_FEXTRA {
            return Err(DecodeError::BadMagic);
        }
        let xlen = usize::from(u16::from_le_bytes([fixed[10], fixed[11]]));
        let extra_end = GZIP_FIXED_LEN + 2 + xlen;
        let header_end = extra_end;
        let header = bytes.get(..header_end).ok_or(DecodeError::Truncated {
            what: "gzip extra field",
        })?;
        let extra = &header[GZIP_FIXED_LEN + 2..extra_end];
        if extra.len() < 4 || extra[..2] != SUBFIELD_ID {
            return Err(DecodeError::BadMagic);
        }
        let sub_len = usize::from(u16::from_le_bytes([extra[2], extra[3]]));
        let with_crc = &extra[4..];
        if sub_len != with_crc.len() {
            return Err(DecodeError::BadHeader(
                "subfield length does not match extra length",
            ));
        }
        let crc_at = with_crc
            .len()
            .checked_sub(4)
            .ok_or(DecodeError::Truncated {
                what: "chunk header",
            })?;
        let data = &with_crc[..crc_at];
        if crc32fast::hash(&header[..extra_end - 4]) != read_u32(with_crc, crc_at) {
            return Err(DecodeError::HeaderCrcMismatch);
        }
        let version = *data.get(off::VERSION).ok_or(DecodeError::Truncated {
            what: "chunk header",
        })?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        if data.len() < off::DEVICE {
            return Err(DecodeError::Truncated {
                what: "chunk header",
            });
        }
        let dev_len = usize::from(data[off::DEVICE_LEN]);
        if data.len() != off::DEVICE + dev_len {
            return Err(DecodeError::BadHeader(
                "device id length does not match header length",
            ));
        }
        let dev = &data[off::DEVICE..];
        DeviceId::check(dev)?;
        let device = DeviceId(String::from(
            core::str::from_utf8(dev).map_err(|_| DecodeError::BadHeader("device id not ASCII"))?,
        ));
        let flags = data[off::FLAGS];
        if flags & !FLAG_SYNCED != 0 {
            return Err(DecodeError::BadHeader("unknown flag bits"));
        }
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&data[off::BOOT..off::BOOT + 16]);
        let first_seq = read_u64(data, off::FIRST_SEQ);
        let last_seq = read_u64(data, off::LAST_SEQ);
        if last_seq < first_seq {
            return Err(DecodeError::BadHeader("last sequence number before first"));
        }
        let record_count = read_u32(data, off::COUNT);
        if record_count == 0 {
            return Err(DecodeError::BadHeader("chunk declares no records"));
        }
        if u64::from(record_count) - 1 > last_seq - first_seq {
            return Err(DecodeError::BadHeader(
                "more records than sequence numbers in range",
            ));
        }
        Ok(Self {
            id: ChunkId {
                device,
                boot: BootId(boot),
                first_seq,
                last_seq,
            },
            sync: SyncPoint {
                mono_us: read_u64(data, off::SYNC_MONO),
                wall_us: read_u64(data, off::SYNC_WALL) as i64,
                synced: flags & FLAG_SYNCED != 0,
            },
            record_count,
            raw_len: read_u32(data, off::RAW_LEN),
            deflate_len: read_u32(data, off::DEFLATE_LEN),
            header_len: header_end as u32,
        })
    }

    /// Appends the gzip header for this chunk to `out`. `header_len` is ignored (it is what this
    /// writes: [`ChunkHeader::encoded_len`]).
    pub fn emit(&self, out: &mut alloc::vec::Vec<u8>) {
        let start = out.len();
        let dev = self.id.device.as_str().as_bytes();
        let data_len = off::DEVICE + dev.len() + 4;
        let xlen = 4 + data_len;
        let mtime = (self.sync.wall_us.max(0) / 1_000_000).min(i64::from(u32::MAX)) as u32;
        out.extend_from_slice(&GZIP_MAGIC);
        out.extend_from_slice(&[GZIP_CM_DEFLATE, GZIP_FEXTRA]);
        out.extend_from_slice(&mtime.to_le_bytes());
        out.extend_from_slice(&[0, GZIP_OS_UNIX]);
        out.extend_from_slice(&(xlen as u16).to_le_bytes());
        out.extend_from_slice(&SUBFIELD_ID);
        out.extend_from_slice(&(data_len as u16).to_le_bytes());
        out.push(VERSION);
        out.push(if self.sync.synced { FLAG_SYNCED } else { 0 });
        out.extend_from_slice(&self.id.boot.0);
        out.extend_from_slice(&self.id.first_seq.to_le_bytes());
        out.extend_from_slice(&self.id.last_seq.to_le_bytes());
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&self.sync.mono_us.to_le_bytes());
        out.extend_from_slice(&self.sync.wall_us.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.deflate_len.to_le_bytes());
        out.push(dev.len() as u8);
        out.extend_from_slice(dev);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Length in bytes of the gzip header [`ChunkHeader::emit`] writes.
    pub fn encoded_len(&self) -> usize {
        GZIP_FIXED_LEN + 2 + 4 + off::DEVICE + self.id.device.as_str().len() + 4
    }
}

fn read_u64(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[at..at + 8]);
    u64::from_le_bytes(b)
}

fn read_u32(d: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d[at..at + 4]);
    u32::from_le_bytes(b)
}
