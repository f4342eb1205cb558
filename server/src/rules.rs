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
//! in the match. Matching is two-step: one [`RegexSet`] over every rule says which rules match a
//! message at all (most messages match none, and are done after one pass), then only those rules
//! run with captures. Patterns use Rust's `regex` syntax (no look-around, no backreferences),
//! which guarantees time linear in the message length whatever the rule.
//!
//! Classes are ASCII by default: `\w`, `\d`, `\s`, `\b` and `(?i)` work on ASCII and `.` or
//! `\S` match any byte, which is what log lines need and keeps 50 rules' automaton small (with
//! Unicode classes the lazy DFA spent most of its time rebuilding states). Write `(?u:\w)` for a
//! Unicode class.
use std::collections::BTreeMap;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::Deserialize;

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

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Event name.
    pub name: String,
    re: Regex,
    labels: Vec<(String, String)>,
    /// Labels the metrics keep.
    pub metric_labels: Vec<String>,
}

/// A compiled rules file.
#[derive(Debug)]
pub struct Rules {
    set: RegexSet,
    rules: Vec<Rule>,
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
            rules.push(Rule {
                name: d.name,
                re,
                labels: d.labels.into_iter().collect(),
                metric_labels: d.metric_labels,
            });
        }
        let set = RegexSetBuilder::new(rules.iter().map(|r| r.re.as_str()))
            .unicode(false)
            .size_limit(64 << 20)
            .dfa_size_limit(64 << 20)
            .build()
            .map_err(|error| RulesError::Regex {
                name: "(all rules together)".into(),
                error,
            })?;
        Ok(Self { set, rules })
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

    /// Every rule that matches `msg`, in file order.
    pub fn apply(&self, msg: &str) -> Vec<Match<'_>> {
        let msg = msg.as_bytes();
        if !self.set.is_match(msg) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in self.set.matches(msg).iter() {
            let Some(rule) = self.rules.get(i) else {
                continue;
            };
            let Some(caps) = rule.re.captures(msg) else {
                continue;
            };
            let mut labels = rule.labels.clone();
            for (name, m) in rule
                .re
                .capture_names()
                .zip(caps.iter())
                .filter_map(|(n, m)| Some((n?, m?)))
            {
                if !labels.iter().any(|(k, _)| k == name) {
                    labels.push((
                        name.to_owned(),
                        String::from_utf8_lossy(m.as_bytes()).into_owned(),
                    ));
                }
            }
            out.push(Match { rule, labels });
        }
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
}
