//! Times as the downstream commands take them, and the hours that key prefixes name.
//!
//! `--since`, `--until`, `--from` and `--hour` accept:
//! - RFC 3339: `2026-11-21T14:03:05Z`, `2026-11-21T14:03:05.123+01:00`, `2026-11-21 14:03:05`
//!   (no offset means UTC); shorter forms `2026-11-21T14:03`, `2026-11-21T14`, `2026-11-21`;
//! - relative to now: `now`, `-90s`, `-15m`, `-1h`, `-2d`, `-1w` (also `15m ago`; a number
//!   with several units such as `-1h30m`);
//! - a Unix time in seconds: `@1795269785`.
//!
//! Times are microseconds since the Unix epoch (`i64`), the unit of the sync points.
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds in an hour.
pub const HOUR_US: i64 = 3_600_000_000;

/// Why a time did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a time: {reason} (use RFC 3339 such as 2026-11-21T14:03:05Z, a date, or -1h / -30m / now)"
)]
pub struct TimeError {
    input: String,
    reason: &'static str,
}

/// The current time in µs since the epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Parses a time given on the command line, relative forms measured from `now`.
pub fn parse_time(s: &str, now: i64) -> Result<i64, TimeError> {
    let err = |reason| TimeError {
        input: s.to_owned(),
        reason,
    };
    let t = s.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(secs) = t.strip_prefix('@') {
        let secs: i64 = secs.parse().map_err(|_| err("bad Unix seconds"))?;
        return secs.checked_mul(1_000_000).ok_or(err("out of range"));
    }
    if let Some(rel) = t.strip_prefix('-') {
        return Ok(now - parse_duration(rel).ok_or(err("bad relative time"))?);
    }
    if let Some(rel) = t.strip_suffix(" ago") {
        return Ok(now - parse_duration(rel.trim()).ok_or(err("bad relative time"))?);
    }
    parse_rfc3339(t).ok_or(err("not RFC 3339"))
}

/// `1h30m`, `90s`, `2d`, `1w`, `500ms` → µs.
pub fn parse_duration(s: &str) -> Option<i64> {
    let mut total: i64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: i64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "us" => 1,
            "ms" => 1_000,
            "s" | "sec" | "secs" => 1_000_000,
            "m" | "min" | "mins" => 60_000_000,
            "h" | "hour" | "hours" => HOUR_US,
            "d" | "day" | "days" => 24 * HOUR_US,
            "w" | "week" | "weeks" => 7 * 24 * HOUR_US,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str, len: usize) -> Option<(i64, &str)> {
    let part = s.get(..len)?;
    if !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((part.parse().ok()?, &s[len..]))
}

/// RFC 3339 and its shorter forms (see the module doc) → µs.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let (y, r) = num(s, 4)?;
    let r = r.strip_prefix('-')?;
    let (mo, r) = num(r, 2)?;
    let r = r.strip_prefix('-')?;
    let (d, mut r) = num(r, 2)?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, mo as u32, d as u32) * 86_400;
    let mut micros = 0i64;
    if let Some(t) = r.strip_prefix(['T', 't', ' ', '/']) {
        let (h, t) = num(t, 2)?;
        if h > 23 {
            return None;
        }
        secs += h * 3600;
        r = t;
        if let Some(t) = r.strip_prefix(':') {
            let (mi, t) = num(t, 2)?;
            if mi > 59 {
                return None;
            }
            secs += mi * 60;
            r = t;
            if let Some(t) = r.strip_prefix(':') {
                let (sec, t) = num(t, 2)?;
                if sec > 60 {
                    return None;
                }
                secs += sec;
                r = t;
                if let Some(t) = r.strip_prefix(['.', ',']) {
                    let n = t.bytes().take_while(u8::is_ascii_digit).count();
                    if n == 0 {
                        return None;
                    }
                    let frac = &t[..n.min(6)];
                    micros = frac.parse::<i64>().ok()? * 10i64.pow(6 - frac.len() as u32);
                    r = &t[n..];
                }
            }
        }
    }
    let offset = match r {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match r.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, t) = num(&r[1..], 2)?;
            let t = t.strip_prefix(':').unwrap_or(t);
            let (om, t) = num(t, 2)?;
            if !t.is_empty() {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    Some((secs - offset) * 1_000_000 + micros)
}

