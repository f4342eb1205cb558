//! The reducer: counts the grinder's events by name and metric labels, in total and over
//! sliding wall-time windows, and renders them as Prometheus text for `--metrics-listen`.
//!
//! - `blackbox_events_total{name,…}`: counter of events ground by this process (Prometheus'
//!   `rate()`/`increase()` handle the reset at a restart).
//! - `blackbox_events_window{name,…,window="5m"|"1h"}`: gauge of events whose *wall time*
//!   lies in the last window (one-minute buckets), so a dashboard shows "OOM kills in the last
//!   hour" without a query language.
//! - `blackbox_grind_*`: the grinder's own progress (objects, lines, bytes, lag).
//!
//! Only the labels a rule lists in `metric_labels` become Prometheus labels: the device and
//! free-text captures stay in the event objects, where a query engine handles cardinality.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Name and metric labels of a counted series.
pub type SeriesKey = (String, Vec<(String, String)>);

const WINDOWS: [(&str, i64); 2] = [("5m", 5), ("1h", 60)];
const MINUTE_US: i64 = 60_000_000;

#[derive(Debug, Default)]
struct State {
    totals: BTreeMap<SeriesKey, u64>,
    minutes: BTreeMap<SeriesKey, BTreeMap<i64, u64>>,
    objects: u64,
    lines: u64,
    bytes: u64,
    problems: u64,
    /// Grinding passes that failed (a store error) and were tried again.
    errors: u64,
    lag_us: Option<i64>,
}

/// Counters shared between the grinder and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Reducer {
    state: Mutex<State>,
    /// This grinder holds its checkpoint's lock (not a standby).
    active: std::sync::atomic::AtomicBool,
    /// The shard this grinder grinds (`K/N`), when sharded: a label on `blackbox_grind_active`.
    shard: std::sync::OnceLock<String>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_name(k: &str) -> String {
    let mut s: String = k
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s == "name"
        || s == "window"
        || s.starts_with("__")
        || s.starts_with(|c: char| c.is_ascii_digit())
    {
        s.insert_str(0, "label_");
    }
    s
}

impl Reducer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters: still fine to read.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one event of `key` at wall time `wall_us`.
    pub fn event(&self, key: SeriesKey, wall_us: i64) {
        self.events([(&key, wall_us)]);
    }

    /// Counts events (series, wall time) under one lock, copying a series' key only the first
    /// time it is seen: an object's events at once.
    pub fn events<'a>(&self, events: impl IntoIterator<Item = (&'a SeriesKey, i64)>) {
        let mut guard = self.lock();
        let s = &mut *guard;
        for (key, wall_us) in events {
            match s.totals.get_mut(key) {
                Some(n) => *n += 1,
                None => {
                    s.totals.insert(key.clone(), 1);
                }
            }
            let minute = wall_us.div_euclid(MINUTE_US);
            match s.minutes.get_mut(key) {
                Some(m) => *m.entry(minute).or_default() += 1,
                None => {
                    s.minutes.insert(key.clone(), BTreeMap::from([(minute, 1)]));
                }
            }
        }
    }

    /// Adds the event counts of `other` (a source's, counted as it was ground).
    pub fn absorb(&self, other: Reducer) {
        let other = other.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut s = self.lock();
        for (key, n) in other.totals {
            *s.totals.entry(key).or_default() += n;
        }
        for (key, minutes) in other.minutes {
            let mine = s.minutes.entry(key).or_default();
            for (minute, n) in minutes {
                *mine.entry(minute).or_default() += n;
            }
        }
    }

    /// Counts an event ground before this process started into the windows only (the totals
    /// count what this process ground).
    pub fn seed(&self, key: SeriesKey, wall_us: i64) {
        let mut s = self.lock();
        *s.minutes
            .entry(key)
            .or_default()
            .entry(wall_us.div_euclid(MINUTE_US))
            .or_default() += 1;
    }

    /// Counts one object ground: its lines, inflated bytes, damage found, and how long after it
    /// was stored it was ground (µs), when known.
    pub fn object(&self, lines: u64, bytes: u64, problems: u64, lag_us: Option<i64>) {
        let mut s = self.lock();
        s.objects += 1;
        s.lines += lines;
        s.bytes += bytes;
        s.problems += problems;
        if lag_us.is_some() {
            s.lag_us = lag_us;
        }
    }

    /// Counts a grinding pass that failed (a store error) and will be tried again.
    pub fn error(&self) {
        self.lock().errors += 1;
    }

    /// Says whether this grinder grinds (holds its checkpoint's lock) or waits as a standby.
    pub fn set_active(&self, active: bool) {
        self.active
            .store(active, std::sync::atomic::Ordering::Relaxed);
    }

    /// Names the shard this grinder grinds (`K/N`): `blackbox_grind_active` carries it as
    /// the label `shard`, so a dashboard sees which shard has no active grinder. Set once.
    pub fn set_shard(&self, shard: String) {
        let _ = self.shard.set(shard);
    }

    /// Prometheus text exposition at wall time `now_us`; drops minute buckets older than the
    /// longest window.
    pub fn render(&self, now_us: i64) -> String {
        let mut s = self.lock();
        let now_min = now_us.div_euclid(MINUTE_US);
        let longest = WINDOWS.iter().map(|w| w.1).max().unwrap_or(60);
        for m in s.minutes.values_mut() {
            m.retain(|&min, _| min > now_min - longest);
        }
        let mut out = String::new();
        let labels = |(name, ls): &SeriesKey, extra: Option<(&str, &str)>| {
            let mut l = format!("name=\"{}\"", escape(name));
            for (k, v) in ls {
                let _ = write!(l, ",{}=\"{}\"", label_name(k), escape(v));
            }
            if let Some((k, v)) = extra {
                let _ = write!(l, ",{k}=\"{v}\"");
            }
            l
        };
        out.push_str("# HELP blackbox_events_total Events ground since this grinder started.\n");
        out.push_str("# TYPE blackbox_events_total counter\n");
        for (k, n) in &s.totals {
            let _ = writeln!(out, "blackbox_events_total{{{}}} {n}", labels(k, None));
        }
        out.push_str(
            "# HELP blackbox_events_window Events whose wall time lies in the last window.\n",
        );
        out.push_str("# TYPE blackbox_events_window gauge\n");
        for (k, mins) in &s.minutes {
            for (w, len) in WINDOWS {
                let n: u64 = mins.range(now_min - len + 1..).map(|(_, n)| n).sum();
                let _ = writeln!(
                    out,
                    "blackbox_events_window{{{}}} {n}",
                    labels(k, Some(("window", w)))
                );
            }
        }
        for (name, help, v) in [
            ("objects", "Objects (segments) ground.", s.objects),
            ("lines", "Lines ground (after deduplication).", s.lines),
            ("bytes", "Inflated bytes ground.", s.bytes),
            (
                "problems",
                "Damaged chunks or lines found (named in the log).",
                s.problems,
            ),
            (
                "errors",
                "Grinding passes that failed on a store error (named in the log) and were tried again.",
                s.errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP blackbox_grind_{name}_total {help}\n# TYPE blackbox_grind_{name}_total counter\nblackbox_grind_{name}_total {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP blackbox_grind_active 1 while this grinder holds its checkpoint's lock and grinds, 0 while it waits as a standby.\n# TYPE blackbox_grind_active gauge\nblackbox_grind_active{} {}",
            self.shard
                .get()
                .map_or(String::new(), |s| format!("{{shard=\"{}\"}}", escape(s))),
            u8::from(self.active.load(std::sync::atomic::Ordering::Relaxed))
        );
        if let Some(lag) = s.lag_us {
            let _ = writeln!(
                out,
                "# HELP blackbox_grind_lag_seconds Time from an object being stored to its events being written.\n# TYPE blackbox_grind_lag_seconds gauge\nblackbox_grind_lag_seconds {:.3}",
                lag as f64 / 1e6
            );
        }
        out
    }
}

