//! The logos core modules together: an app's byte stream cut into lines
//! ([`blackbox_agent::logline`]), rate limited ([`blackbox_agent::bucket`]), formatted as
//! `/dev/kmsg` writes and read back the way the kernel would hand them out; syslog messages
//! ([`blackbox_agent::syslog`]) the same way. Real logs from `shared/corpus` (CRLF line ends)
//! are fed in random chunkings; without the corpus those tests say so and pass.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::OnceLock;

use blackbox_agent::bucket::{Admit, AppLimiter, Limits};
use blackbox_agent::kmsg;
use blackbox_agent::logline::{
    self, DEFAULT_MAX_LINE, KMSG_MAX, KmsgHeader, LineSplitter, Piece, parse_level,
};
use blackbox_agent::syslog;
use proptest::prelude::*;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus");

/// One corpus file, as is and with its line ends varied.
struct Sample {
    name: String,
    bytes: Vec<u8>,
}

/// The corpus files that have `\r` in them, each also with its line ends cycled through
/// `\r\n`, `\n` and a lone `\r`. Empty (with the reason printed) without the corpus.
fn corpus() -> &'static [Sample] {
    static SAMPLES: OnceLock<Vec<Sample>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let dir = Path::new(CORPUS).join("loghub");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            eprintln!("skipping corpus tests: {} is not readable", dir.display());
            return Vec::new();
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        paths.sort();
        let mut samples = Vec::new();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap();
            if !bytes.contains(&b'\r') {
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            samples.push(Sample {
                name: format!("{name} (mixed line ends)"),
                bytes: vary_line_ends(&bytes),
            });
            samples.push(Sample { name, bytes });
        }
        if samples.is_empty() {
            eprintln!(
                "skipping corpus tests: no file with \\r in {}",
                dir.display()
            );
        }
        samples
    })
}

