//! Throughput of `logos`: an app's output bytes to kmsg records, with real log text (the
//! loghub samples in `shared/corpus/loghub/`, with their CRLF line ends; Loghub,
//! <https://github.com/logpai/loghub>; Jieming Zhu, Shilin He, Pinjia He, Jinyang Liu,
//! Michael R. Lyu: "Loghub: A Large Collection of System Log Datasets for AI-driven Log
//! Analytics", ISSRE 2023).
//!
//! - `format`: line splitting, the `<N>` level, the token buckets (limits high enough to admit
//!   everything) and the record formatting with escaping, into memory: the CPU cost of a line.
//! - `to_dev_null`: the agent's own path (`linux::logos::pump` into an `App` over a
//!   `KmsgWriter`), one `write()` per record to /dev/null: adds the syscall per line. Writing
//!   to the real /dev/kmsg costs what the kernel's printk path costs on top; it is not measured
//!   here, to keep benchmarks from filling the host's kernel log.
//!
//! - `syslog_message`: one syslog datagram's handling in the listener (parse, the tag's token
//!   buckets, formatting, one `write()` to /dev/null), without the socket.
//! - `syslog_socket`: the whole listener: datagrams sent to its Unix socket from another
//!   thread, received, handled and written to /dev/null; timed until the listener has counted
//!   every message (a Unix datagram sender blocks when the receiver falls behind, so none is
//!   lost).
//!
//! Throughput is reported in lines/s and in bytes/s of app output; CPU per line is the inverse
//! of lines/s (one core). `cargo bench -p blackbox-agent --bench logos`.

use std::hint::black_box;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blackbox_agent::bucket::{Admit, AppLimiter, Limits};
use blackbox_agent::linux::config::Config;
use blackbox_agent::linux::logos::{App, KmsgWriter, pump};
use blackbox_agent::linux::syslogd::{self, Sink, SocketSpec};
use blackbox_agent::logline::{
    KMSG_MAX, KmsgHeader, LineSplitter, Piece, parse_level, write_kmsg_lines,
};
use criterion::{Throughput, criterion_main};

#[path = "../../protocol/benches/common/corpus.rs"]
mod corpus;

const UNLIMITED: Limits = Limits {
    burst_bytes: u64::MAX / 4,
    burst_period_us: 1,
    daily_bytes: u64::MAX / 4,
    daily_period_us: 1,
};

fn benches() {
    let input: Vec<u8> = corpus::corpus_files()
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap_or_default())
        .collect();
    let lines = corpus::corpus_lines().len() as u64;
    println!(
        "corpus: {lines} lines, {} bytes ({:.1} bytes a line)",
        input.len(),
        input.len() as f64 / lines as f64
    );
    let mut c = corpus::short_criterion();
    for (unit, tp) in [
        ("lines", Throughput::Elements(lines)),
        ("bytes", Throughput::Bytes(input.len() as u64)),
    ] {
        let mut g = c.benchmark_group(format!("logos_{unit}"));
        g.throughput(tp);
        g.bench_function("format", |b| {
            b.iter(|| {
                let mut splitter: LineSplitter = LineSplitter::new();
                let mut limiter = AppLimiter::new(UNLIMITED, 0);
                let mut buf = [0u8; KMSG_MAX];
                let mut out = 0usize;
                let mut now = 0u64;
                let mut emit = |line: &[u8], piece: Piece| {
                    let (level, text) = parse_level(line);
                    now += 1;
                    if limiter.admit(now, text.len()) == Admit::Drop {
                        return;
                    }
                    let h = KmsgHeader {
                        level: level.unwrap_or(6),
                        facility: 1,
                        name: b"app",
                        pid: Some(4242),
                    };
                    let _ = write_kmsg_lines::<()>(&h, piece, text, &mut buf, |rec| {
                        out += rec.len();
                        Ok(())
                    });
                };
                for chunk in input.chunks(16 << 10) {
                    splitter.feed(chunk, &mut emit);
                }
                splitter.finish(&mut emit);
                black_box(out)
            })
        });
        g.bench_function("to_dev_null", |b| {
            b.iter(|| {
                let Ok(w) = KmsgWriter::open(Path::new("/dev/null")) else {
                    return;
                };
                let app = Mutex::new(App::new("app", Some(4242), UNLIMITED, w));
                black_box(pump(&input[..], &app).is_ok());
            })
        });
        g.finish();
    }

    // Syslog: each corpus line as the datagram glibc's syslog(3) would send.
    let messages: Vec<Vec<u8>> = corpus::corpus_lines()
        .iter()
        .map(|l| {
            let mut m = b"<30>Nov 21 10:00:00 app[4242]: ".to_vec();
            m.extend_from_slice(l.as_ref());
            m
        })
        .collect();
    let n = messages.len() as u64;
    let bytes: u64 = messages.iter().map(|m| m.len() as u64).sum();
    let unlimited = || {
        Config::parse("[logos.default]\nburst_bytes = 4611686018427387903\ndaily_bytes = 4611686018427387903\n")
            .unwrap_or_default()
    };
    let dir = std::env::temp_dir().join(format!("blackbox-bench-syslog-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let spec = SocketSpec::Dgram(dir.join("log"));
    let listener = syslogd::bind(std::slice::from_ref(&spec))
        .and_then(|b| Ok((b, KmsgWriter::open(Path::new("/dev/null"))?)))
        .and_then(|(b, w)| syslogd::start(b, Sink::new(w, unlimited())));
    let sender = UnixDatagram::unbound();
    for (unit, tp) in [
        ("lines", Throughput::Elements(n)),
        ("bytes", Throughput::Bytes(bytes)),
    ] {
        let mut g = c.benchmark_group(format!("syslog_{unit}"));
        g.throughput(tp);
        g.bench_function("message", |b| {
            let Ok(w) = KmsgWriter::open(Path::new("/dev/null")) else {
                return;
            };
            let mut sink = Sink::new(w, unlimited());
            b.iter(|| {
                for m in &messages {
                    black_box(sink.message(m).is_ok());
                }
            })
        });
        if let (Ok(l), Ok(tx)) = (&listener, &sender) {
            g.bench_function("socket", |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let target = l.stats.messages.load(Ordering::Relaxed) + n;
                        for m in &messages {
                            let _ = tx.send_to(m, spec.path());
                        }
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while l.stats.messages.load(Ordering::Relaxed) < target
                            && Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    start.elapsed()
                })
            });
        }
        g.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
    c.final_summary();
}

criterion_main!(benches);
