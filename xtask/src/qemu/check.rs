//! What the guest said on its serial console, what the server stored, and the comparison.
//!
//! The guest (`qemu/init.sh`) copies every kmsg record of the first boot to the console just
//! before the panic, so the host knows exactly what the kernel and the apps wrote: each record
//! with the kernel's sequence number. The agent stores kmsg records under that same number, so
//! "every line stored exactly once, in order, under the first boot's id" means: for each dumped
//! record, exactly one stored record of boot 1 with origin `kmsg` has its sequence number and its
//! text; in the order the server stored them (segment keys sort by ingest time, lines within a
//! segment by arrival) boot 1's sequence numbers only grow; no record of boot 1 carries a
//! sequence number inside the dump's range that the dump does not have; no app line of boot 1
//! is stored under another boot; and no pstore line repeats a line the ring already delivered.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use super::json::{Value, parse_object};

/// The line `/init` writes last before the check.
const MARKER: &str = "qemu-test: marker";
/// What the kernel's panic line starts with (found in pstore's dump).
const PANIC_LINE: &str = "Kernel panic - not syncing";

/// One kmsg record as the guest copied it to the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KmsgLine {
    pub(crate) seq: u64,
    pub(crate) facility: u64,
    pub(crate) usec: u64,
    pub(crate) msg: String,
}

/// `prio,seq,usec,flags[,…];text` with `\xNN` escapes, as /dev/kmsg gives it.
fn parse_kmsg(line: &str) -> Option<KmsgLine> {
    let (prefix, text) = line.split_once(';')?;
    let mut f = prefix.split(',');
    let prio: u64 = f.next()?.parse().ok()?;
    let seq = f.next()?.parse().ok()?;
    let usec = f.next()?.parse().ok()?;
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = tail
            .get(1..3)
            .filter(|_| b == b'\\' && tail.first() == Some(&b'x'))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                bytes.push(v);
                rest = &tail[3..];
            }
            None => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    Some(KmsgLine {
        seq,
        facility: prio >> 3,
        usec,
        msg: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// One sample of the footprint test: kB by process and field (`agent VmHWM`, …).
#[derive(Debug, Clone, Default)]
pub(crate) struct FootSample {
    pub(crate) kb: HashMap<(String, String), u64>,
}

/// What the serial console said.
#[derive(Debug, Default)]
pub(crate) struct Serial {
    /// Boot ids, first boot first.
    pub(crate) boots: Vec<String>,
    /// The first boot's kmsg records, once the copy is complete.
    pub(crate) dump: Option<Vec<KmsgLine>>,
    /// Footprint samples.
    pub(crate) foot: Vec<FootSample>,
    /// Footprint test: the guest's uptime when the load started and ended.
    pub(crate) foot_span: (Option<f64>, Option<f64>),
    /// `/init` has nothing more to do.
    pub(crate) done: bool,
    /// What the init script's `status` said after `start` in boot 2.
    pub(crate) init_script: Option<String>,
}

impl Serial {
    pub(crate) fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut s = Serial::default();
        let mut dump: Option<Vec<KmsgLine>> = None;
        for line in text.lines().map(|l| l.trim_end_matches('\r')) {
            if let Some(rec) = line.strip_prefix("BBKMSG ") {
                // Continuation lines (` KEY=value`) carry no record.
                if let (Some(d), Some(r)) = (dump.as_mut(), parse_kmsg(rec)) {
                    d.push(r);
                }
            } else if let Some(rest) = line.strip_prefix("BBFOOT ") {
                let mut sample = FootSample::default();
                let mut who = String::new();
                for w in rest.split_whitespace() {
                    match w.split_once(':') {
                        Some((k, v)) => {
                            if let Ok(v) = v.parse() {
                                sample.kb.insert((who.clone(), k.to_owned()), v);
                            }
                        }
                        None => who = w.to_owned(),
                    }
                }
                s.foot.push(sample);
            } else if let Some(at) = line.find("BBTEST: ") {
                let words: Vec<&str> = line[at + 8..].split_whitespace().collect();
                match words.as_slice() {
                    ["boot", _, id] => s.boots.push((*id).to_owned()),
                    ["kmsg", "begin"] => dump = Some(Vec::new()),
                    ["kmsg", "end"] => s.dump = dump.take(),
                    ["footprint", "start", t] => s.foot_span.0 = t.parse().ok(),
                    ["footprint", "end", t] => s.foot_span.1 = t.parse().ok(),
                    ["done"] => s.done = true,
                    ["init-script", said @ ..] => s.init_script = Some(said.join(" ")),
                    _ => {}
                }
            }
        }
        s
    }
}

/// One stored record.
#[derive(Debug, Clone)]
pub(crate) struct StoredLine {
    pub(crate) boot: String,
    pub(crate) seq: u64,
    pub(crate) mono_us: u64,
    pub(crate) origin: String,
    pub(crate) msg: String,
}

impl StoredLine {
    fn from_json(line: &str) -> Option<Self> {
        let fields = parse_object(line)?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let s = |k: &str| get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Self {
            boot: s("boot")?,
            seq: get("seq").and_then(Value::as_u64)?,
            mono_us: get("mono_us").and_then(Value::as_u64)?,
            origin: s("origin")?,
            msg: s("msg")?,
        })
    }
}

