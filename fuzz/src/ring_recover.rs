//! `Ring::open` (recovery of the persistent RAM ring) on arbitrary region contents.
//!
//! - opening never panics, whatever the bytes; a header it refuses leaves the region untouched;
//! - every live block (`block_order`) reads back records whose sequence numbers grow strictly
//!   (a record starts after the last sequence number the previous one covers), and its
//!   `block_meta` agrees with them (count, first and last sequence and monotonic time);
//! - acknowledging what `next_unacked` hands out succeeds, and draining terminates;
//! - appending a few records of the opening boot and sealing succeeds, and reopening the region
//!   (`into_inner`, then `open`) gives back exactly those records (when the ring dropped blocks
//!   to make room, an ordered subset holding the last one); every block recovery finds again
//!   has the same metadata and records as before, an acknowledged block is never lost, and no
//!   unacknowledged block appears that the ring did not hold (it would be uploaded again).
//!
//! # Input
//!
//! ```text
//! byte 0   bits 0-1  block size: 256, 512, 1024, 4096 (`RingConfig::block_size`; `open` uses
//!                    the block size the header records)
//!          bits 2-3  mode, how the payload becomes the 16 KiB region:
//!                    0 raw:    the payload is the region (zero-padded or cut)
//!                    1 blocks: a freshly formatted ring, the payload copied over the block area
//!                              (the header stays valid)
//!                    2 whole:  a freshly formatted ring, the payload copied from offset 0
//!                              (header slots too)
//!                    3 xor:    a ring that has lived (acked blocks, a previous boot, overflow
//!                              gaps, an open block), the payload XORed over it from offset 0
//!          bit 4     repair checksums after placing the payload: both header slots' CRC,
//!                    every block header's CRC and the CRC of every record in a block, so
//!                    mutations get past the CRC checks to the fields behind them
//!          bit 5     open as another boot than the one that wrote the ring
//!          bit 6     one of the appended records is a gap record
//! byte 1   `keep_oldest_pct` (the ring clamps it to 100); also shifts which lines are appended
//! byte 2   bits 0-3  items to acknowledge after opening (15: until `next_unacked` is empty)
//!          bits 4-6  records to append, minus one
//! byte 3…  the payload
//! ```
//!
//! Seeds: `cargo run --example make_ring_seeds` (see `examples/make_ring_seeds.rs`).
use std::sync::OnceLock;

use blackbox_agent::ring::{
    self, BLOCK_HDR, BlockMeta, Entry, GapInfo, HEADER_LEN, Item, Kind, MAGIC, MAX_GAPS, REC_HDR,
    Ring, RingConfig, SLOT_LEN,
};
use blackbox_protocol::{BootId, SyncPoint};

/// Region size: big enough for 60 blocks of 256 bytes, 3 of 4096.
pub const REGION: usize = 16 * 1024;
const BLOCK_SIZES: [u32; 4] = [256, 512, 1024, 4096];

const MODE_RAW: u8 = 0;
const MODE_BLOCKS: u8 = 1;
const MODE_WHOLE: u8 = 2;
const MODE_XOR: u8 = 3;
pub const REPAIR: u8 = 1 << 4;
pub const OTHER_BOOT: u8 = 1 << 5;
pub const WITH_GAP: u8 = 1 << 6;

/// The boot that formats (and, for mode 3, last wrote) the ring.
pub const WRITER: BootId = BootId([0xb0; 16]);
/// The boot that opens it when bit 5 is set.
const OTHER: BootId = BootId([0x0b; 16]);
/// A boot before `WRITER` (mode 3's base ring holds records of both).
const EARLIER: BootId = BootId([0xa1; 16]);

/// Layout details the repair needs beyond what `ring` exports (see the module docs there).
const SLOT_CRC: usize = SLOT_LEN - 4;
const BLOCK_MAGIC: [u8; 4] = 0x4b4c_4242u32.to_le_bytes();
const BLOCK_CRC: usize = 4;
const BLOCK_GEN: usize = 8;

