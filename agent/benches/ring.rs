//! Throughput of the persistent RAM ring (`blackbox_agent::ring`) over a `Vec<u8>` region of
//! 1 MiB and 16 MiB (default block size: 4 KiB and 64 KiB), with real log lines as messages:
//! every line of the loghub samples in `shared/corpus/loghub/` (Loghub,
//! <https://github.com/logpai/loghub>; Jieming Zhu, Shilin He, Pinjia He, Jinyang Liu,
//! Michael R. Lyu: "Loghub: A Large Collection of System Log Datasets for AI-driven Log
//! Analytics", ISSRE 2023), about 8,000 lines and 0.9 MB.
//!
//! - `append/<size>`: one iteration appends every corpus line once, as the agent does, on a
//!   ring that has wrapped already; whenever an append starts a new block (the previous one is
//!   sealed) the uploader's side acknowledges what `next_unacked` hands out, so the ring keeps
//!   reclaiming the oldest acknowledged block (zeroing it, rewriting the header).
//! - `append_outage/<size>`: the same with no acknowledgement at all: every new block drops the
//!   oldest unacknowledged one after the kept head and records it in a gap entry.
//! - `recover/<size>`: `Ring::open` of a full ring (every block holding unacknowledged records):
//!   both header slots, every block header and every record CRC checked.
//!
//! Each benchmark runs twice: in `ring_records` with the number of records as throughput
//! (records/s), in `ring_bytes` with bytes (for appends the message bytes, i.e. MB of log text
//! per second, record headers not counted; for recovery the region size, i.e. MB of ring per
//! second). A table of the geometry is printed once before the timed runs.
//!
//! `cargo bench -p blackbox-agent --bench ring` takes about a minute;
//! `cargo bench -p blackbox-agent --bench ring -- --test` runs each benchmark once.

use std::hint::black_box;

use blackbox_agent::ring::{self, Entry, Kind, Ring, RingConfig};
use blackbox_protocol::{BootId, SyncPoint};
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_main, measurement::WallTime};

#[path = "../../protocol/benches/common/corpus.rs"]
mod corpus;
use corpus::corpus_lines;

/// Ring sizes benchmarked.
const SIZES: [(&str, usize); 2] = [("1MiB", 1 << 20), ("16MiB", 16 << 20)];

const BOOT: BootId = BootId([0x5a; 16]);
const SYNC: SyncPoint = SyncPoint {
    mono_us: 1_000_000,
    wall_us: 1_795_269_785_000_000,
    synced: true,
};

fn cfg() -> RingConfig {
    RingConfig::default()
}

fn formatted(len: usize) -> Ring<Vec<u8>> {
    match Ring::format(vec![0u8; len], BOOT, cfg()) {
        Ok(r) => r,
        Err((_, e)) => panic!("formatting a {len}-byte ring: {e}"),
    }
}

/// Appends `line` as record `seq` (a kernel line, a fake monotonic time).
fn append(r: &mut Ring<Vec<u8>>, seq: u64, line: &[u8]) -> ring::Appended {
    let e = Entry {
        kind: Kind::Log,
        seq,
        mono_us: 1_000_000 + seq * 1_700,
        level: 6,
        facility: 0,
        origin: ring::origin::KMSG,
        msg: line,
    };
    r.append(&BOOT, &e, &SYNC).expect("sequence numbers grow")
}

/// A writer and an uploader sharing a ring: appends keep going, acknowledgements optional.
struct Writer {
    ring: Ring<Vec<u8>>,
    seq: u64,
    ack: bool,
}

impl Writer {
    fn new(len: usize, ack: bool) -> Self {
        Self {
            ring: formatted(len),
            seq: 0,
            ack,
        }
    }

    /// Appends every line once; with `ack`, acknowledges what is uploadable whenever a block
    /// was sealed by the ring moving on to a new one.
    fn run(&mut self, lines: &[Vec<u8>]) {
        for line in lines {
            self.seq += 1;
            let pending = self.ring.pending_bytes();
            black_box(append(&mut self.ring, self.seq, black_box(line)));
            if self.ack && self.ring.pending_bytes() < pending {
                while let Some(item) = self.ring.next_unacked() {
                    self.ring.ack(&item);
                }
            }
        }
    }

    /// Appends until the ring has gone round at least twice (every block reused).
    fn wrap(&mut self, lines: &[Vec<u8>]) {
        let len = self.ring.region().len() as u64;
        let per_run: u64 = lines.iter().map(|l| (l.len() + ring::REC_HDR) as u64).sum();
        for _ in 0..(2 * len).div_ceil(per_run) + 1 {
            self.run(lines);
        }
    }
}

