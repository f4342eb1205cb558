//! The persistent RAM ring: the agent's copy of the log stream, in memory that survives a kernel
//! panic and a warm reboot (reserved physical memory), or in a mapped file.
//!
//! `no_std`, no allocation: the ring works over any `&mut [u8]`-like region, so tests and the
//! fuzzer drive it over a plain byte slice and the Linux layer over a mapping.
//!
//! # Layout
//!
//! ```text
//! 0      header slot A (512 bytes)  ┐ the valid slot with the higher counter wins; every
//! 512    header slot B (512 bytes)  ┘ update writes the *other* slot, so a torn header write
//!                                     leaves the previous state readable
//! 1024   block 0 … block N-1        (N ≤ 256 blocks of `block_size` bytes)
//! ```
//!
//! A header slot holds magic, version, block size, region size, an update counter, the boot
//! that last opened the ring, the acknowledgement point (last acknowledged block generation and
//! the boot + sequence of its last record), the write position (block index), the table of
//! open gaps (records dropped during an outage) and a CRC32 of the slot.
//!
//! A block holds records of **one boot**. Its header has a magic, a CRC, a *generation* (a
//! number that grows with every block the ring ever started: the order of the stream), the
//! boot id and a sync point. Records follow:
//!
//! ```text
//! 0   kind (8 bits) | length (24 bits)    kind 1 = log record, 2 = close, 3 = gap
//! 4   CRC32 of (block generation, bytes 0..4, bytes 8..end)
//! 8   sequence u64, 16 monotonic µs u64, 24 level u8, facility u8, origin u8, reserved u8
//! 28  message bytes
//! ```
//!
//! The generation is part of each record's CRC, so a record left over from a block's previous
//! life can never be mistaken for one of its current life.
//!
//! # One block, one chunk
//!
//! A block is uploaded as exactly one chunk, identified by (device, boot, first sequence, last
//! sequence). A block is *sealed* by a close record (carrying the sync point to stamp on the
//! chunk) or by the ring moving on to another block. Because a block's records never change once
//! it is sealed, the chunk built from it after a reboot has the identity it had before, and a
//! retry of a chunk the server already stored is recognised there.
//!
//! # Recovery
//!
//! [`Ring::open`] picks the newest valid header slot (no valid slot is a [`HeaderError`]: the
//! caller re-initialises with [`Ring::format`] and reports it), then walks every block: a block
//! header with a bad CRC is discarded; inside a block every record whose CRC holds is kept, and
//! the walk stops at the first torn record. Every length is bounds-checked before use. What was
//! discarded is counted in [`Recovery`].
//!
//! # Overflow
//!
//! A new block reuses, in order of preference: a free block, the oldest acknowledged block, or —
//! when every block holds unacknowledged records (a long outage) — the oldest block *after* the
//! kept head of the outage (`keep_oldest_pct` of the blocks), and after the blocks of a request
//! on its way ([`Ring::set_in_flight`]) when at least two blocks lie beyond them. The dropped
//! block's records become a gap entry in the header (boot, exact sequence range, exact count)
//! *before* the block is overwritten; the gap is uploaded in its place as a chunk holding one gap
//! record.
use blackbox_protocol::{BootId, SyncPoint};

/// Size of one header slot.
pub const SLOT_LEN: usize = 512;
/// Bytes before the first block.
pub const HEADER_LEN: usize = 2 * SLOT_LEN;
/// Most blocks in a ring.
pub const MAX_BLOCKS: usize = 256;
/// Smallest block.
pub const MIN_BLOCK: usize = 256;
/// Largest block.
pub const MAX_BLOCK: usize = 1 << 20;
/// Most gap entries the header holds.
pub const MAX_GAPS: usize = 6;
/// Size of a block header.
pub const BLOCK_HDR: usize = 64;
/// Size of a record header.
pub const REC_HDR: usize = 28;
/// Bytes kept free at the end of every block for its close record.
const CLOSE_LEN: usize = REC_HDR + 9;
/// Magic of a header slot.
pub const MAGIC: [u8; 8] = *b"BBXRING1";
/// Layout version.
pub const VERSION: u16 = 1;
const BLOCK_MAGIC: u32 = 0x4b4c_4242; // "BBLK" little-endian

const KIND_LOG: u8 = 1;
const KIND_CLOSE: u8 = 2;
const KIND_GAP: u8 = 3;

// Header slot field offsets.
mod slot {
    pub(super) const MAGIC: usize = 0;
    pub(super) const VERSION: usize = 8;
    pub(super) const SLOT_LEN: usize = 10;
    pub(super) const BLOCK_SIZE: usize = 12;
    pub(super) const REGION_LEN: usize = 16;
    pub(super) const COUNTER: usize = 24;
    pub(super) const BOOT: usize = 32;
    pub(super) const ACKED_GEN: usize = 48;
    pub(super) const ACKED_BOOT: usize = 56;
    pub(super) const ACKED_SEQ: usize = 72;
    pub(super) const FLAGS: usize = 80;
    pub(super) const WRITE_BLOCK: usize = 84;
    pub(super) const NGAPS: usize = 88;
    pub(super) const GAPS: usize = 96;
    pub(super) const GAP_LEN: usize = 64;
    pub(super) const CRC: usize = 508;
}

// Block header field offsets.
mod blk {
    pub(super) const MAGIC: usize = 0;
    pub(super) const CRC: usize = 4;
    pub(super) const GEN: usize = 8;
    pub(super) const BOOT: usize = 16;
    pub(super) const SYNC_MONO: usize = 32;
    pub(super) const SYNC_WALL: usize = 40;
    pub(super) const FLAGS: usize = 48;
}

const FLAG_ACKED_VALID: u32 = 1;
/// Generations above this are corrupt: a ring would need 2^63 block writes to get there.
const MAX_GEN: u64 = 1 << 63;
/// A ring whose generations passed this (only possible in a corrupt or forged region) is
/// re-initialised, so every generation it writes afterwards stays readable (under `MAX_GEN`).
const GEN_LIMIT: u64 = 1 << 62;