/// Synthetic lines in the style of a device's kernel and daemon log; the last one is longer
/// than a 256-byte block holds (it is truncated).
const LINES: [&str; 8] = [
    "usb 1-1: new high-speed USB device number 2 using ehci-platform",
    "eth0: link up, 100Mbps, full-duplex",
    "dropbear[412]: Child connection from 192.0.2.17:50122",
    "EXT4-fs (mmcblk0p2): mounted filesystem with ordered data mode",
    "",
    "watchdog: watchdog0: nowayout prevents watchdog being stopped!",
    "kworker/0:1: page allocation failure: order:0, mode:0x40cc0(GFP_KERNEL|__GFP_COMP)",
    "Out of memory: Killed process 1234 (collector) total-vm:182044kB, anon-rss:96512kB, \
     file-rss:1024kB, shmem-rss:0kB, UID:0 pgtables:196kB oom_score_adj:0; \
     CPU: 0 PID: 88 Comm: kswapd0 Not tainted 6.6.30 #1",
];

fn sync(mono_us: u64) -> SyncPoint {
    SyncPoint {
        mono_us,
        wall_us: 1_795_269_785_000_000 + mono_us as i64,
        synced: !mono_us.is_multiple_of(3),
    }
}

/// A kernel log record.
pub fn log_entry(seq: u64, mono_us: u64, level: u8, facility: u8, msg: &[u8]) -> Entry<'_> {
    Entry {
        kind: Kind::Log,
        seq,
        mono_us,
        level,
        facility,
        origin: ring::origin::KMSG,
        msg,
    }
}

/// A gap record as the agent writes one for a kmsg overrun: `count` records up to `last` lost.
pub fn overrun_gap(seq: u64, last: u64, count: u64, mono_us: u64) -> Entry<'static> {
    Entry {
        kind: Kind::Gap { last, count },
        seq,
        mono_us,
        level: 4,
        facility: 0,
        origin: ring::origin::AGENT,
        msg: b"kmsg buffer overrun",
    }
}

fn cfg(bs: u32, keep_oldest_pct: u8) -> RingConfig {
    RingConfig {
        keep_oldest_pct,
        block_size: Some(bs),
    }
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn formatted(bs: u32) -> Vec<u8> {
    match Ring::format(vec![0u8; REGION], WRITER, cfg(bs, 50)) {
        Ok(r) => r.into_inner(),
        Err((_, e)) => panic!("formatting {REGION} bytes with {bs}-byte blocks: {e}"),
    }
}

/// A ring that has lived: blocks of `EARLIER` (some acknowledged), then `WRITER` filling it past
/// overflow during an outage (gap entries in the header), a gap record, and an unsealed block.
fn lived(bs: u32) -> Vec<u8> {
    let c = cfg(bs, 50);
    let mut r = match Ring::format(vec![0u8; REGION], EARLIER, c) {
        Ok(r) => r,
        Err((_, e)) => panic!("format: {e}"),
    };
    let mut t = 1_000_000u64;
    let mut seq = 100u64;
    let push = |r: &mut Ring<Vec<u8>>, boot: &BootId, k: usize, seq: &mut u64, t: &mut u64| {
        *t += 1_700;
        let e = log_entry(
            *seq,
            *t,
            (k % 8) as u8,
            0,
            LINES[k % LINES.len()].as_bytes(),
        );
        *seq += 1 + u64::from(k.is_multiple_of(3));
        r.append(boot, &e, &sync(*t))
            .expect("append to the base ring")
            .dropped
            .is_some()
    };
    let blocks = r.blocks();
    for k in 0..blocks {
        push(&mut r, &EARLIER, k, &mut seq, &mut t);
        if k % 3 == 2 {
            r.seal(&sync(t));
        }
    }
    r.seal(&sync(t));
    for _ in 0..blocks / 3 {
        if let Some(it) = r.next_unacked() {
            assert!(r.ack(&it), "base ring: ack");
        }
    }
    let (mut r, _) = Ring::open(r.into_inner(), WRITER, c).expect("base ring reopens");
    let mut seq = 1u64;
    let gap = overrun_gap(3, 9, 7, 2_000_000);
    r.append(&WRITER, &gap, &sync(2_000_000))
        .expect("base ring: gap record");
    seq += 9;
    // Fill the ring about three times over without acknowledgement: it drops blocks into gaps.
    let (mut k, mut drops) = (0, 0);
    while drops < 3 || k < 3 * blocks {
        drops += usize::from(push(&mut r, &WRITER, k, &mut seq, &mut t));
        k += 1;
        assert!(k < 10_000, "base ring: no overflow");
    }
    r.into_inner()
}

/// The base images, built once: (formatted, lived) per block size.
fn bases() -> &'static [(Vec<u8>, Vec<u8>); 4] {
    static BASES: OnceLock<[(Vec<u8>, Vec<u8>); 4]> = OnceLock::new();
    BASES.get_or_init(|| {
        BLOCK_SIZES.map(|bs| {
            let (f, l) = (formatted(bs), lived(bs));
            // Keeps the repair honest: on a valid ring it must change nothing, or it is out of
            // step with the layout and the fuzzer would only ever see repaired garbage.
            for img in [&f, &l] {
                let mut fixed = img.clone();
                repair(&mut fixed, bs as usize);
                assert!(
                    fixed == *img,
                    "repair changed a valid ring: update it to the ring layout"
                );
            }
            (f, l)
        })
    })
}

