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
//! captures; a rule whose every match starts with one of its literals is searched anchored
//! where the prefilter saw one ([`Rules::for_each_match`]). Patterns use Rust's `regex`
//! syntax (no look-around, no backreferences), which guarantees time linear in the message
//! length whatever the rule; they are compiled by `regex-automata`, the regex crate's engine,
//! with the regex crate's settings (and checked by the regex crate, for its error messages).
//!
//! Classes are ASCII by default: `\w`, `\d`, `\s`, `\b` and `(?i)` work on ASCII and `.` or
//! `\S` match any byte, which is what log lines need and keeps each rule's automaton small
//! (with Unicode classes the lazy DFA spent most of its time rebuilding states). Write
//! `(?u:\w)` for a Unicode class.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::panic::{RefUnwindSafe, UnwindSafe};

use regex::bytes::RegexBuilder;
use regex_automata::util::captures::Captures;
use regex_automata::util::pool::{Pool, PoolGuard};
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, PatternID, meta};
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
    /// A regex that compiled for the check above but not for matching. Cannot happen in
    /// practice (both use the same settings); reported rather than assumed.
    #[error("rule {name:?}: {error}")]
    Engine {
        /// The rule.
        name: String,
        /// Why.
        error: Box<meta::BuildError>,
    },
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
    /// The pattern as written.
    pattern: String,
    /// The regex: `regex::bytes::Regex` with ASCII classes, built as the regex crate builds it,
    /// but through `regex-automata`, which can also search anchored at a position.
    re: meta::Regex,
    /// Fixed labels, by name.
    labels: Vec<(String, String)>,
    /// The event's labels by name: the fixed ones, and the captures no fixed label shadows.
    event_labels: Vec<(String, LabelValue)>,
    /// Labels the metrics keep.
    pub metric_labels: Vec<String>,
}

/// Builds `pattern` as `regex::bytes::RegexBuilder::new(pattern).unicode(false)` does (same
/// limits, same semantics) as a `regex-automata` meta regex.
fn meta_regex(pattern: &str) -> Result<meta::Regex, Box<meta::BuildError>> {
    meta::Builder::new()
        .configure(
            meta::Config::new()
                .nfa_size_limit(Some(10 << 20))
                .hybrid_cache_capacity(2 << 20)
                .match_kind(regex_automata::MatchKind::LeftmostFirst)
                .utf8_empty(false),
        )
        .syntax(syntax::Config::new().unicode(false).utf8(false))
        .build(pattern)
        .map_err(Box::new)
}

type ScratchFn = Box<dyn Fn() -> Scratch + Send + Sync + UnwindSafe + RefUnwindSafe>;

/// A compiled rules file.
#[derive(Debug)]
pub struct Rules {
    prefilter: Prefilter,
    rules: Vec<Rule>,
    /// Matching state, one per thread that matches, kept warm between batches (the regexes'
    /// lazy DFAs build their states as they go).
    scratch: Pool<Scratch, ScratchFn>,
}

/// What matching needs besides the rules: candidate bits, and each rule's regex cache and
/// capture slots.
#[derive(Debug)]
struct Scratch {
    candidates: Candidates,
    caches: Vec<meta::Cache>,
    caps: Vec<Captures>,
}

/// A rule that matched a message, with where its captures are.
#[derive(Debug, Clone, Copy)]
pub struct Hit<'r, 'm> {
    /// The rule.
    pub rule: &'r Rule,
    /// Its place in the rules file (from 0).
    pub index: usize,
    msg: &'m [u8],
    caps: &'m Captures,
}