/// Every line end of `data` (as [`reference_lines`] sees them) replaced in turn by `\r\n`,
/// `\n`, `\r`, with a few empty lines in between.
fn vary_line_ends(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let ends: [&[u8]; 5] = [b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r"];
    for (i, line) in reference_lines(data).iter().enumerate() {
        out.extend_from_slice(line);
        out.extend_from_slice(ends[i % ends.len()]);
    }
    out
}

/// The plain reference: `\r\n`, a lone `\r` and `\n` each end a line; a last line without an
/// end counts.
fn reference_lines(data: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < data.len() {
        match data[i] {
            b'\n' => {
                lines.push(&data[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                lines.push(&data[start..i]);
                i += if data.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < data.len() {
        lines.push(&data[start..]);
    }
    lines
}

/// Feeds `data` cut at `cuts` (sizes, cycled) and reassembles the pieces into lines, checking
/// that the pieces of each line come in order and are at most `MAX` bytes.
fn split_in_chunks<const MAX: usize>(data: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut splitter = LineSplitter::<MAX>::new();
    let mut lines = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut emit = |piece: &[u8], kind: Piece| {
        assert!(piece.len() <= MAX);
        assert!(!piece.is_empty() || kind == Piece::Whole);
        assert_eq!(current.is_some(), kind.continued(), "{kind:?} out of order");
        let mut line = current.take().unwrap_or_default();
        line.extend_from_slice(piece);
        if kind.continues() {
            current = Some(line);
        } else {
            lines.push(line);
        }
    };
    let mut rest = data;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, more) = rest.split_at(size.clamp(1, rest.len()));
        splitter.feed(chunk, &mut emit);
        rest = more;
    }
    splitter.finish(&mut emit);
    assert!(current.is_none());
    lines
}

fn assert_same_lines(name: &str, got: &[Vec<u8>], want: &[&[u8]]) {
    assert_eq!(got.len(), want.len(), "{name}: number of lines");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.as_slice(), *w, "{name}: line {}", i + 1);
    }
}

#[test]
fn corpus_has_line_ends_to_test() {
    for s in corpus() {
        let crlf = s.bytes.windows(2).filter(|w| w == b"\r\n").count();
        let cr = s.bytes.iter().filter(|&&b| b == b'\r').count();
        eprintln!("{}: {crlf} CRLF, {} lone CR", s.name, cr - crlf);
        assert!(cr > 0);
    }
}

#[test]
fn crlf_split_exactly_between_feeds() {
    for s in corpus() {
        // Every feed ends right after a '\r': each "\r\n" is split across two feeds.
        let mut sizes = Vec::new();
        let mut last = 0;
        for (i, &b) in s.bytes.iter().enumerate() {
            if b == b'\r' {
                sizes.push(i + 1 - last);
                last = i + 1;
            }
        }
        sizes.push(s.bytes.len() - last);
        let want = reference_lines(&s.bytes);
        assert_same_lines(
            &s.name,
            &split_in_chunks::<DEFAULT_MAX_LINE>(&s.bytes, &sizes),
            &want,
        );
        // And one byte at a time, in pieces of at most 64 bytes.
        assert_same_lines(&s.name, &split_in_chunks::<64>(&s.bytes, &[1]), &want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_gives_the_reference_lines(
        pick in any::<prop::sample::Index>(),
        sizes in prop::collection::vec(
            prop_oneof![1usize..4, 1usize..200, 1usize..20_000], 1..40),
    ) {
        let samples = corpus();
        if samples.is_empty() {
            return Ok(());
        }
        let s = &samples[pick.index(samples.len())];
        let want = reference_lines(&s.bytes);
        assert_same_lines(&s.name, &split_in_chunks::<DEFAULT_MAX_LINE>(&s.bytes, &sizes), &want);
        assert_same_lines(&s.name, &split_in_chunks::<100>(&s.bytes, &sizes), &want);
    }
}

/// What the kernel makes of one write to /dev/kmsg, and what the agent then reads back from
/// it: level, facility and the record's text.
fn through_the_kernel(write: &[u8], seq: u64) -> (u8, u8, Vec<u8>) {
    assert!(write.len() <= KMSG_MAX, "write of {} bytes", write.len());
    let rest = write.strip_prefix(b"<").unwrap();
    let close = rest.iter().position(|&b| b == b'>').unwrap();
    let pri: u32 = std::str::from_utf8(&rest[..close])
        .unwrap()
        .parse()
        .unwrap();
    let text = rest[close + 1..].strip_suffix(b"\n").unwrap();
    assert!(!text.contains(&0), "a NUL would cut the record short");
    let facility = if pri >> 3 == 0 { 1 } else { (pri >> 3) as u8 };
    let read = kmsg::format((pri & 7) as u8, facility, seq, seq * 1000, text);
    let record = kmsg::parse(&read).unwrap();
    (record.level, record.facility, record.msg)
}

/// The text of a record after the `NAME[PID]: ` prefix, its continuation marks taken off.
fn record_text<'a>(msg: &'a [u8], prefix: &str) -> (&'a [u8], bool, bool) {
    let text = msg.strip_prefix(prefix.as_bytes()).unwrap();
    let (text, continued) = match text.strip_prefix(b"[cont] ") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let (text, continues) = match text.strip_suffix(b" [cont]") {
        Some(t) => (t, true),
        None => (text, false),
    };
    (text, continued, continues)
}

/// The logos pipeline over a corpus file with levels, escapes and over-long lines mixed in:
/// every line comes out of the kernel as it went in, or is counted as dropped.
#[test]
fn app_output_through_limiter_and_kmsg() {
    let Some(sample) = corpus().iter().find(|s| s.name.starts_with("Android")) else {
        eprintln!("skipping: no Android_2k.log in the corpus");
        return;
    };
    // The app's stream: the corpus lines, every 7th with a level, every 11th with control
    // characters, invalid UTF-8 and a backslash, every 97th far too long for one record.
    let mut stream = Vec::new();
    let mut want = Vec::new();
    for (i, line) in reference_lines(&sample.bytes).into_iter().enumerate() {
        let mut line = line.to_vec();
        if i % 11 == 0 {
            line.extend_from_slice(b" \x1b[0m \xff\\x41 \0end\t");
        }
        if i % 97 == 0 {
            line = line.repeat(6);
        }
        let level = (i % 7 == 0).then_some((i % 8) as u8);
        if let Some(level) = level {
            stream.extend_from_slice(format!("<{level}>").as_bytes());
        }
        stream.extend_from_slice(&line);
        stream.extend_from_slice(if i % 2 == 0 { b"\r\n" } else { b"\n" });
        want.push((level.unwrap_or(6), line));
    }

    let limits = Limits {
        burst_bytes: 64 * 1024,
        burst_period_us: 1_000_000,
        daily_bytes: 512 * 1024,
        daily_period_us: 60_000_000,
    };
    let mut limiter = AppLimiter::new(limits, 0);
    let header = |level| KmsgHeader {
        level,
        facility: logline::LOG_USER,
        name: b"logcat",
        pid: Some(4242),
    };
    let mut splitter = LineSplitter::<DEFAULT_MAX_LINE>::new();
    let mut buf = [0; KMSG_MAX];
    let mut now_us = 0u64;
    let mut seq = 0u64;
    // What the kernel ended up holding: (level, text of the record after the prefix).
    let mut records: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut reports: Vec<String> = Vec::new();
    let (mut dropped_pieces, mut reported) = (0u64, 0u64);
    let mut line_level = 6;
    let mut on_piece = |piece: &[u8], kind: Piece| {
        now_us += 150;
        let text = if kind.continued() {
            piece
        } else {
            let (level, text) = parse_level(piece);
            line_level = level.unwrap_or(6);
            text
        };
        let h = header(line_level);
        let mut writes = Vec::new();
        logline::write_kmsg_lines(&h, kind, text, &mut buf, |w| {
            writes.push(w.to_vec());
            Ok::<(), ()>(())
        })
        .unwrap();
        let cost: usize = writes.iter().map(Vec::len).sum();
        match limiter.admit(now_us, cost) {
            Admit::Drop => {
                dropped_pieces += 1;
                return;
            }
            Admit::AdmitAfterDrops(report) => {
                reported += report.lines;
                let mut line = String::new();
                report.format(&mut line).unwrap();
                let logos = KmsgHeader {
                    level: 4,
                    facility: logline::LOG_USER,
                    name: b"logos",
                    pid: None,
                };
                let f = logline::format_kmsg_line(&logos, Piece::Whole, line.as_bytes(), &mut buf);
                seq += 1;
                let (_, _, msg) = through_the_kernel(&buf[..f.len], seq);
                assert_eq!(msg, [b"logos: ", line.as_bytes()].concat());
                records.push((4, msg));
                reports.push(line);
            }
            Admit::Admit => {}
        }
        for w in writes {
            seq += 1;
            let (level, facility, msg) = through_the_kernel(&w, seq);
            assert_eq!((level, facility), (line_level, 1));
            records.push((level, msg));
        }
    };
    // Fed in odd chunks, as a pipe would deliver it.
    for chunk in stream.chunks(4093) {
        splitter.feed(chunk, &mut on_piece);
    }
    splitter.finish(&mut on_piece);
    if let Some(report) = limiter.take_pending_report() {
        reported += report.lines;
    }

    let totals = *limiter.totals();
    assert!(totals.dropped_lines > 0, "the limits should have bitten");
    assert!(!reports.is_empty());
    assert_eq!(totals.dropped_lines, dropped_pieces);
    assert_eq!(reported, dropped_pieces);
    assert!(
        reports[0].starts_with("logos: dropped ")
            && reports[0].ends_with(" (burst limit 65536 bytes per 1 s)"),
        "{}",
        reports[0]
    );

    // Join the records back into lines; every complete line must be one the app wrote, in
    // order, at its level (a line some of whose pieces were dropped is left out).
    let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut partial: Option<(u8, Vec<u8>)> = None;
    for (level, msg) in &records {
        if msg.starts_with(b"logos: ") {
            // A drop report: a line whose pieces straddle it lost some of them.
            partial = None;
            continue;
        }
        let (text, continued, continues) = record_text(msg, "logcat[4242]: ");
        let mut line = match (continued, partial.take()) {
            (true, Some(line)) => line,
            (true, None) => continue, // its start was dropped
            (false, _) => (*level, Vec::new()),
        };
        line.1.extend_from_slice(text);
        if continues {
            partial = Some(line);
        } else {
            got.push(line);
        }
    }
    let mut want_iter = want.iter();
    let mut matched = 0;
    for (level, escaped) in &got {
        let line = kmsg::unescape(escaped);
        assert!(
            want_iter.any(|(l, w)| *w == line && l == level),
            "a line the app did not write: {}",
            String::from_utf8_lossy(&line)
        );
        matched += 1;
    }
    assert!(matched > 1000, "only {matched} lines came through");
}

/// Syslog lines of the corpus (as a syslog daemon wrote them to a file: timestamp, host, tag)
/// sent to /dev/log with a PRI, parsed and written to kmsg under their tag.
#[test]
fn syslog_corpus_lines_to_kmsg() {
    let Some(sample) = corpus().iter().find(|s| s.name == "Linux_2k.log") else {
        eprintln!("skipping: no Linux_2k.log in the corpus");
        return;
    };
    let mut tagged = 0;
    let mut buf = [0; KMSG_MAX];
    for (i, line) in reference_lines(&sample.bytes).into_iter().enumerate() {
        let datagram = [format!("<{}>", 32 + i % 8).as_bytes(), line, b"\n"].concat();
        let s = syslog::parse(&datagram);
        assert_eq!(s.format, syslog::Format::Rfc3164);
        assert_eq!((s.facility, s.severity), (4, (i % 8) as u8));
        assert!(line.ends_with(s.msg));
        let name = match s.tag {
            Some(tag) => {
                tagged += 1;
                // "Jun 14 15:16:01 combo TAG[PID]: MSG"
                let after_host = &line[22..];
                assert!(
                    after_host.starts_with(tag),
                    "{}",
                    String::from_utf8_lossy(line)
                );
                if let Some(pid) = s.pid {
                    let bracket = format!("[{pid}]: ");
                    assert!(after_host[tag.len()..].starts_with(bracket.as_bytes()));
                }
                tag
            }
            None => b"syslog",
        };
        let header = KmsgHeader {
            level: syslog::kmsg_level(s.severity),
            facility: s.facility,
            name,
            pid: s.pid,
        };
        let f = logline::format_kmsg_line(&header, Piece::Whole, s.msg, &mut buf);
        assert_eq!(f.consumed, s.msg.len());
        let (level, facility, msg) = through_the_kernel(&buf[..f.len], i as u64);
        assert_eq!((level, facility), (s.severity, s.facility));
        let sep = msg.windows(2).position(|w| w == b": ").unwrap();
        assert_eq!(kmsg::unescape(&msg[sep + 2..]), s.msg);
    }
    // 1,992 of the 2,000 lines have "HOST TAG:"; a few ("syslogd 1.4.1: restart.") do not.
    assert!(tagged >= 1990, "{tagged} tagged");
}