/// A ring of `len` bytes filled with unacknowledged records until the next append would drop
/// a block; its last block sealed.
fn full_ring(len: usize, lines: &[Vec<u8>]) -> Vec<u8> {
    let mut r = formatted(len);
    let mut seq = 0u64;
    'fill: loop {
        for line in lines {
            // Stop before the first append that would start a block while all are in use.
            let live = r.block_order().count();
            let pending = r.pending_bytes();
            if live == r.blocks()
                && pending + ring::REC_HDR + line.len() + ring::BLOCK_HDR + 64 > r.block_size()
            {
                break 'fill;
            }
            seq += 1;
            let a = append(&mut r, seq, line);
            assert!(a.dropped.is_none(), "filling dropped a block");
        }
    }
    r.seal(&SYNC);
    r.into_inner()
}

/// Records and record bytes a ring holds (all blocks, acknowledged or not).
fn held(r: &Ring<Vec<u8>>) -> (u64, u64) {
    let mut n = 0u64;
    let mut bytes = 0u64;
    for i in r.block_order() {
        for e in r.records(i) {
            n += 1;
            bytes += e.msg.len() as u64;
        }
    }
    (n, bytes)
}

fn print_table(lines: &[Vec<u8>], full: &[(&str, Vec<u8>)]) {
    let text: usize = lines.iter().map(Vec::len).sum();
    eprintln!();
    eprintln!(
        "corpus: {} lines, {text} bytes of text ({:.1} bytes a line)",
        lines.len(),
        text as f64 / lines.len() as f64
    );
    eprintln!(
        "{:<6} {:>10} {:>7} {:>7} {:>10} {:>12} {:>6}",
        "ring", "region", "block", "blocks", "records", "msg bytes", "fill"
    );
    for (name, mem) in full {
        let (r, _) = Ring::open(mem.clone(), BOOT, cfg()).expect("full ring opens");
        let (n, bytes) = held(&r);
        eprintln!(
            "{:<6} {:>10} {:>7} {:>7} {:>10} {:>12} {:>5.1}%",
            name,
            mem.len(),
            r.block_size(),
            r.blocks(),
            n,
            bytes,
            100.0 * bytes as f64 / mem.len() as f64
        );
    }
    eprintln!("fill: message bytes / region bytes (the rest: record and block headers, slack)");
    eprintln!();
}

/// Registers the benchmarks of one throughput kind into `group`.
fn register(
    group: &mut BenchmarkGroup<'_, WallTime>,
    lines: &[Vec<u8>],
    full: &[(&str, Vec<u8>)],
    bytes: bool,
) {
    let text: u64 = lines.iter().map(|l| l.len() as u64).sum();
    let append_tp = if bytes {
        Throughput::Bytes(text)
    } else {
        Throughput::Elements(lines.len() as u64)
    };
    for (name, len) in SIZES {
        for (label, ack) in [("append", true), ("append_outage", false)] {
            let mut w = Writer::new(len, ack);
            w.wrap(lines);
            group.throughput(append_tp.clone());
            group.bench_function(format!("{label}/{name}"), |b| b.iter(|| w.run(lines)));
        }
    }
    for (name, mem) in full {
        let (r, _) = Ring::open(mem.clone(), BOOT, cfg()).expect("full ring opens");
        let (n, _) = held(&r);
        group.throughput(if bytes {
            Throughput::Bytes(mem.len() as u64)
        } else {
            Throughput::Elements(n)
        });
        let mut mem = Some(r.into_inner());
        group.bench_function(format!("recover/{name}"), |b| {
            b.iter(|| {
                let m = mem.take().expect("region is back");
                let (r, rec) = Ring::open(m, BOOT, cfg()).expect("full ring opens");
                black_box(rec);
                mem = Some(r.into_inner());
            });
        });
    }
}

fn ring_benches(c: &mut Criterion) {
    let lines = corpus_lines();
    let full: Vec<(&str, Vec<u8>)> = SIZES
        .iter()
        .map(|&(name, len)| (name, full_ring(len, &lines)))
        .collect();
    print_table(&lines, &full);
    for (group, bytes) in [("ring_records", false), ("ring_bytes", true)] {
        let mut g = c.benchmark_group(group);
        register(&mut g, &lines, &full, bytes);
        g.finish();
    }
}

/// The benchmark group, written out rather than with `criterion_group!` so it can carry docs.
/// Short runs; command-line options (`--warm-up-time`, `--measurement-time`, ...) override
/// these.
fn benches() {
    let mut c = corpus::short_criterion();
    ring_benches(&mut c);
}

criterion_main!(benches);