/// The store's segments, read with `gzip -dc` (segments are gzip members back to back); a
/// segment once read is kept, as segments never change.
#[derive(Default)]
pub(crate) struct Store {
    segments: HashMap<PathBuf, Vec<StoredLine>>,
}

impl Store {
    /// Reads the segments not read yet; returns every segment's path in key (ingest) order.
    pub(crate) fn refresh(&mut self, store: &Path) -> Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        let mut stack = vec![store.join("raw")];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.to_string_lossy().ends_with(".seg.gz") {
                    paths.push(p);
                }
            }
        }
        paths.sort();
        for p in &paths {
            if self.segments.contains_key(p) {
                continue;
            }
            let out = Command::new("gzip").arg("-dc").arg(p).output()?;
            if !out.status.success() {
                // Not complete yet, perhaps: the next round reads it again.
                continue;
            }
            let lines = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(StoredLine::from_json)
                .collect();
            self.segments.insert(p.clone(), lines);
        }
        Ok(paths
            .into_iter()
            .filter(|p| self.segments.contains_key(p))
            .collect())
    }

    /// The first stored line of `boot` whose text satisfies `want`.
    pub(crate) fn find(
        &self,
        order: &[PathBuf],
        boot: &str,
        want: impl Fn(&str) -> bool,
    ) -> Option<String> {
        self.lines(order)
            .find(|(_, l)| l.boot == boot && want(&l.msg))
            .map(|(_, l)| l.msg.clone())
    }

    fn lines<'a>(
        &'a self,
        order: &'a [PathBuf],
    ) -> impl Iterator<Item = (&'a Path, &'a StoredLine)> {
        order.iter().flat_map(move |p| {
            self.segments
                .get(p)
                .into_iter()
                .flatten()
                .map(move |l| (p.as_path(), l))
        })
    }
}

/// Counts for one kind of line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) expected: usize,
    pub(crate) stored: usize,
    /// Stored only from the pstore dump (the ring did not have them).
    pub(crate) from_pstore: usize,
    pub(crate) missing: usize,
    pub(crate) duplicated: usize,
    pub(crate) out_of_order: usize,
    pub(crate) other_boot: usize,
}

/// The comparison of the first boot's dump with the store.
#[derive(Debug, Default)]
pub(crate) struct Check {
    pub(crate) kernel: Counts,
    pub(crate) apps: Counts,
    /// Copies of the marker stored under boot 1.
    pub(crate) marker: usize,
    /// Whether the dump holds the marker (it is complete).
    pub(crate) marker_dumped: bool,
    /// Stored records whose sequence number the dump has, with another text (examples).
    pub(crate) mismatched: Vec<String>,
    /// Dumped records not stored (examples).
    pub(crate) missing: Vec<String>,
    /// Boot 1 kmsg records inside the dump's range that the dump does not have.
    pub(crate) unexpected: usize,
    /// Boot 1 kmsg records after the dump (the first line of the crash, at most).
    pub(crate) after_dump: usize,
    /// Boot 1 records of other origins, by origin.
    pub(crate) other_origins: HashMap<String, usize>,
    /// Pstore lines stored under boot 1 (the dump's and the panic's).
    pub(crate) pstore_lines: usize,
    /// The panic line among them.
    pub(crate) pstore_panic: Option<String>,
    /// Boot 1 kmsg records in segments stored before the second boot started, and after
    /// (when there was one).
    pub(crate) before_reboot: usize,
    pub(crate) after_reboot: usize,
    pub(crate) rebooted: bool,
}