/// Serves `GET /metrics` from `reducer` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    reducer: std::sync::Arc<Reducer>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let r = reducer.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    r.render(crate::timespec::now_us()),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_absorbed_from_another_reducer_are_the_same_as_counted_here() {
        let now = 1_795_269_785_000_000;
        let key = |n: &str, v: &str| (n.to_owned(), vec![("iface".to_owned(), v.to_owned())]);
        let events = [
            (key("link_down", "eth0"), now - 10 * MINUTE_US),
            (key("link_down", "eth0"), now - 90 * MINUTE_US),
            (key("link_down", "wlan0"), now - MINUTE_US),
            (key("oom_kill", ""), now),
        ];
        let direct = Reducer::default();
        direct.events(events.iter().map(|(k, t)| (k, *t)));
        let (main, other) = (Reducer::default(), Reducer::default());
        main.events(events[..1].iter().map(|(k, t)| (k, *t)));
        other.events(events[1..].iter().map(|(k, t)| (k, *t)));
        main.absorb(other);
        assert_eq!(main.render(now), direct.render(now));
    }

    #[test]
    fn counts_by_labels_and_window() {
        let r = Reducer::default();
        let now = 1_795_269_785_000_000;
        let k = |p: &str| {
            (
                "oom_kill".to_owned(),
                vec![("process".to_owned(), p.to_owned())],
            )
        };
        r.event(k("dnsmasq"), now - 10_000_000);
        r.events([
            (&k("dnsmasq"), now - 20 * MINUTE_US),
            (&k("hostapd"), now - 2 * 3_600_000_000),
        ]);
        r.event(("odd".into(), vec![("name".into(), "a\"b".into())]), now);
        let text = r.render(now);
        for want in [
            "blackbox_events_total{name=\"oom_kill\",process=\"dnsmasq\"} 2",
            "blackbox_events_total{name=\"oom_kill\",process=\"hostapd\"} 1",
            "blackbox_events_window{name=\"oom_kill\",process=\"dnsmasq\",window=\"5m\"} 1",
            "blackbox_events_window{name=\"oom_kill\",process=\"dnsmasq\",window=\"1h\"} 2",
            "blackbox_events_window{name=\"oom_kill\",process=\"hostapd\",window=\"1h\"} 0",
            "blackbox_events_total{name=\"odd\",label_name=\"a\\\"b\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }

    #[test]
    fn the_active_gauge_names_its_shard() {
        let now = 1_795_269_785_000_000;
        let plain = Reducer::default();
        plain.set_active(true);
        assert!(plain.render(now).contains("\nblackbox_grind_active 1\n"));
        let sharded = Reducer::default();
        sharded.set_shard("1/4".into());
        sharded.set_shard("2/4".into());
        let text = sharded.render(now);
        assert!(
            text.contains("\nblackbox_grind_active{shard=\"1/4\"} 0\n"),
            "{text}"
        );
    }
}