/// Why a header could not be used. The region is then re-initialised by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    /// The region is too small for a header and two blocks.
    TooSmall {
        /// Its length.
        len: usize,
    },
    /// Neither slot has the magic: never formatted (or overwritten by something else).
    NoMagic,
    /// A slot has the magic but a layout version this agent does not know.
    Version(u16),
    /// Slots carry the magic but neither passes its CRC (or holds impossible values).
    BadCrc,
    /// Generation numbers are implausibly large (2^62 and more): a corrupt or forged region.
    Generations,
    /// The header describes a different region size or an impossible block size (the
    /// configured size changed, or the header is corrupt).
    Geometry {
        /// Region length the header records.
        recorded: u64,
        /// Actual region length.
        actual: u64,
        /// Block size the header records.
        block_size: u32,
    },
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooSmall { len } => write!(
                f,
                "region of {len} bytes is too small (need {} at least)",
                HEADER_LEN + 2 * MIN_BLOCK
            ),
            Self::NoMagic => f.write_str("no ring header (never formatted, or overwritten)"),
            Self::Version(v) => write!(f, "unknown ring layout version {v}"),
            Self::BadCrc => f.write_str("both header slots fail their CRC"),
            Self::Generations => f.write_str("generation numbers are implausibly large"),
            Self::Geometry {
                recorded,
                actual,
                block_size,
            } => write!(
                f,
                "header describes a {recorded}-byte region with {block_size}-byte blocks, \
                 the region is {actual} bytes"
            ),
        }
    }
}

impl core::error::Error for HeaderError {}

/// Misuse of the append API (the caller's bug, never caused by what is in the region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppendError {
    /// Sequence numbers of one boot must grow strictly.
    SeqOrder {
        /// Last sequence held for that boot in the open block.
        last: u64,
        /// The offending sequence number.
        seq: u64,
    },
    /// A gap record's range is empty or reversed.
    BadGap,
}

impl core::fmt::Display for AppendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::SeqOrder { last, seq } => {
                write!(f, "sequence {seq} does not follow {last}")
            }
            Self::BadGap => f.write_str("gap record with an empty range"),
        }
    }
}

impl core::error::Error for AppendError {}

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Blocks holding records.
    pub blocks: u32,
    /// Log and gap records kept.
    pub records: u64,
    /// Blocks whose walk stopped at a record that was there but failed its length or CRC check
    /// (a torn write, or corruption).
    pub torn: u32,
    /// Blocks whose header carried the block magic but failed its CRC (discarded whole).
    pub bad_blocks: u32,
    /// Blocks dropped because a gap entry already accounts for their records (a crash between
    /// recording a gap and reusing the block).
    pub covered: u32,
    /// The header slot that was used had the other slot corrupt (a torn header write).
    pub torn_header: bool,
}

/// Settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Share of the blocks (percent) kept from the start of an outage when the ring overflows;
    /// the rest holds the newest records.
    pub keep_oldest_pct: u8,
    /// Block size for a new ring (`None`: derived from the region size). An existing ring keeps
    /// the block size its header records.
    pub block_size: Option<u32>,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            keep_oldest_pct: 50,
            block_size: None,
        }
    }
}

/// Where a record came from (a byte in the ring).
pub mod origin {
    /// Read from the kernel log.
    pub const KMSG: u8 = 0;
    /// Recovered from pstore.
    pub const PSTORE: u8 = 1;
    /// Written by the agent.
    pub const AGENT: u8 = 2;
}

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A log line.
    Log,
    /// `count` records with sequence numbers `seq..=last` were lost; the message says why.
    Gap {
        /// Last lost sequence number.
        last: u64,
        /// How many records were lost.
        count: u64,
    },
}

/// A record, borrowed: what is appended, and what is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Log line or gap.
    pub kind: Kind,
    /// Sequence number (for a gap: the first lost one).
    pub seq: u64,
    /// Monotonic µs since boot.
    pub mono_us: u64,
    /// Severity.
    pub level: u8,
    /// Facility.
    pub facility: u8,
    /// One of [`origin`].
    pub origin: u8,
    /// Message bytes (for a gap: the reason).
    pub msg: &'a [u8],
}

impl Entry<'_> {
    /// Last sequence number this entry covers.
    pub fn last_seq(&self) -> u64 {
        match self.kind {
            Kind::Log => self.seq,
            Kind::Gap { last, .. } => last,
        }
    }

    /// Records this entry stands for (1 for a line, the lost count for a gap).
    pub fn weight(&self) -> u64 {
        match self.kind {
            Kind::Log => 1,
            Kind::Gap { count, .. } => count,
        }
    }
}

/// Records dropped from the middle of an outage and not uploaded yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GapInfo {
    /// The gap stands right after the block with this generation.
    pub after_gen: u64,
    /// Boot of the lost records.
    pub boot: BootId,
    /// First lost sequence number.
    pub first: u64,
    /// Last lost sequence number.
    pub last: u64,
    /// Exact number of lost records.
    pub count: u64,
    /// Monotonic time of the first lost record.
    pub mono_us: u64,
    /// Records of other (later) boots lost too, when the gap table was full.
    pub other: u64,
}

/// Something to upload, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A sealed block (one chunk).
    Block {
        /// Block index.
        index: u16,
        /// Its generation.
        gen_: u64,
    },
    /// A gap entry (one chunk holding a gap record).
    Gap(GapInfo),
}

/// What happened while appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// A block of unacknowledged records was dropped to make room (the ring is full during an
    /// outage); its records joined this gap.
    pub dropped: Option<GapInfo>,
    /// Bytes cut from the end of an over-long message.
    pub truncated: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct BlockInfo {
    live: bool,
    gen_: u64,
    boot: BootId,
    sync: SyncPoint,
    closed: bool,
    used: u32,
    records: u32,
    first_seq: u64,
    last_seq: u64,
    weight: u64,
    first_mono: u64,
    last_mono: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    counter: u64,
    boot: BootId,
    acked_gen: u64,
    acked: Option<(BootId, u64)>,
    write_block: u32,
    ngaps: usize,
    gaps: [GapInfo; MAX_GAPS],
}

/// The ring over a region `M` (a byte slice, a `Vec`, a memory mapping).
pub struct Ring<M> {
    mem: M,
    block_size: usize,
    nblocks: usize,
    cfg: RingConfig,
    st: State,
    previous_boot: Option<BootId>,
    blocks: [BlockInfo; MAX_BLOCKS],
    /// Live blocks, oldest generation first.
    order: [u16; MAX_BLOCKS],
    nlive: usize,
    /// The block being appended to.
    open: Option<u16>,
    next_gen: u64,
    /// The first gap entry was handed out for upload: it must not grow any more.
    gap_handed: bool,
    /// Blocks up to this generation are on their way to the server (0: none): dropped only
    /// when nothing else can be (see [`Ring::set_in_flight`]).
    in_flight_gen: u64,
}