impl Check {
    /// Compares; `early` are the segments that were there before the second boot began, if
    /// there was one. A pstore line counts as a copy of the dumped record with its time and text.
    pub(crate) fn run(
        dump: &[KmsgLine],
        boot1: &str,
        store: &Store,
        order: &[PathBuf],
        early: Option<&HashSet<PathBuf>>,
    ) -> Self {
        let mut c = Check {
            marker_dumped: dump.iter().any(|r| r.msg.contains(MARKER)),
            rebooted: early.is_some(),
            ..Check::default()
        };
        let by_seq: HashMap<u64, &KmsgLine> = dump.iter().map(|r| (r.seq, r)).collect();
        let by_time: HashMap<(u64, &str), u64> = dump
            .iter()
            .map(|r| ((r.usec, r.msg.as_str()), r.seq))
            .collect();
        let app_texts: HashSet<&str> = dump
            .iter()
            .filter(|r| r.facility != 0)
            .map(|r| r.msg.as_str())
            .collect();
        let first = dump.iter().map(|r| r.seq).min().unwrap_or(0);
        let last = dump.iter().map(|r| r.seq).max().unwrap_or(0);
        // Per dumped seq: copies from kmsg, copies from pstore.
        let mut copies: HashMap<u64, (usize, usize)> = HashMap::new();
        let mut newest: Option<u64> = None;
        for (segment, l) in store.lines(order) {
            if l.boot != boot1 {
                if app_texts.contains(l.msg.as_str()) {
                    c.apps.other_boot += 1;
                }
                continue;
            }
            match l.origin.as_str() {
                "kmsg" => {}
                "pstore" => {
                    c.pstore_lines += 1;
                    if l.msg.contains(PANIC_LINE) && c.pstore_panic.is_none() {
                        c.pstore_panic = Some(l.msg.clone());
                    }
                    if let Some(seq) = by_time.get(&(l.mono_us, l.msg.as_str())) {
                        copies.entry(*seq).or_default().1 += 1;
                    }
                    continue;
                }
                other => {
                    *c.other_origins.entry(other.to_owned()).or_default() += 1;
                    continue;
                }
            }
            if early.is_none_or(|e| e.contains(segment)) {
                c.before_reboot += 1;
            } else {
                c.after_reboot += 1;
            }
            let Some(want) = by_seq.get(&l.seq) else {
                if l.seq > last {
                    c.after_dump += 1;
                } else if l.seq >= first {
                    c.unexpected += 1;
                }
                continue;
            };
            if want.msg != l.msg {
                if c.mismatched.len() < 5 {
                    c.mismatched.push(format!(
                        "seq {}: dumped {:?}, stored {:?}",
                        l.seq, want.msg, l.msg
                    ));
                }
                continue;
            }
            let n = copies.entry(l.seq).or_default();
            n.0 += 1;
            if n.0 == 1 && newest.is_some_and(|s| l.seq < s) {
                c.kind(want.facility).out_of_order += 1;
            }
            newest = newest.max(Some(l.seq));
        }
        for r in dump {
            let (ring, pstore) = copies.get(&r.seq).copied().unwrap_or_default();
            if ring + pstore == 0 && c.missing.len() < 3 {
                c.missing.push(format!("seq {} {:?}", r.seq, r.msg));
            }
            let kind = c.kind(r.facility);
            kind.expected += 1;
            match ring + pstore {
                0 => kind.missing += 1,
                n => {
                    kind.stored += 1;
                    kind.duplicated += usize::from(n > 1);
                    kind.from_pstore += usize::from(ring == 0);
                }
            }
            if r.msg.contains(MARKER) {
                c.marker += ring + pstore;
            }
        }
        c
    }

