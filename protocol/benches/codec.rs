//! Encode/decode throughput of real logs (the loghub samples in `shared/corpus/loghub/`).
//!
//! Every `*.log` file there is cut into lines (on `\n`, `\r\n` and lone `\r`), the lines become
//! [`Record`]s with increasing sequence numbers and fake monotonic times, and the records are
//! packed into chunks of about 1000. Three benchmarks per file, all with the *raw log bytes* as
//! throughput, so MB/s means "MB of log text per second":
//!
//! - `encode/1`, `encode/6`: every chunk of the file encoded at deflate level 1 and 6;
//! - `decode`: every chunk of the file (encoded at level 6) decoded with the default limits.
//!
//! Before the timed runs a table of sizes and compression ratios is printed once.
//!
//! `cargo bench -p blackbox-protocol` takes about a minute on two cores;
//! `cargo bench -p blackbox-protocol -- --test` (or `cargo test --benches`) runs each once.

use std::hint::black_box;
use std::path::Path;

use blackbox_protocol::{
    BootId, Chunk, ChunkBuilder, ChunkHeader, DeviceId, Limits, Origin, Record, SyncPoint,
};
use criterion::{Criterion, Throughput, criterion_main};

#[path = "common/corpus.rs"]
mod corpus;
use corpus::{corpus_files, split_lines};

/// Records per chunk, roughly what the agent cuts at.
const RECORDS_PER_CHUNK: usize = 1000;
/// The deflate levels benchmarked: fastest and the usual balance.
const LEVELS: [u8; 2] = [1, 6];

/// One corpus file, ready to benchmark.
struct Corpus {
    /// File stem, e.g. `Linux_2k`.
    name: String,
    /// Size of the log file in bytes (the throughput unit).
    raw_len: u64,
    /// Number of lines (records).
    lines: usize,
    /// The file's records, cut into chunks.
    chunks: Vec<Chunk>,
}

/// Packs `lines` into chunks of at most [`RECORDS_PER_CHUNK`] records (fewer if a chunk would
/// pass the default limits).
fn chunk_lines(lines: &[&[u8]]) -> Vec<Chunk> {
    let device = DeviceId::new("bench-device-1").expect("valid device id");
    let boot = BootId([0x5a; 16]);
    let sync = SyncPoint {
        mono_us: 1_000_000,
        wall_us: 1_795_269_785_000_000,
        synced: true,
    };
    let limits = Limits::DEFAULT;
    let new_builder = || ChunkBuilder::new(device.clone(), boot, sync, limits);
    let mut chunks = Vec::new();
    let mut builder = new_builder();
    for (i, line) in lines.iter().enumerate() {
        let i = i as u64;
        let mut rec = Record {
            seq: 1 + i,
            // A line every 1.7 ms or so, starting at the sync point.
            mono_us: 1_000_000 + i * 1_700 + (i * 7919) % 613,
            level: 6,
            facility: 1,
            origin: Origin::Kmsg,
            msg: line.to_vec(),
        };
        // The loghub lines are far below the message limit; cut one if it is not.
        rec.msg.truncate(limits.max_msg as usize);
        if builder.len() >= RECORDS_PER_CHUNK || !builder.fits(&rec) {
            let full = std::mem::replace(&mut builder, new_builder());
            chunks.push(full.finish().expect("non-empty chunk"));
        }
        builder
            .push(rec)
            .map_err(|(e, _)| e)
            .expect("record fits an empty chunk");
    }
    if !builder.is_empty() {
        chunks.push(builder.finish().expect("non-empty chunk"));
    }
    chunks
}

fn load(path: &Path) -> Corpus {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("cannot read corpus file {}: {e}", path.display()));
    let lines = split_lines(&bytes);
    let chunks = chunk_lines(&lines);
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into(),
    );
    Corpus {
        name,
        raw_len: bytes.len() as u64,
        lines: lines.len(),
        chunks,
    }
}

fn encode_all(chunks: &[Chunk], level: u8) -> Vec<Vec<u8>> {
    chunks
        .iter()
        .map(|c| {
            c.encode(level, &Limits::DEFAULT)
                .expect("corpus chunk encodes")
        })
        .collect()
}

/// Prints, once, the sizes and ratios of every corpus file; checks the round trip on the way.
fn print_table(corpora: &[Corpus]) {
    eprintln!();
    eprintln!(
        "{:<16} {:>6} {:>7} {:>10} {:>10} {:>10} {:>8} {:>10} {:>8}",
        "corpus", "lines", "chunks", "raw", "json", "level 1", "ratio 1", "level 6", "ratio 6"
    );
    for c in corpora {
        let mut json = 0u64;
        let mut sizes = [0u64; LEVELS.len()];
        for (size, level) in sizes.iter_mut().zip(LEVELS) {
            let encoded = encode_all(&c.chunks, level);
            json = 0;
            for (bytes, chunk) in encoded.iter().zip(&c.chunks) {
                *size += bytes.len() as u64;
                json += u64::from(ChunkHeader::parse(bytes).expect("own header").raw_len);
                let back = Chunk::decode(bytes, &Limits::DEFAULT).expect("own chunk decodes");
                assert!(back == *chunk, "round trip changed a chunk of {}", c.name);
            }
        }
        let ratio = |n: u64| c.raw_len as f64 / n as f64;
        eprintln!(
            "{:<16} {:>6} {:>7} {:>10} {:>10} {:>10} {:>7.2}x {:>10} {:>7.2}x",
            c.name,
            c.lines,
            c.chunks.len(),
            c.raw_len,
            json,
            sizes[0],
            ratio(sizes[0]),
            sizes[1],
            ratio(sizes[1]),
        );
    }
    eprintln!(
        "raw: log file bytes; json: inflated NDJSON payload; ratio: raw / encoded (gzip members)"
    );
    eprintln!();
}

fn codec(c: &mut Criterion) {
    let corpora: Vec<Corpus> = corpus_files().iter().map(|p| load(p)).collect();
    print_table(&corpora);
    for corpus in &corpora {
        let mut group = c.benchmark_group(&corpus.name);
        group.throughput(Throughput::Bytes(corpus.raw_len));
        for level in LEVELS {
            group.bench_function(format!("encode/{level}"), |b| {
                b.iter(|| {
                    for chunk in &corpus.chunks {
                        black_box(
                            black_box(chunk)
                                .encode(level, &Limits::DEFAULT)
                                .expect("corpus chunk encodes"),
                        );
                    }
                });
            });
        }
        let encoded = encode_all(&corpus.chunks, 6);
        group.bench_function("decode", |b| {
            b.iter(|| {
                for bytes in &encoded {
                    black_box(
                        Chunk::decode(black_box(bytes), &Limits::DEFAULT)
                            .expect("corpus chunk decodes"),
                    );
                }
            });
        });
        group.finish();
    }
}

/// The benchmark group, written out rather than with `criterion_group!` so it can carry docs.
/// Short runs: 4 files x 3 benchmarks finish in about a minute on two cores. Command-line
/// options (`--sample-size`, `--measurement-time`, ...) still override these.
fn benches() {
    let mut c = corpus::short_criterion();
    codec(&mut c);
}

criterion_main!(benches);