impl<M> core::fmt::Debug for Ring<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ring")
            .field("block_size", &self.block_size)
            .field("nblocks", &self.nblocks)
            .field("live", &self.nlive)
            .field("acked_gen", &self.st.acked_gen)
            .field("gaps", &self.st.ngaps)
            .finish()
    }
}

fn rd_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn rd_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn rd_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn rd_boot(b: &[u8], off: usize) -> BootId {
    let mut a = [0u8; 16];
    if let Some(s) = b.get(off..off + 16) {
        a.copy_from_slice(s);
    }
    BootId(a)
}

fn wr(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Block size for a region of `len` bytes: a power of two, at least 4 KiB, at most
/// [`MAX_BLOCKS`] blocks.
pub fn default_block_size(len: usize) -> usize {
    let data = len.saturating_sub(HEADER_LEN);
    data.div_ceil(MAX_BLOCKS)
        .next_power_of_two()
        .clamp(4096, MAX_BLOCK)
}

/// Longest message a block of `block_size` bytes holds (longer ones are truncated).
pub fn max_msg(block_size: usize) -> usize {
    block_size - BLOCK_HDR - CLOSE_LEN - REC_HDR
}

fn geometry(len: usize, block_size: usize) -> Option<usize> {
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return None;
    }
    let n = (len.checked_sub(HEADER_LEN)? / block_size).min(MAX_BLOCKS);
    (n >= 2).then_some(n)
}

struct Walk {
    info: BlockInfo,
    torn: bool,
}

/// The memory a ring lives in. Every write goes through [`Region::write`], in program order, so
/// a test can cut a run of writes at any byte and recover from what reached memory.
pub trait Region {
    /// The whole region.
    fn bytes(&self) -> &[u8];
    /// Writes `data` at `off` (the ring never writes out of bounds).
    fn write(&mut self, off: usize, data: &[u8]);
    /// Zeroes `len` bytes at `off`.
    fn zero(&mut self, off: usize, len: usize);
}

macro_rules! slice_region {
    ($($t:ty),*) => {$(
        impl Region for $t {
            fn bytes(&self) -> &[u8] {
                self
            }
            fn write(&mut self, off: usize, data: &[u8]) {
                if let Some(d) = self.get_mut(off..off.saturating_add(data.len())) {
                    d.copy_from_slice(data);
                }
            }
            fn zero(&mut self, off: usize, len: usize) {
                if let Some(d) = self.get_mut(off..off.saturating_add(len)) {
                    d.fill(0);
                }
            }
        }
    )*};
}

slice_region!(&mut [u8], alloc::vec::Vec<u8>, alloc::boxed::Box<[u8]>);

impl<M: Region> Ring<M> {
    /// Formats `mem` as an empty ring opened by `boot`. Everything it held is forgotten.
    pub fn format(mut mem: M, boot: BootId, cfg: RingConfig) -> Result<Self, (M, HeaderError)> {
        let len = mem.bytes().len();
        let bs = cfg
            .block_size
            .map_or_else(|| default_block_size(len), |b| b as usize);
        let Some(nblocks) = geometry(len, bs) else {
            return Err((mem, HeaderError::TooSmall { len }));
        };
        for i in 0..nblocks {
            mem.zero(HEADER_LEN + i * bs, BLOCK_HDR);
        }
        mem.zero(0, HEADER_LEN);
        let mut ring = Self::empty(mem, bs, nblocks, cfg);
        ring.st.boot = boot;
        // Write both slots so a torn first update still leaves a valid one.
        ring.write_header();
        ring.write_header();
        Ok(ring)
    }

    /// Opens an existing ring, recovering every intact record, for the current `boot`.
    /// A header that cannot be used gives the region back with the reason.
    pub fn open(
        mem: M,
        boot: BootId,
        cfg: RingConfig,
    ) -> Result<(Self, Recovery), (M, HeaderError)> {
        let len = mem.bytes().len();
        if len < HEADER_LEN + 2 * MIN_BLOCK {
            return Err((mem, HeaderError::TooSmall { len }));
        }
        let (a, b) = {
            let r = mem.bytes();
            (
                parse_slot(&r[..SLOT_LEN]),
                parse_slot(&r[SLOT_LEN..HEADER_LEN]),
            )
        };
        let mut rec = Recovery::default();
        let (st, bs, region_len) = match (a, b) {
            (Ok(a), Ok(b)) => {
                if a.0.counter >= b.0.counter {
                    a
                } else {
                    b
                }
            }
            (Ok(x), Err(e)) | (Err(e), Ok(x)) => {
                rec.torn_header = e != HeaderError::NoMagic;
                x
            }
            (Err(e1), Err(e2)) => {
                let e = match (e1, e2) {
                    (HeaderError::Version(v), _) | (_, HeaderError::Version(v)) => {
                        HeaderError::Version(v)
                    }
                    (HeaderError::NoMagic, HeaderError::NoMagic) => HeaderError::NoMagic,
                    _ => HeaderError::BadCrc,
                };
                return Err((mem, e));
            }
        };
        let nblocks = match geometry(len, bs) {
            Some(n) if region_len == len as u64 => n,
            _ => {
                return Err((
                    mem,
                    HeaderError::Geometry {
                        recorded: region_len,
                        actual: len as u64,
                        block_size: bs as u32,
                    },
                ));
            }
        };
        let mut ring = Self::empty(mem, bs, nblocks, cfg);
        ring.st = st;
        let covered = ring.recover(&mut rec);
        if ring.next_gen > GEN_LIMIT {
            return Err((ring.into_inner(), HeaderError::Generations));
        }
        // Finish an interrupted reuse: a block a gap entry accounts for must not come back to
        // life once the gap is acknowledged and gone from the header.
        for (i, _) in covered.iter().enumerate().filter(|(_, c)| **c) {
            let start = ring.block_start(i);
            ring.mem.zero(start, BLOCK_HDR);
        }
        // The open block continues where its last intact record ends: clear what follows (a
        // torn record, or stale bytes of this block's life), so nothing behind new records
        // can be read back as part of the block.
        if let Some(i) = ring.open {
            let b = ring.blocks[i as usize];
            let start = ring.block_start(i as usize) + b.used as usize;
            let rest = ring.block_size - b.used as usize;
            if ring
                .mem
                .bytes()
                .get(start..start + rest)
                .is_some_and(|t| t.iter().any(|&x| x != 0))
            {
                ring.mem.zero(start, rest);
            }
        }
        if ring.st.boot != boot {
            // Every block of the earlier boot is sealed now.
            ring.open = None;
            ring.previous_boot = Some(ring.st.boot);
            ring.st.boot = boot;
            ring.write_header();
        }
        Ok((ring, rec))
    }

