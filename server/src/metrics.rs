//! Counters of the receiving path, rendered as Prometheus text (`GET /metrics` on the
//! `--metrics-listen` port).
//!
//! A handful of atomics and one fixed-bucket histogram, written by hand: the exposition format
//! for counters, gauges and one histogram is a few lines, and a metrics crate would add more
//! code than it saves. Every series is registered up front, so a scrape shows zeros rather than
//! missing series before the first request.
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Status codes the receiver answers with; anything else is counted as `other`.
const STATUSES: [u16; 12] = [200, 201, 400, 401, 403, 404, 405, 408, 413, 500, 503, 0];

/// Why a request or connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Over `--max-inflight` requests being received and checked.
    Inflight,
    /// Over the byte budget for bodies in memory (`--body-budget`).
    Memory,
    /// Waited too long for a decoder (the CPUs are saturated).
    Decoders,
    /// The receiver is shutting down.
    Draining,
    /// Over `--max-connections`: the connection was closed right after accept.
    Connections,
    /// The chunk's segment was not written within `--commit-timeout` (the store is slow or
    /// hangs); the write goes on, and a retry of a chunk it stores is recognised.
    Store,
}

impl Shed {
    const ALL: [Self; 6] = [
        Self::Inflight,
        Self::Memory,
        Self::Decoders,
        Self::Draining,
        Self::Connections,
        Self::Store,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Inflight => "inflight",
            Self::Memory => "memory",
            Self::Decoders => "decoders",
            Self::Draining => "draining",
            Self::Connections => "connections",
            Self::Store => "store",
        }
    }
}

/// Upper bounds (seconds) of the store latency histogram's buckets.
const PUT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram with fixed buckets; observations in microseconds.
#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative), plus one for +Inf.
    buckets: [AtomicU64; PUT_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = PUT_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(PUT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            match PUT_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum {sum}\n{name}_count {}",
            self.count.load(Relaxed)
        );
    }
}

/// The receiver's counters. Shared (`Arc`) by the accept loop, the handlers and the committer.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; STATUSES.len()],
    shed: [AtomicU64; Shed::ALL.len()],
    body_bytes: AtomicU64,
    chunks_stored: AtomicU64,
    chunks_duplicate: AtomicU64,
    segments_stored: AtomicU64,
    segment_bytes: AtomicU64,
    store_errors: AtomicU64,
    store_put: Histogram,
    awaiting_commit: AtomicU64,
    connections_open: AtomicU64,
    connections_total: AtomicU64,
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn up(g: &AtomicU64) -> GaugeGuard<'_> {
    g.fetch_add(1, Relaxed);
    GaugeGuard(g)
}

