//! `blackbox-server grep PATTERN --since T --until T [--device D…] [--count]`.
//!
//! Matches the stored line, as `zcat | grep -E` on the same objects would (`--msg` matches the
//! message text only), for lines with wall time in the range, of the given devices. Objects
//! are read `--parallel` at a time and matches stream out in object order (compacted objects,
//! then raw segments, by key, hour by hour), each line once by identity.
//!
//! Fast path: a chunk wholly inside the time range, whose sequence numbers are dense (its
//! record count fills its sequence range) and none seen before, is searched as one buffer with
//! the regex (lines are only cut out around matches); other chunks go line by line.
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blackbox_protocol::Limits;
use regex::bytes::{Regex, RegexBuilder};

use crate::dedup::Overlap;
use crate::reader::{Decoded, Filter, Progress, Scanner, read_hours};
use crate::store::Store;

/// What to search for and where.
#[derive(Debug, Clone)]
pub struct GrepOptions {
    /// The pattern (Rust regex syntax, close to `grep -E`).
    pub pattern: String,
    /// Case-insensitive.
    pub ignore_case: bool,
    /// Match the message text only, not the whole stored line.
    pub msg_only: bool,
    /// Print only the number of matching lines.
    pub count: bool,
    /// Objects read at once.
    pub parallel: usize,
    /// Print a progress line on stderr every this often once a search runs this long
    /// (`None`: never).
    pub progress_every: Option<Duration>,
}

/// What a search found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrepStats {
    /// Matching lines.
    pub matches: u64,
    /// Lines looked at (after deduplication and the time filter) on the slow path, plus whole
    /// chunks' lines on the fast path.
    pub lines: u64,
    /// Objects read.
    pub objects: u64,
    /// Bytes fetched.
    pub bytes: u64,
}

/// A compiled search.
#[derive(Debug)]
pub struct Matcher {
    re: Regex,
    msg_only: bool,
    /// The pattern may match where per-line matching would not (`\A`, `\z`): always per line.
    line_only: bool,
}

impl Matcher {
    /// Compiles the pattern (multi-line, so `^` and `$` are a line's ends).
    pub fn new(o: &GrepOptions) -> Result<Self, regex::Error> {
        let re = RegexBuilder::new(&o.pattern)
            .case_insensitive(o.ignore_case)
            .multi_line(true)
            .build()?;
        let line_only = o.msg_only || o.pattern.contains("\\A") || o.pattern.contains("\\z");
        Ok(Self {
            re,
            msg_only: o.msg_only,
            line_only,
        })
    }

    /// The lines of a whole chunk payload that match, searched as one buffer; `None` if a match
    /// spans a newline (then per-line matching decides).
    pub fn buffer_matches<'a>(&self, raw: &'a [u8]) -> Option<Vec<&'a [u8]>> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(m) = self.re.find_at(raw, at) {
            if raw[m.start()..m.end()].contains(&b'\n') {
                return None;
            }
            let start = memchr::memrchr(b'\n', &raw[..m.start()]).map_or(0, |i| i + 1);
            let end = memchr::memchr(b'\n', &raw[m.end()..]).map_or(raw.len(), |i| m.end() + i);
            if end > start {
                out.push(&raw[start..end]);
            }
            at = end + 1;
            if at > raw.len() {
                break;
            }
        }
        Some(out)
    }

    /// Does one line (and its message) match?
    pub fn line_matches(&self, text: &[u8], msg: &str) -> bool {
        if self.msg_only {
            self.re.is_match(msg.as_bytes())
        } else {
            self.re.is_match(text)
        }
    }
}

fn fast_path_ok(c: &Decoded, filter: &Filter, scanner: &mut Scanner) -> bool {
    let id = &c.header.id;
    let dense = id
        .last_seq
        .checked_sub(id.first_seq)
        .and_then(|d| d.checked_add(1))
        == Some(u64::from(c.header.record_count));
    let Some((lo, hi)) = c.wall else { return false };
    if !dense || !filter.covers(lo, hi) {
        return false;
    }
    let runs = scanner.seen.runs(id.device.as_str(), &c.boot);
    if runs.overlap(id.first_seq, id.last_seq) != Overlap::None {
        return false;
    }
    runs.insert_run(id.first_seq, id.last_seq);
    true
}

/// Searches `hours` and writes matching lines (or, with `count`, nothing) to `out`.
pub async fn grep(
    store: &Store,
    hours: &[i64],
    filter: &Filter,
    opts: &GrepOptions,
    out: &mut (impl Write + Send),
) -> anyhow::Result<GrepStats> {
    let matcher = Matcher::new(opts)?;
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let matches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = opts.progress_every.map(|every| {
        let (p, m) = (progress.clone(), matches.clone());
        tokio::spawn(async move {
            tokio::time::sleep(every).await;
            loop {
                let total = p.sources.load(Ordering::Relaxed).max(1);
                let done = p.done.load(Ordering::Relaxed);
                eprintln!(
                    "grep: {}% ({done}/{total} objects), {:.1} MB read, {} matches, {:.0} s",
                    done * 100 / total,
                    p.bytes.load(Ordering::Relaxed) as f64 / 1e6,
                    m.load(Ordering::Relaxed),
                    started.elapsed().as_secs_f64()
                );
                tokio::time::sleep(every).await;
            }
        })
    });
    let mut scanner = Scanner::default();
    let mut stats = GrepStats::default();
    let mut io_error: Option<std::io::Error> = None;
    let result = read_hours(
        store,
        hours,
        filter,
        &Limits::DEFAULT,
        opts.parallel,
        &progress,
        |read| {
            if io_error.is_some() {
                return;
            }
            stats.objects += 1;
            stats.bytes += read.fetched;
            let mut hits: Vec<&[u8]> = Vec::new();
            for c in &read.chunks {
                if !matcher.line_only && fast_path_ok(c, filter, &mut scanner) {
                    stats.lines += u64::from(c.header.record_count);
                    match matcher.buffer_matches(&c.raw) {
                        Some(m) => hits.extend(m),
                        None => hits.extend(c.lines().filter(|l| matcher.line_matches(l, ""))),
                    }
                    continue;
                }
                scanner.chunk(c, filter, |l| {
                    stats.lines += 1;
                    if matcher.line_matches(l.text, &l.fields.msg) {
                        hits.push(l.text);
                    }
                });
            }
            stats.matches += hits.len() as u64;
            matches.fetch_add(hits.len() as u64, Ordering::Relaxed);
            if !opts.count {
                let r = hits.iter().try_for_each(|h| {
                    out.write_all(h)?;
                    out.write_all(b"\n")
                });
                if let Err(e) = r.and_then(|()| out.flush()) {
                    io_error = Some(e);
                }
            }
        },
    )
    .await;
    if let Some(t) = ticker {
        t.abort();
    }
    result?;
    match io_error {
        // `grep … | head` closes the pipe: that is the reader being done, not a failure.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Some(e) => return Err(e.into()),
        None => {}
    }
    if opts.count {
        writeln!(out, "{}", stats.matches)?;
    }
    Ok(stats)
}