    /// [`Ring::open`], and on a bad header [`Ring::format`]: the error says why the region was
    /// re-initialised.
    pub fn open_or_format(
        mem: M,
        boot: BootId,
        cfg: RingConfig,
    ) -> Result<(Self, Recovery, Option<HeaderError>), HeaderError> {
        match Self::open(mem, boot, cfg) {
            Ok((r, rec)) => Ok((r, rec, None)),
            Err((mem, e)) => match Self::format(mem, boot, cfg) {
                Ok(r) => Ok((r, Recovery::default(), Some(e))),
                Err((_, e2)) => Err(e2),
            },
        }
    }

    fn empty(mem: M, block_size: usize, nblocks: usize, cfg: RingConfig) -> Self {
        Self {
            mem,
            block_size,
            nblocks,
            cfg,
            st: State::default(),
            previous_boot: None,
            blocks: [BlockInfo::default(); MAX_BLOCKS],
            order: [0; MAX_BLOCKS],
            nlive: 0,
            open: None,
            next_gen: 1,
            gap_handed: false,
            in_flight_gen: 0,
        }
    }

    /// The region (for flushing a file mapping, or inspection).
    pub fn region(&self) -> &[u8] {
        self.mem.bytes()
    }

    /// The backing, e.g. to flush a file mapping. Writing through it bypasses the ring.
    pub fn backing_mut(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Gives the region back.
    pub fn into_inner(self) -> M {
        self.mem
    }

    /// Block size.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.nblocks
    }

    /// The boot that had the ring open before this one (if it was another boot).
    pub fn previous_boot(&self) -> Option<BootId> {
        self.previous_boot
    }

    /// The last acknowledged record (boot and sequence number).
    pub fn acked(&self) -> Option<(BootId, u64)> {
        self.st.acked
    }

    fn block_start(&self, i: usize) -> usize {
        HEADER_LEN + i * self.block_size
    }

    /// Reads the blocks (no writes). Returns which blocks a gap entry already accounts for.
    fn recover(&mut self, rec: &mut Recovery) -> [bool; MAX_BLOCKS] {
        let mut covered_blocks = [false; MAX_BLOCKS];
        let mut max_gen = self.st.acked_gen;
        for g in &self.st.gaps[..self.st.ngaps] {
            max_gen = max_gen.max(g.after_gen);
        }
        for (i, covered_block) in covered_blocks.iter_mut().enumerate().take(self.nblocks) {
            let start = self.block_start(i);
            let Some(block) = self.mem.bytes().get(start..start + self.block_size) else {
                continue;
            };
            match walk_block(block) {
                Err(true) => rec.bad_blocks += 1,
                Err(false) => {}
                Ok(w) => {
                    max_gen = max_gen.max(w.info.gen_);
                    if w.torn {
                        rec.torn += 1;
                    }
                    let info = w.info;
                    let covered = info.gen_ > self.st.acked_gen
                        && info.records > 0
                        && self.st.gaps[..self.st.ngaps].iter().any(|g| {
                            g.boot == info.boot
                                && g.first <= info.first_seq
                                && info.last_seq <= g.last
                        });
                    if covered {
                        rec.covered += 1;
                        *covered_block = true;
                        continue;
                    }
                    if info.records == 0 && !info.closed {
                        // Started but never written to: free.
                        continue;
                    }
                    self.blocks[i] = info;
                    if info.gen_ > self.st.acked_gen {
                        rec.blocks += 1;
                        rec.records = rec.records.saturating_add(u64::from(info.records));
                    }
                }
            }
        }
        self.next_gen = max_gen.saturating_add(1);
        self.rebuild_order();
        // The newest unsealed block of the current header boot stays open for appends.
        if let Some(&last) = self.order[..self.nlive].last() {
            let b = &self.blocks[last as usize];
            if !b.closed && b.boot == self.st.boot && b.gen_ > self.st.acked_gen {
                self.open = Some(last);
            }
        }
        covered_blocks
    }

    fn rebuild_order(&mut self) {
        let mut n = 0;
        for i in 0..self.nblocks {
            if self.blocks[i].live {
                self.order[n] = i as u16;
                n += 1;
            }
        }
        let blocks = &self.blocks;
        self.order[..n].sort_unstable_by_key(|&i| blocks[i as usize].gen_);
        self.nlive = n;
    }

    fn write_header(&mut self) {
        self.st.counter = self.st.counter.saturating_add(1);
        let off = if self.st.counter.is_multiple_of(2) {
            0
        } else {
            SLOT_LEN
        };
        let mut s = [0u8; SLOT_LEN];
        let st = &self.st;
        wr(&mut s, slot::MAGIC, &MAGIC);
        wr(&mut s, slot::VERSION, &VERSION.to_le_bytes());
        wr(&mut s, slot::SLOT_LEN, &(SLOT_LEN as u16).to_le_bytes());
        wr(
            &mut s,
            slot::BLOCK_SIZE,
            &(self.block_size as u32).to_le_bytes(),
        );
        let len = self.mem.bytes().len() as u64;
        wr(&mut s, slot::REGION_LEN, &len.to_le_bytes());
        wr(&mut s, slot::COUNTER, &st.counter.to_le_bytes());
        wr(&mut s, slot::BOOT, &st.boot.0);
        wr(&mut s, slot::ACKED_GEN, &st.acked_gen.to_le_bytes());
        let (ab, aseq, flags) = match st.acked {
            Some((b, q)) => (b, q, FLAG_ACKED_VALID),
            None => (BootId::default(), 0, 0),
        };
        wr(&mut s, slot::ACKED_BOOT, &ab.0);
        wr(&mut s, slot::ACKED_SEQ, &aseq.to_le_bytes());
        wr(&mut s, slot::FLAGS, &flags.to_le_bytes());
        wr(&mut s, slot::WRITE_BLOCK, &st.write_block.to_le_bytes());
        wr(&mut s, slot::NGAPS, &(st.ngaps as u32).to_le_bytes());
        for (k, g) in st.gaps[..st.ngaps].iter().enumerate() {
            let o = slot::GAPS + k * slot::GAP_LEN;
            wr(&mut s, o, &g.after_gen.to_le_bytes());
            wr(&mut s, o + 8, &g.boot.0);
            wr(&mut s, o + 24, &g.first.to_le_bytes());
            wr(&mut s, o + 32, &g.last.to_le_bytes());
            wr(&mut s, o + 40, &g.count.to_le_bytes());
            wr(&mut s, o + 48, &g.mono_us.to_le_bytes());
            wr(&mut s, o + 56, &g.other.to_le_bytes());
        }
        let c = crc(&[&s[..slot::CRC]]);
        wr(&mut s, slot::CRC, &c.to_le_bytes());
        self.mem.write(off, &s);
    }