/// Makes every checksum right again: both header slots (when they carry the magic), every
/// block header (when it carries the block magic) and every record of such a block, walking
/// the records by their length words as recovery does.
fn repair(mem: &mut [u8], bs: usize) {
    for s in [0, SLOT_LEN] {
        if mem[s..s + MAGIC.len()] == MAGIC {
            let c = crc(&[&mem[s..s + SLOT_CRC]]);
            mem[s + SLOT_CRC..s + SLOT_LEN].copy_from_slice(&c.to_le_bytes());
        }
    }
    let mut start = HEADER_LEN;
    while start + bs <= mem.len() {
        let b = &mut mem[start..start + bs];
        start += bs;
        if b[..4] != BLOCK_MAGIC {
            continue;
        }
        let c = crc(&[&b[BLOCK_GEN..BLOCK_HDR]]);
        b[BLOCK_CRC..BLOCK_CRC + 4].copy_from_slice(&c.to_le_bytes());
        let gen_ = b[BLOCK_GEN..BLOCK_GEN + 8].to_vec();
        let mut off = BLOCK_HDR;
        while off + REC_HDR <= bs {
            let kl = u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"));
            let end = off + REC_HDR + (kl & 0x00ff_ffff) as usize;
            if kl == 0 || end > bs {
                break;
            }
            let (h, body) = b[off..end].split_at(REC_HDR);
            let c = crc(&[&gen_, &h[..4], &h[8..], body]);
            b[off + 4..off + 8].copy_from_slice(&c.to_le_bytes());
            off = end;
        }
    }
}

/// A record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    kind: Kind,
    seq: u64,
    mono_us: u64,
    level: u8,
    facility: u8,
    origin: u8,
    msg: Vec<u8>,
}

impl Rec {
    fn of(e: &Entry<'_>) -> Self {
        Self {
            kind: e.kind,
            seq: e.seq,
            mono_us: e.mono_us,
            level: e.level,
            facility: e.facility,
            origin: e.origin,
            msg: e.msg.to_vec(),
        }
    }
    fn last_seq(&self) -> u64 {
        match self.kind {
            Kind::Log => self.seq,
            Kind::Gap { last, .. } => last,
        }
    }
}

/// What a ring shows: its live blocks, oldest first, with their metadata and records.
type View = Vec<(u16, BlockMeta, Vec<Rec>)>;

