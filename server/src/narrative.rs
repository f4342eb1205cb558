//! `blackbox-server narrative`: the exact lines of some devices in a wall-time range, in order.
//!
//! Within a device, lines are in sequence order (boots ordered by their first line's wall
//! time); across devices they are merged by wall time (each line's from its chunk's sync
//! point), ties broken by device name. A device's sequence order wins over its own wall times,
//! so a clock stepped backwards by NTP cannot reorder what the device logged. Lines are found
//! through the index objects (device and wall range → object, offset, length) and fetched with
//! ranged GETs ([`crate::reader`]); duplicates are dropped by identity.
//!
//! The lines of the range are held in memory to be sorted: meant for an incident's devices and
//! hours, not a fleet's month (use `grep` for that).
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::io::Write;

use blackbox_protocol::Limits;

use crate::reader::{Filter, Lookback, Progress, Scanner, read_hours};
use crate::store::Store;
use crate::timespec::rfc3339;

/// How to print a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The stored JSON line, byte for byte.
    Json,
    /// `TIME DEVICE LEVEL MESSAGE`.
    Text,
}

/// One line held for ordering.
#[derive(Debug, Clone)]
pub struct Held {
    /// Boot id.
    pub boot: String,
    /// Sequence number.
    pub seq: u64,
    /// Wall time, µs.
    pub wall_us: i64,
    /// The stored line.
    pub text: Vec<u8>,
    /// Severity.
    pub level: u8,
    /// Message text.
    pub msg: String,
}

/// Collects the lines of `devices` with wall time in `[since, until)`.
pub async fn collect(
    store: &Store,
    devices: &BTreeSet<String>,
    since_us: i64,
    until_us: i64,
    lookback: &Lookback,
    now_us: i64,
    parallel: usize,
) -> anyhow::Result<BTreeMap<String, Vec<Held>>> {
    let filter = Filter {
        devices: Some(devices.clone()),
        since_us,
        until_us,
        shard: None,
    };
    let hours = lookback.hours(since_us, until_us, now_us);
    let mut scanner = Scanner::default();
    let mut by_device: BTreeMap<String, Vec<Held>> = BTreeMap::new();
    read_hours(
        store,
        &hours,
        &filter,
        &Limits::DEFAULT,
        parallel,
        &Progress::default(),
        |read| {
            for c in &read.chunks {
                scanner.chunk(c, &filter, |l| {
                    by_device
                        .entry(c.header.id.device.to_string())
                        .or_default()
                        .push(Held {
                            boot: c.boot.clone(),
                            seq: l.fields.seq,
                            wall_us: l.wall_us,
                            text: l.text.to_vec(),
                            level: l.fields.level,
                            msg: l.fields.msg.into_owned(),
                        })
                });
            }
        },
    )
    .await?;
    Ok(by_device)
}

/// Orders the collected lines: per device by boot (first wall time) and sequence, then merged
/// across devices by wall time.
pub fn order(by_device: BTreeMap<String, Vec<Held>>) -> Vec<(String, Held)> {
    let mut streams: Vec<(String, std::vec::IntoIter<Held>)> = Vec::new();
    for (dev, mut lines) in by_device {
        let mut boot_start: BTreeMap<String, i64> = BTreeMap::new();
        for l in &lines {
            let e = boot_start.entry(l.boot.clone()).or_insert(l.wall_us);
            *e = (*e).min(l.wall_us);
        }
        lines.sort_by(|a, b| {
            (boot_start.get(&a.boot), &a.boot, a.seq).cmp(&(
                boot_start.get(&b.boot),
                &b.boot,
                b.seq,
            ))
        });
        streams.push((dev, lines.into_iter()));
    }
    let mut heap = BinaryHeap::new();
    let mut heads: Vec<Option<Held>> = streams.iter_mut().map(|(_, it)| it.next()).collect();
    for (i, h) in heads.iter().enumerate() {
        if let Some(h) = h {
            heap.push(Reverse((h.wall_us, i)));
        }
    }
    let mut out = Vec::new();
    while let Some(Reverse((_, i))) = heap.pop() {
        let Some(line) = heads[i].take() else {
            continue;
        };
        heads[i] = streams[i].1.next();
        if let Some(n) = &heads[i] {
            heap.push(Reverse((n.wall_us, i)));
        }
        out.push((streams[i].0.clone(), line));
    }
    out
}

/// Writes the ordered lines.
pub fn print(
    lines: &[(String, Held)],
    format: Format,
    out: &mut impl Write,
) -> std::io::Result<()> {
    for (dev, l) in lines {
        match format {
            Format::Json => {
                out.write_all(&l.text)?;
                out.write_all(b"\n")?;
            }
            Format::Text => writeln!(out, "{} {dev} <{}> {}", rfc3339(l.wall_us), l.level, l.msg)?,
        }
    }
    out.flush()
}