    /// Live blocks, oldest first.
    fn live(&self) -> &[u16] {
        &self.order[..self.nlive]
    }

    /// The last sequence number of `boot` the ring holds or has had acknowledged (reading the
    /// log stream resumes after it).
    pub fn resume_after(&self, boot: &BootId) -> Option<u64> {
        let mut best: Option<u64> = None;
        let mut see = |q: u64| best = Some(best.map_or(q, |b: u64| b.max(q)));
        for &i in self.live() {
            let b = &self.blocks[i as usize];
            if b.boot == *boot && b.records > 0 {
                see(b.last_seq);
            }
        }
        if let Some((ab, q)) = self.st.acked
            && ab == *boot
        {
            see(q);
        }
        for g in &self.st.gaps[..self.st.ngaps] {
            if g.boot == *boot {
                see(g.last);
            }
        }
        best
    }

    /// Sync point of the newest block of `boot` (for records added to an earlier boot).
    pub fn last_sync(&self, boot: &BootId) -> Option<SyncPoint> {
        self.live()
            .iter()
            .rev()
            .map(|&i| &self.blocks[i as usize])
            .find(|b| b.boot == *boot)
            .map(|b| b.sync)
    }

    /// Bytes of records in the open (unsealed) block.
    pub fn pending_bytes(&self) -> usize {
        self.open
            .map_or(0, |i| self.blocks[i as usize].used as usize - BLOCK_HDR)
    }

    /// Whether the open block holds records.
    pub fn has_pending(&self) -> bool {
        self.open
            .is_some_and(|i| self.blocks[i as usize].records > 0)
    }

    /// Appends a record of `boot`. `sync` is stamped on a block this append starts.
    pub fn append(
        &mut self,
        boot: &BootId,
        e: &Entry<'_>,
        sync: &SyncPoint,
    ) -> Result<Appended, AppendError> {
        if let Kind::Gap { last, count } = e.kind
            && (last < e.seq || count == 0)
        {
            return Err(AppendError::BadGap);
        }
        let extra = if matches!(e.kind, Kind::Gap { .. }) {
            16
        } else {
            0
        };
        let cap = max_msg(self.block_size) - extra;
        let (msg, truncated) = if e.msg.len() > cap {
            (&e.msg[..cap], e.msg.len() - cap)
        } else {
            (e.msg, 0)
        };
        let need = REC_HDR + extra + msg.len();
        let mut out = Appended {
            truncated,
            ..Appended::default()
        };
        let fits = self.open.is_some_and(|i| {
            let b = &self.blocks[i as usize];
            b.boot == *boot && b.used as usize + need + CLOSE_LEN <= self.block_size
        });
        if let Some(i) = self.open
            && self.blocks[i as usize].boot == *boot
            && self.blocks[i as usize].records > 0
            && e.seq <= self.blocks[i as usize].last_seq
        {
            return Err(AppendError::SeqOrder {
                last: self.blocks[i as usize].last_seq,
                seq: e.seq,
            });
        }
        if !fits {
            if let Some(held) = self.resume_after(boot)
                && e.seq <= held
            {
                return Err(AppendError::SeqOrder {
                    last: held,
                    seq: e.seq,
                });
            }
            out.dropped = self.start_block(boot, sync);
        }
        let Some(i) = self.open else {
            return Ok(out); // unreachable: start_block always opens one
        };
        let gen_ = self.blocks[i as usize].gen_;
        let start = self.block_start(i as usize) + self.blocks[i as usize].used as usize;
        let mut hdr = [0u8; REC_HDR + 16];
        let kind = match e.kind {
            Kind::Log => KIND_LOG,
            Kind::Gap { .. } => KIND_GAP,
        };
        let kl = (u32::from(kind) << 24) | (extra + msg.len()) as u32;
        wr(&mut hdr, 0, &kl.to_le_bytes());
        wr(&mut hdr, 8, &e.seq.to_le_bytes());
        wr(&mut hdr, 16, &e.mono_us.to_le_bytes());
        hdr[24] = e.level;
        hdr[25] = e.facility;
        hdr[26] = e.origin;
        if let Kind::Gap { last, count } = e.kind {
            wr(&mut hdr, 28, &last.to_le_bytes());
            wr(&mut hdr, 36, &count.to_le_bytes());
        }
        let h = &hdr[..REC_HDR + extra];
        let c = crc(&[&gen_.to_le_bytes(), &h[..4], &h[8..], msg]);
        wr(&mut hdr, 4, &c.to_le_bytes());
        // Message first, then the header whose CRC covers it: the length word lands last.
        self.mem.write(start + REC_HDR + extra, msg);
        self.mem.write(start + 4, &hdr[4..REC_HDR + extra]);
        self.mem.write(start, &hdr[..4]);
        let b = &mut self.blocks[i as usize];
        if b.records == 0 {
            b.first_seq = e.seq;
            b.first_mono = e.mono_us;
        }
        b.records += 1;
        b.last_seq = e.last_seq();
        b.last_mono = e.mono_us;
        b.weight = b.weight.saturating_add(e.weight());
        b.used += need as u32;
        Ok(out)
    }

