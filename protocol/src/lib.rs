//! # blackbox-protocol: the chunk, the one thing agent and server agree on
//!
//! A **chunk** is a batch of log records from one device and one boot, compressed as a single
//! gzip member (RFC 1952). Because it is plain gzip, a stored chunk (and a segment of chunks back
//! to back) is readable by `zcat`, `grep` and DuckDB without this crate.
//!
//! ```text
//!  gzip header ─ FEXTRA subfield "BB" ─ ChunkHeader (identity, sync point, sizes, CRC32)
//!  deflate payload ─ one JSON line per record (NDJSON)
//!  gzip trailer ─ CRC32 and length of the inflated payload
//! ```
//!
//! The layers, bottom up:
//! - [`header`]: the fixed binary header carried in the gzip extra field, readable without
//!   inflating: device, boot id, first and last sequence number (the chunk's identity), the
//!   wall-clock/monotonic sync point, record count and the declared sizes.
//! - [`line`]: one record as one JSON line (`ts`, `device`, `boot`, `seq`, `mono_us`, `level`,
//!   `facility`, `origin`, `msg`).
//! - [`identity`]: the certificate fingerprint that names a device on the server's allowlist.
//! - [`chunk`]: [`ChunkBuilder`] emits chunks; [`Chunk::decode`] is **the** checked parse for
//!   untrusted bytes. It enforces [`Limits`] (record count, line length, inflated size) *before*
//!   and *while* inflating, so a decompression bomb costs at most the declared, bounded size.
//!   After it succeeds no accessor can panic.
//!
//! Guarantees: `no_std` (with `alloc`), no `unsafe`, encode → decode is the identity (property
//! tested, fuzzed in `fuzz/`), every error caused by outside bytes is a [`DecodeError`] variant.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod chunk;
pub mod error;
pub mod header;
pub mod identity;
pub mod line;
pub mod record;
pub mod time;

pub use chunk::{Chunk, ChunkBuilder, Limits};
pub use error::{DecodeError, EncodeError};
pub use header::{BootId, ChunkHeader, ChunkId, DeviceId, SyncPoint};
pub use identity::Fingerprint;
pub use record::{Origin, Record};