/// Reads every block and checks what must hold of any opened ring.
fn view(r: &Ring<Vec<u8>>) -> View {
    let n = r.blocks();
    let mut seen = vec![false; n];
    let mut out = Vec::new();
    for i in r.block_order() {
        assert!(usize::from(i) < n, "block_order: index {i} of {n} blocks");
        assert!(!seen[usize::from(i)], "block_order: block {i} twice");
        seen[usize::from(i)] = true;
        let meta = r
            .block_meta(i)
            .unwrap_or_else(|| panic!("block {i} is in block_order but has no meta"));
        let recs: Vec<Rec> = r.records(i).map(|e| Rec::of(&e)).collect();
        for w in recs.windows(2) {
            assert!(
                w[1].seq > w[0].last_seq(),
                "block {i}: sequence {} after {} (records {:?})",
                w[1].seq,
                w[0].last_seq(),
                recs.iter()
                    .map(|r| (r.seq, r.last_seq()))
                    .collect::<Vec<_>>()
            );
        }
        for rec in &recs {
            if let Kind::Gap { last, count } = rec.kind {
                assert!(
                    last >= rec.seq && count > 0,
                    "block {i}: bad gap record {rec:?}"
                );
            }
        }
        assert_eq!(
            recs.len(),
            meta.records as usize,
            "block {i}: meta.records vs records()"
        );
        if let (Some(first), Some(last)) = (recs.first(), recs.last()) {
            assert_eq!(
                (first.seq, last.last_seq(), first.mono_us, last.mono_us),
                (
                    meta.first_seq,
                    meta.last_seq,
                    meta.first_mono,
                    meta.last_mono
                ),
                "block {i}: meta vs records"
            );
        }
        out.push((i, meta, recs));
    }
    for i in 0..n as u16 {
        if !seen[usize::from(i)] {
            assert!(r.block_meta(i).is_none(), "block {i}: meta but not live");
            assert_eq!(r.records(i).count(), 0, "block {i}: records but not live");
        }
    }
    assert!(r.block_meta(u16::MAX).is_none());
    assert_eq!(r.records(u16::MAX).count(), 0);
    out
}

