//! Grind rules: named regexes over a line's message, each match an event with labels.
//!
//! ```toml
//! [[rule]]
//! name = "oom_kill"                        # the event's name (several rules may share one)
//! regex = 'Out of memory: Killed process (?P<pid>\d+) \((?P<process>[^)]+)\)'
//! labels = { severity = "critical" }       # fixed labels (optional)
//! metric_labels = ["process"]              # labels the Prometheus counters keep (optional)
//! ```
//!
//! An event's labels are the rule's fixed labels plus every named capture group that took part
//! in the match. Matching is two-step: a literal prefilter (one Aho-Corasick pass over the
//! message for the literals every rule requires, see [`crate::prefilter`]) says which rules can
//! match at all (most messages leave most rules out), then only those run their regex, with
//! captures. Patterns use Rust's `regex` syntax (no look-around, no backreferences), which
//! guarantees time linear in the message length whatever the rule.
//!
//! Classes are ASCII by default: `\w`, `\d`, `\s`, `\b` and `(?i)` work on ASCII and `.` or
//! `\S` match any byte, which is what log lines need and keeps each rule's automaton small
//! (with Unicode classes the lazy DFA spent most of its time rebuilding states). Write
//! `(?u:\w)` for a Unicode class.
use std::borrow::Cow;
use std::collections::BTreeMap;

use regex::bytes::{CaptureLocations, Regex, RegexBuilder};
use serde::Deserialize;

use crate::prefilter::{Candidates, Prefilter};

/// The rules that ship with blackbox: what routers and DVRs say when something happens.
pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<Def>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Def {
    name: String,
    regex: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    metric_labels: Vec<String>,
}

/// Why a rules file was refused (the grinder keeps its previous rules).
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not TOML in the expected shape.
    #[error("rules file: {0}")]
    Toml(#[from] toml::de::Error),
    /// A rule's regex does not compile.
    #[error("rule {name:?}: {error}")]
    Regex {
        /// The rule.
        name: String,
        /// Why.
        error: regex::Error,
    },
    /// A rule's name is empty or not `[A-Za-z_][A-Za-z0-9_]*` (it becomes a metric label value
    /// and a column value; kept simple on purpose).
    #[error("rule name {0:?}: use letters, digits and _")]
    Name(String),
    /// A metric label that is neither a fixed label nor a capture of the rule.
    #[error("rule {name:?}: metric label {label:?} is neither a label nor a capture group")]
    MetricLabel {
        /// The rule.
        name: String,
        /// The label.
        label: String,
    },
}

/// Where an event label's value comes from.
#[derive(Debug)]
enum LabelValue {
    Fixed(String),
    /// A capture group, by index.
    Capture(usize),
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Event name.
    pub name: String,
    re: Regex,
    /// Fixed labels, by name.
    labels: Vec<(String, String)>,
    /// The event's labels by name: the fixed ones, and the captures no fixed label shadows.
    event_labels: Vec<(String, LabelValue)>,
    /// Labels the metrics keep.
    pub metric_labels: Vec<String>,
}

/// A compiled rules file.
#[derive(Debug)]
pub struct Rules {
    prefilter: Prefilter,
    rules: Vec<Rule>,
}

/// What matching needs besides the rules (candidate bits, capture positions), kept to spare
/// allocations per message: make one with [`Rules::scratch`] per thread and reuse it.
#[derive(Debug)]
pub struct Scratch {
    candidates: Candidates,
    /// Capture positions, one per rule.
    locs: Vec<CaptureLocations>,
}

/// A rule that matched a message, with where its captures are.
#[derive(Debug, Clone, Copy)]
pub struct Hit<'r, 'm> {
    /// The rule.
    pub rule: &'r Rule,
    msg: &'m [u8],
    locs: &'m CaptureLocations,
}

impl<'r, 'm> Hit<'r, 'm> {
    fn value<'v>(&'v self, v: &'v LabelValue) -> Option<Cow<'v, str>> {
        match v {
            LabelValue::Fixed(s) => Some(Cow::Borrowed(s.as_str())),
            LabelValue::Capture(i) => {
                let (a, b) = self.locs.get(*i)?;
                Some(String::from_utf8_lossy(self.msg.get(a..b)?))
            }
        }
    }