    /// The counts for lines of `facility` (0: the kernel's).
    fn kind(&mut self, facility: u64) -> &mut Counts {
        if facility == 0 {
            &mut self.kernel
        } else {
            &mut self.apps
        }
    }

    /// Everything expected is there (more time cannot make it better, only show duplicates).
    pub(crate) fn complete(&self, pstore: bool) -> bool {
        self.marker_dumped
            && self.kernel.missing == 0
            && self.apps.missing == 0
            && (!pstore || self.pstore_panic.is_some())
    }

    /// The verdict's reasons: empty when it passes.
    pub(crate) fn failures(&self, pstore: bool) -> Vec<String> {
        let mut why = Vec::new();
        if !self.marker_dumped {
            why.push("the guest's copy of kmsg has no marker (incomplete)".to_owned());
        }
        for (name, k) in [("kernel", &self.kernel), ("app", &self.apps)] {
            if k.missing + k.duplicated + k.out_of_order + k.other_boot > 0 {
                why.push(format!(
                    "{name} lines: {} missing, {} duplicated, {} out of order, {} under another boot",
                    k.missing, k.duplicated, k.out_of_order, k.other_boot
                ));
            }
        }
        if !self.missing.is_empty() {
            why.push(format!("missing, for example: {}", self.missing.join(", ")));
        }
        if self.marker != 1 {
            why.push(format!("the marker is stored {} times", self.marker));
        }
        if !self.mismatched.is_empty() {
            why.push(format!(
                "stored text differs from the guest's: {}",
                self.mismatched.join("; ")
            ));
        }
        if self.unexpected > 0 {
            why.push(format!(
                "{} record(s) of boot 1 with sequence numbers the guest never had",
                self.unexpected
            ));
        }
        if pstore && self.pstore_panic.is_none() {
            why.push(format!(
                "no \"{PANIC_LINE}\" line from pstore ({} pstore line(s) stored)",
                self.pstore_lines
            ));
        }
        why
    }

    pub(crate) fn print(&self, pstore: Option<&str>) {
        let row = |name: &str, k: &Counts| {
            println!(
                "    {:<12} {:>8} {:>7} {:>11} {:>8} {:>11} {:>13} {:>11}",
                name,
                k.expected,
                k.stored,
                k.from_pstore,
                k.missing,
                k.duplicated,
                k.out_of_order,
                k.other_boot
            )
        };
        println!(
            "    {:<12} {:>8} {:>7} {:>11} {:>8} {:>11} {:>13} {:>11}",
            "",
            "expected",
            "stored",
            "from pstore",
            "missing",
            "duplicated",
            "out of order",
            "other boot"
        );
        row("kernel lines", &self.kernel);
        row("app lines", &self.apps);
        println!("    marker stored {} time(s)", self.marker);
        if self.rebooted {
            println!(
                "    boot 1 records from the ring uploaded before the reboot: {}, after: {}",
                self.before_reboot, self.after_reboot
            );
        }
        if self.after_dump > 0 {
            println!(
                "    {} record(s) of boot 1 written after the copy (the crash's first line)",
                self.after_dump
            );
        }
        for (origin, n) in &self.other_origins {
            println!("    {n} record(s) of boot 1 with origin {origin}");
        }
        match (pstore, &self.pstore_panic) {
            (Some(why), _) => println!("    pstore: n/a ({why})"),
            (None, Some(line)) => println!(
                "    pstore: {} line(s) stored under boot 1, among them {line:?}",
                self.pstore_lines
            ),
            (None, None) => println!(
                "    pstore: no panic line ({} pstore line(s) stored under boot 1)",
                self.pstore_lines
            ),
        }
    }
}