    /// Seals the open block (if it holds records) with a close record carrying `sync`: it
    /// becomes uploadable, and the next append starts a new block. `sync` is the current
    /// boot's clock; a block of an earlier boot keeps the sync point it was started with.
    pub fn seal(&mut self, sync: &SyncPoint) -> bool {
        let Some(i) = self.open else { return false };
        if self.blocks[i as usize].records == 0 {
            return false;
        }
        let b = self.blocks[i as usize];
        let sync = if b.boot == self.st.boot {
            sync
        } else {
            &b.sync
        };
        let start = self.block_start(i as usize) + b.used as usize;
        let mut rec = [0u8; CLOSE_LEN];
        let kl = (u32::from(KIND_CLOSE) << 24) | 9;
        wr(&mut rec, 0, &kl.to_le_bytes());
        wr(&mut rec, 16, &sync.mono_us.to_le_bytes());
        wr(&mut rec, REC_HDR, &sync.wall_us.to_le_bytes());
        rec[REC_HDR + 8] = u8::from(sync.synced);
        let c = crc(&[&b.gen_.to_le_bytes(), &rec[..4], &rec[8..]]);
        wr(&mut rec, 4, &c.to_le_bytes());
        self.mem.write(start, &rec);
        let b = &mut self.blocks[i as usize];
        b.closed = true;
        b.sync = *sync;
        b.used += CLOSE_LEN as u32;
        self.open = None;
        true
    }

    /// Starts a new block for `boot`, reclaiming one if needed. Returns the gap a dropped block
    /// of unacknowledged records joined.
    fn start_block(&mut self, boot: &BootId, sync: &SyncPoint) -> Option<GapInfo> {
        self.open = None;
        let mut dropped = None;
        let idx = if let Some(i) = (0..self.nblocks).find(|&i| !self.blocks[i].live) {
            i
        } else if let Some(&i) = self
            .live()
            .first()
            .filter(|&&i| self.blocks[i as usize].gen_ <= self.st.acked_gen)
        {
            i as usize
        } else {
            let (i, g) = self.pick_victim();
            dropped = Some(g);
            i
        };
        // Take it out of the order; it comes back as the newest.
        if let Some(pos) = self.live().iter().position(|&x| x as usize == idx) {
            self.order.copy_within(pos + 1..self.nlive, pos);
            self.nlive -= 1;
        }
        let gen_ = self.next_gen;
        self.next_gen = self.next_gen.saturating_add(1);
        let start = self.block_start(idx);
        let bs = self.block_size;
        self.mem.zero(start, bs);
        let mut h = [0u8; BLOCK_HDR];
        wr(&mut h, blk::MAGIC, &BLOCK_MAGIC.to_le_bytes());
        wr(&mut h, blk::GEN, &gen_.to_le_bytes());
        wr(&mut h, blk::BOOT, &boot.0);
        wr(&mut h, blk::SYNC_MONO, &sync.mono_us.to_le_bytes());
        wr(&mut h, blk::SYNC_WALL, &sync.wall_us.to_le_bytes());
        wr(&mut h, blk::FLAGS, &u32::from(sync.synced).to_le_bytes());
        let c = crc(&[&h[blk::GEN..]]);
        wr(&mut h, blk::CRC, &c.to_le_bytes());
        self.mem.write(start, &h);
        self.blocks[idx] = BlockInfo {
            live: true,
            gen_,
            boot: *boot,
            sync: *sync,
            used: BLOCK_HDR as u32,
            ..BlockInfo::default()
        };
        self.order[self.nlive] = idx as u16;
        self.nlive += 1;
        self.open = Some(idx as u16);
        // The write position is a hint for people reading a dump (recovery orders blocks by
        // generation); one header write per block costs little.
        self.st.write_block = idx as u32;
        self.write_header();
        dropped
    }

    /// Chooses the block to drop when every block holds unacknowledged records, records its
    /// loss as a gap (header written before the block is touched), and returns it.
    fn pick_victim(&mut self) -> (usize, GapInfo) {
        let live_n = self.nlive;
        // The kept head: blocks up to `boundary` (by generation) are never dropped.
        let extendable = self.st.ngaps > 0
            && !(self.st.ngaps == 1 && self.gap_handed)
            && self.st.gaps[self.st.ngaps - 1].after_gen > self.st.acked_gen;
        let boundary = if extendable {
            self.st.gaps[self.st.ngaps - 1].after_gen
        } else {
            let k = (self.nblocks * usize::from(self.cfg.keep_oldest_pct.min(100))).div_ceil(100);
            let k = k.min(live_n.saturating_sub(2));
            if k == 0 {
                self.st.acked_gen
            } else {
                self.blocks[self.order[k - 1] as usize].gen_
            }
        };
        // Past the blocks in flight, if two or more blocks lie beyond them (the newest is
        // never the victim, as with the kept head).
        let beyond = |g: u64| {
            self.live()
                .iter()
                .filter(|&&i| self.blocks[i as usize].gen_ > g)
                .count()
        };
        let boundary = if self.in_flight_gen > boundary && beyond(self.in_flight_gen) >= 2 {
            self.in_flight_gen
        } else {
            boundary
        };
        let victim_pos = self
            .live()
            .iter()
            .position(|&i| self.blocks[i as usize].gen_ > boundary)
            .unwrap_or(0);
        let idx = self.order[victim_pos] as usize;
        let v = self.blocks[idx];
        let mut gap = GapInfo {
            after_gen: boundary,
            boot: v.boot,
            first: v.first_seq,
            last: v.last_seq,
            count: v.weight,
            mono_us: v.first_mono,
            other: 0,
        };
        if v.records > 0 {
            let n = self.st.ngaps;
            let last = n.checked_sub(1).map(|k| self.st.gaps[k]);
            match last {
                Some(g)
                    if g.after_gen == boundary
                        && g.boot == v.boot
                        && (extendable || n == MAX_GAPS) =>
                {
                    let g = &mut self.st.gaps[n - 1];
                    g.first = g.first.min(v.first_seq);
                    g.last = g.last.max(v.last_seq);
                    g.count = g.count.saturating_add(v.weight);
                    gap = *g;
                }
                Some(_) if n == MAX_GAPS => {
                    let g = &mut self.st.gaps[n - 1];
                    g.other = g.other.saturating_add(v.weight);
                    gap = *g;
                }
                _ => {
                    self.st.gaps[n] = gap;
                    self.st.ngaps += 1;
                }
            }
            self.write_header();
        }
        (idx, gap)
    }