    /// The event's labels in name order: fixed labels, and the captures that took part in the
    /// match (a fixed label wins over a capture of the same name).
    pub fn labels(&self) -> impl Iterator<Item = (&str, Cow<'_, str>)> + '_ {
        self.rule
            .event_labels
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), self.value(v)?)))
    }

    /// One label's value, if the event has it.
    pub fn label(&self, name: &str) -> Option<Cow<'_, str>> {
        let (_, v) = self.rule.event_labels.iter().find(|(k, _)| k == name)?;
        self.value(v)
    }
}

/// One match: the rule and its labels (fixed ones first, then captures, each name once).
#[derive(Debug, Clone)]
pub struct Match<'r> {
    /// The rule that matched.
    pub rule: &'r Rule,
    /// Its labels.
    pub labels: Vec<(String, String)>,
}

fn valid_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl Rules {
    /// Parses and compiles a rules file.
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let file: File = toml::from_str(text)?;
        let mut rules = Vec::with_capacity(file.rule.len());
        for d in file.rule {
            if !valid_name(&d.name) {
                return Err(RulesError::Name(d.name));
            }
            let re = RegexBuilder::new(&d.regex)
                .unicode(false)
                .build()
                .map_err(|error| RulesError::Regex {
                    name: d.name.clone(),
                    error,
                })?;
            for l in &d.metric_labels {
                if !d.labels.contains_key(l) && !re.capture_names().flatten().any(|c| c == l) {
                    return Err(RulesError::MetricLabel {
                        name: d.name,
                        label: l.clone(),
                    });
                }
            }
            let mut event_labels: BTreeMap<String, LabelValue> = d
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), LabelValue::Fixed(v.clone())))
                .collect();
            for (i, name) in re.capture_names().enumerate() {
                if let Some(name) = name {
                    event_labels
                        .entry(name.to_owned())
                        .or_insert(LabelValue::Capture(i));
                }
            }
            rules.push(Rule {
                name: d.name,
                re,
                labels: d.labels.into_iter().collect(),
                event_labels: event_labels.into_iter().collect(),
                metric_labels: d.metric_labels,
            });
        }
        let prefilter = Prefilter::new(rules.iter().map(|r| r.re.as_str()));
        Ok(Self { prefilter, rules })
    }

    /// The built-in default rules.
    pub fn default_rules() -> Self {
        match Self::parse(DEFAULT_RULES) {
            Ok(r) => r,
            // A unit test parses the file, so this cannot happen in a released build.
            Err(e) => panic!("the built-in rules do not compile: {e}"),
        }
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// No rules?
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules the literal prefilter cannot leave out (no literal of three bytes or more is
    /// required by every match, e.g. `\w+=\d+`): they run on every message, so they cost
    /// far more than the others.
    pub fn unfiltered(&self) -> impl Iterator<Item = &Rule> + '_ {
        self.prefilter.always().filter_map(|i| self.rules.get(i))
    }

    /// State for [`Rules::for_each_match`], to reuse from one batch to the next.
    pub fn scratch(&self) -> Scratch {
        Scratch {
            candidates: self.prefilter.scratch(),
            locs: self
                .rules
                .iter()
                .map(|r| r.re.capture_locations())
                .collect(),
        }
    }

    /// Calls `f(i, hit)` for every rule that matches `msgs[i]`: message by message, each in
    /// file order. Allocates nothing once `scratch` has served a batch as large. A batch of
    /// many messages (a chunk's) is faster than one at a time: the prefilter walks several
    /// messages side by side.
    pub fn for_each_match<'r>(
        &'r self,
        msgs: &[&[u8]],
        scratch: &mut Scratch,
        mut f: impl FnMut(usize, Hit<'r, '_>),
    ) {
        self.prefilter.candidates(msgs, &mut scratch.candidates);
        for (m, msg) in msgs.iter().enumerate() {
            for i in scratch.candidates.iter(m) {
                let (Some(rule), Some(locs)) = (self.rules.get(i), scratch.locs.get_mut(i)) else {
                    continue;
                };
                if rule.re.captures_read(locs, msg).is_some() {
                    f(m, Hit { rule, msg, locs });
                }
            }
        }
    }

    /// Every rule that matches `msg` with its regex alone, without the prefilter (the
    /// reference the prefilter is tested against).
    #[cfg(test)]
    fn matching_without_prefilter(&self, msg: &[u8]) -> Vec<usize> {
        (0..self.rules.len())
            .filter(|&i| self.rules[i].re.is_match(msg))
            .collect()
    }

    /// Every rule that matches `msg`, in file order, each with its fixed labels (in name order)
    /// then its captures that took part (in pattern order).
    pub fn apply(&self, msg: &str) -> Vec<Match<'_>> {
        let mut out = Vec::new();
        let mut scratch = self.scratch();
        self.for_each_match(&[msg.as_bytes()], &mut scratch, |_, h| {
            let rule = h.rule;
            let mut labels = rule.labels.clone();
            for (i, name) in rule.re.capture_names().enumerate() {
                let Some(name) = name else { continue };
                if labels.iter().any(|(k, _)| k == name) {
                    continue;
                }
                if let Some(v) = h.value(&LabelValue::Capture(i)) {
                    labels.push((name.to_owned(), v.into_owned()));
                }
            }
            out.push(Match { rule, labels });
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_compile_and_match_what_devices_say() {
        let r = Rules::default_rules();
        assert!(r.len() >= 15);
        let cases = [
            (
                "Kernel panic - not syncing: Fatal exception in interrupt",
                "kernel_panic",
            ),
            ("Internal error: Oops: 17 [#1] PREEMPT ARM", "kernel_oops"),
            (
                "BUG: unable to handle page fault for address: ffffc90000a3c000",
                "kernel_oops",
            ),
            (
                "Out of memory: Killed process 812 (dnsmasq) total-vm:12345kB",
                "oom_kill",
            ),
            (
                "hostapd[901]: segfault at 0 ip 00007f sp 00007ffd error 4 in libc.so",
                "segfault",
            ),
            (
                "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/0:1:33]",
                "watchdog",
            ),
            ("watchdog: watchdog0: watchdog did not stop!", "watchdog"),
            ("reboot: Restarting system", "reboot"),
            ("boot reason: watchdog reset", "reboot_reason"),
            (
                "r8169 0000:02:00.0 eth0: Link is Up - 1Gbps/Full - flow control off",
                "link_up",
            ),
            (
                "e1000e: eth1 NIC Link is Up 1000 Mbps Full Duplex, Flow Control: None",
                "link_up",
            ),
            ("eth0: Link is Down", "link_down"),
            (
                "udhcpc: lease of 192.168.1.23 obtained, lease time 86400",
                "dhcp_lease",
            ),
            (
                "dnsmasq-dhcp[812]: DHCPACK(br-lan) 192.168.1.100 aa:bb:cc:dd:ee:ff laptop",
                "dhcp_lease",
            ),
            (
                "wlan0: STA 11:22:33:44:55:66 IEEE 802.11: associated (aid 1)",
                "wifi_assoc",
            ),
            (
                "wlan0: AP-STA-DISCONNECTED 11:22:33:44:55:66",
                "wifi_disassoc",
            ),
            (
                "CPU0: Core temperature above threshold, cpu clock throttled (total events = 1)",
                "thermal",
            ),
            (
                "thermal thermal_zone0: critical temperature reached (105 C), shutting down",
                "thermal",
            ),
        ];
        for (msg, want) in cases {
            let names: Vec<&str> = r.apply(msg).iter().map(|m| m.rule.name.as_str()).collect();
            assert!(
                names.contains(&want),
                "{msg:?} gave {names:?}, wanted {want}"
            );
        }
        let m = r.apply("Out of memory: Killed process 812 (dnsmasq) total-vm:12345kB");
        assert_eq!(
            m[0].labels,
            vec![
                ("severity".into(), "critical".into()),
                ("pid".into(), "812".into()),
                ("process".into(), "dnsmasq".into())
            ]
        );
        for quiet in [
            "eth0: renamed from veth12",
            "sshd[1]: Accepted publickey for root",
            "",
        ] {
            assert!(r.apply(quiet).is_empty(), "{quiet:?}");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let e = Rules::parse("[[rule]]\nname = \"x\"\nregex = \"(\"\n").unwrap_err();
        assert!(e.to_string().contains("rule \"x\""), "{e}");
        assert!(Rules::parse("[[rule]]\nname = \"a b\"\nregex = \"x\"\n").is_err());
        assert!(
            Rules::parse("[[rule]]\nname = \"a\"\nregex = \"x\"\nmetric_labels = [\"y\"]\n")
                .is_err()
        );
        assert!(Rules::parse("[[rule]]\nname = \"a\"\nregex = \"x\"\ncolour = 1\n").is_err());
        assert!(Rules::parse("").unwrap().is_empty());
    }

    /// The 50 rules of the grinder benchmark: the built-in ones and the bench's.
    fn bench_rules() -> Rules {
        Rules::parse(&format!(
            "{DEFAULT_RULES}\n{}",
            include_str!("../benches/rules-extra.toml")
        ))
        .unwrap()
    }

    /// The messages of the benchmark corpus (`shared/corpus/loghub/*.log` beside the workspace).
    fn corpus() -> Vec<Vec<u8>> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/loghub");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no *.log in {}", dir.display());
        files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read(f).unwrap();
                text.split(|&b| b == b'\n')
                    .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The rules `for_each_match` reports for each message of a batch, by index.
    fn prefiltered(r: &Rules, msgs: &[&[u8]], s: &mut Scratch) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); msgs.len()];
        r.for_each_match(msgs, s, |i, h| {
            out[i].extend(r.rules.iter().position(|x| std::ptr::eq(x, h.rule)));
        });
        out
    }

    #[test]
    fn the_prefilter_changes_nothing_on_the_corpus() {
        let r = bench_rules();
        let mut s = r.scratch();
        let corpus = corpus();
        let (mut lines, mut matches) = (0, 0);
        // Batches of all sizes, as chunks come.
        for batch in corpus
            .chunks(1)
            .take(50)
            .chain(corpus.chunks(7))
            .chain(corpus.chunks(500))
        {
            let msgs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            for (msg, got) in msgs.iter().zip(prefiltered(&r, &msgs, &mut s)) {
                let want = r.matching_without_prefilter(msg);
                assert_eq!(got, want, "{}", String::from_utf8_lossy(msg));
                lines += 1;
                matches += want.len();
            }
        }
        // The corpus does exercise the rules.
        assert!(
            lines >= 16000 && matches > lines / 2,
            "{lines} lines, {matches} matches"
        );
    }

    #[test]
    fn every_shipped_rule_has_literals() {
        assert_eq!(bench_rules().unfiltered().count(), 0);
        let r = Rules::parse("[[rule]]\nname = \"kv\"\nregex = '\\w+=\\d+'\n").unwrap();
        let names: Vec<&str> = r.unfiltered().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["kv"]);
        assert_eq!(r.apply("a=1").len(), 1);
    }

    /// Words of the corpus and of the rules' literals, and odd bytes: random messages made of
    /// them often hold a literal (so the regexes run) and now and then match.
    fn vocabulary() -> Vec<Vec<u8>> {
        let r = bench_rules();
        let mut v: Vec<Vec<u8>> = r
            .prefilter
            .describe()
            .iter()
            .flatten()
            .flatten()
            .cloned()
            .collect();
        for msg in corpus().iter().step_by(7) {
            v.extend(msg.split(|&b| b == b' ').map(<[u8]>::to_vec));
        }
        for odd in [
            "[",
            "]",
            "(",
            ")",
            ":",
            "=",
            "'",
            "\"",
            "#1",
            "12345",
            "0x1f",
            "10.0.0.1",
            "aa:bb:cc:dd:ee:ff",
            "\t",
            "\u{e9}",
            "\u{263a}",
            "eth0",
            "wlan0",
            "port 22",
        ] {
            v.push(odd.as_bytes().to_vec());
        }
        v.sort();
        v.dedup();
        v
    }

    proptest::proptest! {
        #[test]
        fn the_prefilter_changes_nothing_on_random_messages(
            batch in proptest::collection::vec(
                proptest::collection::vec((0..1usize << 20, 0..4u8, 0..5usize), 0..24),
                1..9,
            )
        ) {
            thread_local! {
                static FIXTURE: (Rules, Vec<Vec<u8>>) = (bench_rules(), vocabulary());
            }
            FIXTURE.with(|(r, vocab)| {
                let msgs: Vec<Vec<u8>> = batch
                    .into_iter()
                    .map(|parts| {
                        let mut msg = Vec::new();
                        for (word, case, sep) in parts {
                            let mut w = vocab[word % vocab.len()].clone();
                            match case {
                                1 => w.make_ascii_uppercase(),
                                2 => w.make_ascii_lowercase(),
                                _ => {}
                            }
                            msg.extend_from_slice(&w);
                            msg.extend_from_slice([&b" "[..], b"", b": ", b", ", b"="][sep]);
                        }
                        msg
                    })
                    .collect();
                let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
                let mut s = r.scratch();
                for (msg, got) in refs.iter().zip(prefiltered(r, &refs, &mut s)) {
                    proptest::prop_assert_eq!(
                        got,
                        r.matching_without_prefilter(msg),
                        "{}",
                        String::from_utf8_lossy(msg)
                    );
                }
                Ok(())
            })?;
        }
    }
}
