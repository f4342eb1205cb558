//! Typed errors. [`DecodeError`] is what untrusted bytes can cause; [`EncodeError`] is misuse of
//! the builder by the caller (a bug or a limit the caller chose to exceed), never outside input.
use core::fmt;

/// Why a chunk received from outside was rejected. Every variant is caused by the bytes alone.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the structure being read needs (a truncated body).
    Truncated {
        /// What was being read when the bytes ran out.
        what: &'static str,
    },
    /// The gzip magic, method or our extra-field tag is not what a chunk starts with.
    BadMagic,
    /// The header names a chunk format version this build does not understand.
    UnsupportedVersion(u8),
    /// A header field holds a value that cannot be valid (for example an empty device id).
    BadHeader(&'static str),
    /// The header CRC32 (in our extra field) does not match the header bytes.
    HeaderCrcMismatch,
    /// The CRC32 in the gzip trailer does not match the inflated payload.
    PayloadCrcMismatch,
    /// A size in the header disagrees with the bytes (declared sizes that lie).
    SizeMismatch {
        /// Which size.
        what: &'static str,
        /// What the header declared.
        declared: u64,
        /// What the bytes actually hold.
        actual: u64,
    },
    /// A declared or actual size is over the receiver's limit (the decompression-bomb guard).
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The value found (for inflated sizes: at least this much).
        value: u64,
    },
    /// The deflate stream is corrupt.
    Inflate,
    /// Bytes follow the gzip member.
    TrailingBytes(u64),
    /// A record line is not valid JSON of the record shape.
    BadRecord {
        /// Zero-based index of the record line.
        index: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { what } => {
                write!(f, "truncated chunk: ran out of bytes reading {what}")
            }
            Self::BadMagic => {
                f.write_str("not a blackbox chunk (bad gzip magic or missing BB extra field)")
            }
            Self::UnsupportedVersion(v) => write!(f, "unsupported chunk version {v}"),
            Self::BadHeader(why) => write!(f, "bad chunk header: {why}"),
            Self::HeaderCrcMismatch => f.write_str("chunk header CRC mismatch"),
            Self::PayloadCrcMismatch => f.write_str("chunk payload CRC32 mismatch"),
            Self::SizeMismatch {
                what,
                declared,
                actual,
            } => {
                write!(
                    f,
                    "declared {what} {declared} does not match actual {actual}"
                )
            }
            Self::LimitExceeded { what, limit, value } => {
                write!(f, "{what} {value} exceeds limit {limit}")
            }
            Self::Inflate => f.write_str("corrupt deflate stream"),
            Self::TrailingBytes(n) => write!(f, "{n} bytes after the end of the chunk"),
            Self::BadRecord { index, reason } => write!(f, "record {index}: {reason}"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why the builder refused to make a chunk. These are caller errors, not input errors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A chunk needs at least one record.
    Empty,
    /// Record sequence numbers must strictly increase.
    SequenceNotIncreasing {
        /// The previous record's sequence number.
        previous: u64,
        /// The offending record's sequence number.
        next: u64,
    },
    /// The chunk would exceed one of the [`crate::Limits`] it is built for.
    LimitExceeded(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("a chunk needs at least one record"),
            Self::SequenceNotIncreasing { previous, next } => {
                write!(f, "sequence {next} does not follow {previous}")
            }
            Self::LimitExceeded(what) => write!(f, "chunk would exceed the {what} limit"),
        }
    }
}

impl core::error::Error for EncodeError {}