    /// The oldest thing not acknowledged yet, if it is ready to upload (the open block is not).
    pub fn next_unacked(&mut self) -> Option<Item> {
        let first_block = self
            .live()
            .iter()
            .copied()
            .find(|&i| self.blocks[i as usize].gen_ > self.st.acked_gen);
        let gap = (self.st.ngaps > 0).then_some(self.st.gaps[0]);
        if let Some(g) = gap
            && first_block.is_none_or(|i| self.blocks[i as usize].gen_ > g.after_gen)
        {
            self.gap_handed = true;
            return Some(Item::Gap(g));
        }
        let i = first_block?;
        if Some(i) == self.open {
            return None;
        }
        let b = &self.blocks[i as usize];
        Some(Item::Block {
            index: i,
            gen_: b.gen_,
        })
    }

    /// The item to upload right after `item` in the same request, if it is a sealed block that
    /// directly follows it: a batch is a run of consecutive blocks, ending before the open block
    /// or before a gap entry that is due first. Acknowledging the run's items in order is
    /// acknowledging each as the oldest.
    pub fn unacked_after(&self, item: &Item) -> Option<Item> {
        let Item::Block { index, gen_ } = *item else {
            return None;
        };
        let live = self.live();
        let pos = live.iter().position(|&i| i == index)?;
        if self.blocks[index as usize].gen_ != gen_ {
            return None;
        }
        let next = *live.get(pos + 1)?;
        if Some(next) == self.open {
            return None;
        }
        let b = &self.blocks[next as usize];
        if b.gen_ <= self.st.acked_gen || self.gaps().first().is_some_and(|g| g.after_gen < b.gen_)
        {
            return None;
        }
        Some(Item::Block {
            index: next,
            gen_: b.gen_,
        })
    }

    /// Says which items are on their way to the server now (none: an empty list). While a
    /// request is in flight its blocks are dropped only if no other block can be: the upload
    /// may well succeed, and a block the server stores must not be counted lost as well.
    pub fn set_in_flight<'a>(&mut self, items: impl IntoIterator<Item = &'a Item>) {
        self.in_flight_gen = items
            .into_iter()
            .filter_map(|it| match it {
                Item::Block { gen_, .. } => Some(*gen_),
                Item::Gap(_) => None,
            })
            .max()
            .unwrap_or(0);
    }

    /// The server acknowledged `item` (which [`Ring::next_unacked`] returned). Returns false
    /// if it no longer is the oldest unacknowledged item (it was dropped meanwhile).
    pub fn ack(&mut self, item: &Item) -> bool {
        match item {
            Item::Gap(g) => {
                if self.st.ngaps == 0 || self.st.gaps[0] != *g {
                    return false;
                }
                self.st.gaps.copy_within(1..self.st.ngaps, 0);
                self.st.ngaps -= 1;
                self.gap_handed = false;
                self.st.acked = Some((g.boot, g.last));
            }
            Item::Block { index, gen_ } => {
                let b = self.blocks[*index as usize];
                if !b.live || b.gen_ != *gen_ || Some(*index) == self.open {
                    return false;
                }
                if self.st.gaps[..self.st.ngaps]
                    .first()
                    .is_some_and(|g| g.after_gen < *gen_)
                {
                    return false;
                }
                let oldest = self
                    .live()
                    .iter()
                    .find(|&&i| self.blocks[i as usize].gen_ > self.st.acked_gen);
                if oldest != Some(index) {
                    return false;
                }
                self.st.acked_gen = self.st.acked_gen.max(*gen_);
                self.st.acked = Some((b.boot, b.last_seq));
            }
        }
        self.write_header();
        true
    }

    /// Identity and stamp of block `index`: boot, first and last sequence, sync point.
    pub fn block_meta(&self, index: u16) -> Option<BlockMeta> {
        let b = self.blocks.get(index as usize).filter(|b| b.live)?;
        Some(BlockMeta {
            boot: b.boot,
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            records: b.records,
            sync: b.sync,
            first_mono: b.first_mono,
            last_mono: b.last_mono,
            acked: b.gen_ <= self.st.acked_gen,
            gen_: b.gen_,
            open: self.open == Some(index),
        })
    }

    /// The records of block `index`, in order.
    pub fn records(&self, index: u16) -> Records<'_> {
        let b = self.blocks.get(index as usize).copied().unwrap_or_default();
        let start = self.block_start(index as usize);
        let data = if b.live {
            self.mem
                .bytes()
                .get(start..start + b.used as usize)
                .unwrap_or(&[])
        } else {
            &[]
        };
        Records {
            data,
            gen_: b.gen_,
            off: BLOCK_HDR,
            last: None,
        }
    }

    /// Live blocks (index), oldest first; acknowledged ones included.
    pub fn block_order(&self) -> impl Iterator<Item = u16> + '_ {
        self.live().iter().copied()
    }

    /// Gap entries not acknowledged yet, oldest first.
    pub fn gaps(&self) -> &[GapInfo] {
        &self.st.gaps[..self.st.ngaps]
    }

    /// Number of blocks and gaps waiting for acknowledgement (the open block included).
    pub fn unacked(&self) -> usize {
        self.live()
            .iter()
            .filter(|&&i| {
                let b = &self.blocks[i as usize];
                b.gen_ > self.st.acked_gen && b.records > 0
            })
            .count()
            + self.st.ngaps
    }
}

/// Identity and stamp of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMeta {
    /// Boot of its records.
    pub boot: BootId,
    /// First sequence number.
    pub first_seq: u64,
    /// Last sequence number covered (a gap record covers its range).
    pub last_seq: u64,
    /// Number of records.
    pub records: u32,
    /// Sync point to stamp on its chunk.
    pub sync: SyncPoint,
    /// Monotonic time of its first record.
    pub first_mono: u64,
    /// Monotonic time of its last record.
    pub last_mono: u64,
    /// Already acknowledged by the server.
    pub acked: bool,
    /// Generation (the block's place in the stream).
    pub gen_: u64,
    /// Still being appended to (not sealed).
    pub open: bool,
}

/// Iterator over the records of a block.
#[derive(Debug)]
pub struct Records<'a> {
    data: &'a [u8],
    gen_: u64,
    off: usize,
    last: Option<u64>,
}

enum Step<'a> {
    End,
    Torn,
    Close(SyncPoint),
    Rec(Entry<'a>, usize),
}

