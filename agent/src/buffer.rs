//! The buffer between reading the log stream and uploading it.
//!
//! The agent appends records as it reads them, *seals* pending records into chunks (fixing each
//! chunk's identity, so every retry sends the same bytes), uploads the oldest sealed chunk, and
//! removes it only when the server acknowledged it. The implementation is the persistent ring
//! (`linux::ringbuf`), where one sealed block is one chunk.
use alloc::vec::Vec;

use blackbox_protocol::{BootId, ChunkId, Record, SyncPoint};

/// Most chunks sent in one request. A chunk is one ring block (a 256th of the ring); the
/// server acknowledges a request when its segment is written (up to a second), so one chunk
/// per request would cap the agent at a block a second: far below a busy device's log rate.
pub const BATCH_CHUNKS: usize = 64;

/// Most bytes of chunks sent in one request (the server takes bodies up to 2 MiB by default;
/// one with a lower `--max-body` states it in its 413, and the agent sends less from then on).
pub const BATCH_BYTES: usize = 256 << 10;

/// A sealed chunk: its identity and the exact bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Identity.
    pub id: ChunkId,
    /// Encoded chunk (one gzip member).
    pub bytes: Vec<u8>,
}

/// What the agent needs from its buffer.
pub trait LogBuffer {
    /// The buffer's error type.
    type Error: core::fmt::Debug + core::fmt::Display;

    /// The last sequence number of `boot` already held (sealed or acknowledged): reading the
    /// log stream resumes after it, so an agent restart neither duplicates nor skips records.
    fn resume_after(&self, boot: &BootId) -> Option<u64>;

    /// Adds a record of the current boot; `sync` is the current clock pair (stamped on a new
    /// block, in case the boot ends before the block is sealed).
    fn append(&mut self, rec: Record, sync: SyncPoint) -> Result<(), Self::Error>;

    /// Bytes appended but not sealed yet (an estimate of their JSON size).
    fn pending_bytes(&self) -> usize;

    /// Seals pending records into chunks stamped with `sync`.
    fn seal(&mut self, sync: SyncPoint) -> Result<(), Self::Error>;

    /// The oldest sealed chunk not acknowledged yet.
    fn next_unacked(&mut self) -> Result<Option<Sealed>, Self::Error>;

    /// The oldest sealed chunks not acknowledged yet, to send in one request: at least one if
    /// any is waiting, at most `max_chunks`, and more than one only while their bytes stay
    /// within `max_bytes`. Acknowledge them in the order given.
    fn next_batch(
        &mut self,
        max_chunks: usize,
        max_bytes: usize,
    ) -> Result<Vec<Sealed>, Self::Error> {
        let _ = (max_chunks, max_bytes);
        Ok(self.next_unacked()?.into_iter().collect())
    }

    /// The server acknowledged `id`: it will never be sent again.
    fn ack(&mut self, id: &ChunkId) -> Result<(), Self::Error>;

    /// The server rejected `id` as invalid (a 4xx that no retry can fix): set it aside, so it
    /// neither blocks the chunks behind it nor disappears without a trace.
    fn reject(&mut self, id: &ChunkId, reason: &str) -> Result<(), Self::Error>;
}