/// Lines of the footprint test's app (`load[PID]: load S.I: …`) stored under `boot`:
/// (distinct, duplicated).
pub(crate) fn load_lines(store: &Store, order: &[PathBuf], boot: &str) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut dup = 0;
    for (_, l) in store.lines(order) {
        if l.boot != boot || !l.msg.starts_with("load[") {
            continue;
        }
        let key = l
            .msg
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_owned();
        if !seen.insert(key) {
            dup += 1;
        }
    }
    (seen.len(), dup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_lines_unescape() {
        let r = parse_kmsg("14,812,5012345,-;alpha[77]: a\\x5cb\\x0ac;d").unwrap();
        assert_eq!((r.seq, r.facility, r.usec), (812, 1, 5_012_345));
        assert_eq!(r.msg, "alpha[77]: a\\b\nc;d");
        assert_eq!(parse_kmsg(" SUBSYSTEM=net"), None);
    }

    #[test]
    fn serial_dump_boots_and_samples() {
        let dir = std::env::temp_dir().join(format!("xtask-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        std::fs::write(
            &path,
            "noise\r\nBBTEST: boot 1 aaa\r\nBBTEST: kmsg begin\r\nBBKMSG 6,0,1,-;Linux version\r\n\
             BBKMSG  SUBSYSTEM=x\r\n[   1.0] kernel talk BBTEST: kmsg end\r\n\
             BBFOOT t=3.5 agent VmHWM:900 VmRSS:800 logos VmHWM:300\r\nBBTEST: boot 2 bbb\r\n\
             BBTEST: init-script blackbox: running (supervisor 91)\r\n",
        )
        .unwrap();
        let s = Serial::read(&path);
        assert_eq!(s.boots, ["aaa", "bbb"]);
        assert_eq!(s.dump.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            s.init_script.as_deref(),
            Some("blackbox: running (supervisor 91)")
        );
        let kb = &s.foot[0].kb;
        assert_eq!(kb.get(&("agent".into(), "VmHWM".into())), Some(&900));
        assert_eq!(kb.get(&("logos".into(), "VmHWM".into())), Some(&300));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn stored(boot: &str, seq: u64, origin: &str, msg: &str) -> StoredLine {
        StoredLine {
            boot: boot.into(),
            seq,
            mono_us: seq * 10,
            origin: origin.into(),
            msg: msg.into(),
        }
    }

    #[test]
    fn exactly_once_in_order() {
        let dump: Vec<KmsgLine> = [(0, 0, "Linux version"), (1, 1, "alpha[9]: alpha line 1")]
            .into_iter()
            .chain([
                (2, 1, "qemu-test: marker: x"),
                (3, 1, "beta[8]: beta line 1"),
            ])
            .map(|(seq, facility, msg)| KmsgLine {
                seq,
                facility,
                usec: seq * 10,
                msg: msg.into(),
            })
            .collect();
        let mut store = Store::default();
        let (a, b) = (PathBuf::from("a"), PathBuf::from("b"));
        store.segments.insert(
            a.clone(),
            vec![
                stored("B1", 0, "kmsg", "Linux version"),
                stored("B1", 2, "kmsg", "qemu-test: marker: x"),
            ],
        );
        store.segments.insert(
            b.clone(),
            vec![
                stored("B1", 1, "kmsg", "alpha[9]: alpha line 1"),
                stored("B1", 2, "kmsg", "qemu-test: marker: x"),
                stored("B1", 3, "pstore", "beta[8]: beta line 1"),
                stored("B1", 4, "pstore", "Kernel panic - not syncing: sysrq"),
                stored("B2", 0, "kmsg", "alpha[9]: alpha line 1"),
            ],
        );
        let order = [a.clone(), b];
        let c = Check::run(&dump, "B1", &store, &order, Some(&HashSet::from([a])));
        assert_eq!(
            (c.kernel.expected, c.kernel.stored, c.kernel.missing),
            (1, 1, 0)
        );
        assert_eq!((c.apps.expected, c.apps.stored), (3, 3));
        assert_eq!(
            (c.apps.duplicated, c.apps.out_of_order, c.apps.other_boot),
            (1, 1, 1)
        );
        assert_eq!(c.apps.from_pstore, 1);
        assert_eq!((c.marker, c.before_reboot, c.after_reboot), (2, 2, 2));
        assert!(c.pstore_panic.is_some() && c.complete(true));
        assert_eq!(c.failures(true).len(), 2);
    }
}