/// Reads the record at `off`. Every length is checked against `data` before use.
fn step<'a>(data: &'a [u8], gen_: u64, off: usize, last: Option<u64>) -> Step<'a> {
    let Some(h) = off.checked_add(REC_HDR).and_then(|e| data.get(off..e)) else {
        return Step::End;
    };
    let kl = rd_u32(h, 0);
    if kl == 0 {
        return Step::End;
    }
    let kind = (kl >> 24) as u8;
    let len = (kl & 0x00ff_ffff) as usize;
    let Some(body) = off
        .checked_add(REC_HDR + len)
        .and_then(|e| data.get(off + REC_HDR..e))
    else {
        return Step::Torn;
    };
    let want = rd_u32(h, 4);
    if crc(&[&gen_.to_le_bytes(), &h[..4], &h[8..], body]) != want {
        return Step::Torn;
    }
    let seq = rd_u64(h, 8);
    let mono_us = rd_u64(h, 16);
    let next = off + REC_HDR + len;
    let (kind, msg) = match kind {
        KIND_LOG => (Kind::Log, body),
        KIND_GAP if len >= 16 => {
            let last = rd_u64(body, 0);
            let count = rd_u64(body, 8);
            if last < seq || count == 0 {
                return Step::Torn;
            }
            (Kind::Gap { last, count }, &body[16..])
        }
        KIND_CLOSE if len == 9 => {
            return Step::Close(SyncPoint {
                mono_us,
                wall_us: rd_u64(body, 0) as i64,
                synced: body[8] != 0,
            });
        }
        _ => return Step::Torn,
    };
    if last.is_some_and(|l| seq <= l) {
        return Step::Torn;
    }
    Step::Rec(
        Entry {
            kind,
            seq,
            mono_us,
            level: h[24],
            facility: h[25],
            origin: h[26],
            msg,
        },
        next,
    )
}

impl<'a> Iterator for Records<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        match step(self.data, self.gen_, self.off, self.last) {
            Step::Rec(e, next) => {
                self.off = next;
                self.last = Some(e.last_seq());
                Some(e)
            }
            _ => None,
        }
    }
}

fn parse_slot(s: &[u8]) -> Result<(State, usize, u64), HeaderError> {
    if s.len() < SLOT_LEN || s[slot::MAGIC..slot::MAGIC + 8] != MAGIC {
        return Err(HeaderError::NoMagic);
    }
    let v = rd_u16(s, slot::VERSION);
    if v != VERSION {
        return Err(HeaderError::Version(v));
    }
    if crc(&[&s[..slot::CRC]]) != rd_u32(s, slot::CRC) {
        return Err(HeaderError::BadCrc);
    }
    let ngaps = rd_u32(s, slot::NGAPS) as usize;
    if ngaps > MAX_GAPS
        || rd_u16(s, slot::SLOT_LEN) as usize != SLOT_LEN
        || rd_u64(s, slot::ACKED_GEN) > MAX_GEN
        || rd_u64(s, slot::COUNTER) > MAX_GEN
    {
        return Err(HeaderError::BadCrc);
    }
    let mut st = State {
        counter: rd_u64(s, slot::COUNTER),
        boot: rd_boot(s, slot::BOOT),
        acked_gen: rd_u64(s, slot::ACKED_GEN),
        acked: (rd_u32(s, slot::FLAGS) & FLAG_ACKED_VALID != 0)
            .then(|| (rd_boot(s, slot::ACKED_BOOT), rd_u64(s, slot::ACKED_SEQ))),
        write_block: rd_u32(s, slot::WRITE_BLOCK),
        ngaps,
        gaps: [GapInfo::default(); MAX_GAPS],
    };
    for k in 0..ngaps {
        let o = slot::GAPS + k * slot::GAP_LEN;
        if rd_u64(s, o) > MAX_GEN {
            return Err(HeaderError::BadCrc);
        }
        st.gaps[k] = GapInfo {
            after_gen: rd_u64(s, o),
            boot: rd_boot(s, o + 8),
            first: rd_u64(s, o + 24),
            last: rd_u64(s, o + 32),
            count: rd_u64(s, o + 40),
            mono_us: rd_u64(s, o + 48),
            other: rd_u64(s, o + 56),
        };
    }
    Ok((
        st,
        rd_u32(s, slot::BLOCK_SIZE) as usize,
        rd_u64(s, slot::REGION_LEN),
    ))
}

/// Walks one block. `Err(true)`: a block header was there but is corrupt; `Err(false)`: unused.
fn walk_block(block: &[u8]) -> Result<Walk, bool> {
    if block.len() < BLOCK_HDR + CLOSE_LEN {
        return Err(false);
    }
    if rd_u32(block, blk::MAGIC) != BLOCK_MAGIC {
        return Err(block[..BLOCK_HDR].iter().any(|&b| b != 0));
    }
    if crc(&[&block[blk::GEN..BLOCK_HDR]]) != rd_u32(block, blk::CRC) {
        return Err(true);
    }
    let gen_ = rd_u64(block, blk::GEN);
    if gen_ == 0 || gen_ > MAX_GEN {
        return Err(true);
    }
    let mut info = BlockInfo {
        live: true,
        gen_,
        boot: rd_boot(block, blk::BOOT),
        sync: SyncPoint {
            mono_us: rd_u64(block, blk::SYNC_MONO),
            wall_us: rd_u64(block, blk::SYNC_WALL) as i64,
            synced: rd_u32(block, blk::FLAGS) & 1 != 0,
        },
        used: BLOCK_HDR as u32,
        ..BlockInfo::default()
    };
    let mut off = BLOCK_HDR;
    let mut last = None;
    let mut torn = false;
    // Records may not use the room kept for the close record.
    let data_end = block.len() - CLOSE_LEN;
    loop {
        match step(block, gen_, off, last) {
            Step::End => break,
            Step::Torn => {
                torn = true;
                break;
            }
            Step::Close(sync) => {
                if info.records > 0 {
                    info.closed = true;
                    info.sync = sync;
                    info.used = (off + CLOSE_LEN) as u32;
                }
                break;
            }
            Step::Rec(e, next) => {
                if next > data_end {
                    torn = true;
                    break;
                }
                if info.records == 0 {
                    info.first_seq = e.seq;
                    info.first_mono = e.mono_us;
                }
                info.records += 1;
                info.last_seq = e.last_seq();
                info.last_mono = e.mono_us;
                info.weight = info.weight.saturating_add(e.weight());
                last = Some(e.last_seq());
                off = next;
                info.used = off as u32;
            }
        }
    }
    Ok(Walk { info, torn })
}