impl Metrics {
    /// Counts an answer.
    pub fn request(&self, status: u16) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len() - 1);
        self.requests[i].fetch_add(1, Relaxed);
    }

    /// Counts a request or connection shed.
    pub fn shed(&self, why: Shed) {
        self.shed[why as usize].fetch_add(1, Relaxed);
    }

    /// Counts body bytes received.
    pub fn body_bytes(&self, n: usize) {
        self.body_bytes.fetch_add(n as u64, Relaxed);
    }

    /// Counts chunks written in a segment.
    pub fn stored(&self, chunks: usize) {
        self.chunks_stored.fetch_add(chunks as u64, Relaxed);
    }

    /// Counts a retry recognised as already stored.
    pub fn duplicate(&self) {
        self.chunks_duplicate.fetch_add(1, Relaxed);
    }

    /// Records a segment write (its duration, its size, whether it succeeded).
    pub fn segment_put(&self, took: Duration, bytes: usize, ok: bool) {
        self.store_put.observe(took);
        if ok {
            self.segments_stored.fetch_add(1, Relaxed);
            self.segment_bytes.fetch_add(bytes as u64, Relaxed);
        } else {
            self.store_errors.fetch_add(1, Relaxed);
        }
    }

    /// A chunk handed to the committer and waiting for its segment, until the guard drops.
    pub fn awaiting_commit(&self) -> GaugeGuard<'_> {
        up(&self.awaiting_commit)
    }

    /// An open connection, until the guard drops.
    pub fn connection(&self) -> GaugeGuard<'_> {
        self.connections_total.fetch_add(1, Relaxed);
        up(&self.connections_open)
    }

    /// Requests answered with `status` so far.
    pub fn requests_with(&self, status: u16) -> u64 {
        STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.requests[i].load(Relaxed))
    }

    /// The Prometheus text exposition (format 0.0.4), with `gauges` (name, help, value) that
    /// the caller reads elsewhere (the receiver's semaphores).
    pub fn render(&self, gauges: &[(&str, &str, usize)]) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP blackbox_http_requests_total Requests answered, by status code.\n\
             # TYPE blackbox_http_requests_total counter"
        );
        for (s, n) in STATUSES.iter().zip(&self.requests) {
            let label = if *s == 0 {
                "other".to_owned()
            } else {
                s.to_string()
            };
            let _ = writeln!(
                out,
                "blackbox_http_requests_total{{status=\"{label}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP blackbox_shed_total Requests answered 503 at once, and connections closed at \
             once, by reason.\n# TYPE blackbox_shed_total counter"
        );
        for (w, n) in Shed::ALL.iter().zip(&self.shed) {
            let _ = writeln!(
                out,
                "blackbox_shed_total{{reason=\"{}\"}} {}",
                w.label(),
                n.load(Relaxed)
            );
        }
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "blackbox_received_bytes_total",
                "Request body bytes received.",
                &self.body_bytes,
            ),
            (
                "blackbox_chunks_stored_total",
                "Chunks durably written in a segment.",
                &self.chunks_stored,
            ),
            (
                "blackbox_chunks_duplicate_total",
                "Chunks recognised as already stored (retries); nothing written.",
                &self.chunks_duplicate,
            ),
            (
                "blackbox_segments_stored_total",
                "Segment objects written.",
                &self.segments_stored,
            ),
            (
                "blackbox_segment_bytes_total",
                "Bytes of segment objects written.",
                &self.segment_bytes,
            ),
            (
                "blackbox_store_errors_total",
                "Segment writes that failed (their chunks were not acknowledged).",
                &self.store_errors,
            ),
            (
                "blackbox_connections_total",
                "Connections accepted (and kept: over the limit they are counted as shed).",
                &self.connections_total,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let own = [
            (
                "blackbox_chunks_awaiting_commit",
                "Accepted chunks waiting for their segment to be written.",
                &self.awaiting_commit,
            ),
            (
                "blackbox_connections_open",
                "Open client connections (limited by --max-connections).",
                &self.connections_open,
            ),
        ]
        .map(|(n, h, v)| (n, h, v.load(Relaxed) as usize));
        for (name, help, v) in own.iter().chain(gauges) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.store_put.render(
            &mut out,
            "blackbox_store_put_seconds",
            "Time to write one segment object to the store.",
        );
        if let Some(rss) = resident_bytes() {
            let _ = writeln!(
                out,
                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                 # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
            );
        }
        out
    }
}

/// This process's resident set size, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_its_type_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request(201);
        m.request(201);
        m.request(503);
        m.request(418);
        m.shed(Shed::Memory);
        m.segment_put(Duration::from_millis(3), 100, true);
        m.segment_put(Duration::from_secs(20), 0, false);
        let g = m.connection();
        let text = m.render(&[("blackbox_requests_in_flight", "Requests.", 3)]);
        drop(g);
        for line in [
            "blackbox_http_requests_total{status=\"201\"} 2",
            "blackbox_http_requests_total{status=\"503\"} 1",
            "blackbox_http_requests_total{status=\"other\"} 1",
            "blackbox_shed_total{reason=\"memory\"} 1",
            "blackbox_shed_total{reason=\"inflight\"} 0",
            "blackbox_requests_in_flight 3",
            "blackbox_connections_open 1",
            "blackbox_connections_total 1",
            "blackbox_segments_stored_total 1",
            "blackbox_store_errors_total 1",
            "blackbox_store_put_seconds_bucket{le=\"0.0025\"} 0",
            "blackbox_store_put_seconds_bucket{le=\"0.005\"} 1",
            "blackbox_store_put_seconds_bucket{le=\"10\"} 1",
            "blackbox_store_put_seconds_bucket{le=\"+Inf\"} 2",
            "blackbox_store_put_seconds_count 2",
            "# TYPE blackbox_store_put_seconds histogram",
            "# TYPE blackbox_connections_open gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        assert!(m.render(&[]).contains("\nblackbox_connections_open 0\n"));
        // Every sample line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