/// The checks on one input (what the fuzz target runs); panics on a failure.
pub fn run(data: &[u8]) {
    let ctrl = data.first().copied().unwrap_or(0);
    let pct = data.get(1).copied().unwrap_or(50);
    let ops = data.get(2).copied().unwrap_or(0);
    let payload = data.get(3..).unwrap_or(&[]);

    let bs_i = usize::from(ctrl & 3);
    let bs = BLOCK_SIZES[bs_i];
    let (fresh, lived) = &bases()[bs_i];
    let mut mem = match (ctrl >> 2) & 3 {
        MODE_RAW => {
            let mut m = payload[..payload.len().min(REGION)].to_vec();
            m.resize(REGION, 0);
            m
        }
        MODE_BLOCKS => {
            let mut m = fresh.clone();
            let n = payload.len().min(REGION - HEADER_LEN);
            m[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&payload[..n]);
            m
        }
        MODE_WHOLE => {
            let mut m = fresh.clone();
            let n = payload.len().min(REGION);
            m[..n].copy_from_slice(&payload[..n]);
            m
        }
        MODE_XOR => {
            let mut m = lived.clone();
            for (d, s) in m.iter_mut().zip(payload) {
                *d ^= s;
            }
            m
        }
        _ => unreachable!(),
    };
    if ctrl & REPAIR != 0 {
        repair(&mut mem, bs as usize);
    }
    let boot = if ctrl & OTHER_BOOT != 0 {
        OTHER
    } else {
        WRITER
    };
    let c = cfg(bs, pct);

    let original = mem.clone();
    let mut r = match Ring::open(mem, boot, c) {
        Ok((r, _recovery)) => r,
        Err((mem, _e)) => {
            assert!(mem == original, "a refused open changed the region");
            let (r, _, e) =
                Ring::open_or_format(mem, boot, c).expect("a 16 KiB region always formats");
            assert!(e.is_some(), "open_or_format opened what open refused");
            r
        }
    };
    assert_eq!(r.region().len(), REGION);
    view(&r);
    let _ = (
        r.unacked(),
        r.resume_after(&boot),
        r.pending_bytes(),
        r.has_pending(),
    );

    // Acknowledge what the uploader would be handed.
    let acks = usize::from(ops & 15);
    let limit = if acks == 15 {
        r.blocks() + MAX_GAPS + 1
    } else {
        acks
    };
    let mut drained = false;
    for _ in 0..limit {
        let Some(item) = r.next_unacked() else {
            drained = true;
            break;
        };
        assert!(r.ack(&item), "ack of what next_unacked returned: {item:?}");
        if let Item::Block { .. } = item {
            assert!(!r.ack(&item), "a block acknowledged twice: {item:?}");
        }
    }
    if acks == 15 {
        assert!(
            drained || r.next_unacked().is_none(),
            "next_unacked still hands out items after {limit} acknowledgements"
        );
    }

    // Append a few records of the opening boot, after everything the ring holds of it.
    let Some(start) = r.resume_after(&boot).map_or(Some(1), |s| s.checked_add(1)) else {
        return;
    };
    if start.checked_add(64).is_none() {
        return;
    }
    let cap = ring::max_msg(r.block_size());
    let n = 1 + usize::from((ops >> 4) & 7);
    let mut seq = start;
    let mut t = 5_000_000u64;
    let mut expected = Vec::new();
    let mut dropped: Vec<GapInfo> = Vec::new();
    for k in 0..n {
        t += 1_000;
        let line = LINES[(k + usize::from(pct)) % LINES.len()].as_bytes();
        let e = if ctrl & WITH_GAP != 0 && k == 1 {
            overrun_gap(seq, seq + 4, 3, t)
        } else {
            log_entry(seq, t, (k % 8) as u8, 3, line)
        };
        let a = r
            .append(&boot, &e, &sync(t))
            .unwrap_or_else(|err| panic!("append of seq {seq} after {start}: {err}"));
        let room = if matches!(e.kind, Kind::Gap { .. }) {
            cap - 16
        } else {
            cap
        };
        assert_eq!(a.truncated, e.msg.len().saturating_sub(room), "truncated");
        dropped.extend(a.dropped);
        let mut stored = Rec::of(&e);
        stored.msg.truncate(room);
        seq = stored.last_seq() + 1;
        expected.push(stored);
    }
    assert!(r.seal(&sync(t)), "seal after appending");
    assert!(!r.has_pending(), "pending after seal");
    let before = view(&r);

    // Reopen: the ring must come back as it was, with our records.
    let (r2, _) = match Ring::open(r.into_inner(), boot, c) {
        Ok(x) => x,
        Err((_, e)) => panic!("reopening a ring we just wrote: {e}"),
    };
    let after = view(&r2);
    let mut ours = Vec::new();
    for (i, meta, recs) in &after {
        if let Some((_, m0, recs0)) = before.iter().find(|(j, _, _)| j == i) {
            assert_eq!(meta, m0, "block {i}: meta changed by reopening");
            assert_eq!(recs, recs0, "block {i}: records changed by reopening");
        } else {
            // Recovery found a block the ring did not hold: only an acknowledged one (never
            // uploaded again) is harmless.
            assert!(
                meta.acked,
                "unacknowledged block {i} live after reopening but not before: {meta:?}"
            );
            continue;
        }
        if meta.boot == boot {
            ours.extend(recs.iter().filter(|e| e.seq >= start).cloned());
        }
    }
    for (i, m0, _) in &before {
        if !after.iter().any(|(j, _, _)| j == i) {
            assert!(
                !m0.acked,
                "acknowledged block {i} lost by reopening: {m0:?}"
            );
        }
    }
    if dropped.is_empty() {
        assert_eq!(
            ours, expected,
            "reopening did not give back the records appended"
        );
    } else {
        // The ring was full of unacknowledged records and dropped blocks to make room, maybe
        // blocks of ours (into a gap entry, or its `other` count when the gap table is full):
        // what is left is in order, and the block just sealed is there.
        let mut want = expected.iter();
        for e in &ours {
            assert!(
                want.any(|x| x == e),
                "reopening gave back a record not appended, or out of order: {e:?}"
            );
        }
        assert_eq!(
            ours.last(),
            expected.last(),
            "the last record appended is lost"
        );
    }
}