impl<'r, 'm> Hit<'r, 'm> {
    fn value<'v>(&'v self, v: &'v LabelValue) -> Option<Cow<'v, str>> {
        match v {
            LabelValue::Fixed(s) => Some(Cow::Borrowed(s.as_str())),
            LabelValue::Capture(i) => {
                let span = self.caps.get_group(*i)?;
                Some(String::from_utf8_lossy(self.msg.get(span.range())?))
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
            // The regex crate's errors say best what is wrong with a pattern.
            let checked = RegexBuilder::new(&d.regex)
                .unicode(false)
                .build()
                .map_err(|error| RulesError::Regex {
                    name: d.name.clone(),
                    error,
                })?;
            let re = meta_regex(&d.regex).map_err(|error| RulesError::Engine {
                name: d.name.clone(),
                error,
            })?;
            for l in &d.metric_labels {
                if !d.labels.contains_key(l) && !checked.capture_names().flatten().any(|c| c == l) {
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
            for (i, name) in checked.capture_names().enumerate() {
                if let Some(name) = name {
                    event_labels
                        .entry(name.to_owned())
                        .or_insert(LabelValue::Capture(i));
                }
            }
            rules.push(Rule {
                name: d.name,
                pattern: d.regex,
                re,
                labels: d.labels.into_iter().collect(),
                event_labels: event_labels.into_iter().collect(),
                metric_labels: d.metric_labels,
            });
        }
        let prefilter = Prefilter::new(rules.iter().map(|r| r.pattern.as_str()));
        let fresh = prefilter.scratch();
        let regexes: Vec<meta::Regex> = rules.iter().map(|r| r.re.clone()).collect();
        let scratch: ScratchFn = Box::new(move || Scratch {
            candidates: fresh.clone(),
            caches: regexes.iter().map(meta::Regex::create_cache).collect(),
            caps: regexes.iter().map(meta::Regex::create_captures).collect(),
        });
        Ok(Self {
            prefilter,
            rules,
            scratch: Pool::new(scratch),
        })
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

    /// Calls `f(i, hit)` for every rule that matches `msgs[i]`: message by message, each in
    /// file order. Allocates nothing once this thread has matched a batch as large. A batch of
    /// many messages (a chunk's) is faster than one at a time: the prefilter walks several
    /// messages side by side.
    ///
    /// A rule whose every match starts with one of its literals is searched anchored at each
    /// place the prefilter saw one, leftmost first: the first that matches is the match an
    /// unanchored search finds (leftmost-first), found in one pass over the match instead of
    /// three (forward to its end, back to its start, then captures).
    pub fn for_each_match<'r>(&'r self, msgs: &[&[u8]], mut f: impl FnMut(usize, Hit<'r, '_>)) {
        let mut guard: PoolGuard<'_, Scratch, ScratchFn> = self.scratch.get();
        let Scratch {
            candidates,
            caches,
            caps,
        } = &mut *guard;
        self.prefilter.candidates(msgs, candidates);
        let mut cursor = 0;
        for (m, &msg) in msgs.iter().enumerate() {
            for i in candidates.iter(m) {
                let (Some(rule), Some(cache), Some(caps)) =
                    (self.rules.get(i), caches.get_mut(i), caps.get_mut(i))
                else {
                    continue;
                };
                if self.prefilter.anchored(i) {
                    caps.set_pattern(None);
                    for start in candidates.starts(&mut cursor, m, i) {
                        let input = Input::new(msg)
                            .span(start..msg.len())
                            .anchored(Anchored::Yes);
                        rule.re.search_captures_with(cache, &input, caps);
                        if caps.is_match() {
                            break;
                        }
                    }
                } else {
                    rule.re.search_captures_with(cache, &Input::new(msg), caps);
                }
                if caps.is_match() {
                    f(
                        m,
                        Hit {
                            rule,
                            index: i,
                            msg,
                            caps,
                        },
                    );
                }
            }
        }
    }

    /// Every rule that matches `msg`, in file order, each with its fixed labels (in name order)
    /// then its captures that took part (in pattern order).
    pub fn apply(&self, msg: &str) -> Vec<Match<'_>> {
        let mut out = Vec::new();
        self.for_each_match(&[msg.as_bytes()], |_, h| {
            let rule = h.rule;
            let mut labels = rule.labels.clone();
            let names = rule.re.group_info().pattern_names(PatternID::ZERO);
            for (i, name) in names.enumerate() {
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

    type Found = Vec<(usize, Vec<Option<std::ops::Range<usize>>>)>;

    /// What `for_each_match` reports for each message of a batch: rules by index, each with
    /// its groups' spans.
    fn prefiltered(r: &Rules, msgs: &[&[u8]]) -> Vec<Found> {
        let mut out = vec![Vec::new(); msgs.len()];
        r.for_each_match(msgs, |i, h| {
            let groups = (0..h.caps.group_len()).map(|g| h.caps.get_group(g).map(|s| s.range()));
            let rule = r.rules.iter().position(|x| std::ptr::eq(x, h.rule));
            out[i].extend(rule.map(|rule| (rule, groups.collect())));
        });
        out
    }

    /// The reference: every rule run on its own by the regex crate, no prefilter, no
    /// anchored search.
    struct Reference(Vec<regex::bytes::Regex>);

    impl Reference {
        fn of(r: &Rules) -> Self {
            Self(
                r.rules
                    .iter()
                    .map(|r| {
                        RegexBuilder::new(&r.pattern)
                            .unicode(false)
                            .build()
                            .unwrap()
                    })
                    .collect(),
            )
        }

        fn find(&self, msg: &[u8]) -> Found {
            self.0
                .iter()
                .enumerate()
                .filter_map(|(i, re)| {
                    let caps = re.captures(msg)?;
                    Some((i, caps.iter().map(|g| g.map(|g| g.range())).collect()))
                })
                .collect()
        }
    }

    #[test]
    fn the_prefilter_changes_nothing_on_the_corpus() {
        let r = bench_rules();
        let reference = Reference::of(&r);
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
            for (msg, got) in msgs.iter().zip(prefiltered(&r, &msgs)) {
                let want = reference.find(msg);
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
            .flat_map(|l| l.set().iter().cloned())
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
                static FIXTURE: (Rules, Reference, Vec<Vec<u8>>) = {
                    let r = bench_rules();
                    let reference = Reference::of(&r);
                    (r, reference, vocabulary())
                };
            }
            FIXTURE.with(|(r, reference, vocab)| {
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
                for (msg, got) in refs.iter().zip(prefiltered(r, &refs)) {
                    proptest::prop_assert_eq!(
                        got,
                        reference.find(msg),
                        "{}",
                        String::from_utf8_lossy(msg)
                    );
                }
                Ok(())
            })?;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        /// Random patterns as rules: the prefilter and the anchored searches find what the
        /// regex crate finds, groups included.
        #[test]
        fn random_rules_match_as_the_regex_crate_does(
            patterns in proptest::collection::vec(crate::prefilter::tests::pattern(), 1..4),
            msgs in proptest::collection::vec(crate::prefilter::tests::haystack(), 1..12),
        ) {
            let file: String = patterns
                .iter()
                .map(|p| format!("[[rule]]\nname = \"r\"\nregex = '''{p}'''\n"))
                .collect();
            let Ok(r) = Rules::parse(&file) else {
                return Ok(());
            };
            let reference = Reference::of(&r);
            let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
            for (msg, got) in refs.iter().zip(prefiltered(&r, &refs)) {
                proptest::prop_assert_eq!(
                    got,
                    reference.find(msg),
                    "{:?} on {:?}",
                    patterns,
                    String::from_utf8_lossy(msg)
                );
            }
        }
    }
}