/// The hour (hours since the epoch) that `us` falls in.
pub fn hour_of(us: i64) -> i64 {
    us.div_euclid(HOUR_US)
}

/// `YYYY-MM-DD/HH` of an hour number: the part of a key that names the ingest hour.
pub fn hour_path(hour: i64) -> String {
    let (y, m, d) = blackbox_protocol::time::civil_from_days(hour.div_euclid(24));
    format!("{y:04}-{m:02}-{d:02}/{:02}", hour.rem_euclid(24))
}

/// The hour number a `YYYY-MM-DD/HH` path part names.
pub fn parse_hour_path(s: &str) -> Option<i64> {
    let (date, hh) = s.split_once('/')?;
    let us = parse_rfc3339(&format!("{date}T{hh}"))?;
    (hh.len() == 2).then_some(hour_of(us))
}

/// Hours in a day.
pub const DAY_HOURS: i64 = 24;

/// The day (days since the epoch) an hour falls in.
pub fn day_of_hour(hour: i64) -> i64 {
    hour.div_euclid(DAY_HOURS)
}

/// The hours of a day.
pub fn day_hours(day: i64) -> std::ops::Range<i64> {
    day * DAY_HOURS..(day + 1) * DAY_HOURS
}

/// `YYYY-MM-DD` of a day number: the date part of a key.
pub fn day_path(day: i64) -> String {
    let (y, m, d) = blackbox_protocol::time::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day number a `YYYY-MM-DD` key part names.
pub fn parse_day_path(s: &str) -> Option<i64> {
    Some(day_of_hour(parse_hour_path(&format!("{s}/00"))?))
}

/// `us` as RFC 3339 with microseconds.
pub fn rfc3339(us: i64) -> String {
    let mut s = String::with_capacity(27);
    // Writing into a String cannot fail.
    let _ = blackbox_protocol::time::write_rfc3339(&mut s, us);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_269_785_123_456; // 2026-11-21T14:03:05.123456Z

    #[test]
    fn absolute_forms() {
        for (s, want) in [
            ("2026-11-21T14:03:05.123456Z", NOW),
            ("2026-11-21T14:03:05.123456", NOW),
            ("2026-11-21 14:03:05.123456+00:00", NOW),
            ("2026-11-21T15:03:05.123456+01:00", NOW),
            ("2026-11-21T14:03:05Z", NOW - 123_456),
            ("2026-11-21T14", hour_of(NOW) * HOUR_US),
            ("2026-11-21", 1_795_219_200_000_000),
            ("@1795269785", NOW - 123_456),
        ] {
            assert_eq!(parse_time(s, 0), Ok(want), "{s}");
        }
        for bad in [
            "",
            "2026-13-01",
            "yesterday",
            "2026-11-21T25",
            "-1x",
            "14:00",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_forms() {
        assert_eq!(parse_time("now", NOW), Ok(NOW));
        assert_eq!(parse_time("-1h", NOW), Ok(NOW - HOUR_US));
        assert_eq!(parse_time("-1h30m", NOW), Ok(NOW - HOUR_US * 3 / 2));
        assert_eq!(parse_time("15m ago", NOW), Ok(NOW - 900_000_000));
        assert_eq!(parse_time("-2d", NOW), Ok(NOW - 48 * HOUR_US));
    }

    #[test]
    fn hour_paths_round_trip() {
        let h = hour_of(NOW);
        assert_eq!(hour_path(h), "2026-11-21/14");
        assert_eq!(parse_hour_path("2026-11-21/14"), Some(h));
        assert_eq!(rfc3339(NOW), "2026-11-21T14:03:05.123456Z");
        let day = day_of_hour(h);
        assert_eq!(day_path(day), "2026-11-21");
        assert_eq!(parse_day_path("2026-11-21"), Some(day));
        assert!(day_hours(day).contains(&h));
        assert_eq!(parse_day_path("2026-11-21/14"), None);
    }
}
