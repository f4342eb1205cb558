//! The rules' literal prefilter: which rules can possibly match a message, from one
//! Aho-Corasick pass over it.
//!
//! For every rule we derive a set of *required literals*: byte strings of which every match of
//! the rule contains at least one. One Aho-Corasick DFA holds the literals of all rules (ASCII
//! case folded, so a `(?i)` rule needs a handful of literals rather than every case variant;
//! cut to 12 bytes, since any part of a required literal is required too); a pass over a
//! message marks the rules one of whose literals occurs, and only those run their regex. A
//! rule for which no selective set is found (say `\w+=\d+`) runs on every message. The
//! prefilter only ever says "maybe": a rule it marks may still not match, and a rule it does
//! not mark cannot match, which is what keeps the result identical to running every rule (unit
//! tests compare the two on the corpus, on random messages, and for random patterns).
//!
//! How a set is derived ([`required`]): a literal requires itself; an alternation requires one
//! of its branches' sets; a repetition of at least one, or a capture group, requires what its
//! part requires; a concatenation requires what any one of its parts requires, or a prefix of
//! any of its tails (found by `regex-syntax`'s literal extractor, which also expands small
//! classes such as `[Ll]`). Of the candidate sets the most selective wins ([`score`]).
//!
//! The pass reports every occurrence, overlapping ones included (a literal inside another
//! must not hide), and walks four messages side by side ([`Prefilter::candidates`]): a DFA walk
//! is a chain of dependent loads, and four chains keep the core busier than one.
use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind, StartKind};
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind};

/// A literal shorter than this is too common to be worth its matches: the rule runs always.
const MIN_LITERAL: usize = 3;
/// More literals than this for one rule: the rule runs always.
const MAX_LITERALS: usize = 64;
/// Literals are cut to this length (a part of a required literal is required too), for a
/// smaller automaton: on the bench's corpus, 12 rather than uncut made 5 % more candidates and
/// the pass faster; 8 made 31 % more candidates.
const MAX_LEN: usize = 12;

/// A set of literals at least one of which occurs in every match: lowercased, sorted, distinct.
type Set = Vec<Vec<u8>>;

/// How selective a set is, to maximise: a byte more in the shortest literal is worth about
/// four doublings of the number of literals (a byte of log text carries about four bits), and
/// beyond 8 bytes a longer literal hardly matches less often. Ties go to fewer literals.
fn score(s: &Set) -> (usize, std::cmp::Reverse<usize>) {
    let min = s.iter().map(Vec::len).min().unwrap_or(0).min(8);
    let doublings = s.len().next_power_of_two().trailing_zeros() as usize;
    (
        (4 * min).saturating_sub(doublings),
        std::cmp::Reverse(s.len()),
    )
}

fn best(a: Option<Set>, b: Option<Set>) -> Option<Set> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if score(&b) > score(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Folds ASCII case, sorts, drops duplicates; `None` when the set cannot pay for itself (an
/// empty literal matches everywhere).
fn normalise(lits: impl IntoIterator<Item = Vec<u8>>) -> Option<Set> {
    let mut s: Set = lits
        .into_iter()
        .map(|mut l| {
            l.make_ascii_lowercase();
            l
        })
        .collect();
    s.sort();
    s.dedup();
    let usable =
        !s.is_empty() && s.len() <= MAX_LITERALS && s.iter().all(|l| l.len() >= MIN_LITERAL);
    usable.then_some(s)
}

/// The prefixes every match of `hir` starts with, if finitely many. Classes of two bytes (case
/// pairs such as `[Ll]`, which folding makes one) are expanded; larger ones (`\d`) end a
/// prefix rather than multiply it.
fn prefixes(hir: &Hir) -> Option<Set> {
    let seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_class(2)
        .extract(hir);
    normalise(seq.literals()?.iter().map(|l| l.as_bytes().to_vec()))
}

/// A set of literals one of which occurs in every match of `hir`, if one worth having is found.
fn required(hir: &Hir) -> Option<Set> {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => None,
        HirKind::Literal(_) | HirKind::Class(_) => prefixes(hir),
        HirKind::Capture(c) => required(&c.sub),
        HirKind::Repetition(r) if r.min >= 1 => best(required(&r.sub), prefixes(hir)),
        HirKind::Repetition(_) => None,
        HirKind::Alternation(alts) => {
            let union: Option<Vec<Set>> = alts.iter().map(required).collect();
            best(union.and_then(|u| normalise(u.concat())), prefixes(hir))
        }
        HirKind::Concat(parts) => {
            let mut found = None;
            for (i, p) in parts.iter().enumerate() {
                found = best(found, required(p));
                found = best(found, prefixes(&Hir::concat(parts[i..].to_vec())));
            }
            found
        }
    }
}

/// A prefix set at least this selective ([`score`]) is used, and the rule is searched anchored
/// where its literals start, even if an inner set would filter a little better: 4 bytes with
/// one literal, 5 bytes with up to 16.
const ANCHOR_SCORE: usize = 16;

/// A pattern's literals, and whether every match *starts* with one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Literals {
    set: Set,
    prefix: bool,
}

impl Literals {
    /// The literals, lowercased.
    #[cfg(test)]
    pub(crate) fn set(&self) -> &[Vec<u8>] {
        &self.set
    }
}

/// Parses `pattern` as `regex::bytes` with ASCII classes does (the rules' settings) and finds
/// its required literals: the prefixes of every match when there are good ones, else the best
/// set found inside.
fn literals_of(pattern: &str) -> Option<Literals> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
        .ok()?;
    match prefixes(&hir).filter(|p| score(p).0 >= ANCHOR_SCORE) {
        Some(set) => Some(Literals { set, prefix: true }),
        None => Some(Literals {
            set: required(&hir)?,
            prefix: false,
        }),
    }
}

/// The compiled prefilter for a list of patterns.
#[derive(Debug)]
pub(crate) struct Prefilter {
    /// Every rule's literals; `None` when no rule has any.
    dfa: Option<DFA>,
    /// For each literal (the automaton's pattern id), the rules it stands for: a range of
    /// `targets`.
    pattern_rules: Vec<(u32, u32)>,
    targets: Vec<u32>,
    /// Rules without literals: candidates for every message.
    always: Vec<u32>,
    /// Rules every match of which starts with one of their literals, by rule.
    anchored: Vec<bool>,
    /// Number of rules.
    rules: usize,
    /// Each rule's literals, as found.
    #[cfg(test)]
    sets: Vec<Option<Literals>>,
}

/// One walk of [`Prefilter::candidates`]: the message, what is left of it, the state.
#[derive(Debug, Clone, Copy)]
struct Lane<'m> {
    msg: usize,
    rest: &'m [u8],
    sid: StateID,
}

/// Which rules may match each message of a batch: a bit per rule and message, and for rules
/// whose matches start with a literal, where such a literal starts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Candidates {
    /// `per` words for each message, one after the other.
    words: Vec<u64>,
    per: usize,
    /// (message, rule, start), sorted, distinct.
    starts: Vec<(usize, usize, usize)>,
}

impl Candidates {
    fn set(&mut self, msg: usize, rule: u32) {
        let w = msg * self.per + (rule / 64) as usize;
        if let Some(word) = self.words.get_mut(w) {
            *word |= 1 << (rule % 64);
        }
    }

    /// The rules marked for message `msg` of the batch, in ascending order.
    pub(crate) fn iter(&self, msg: usize) -> impl Iterator<Item = usize> + '_ {
        let words = self
            .words
            .get(msg * self.per..(msg + 1) * self.per)
            .unwrap_or_default();
        words.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let b = rest.trailing_zeros() as usize;
                    rest &= rest - 1;
                    w * 64 + b
                })
            })
        })
    }

    /// Where, in message `msg`, a literal of anchored rule `rule` starts: ascending. `cursor`
    /// starts at 0 for a batch and is moved on: ask for (message, rule) pairs in ascending
    /// order.
    pub(crate) fn starts(
        &self,
        cursor: &mut usize,
        msg: usize,
        rule: usize,
    ) -> impl Iterator<Item = usize> + '_ {
        let rest = self.starts.get(*cursor..).unwrap_or_default();
        let skip = rest
            .iter()
            .take_while(|&&(m, r, _)| (m, r) < (msg, rule))
            .count();
        let rest = rest.get(skip..).unwrap_or_default();
        let n = rest
            .iter()
            .take_while(|&&(m, r, _)| (m, r) == (msg, rule))
            .count();
        *cursor += skip + n;
        rest.get(..n).unwrap_or_default().iter().map(|&(_, _, s)| s)
    }
}

impl Prefilter {
    /// Derives every pattern's literals. Patterns that do not parse (the caller compiled them
    /// already, so they do) or have no selective literals run on every message.
    pub(crate) fn new<'p>(patterns: impl IntoIterator<Item = &'p str>) -> Self {
        let mut by_literal: std::collections::BTreeMap<Vec<u8>, Vec<u32>> = Default::default();
        let mut always = Vec::new();
        let sets: Vec<Option<Literals>> = patterns.into_iter().map(literals_of).collect();
        let rules = sets.len();
        let mut anchored = vec![false; rules];
        for (i, lits) in sets.iter().enumerate() {
            let i = i as u32;
            match lits {
                Some(lits) => {
                    if let Some(a) = anchored.get_mut(i as usize) {
                        *a = lits.prefix;
                    }
                    for l in &lits.set {
                        let cut = &l[..l.len().min(MAX_LEN)];
                        let rules = by_literal.entry(cut.to_vec()).or_default();
                        if !rules.contains(&i) {
                            rules.push(i);
                        }
                    }
                }
                None => always.push(i),
            }
        }
        let mut pattern_rules = Vec::with_capacity(by_literal.len());
        let mut targets = Vec::new();
        for rs in by_literal.values() {
            let start = targets.len() as u32;
            targets.extend_from_slice(rs);
            pattern_rules.push((start, targets.len() as u32));
        }
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(true)
            .start_kind(StartKind::Unanchored)
            .prefilter(false)
            .build(by_literal.keys())
            .ok();
        let dfa = match dfa {
            Some(dfa) if !by_literal.is_empty() => Some(dfa),
            // The automaton cannot be built (too large): every rule runs, unanchored.
            _ => {
                always = (0..rules as u32).collect();
                anchored = vec![false; rules];
                None
            }
        };
        Self {
            dfa,
            pattern_rules,
            targets,
            always,
            anchored,
            rules,
            #[cfg(test)]
            sets,
        }
    }

    /// An empty candidate set to reuse with [`Prefilter::candidates`].
    pub(crate) fn scratch(&self) -> Candidates {
        Candidates {
            words: Vec::new(),
            per: self.rules.div_ceil(64),
            starts: Vec::new(),
        }
    }

    /// Marks in `c` the rules that may match each of `msgs` (and clears the rest).
    pub(crate) fn candidates(&self, msgs: &[&[u8]], c: &mut Candidates) {
        c.words.clear();
        c.words.resize(msgs.len() * c.per, 0);
        c.starts.clear();
        if !self.always.is_empty() {
            for m in 0..msgs.len() {
                for &i in &self.always {
                    c.set(m, i);
                }
            }
        }
        let Some(dfa) = &self.dfa else {
            return;
        };
        let Ok(start) = dfa.start_state(Anchored::No) else {
            return;
        };
        // One walk is a chain of dependent table lookups (about 2.3 ns a byte, the latency of
        // the load): four walks side by side, over four messages, overlap their latencies. A
        // lane that finishes its message takes the next one. The lanes are four separate
        // values (not an array the loop indexes) so that they stay in registers.
        let mut next = 0;
        let idle = Lane {
            msg: 0,
            rest: &[],
            sid: start,
        };
        let (mut a, mut b, mut d, mut e) = (idle, idle, idle, idle);
        loop {
            let busy = self.step(dfa, start, msgs, &mut next, &mut a, c)
                | self.step(dfa, start, msgs, &mut next, &mut b, c)
                | self.step(dfa, start, msgs, &mut next, &mut d, c)
                | self.step(dfa, start, msgs, &mut next, &mut e, c);
            if !busy {
                break;
            }
        }
        c.starts.sort_unstable();
        c.starts.dedup();
    }

    /// Does rule `i` search anchored at its literals' starts ([`Candidates::starts`])?
    pub(crate) fn anchored(&self, i: usize) -> bool {
        self.anchored.get(i).copied().unwrap_or(false)
    }

    /// One byte of one lane, or the lane takes the next message. False when it is idle.
    #[inline(always)]
    fn step<'m>(
        &self,
        dfa: &DFA,
        start: StateID,
        msgs: &[&'m [u8]],
        next: &mut usize,
        lane: &mut Lane<'m>,
        c: &mut Candidates,
    ) -> bool {
        if let Some((&byte, tail)) = lane.rest.split_first() {
            lane.sid = dfa.next_state(Anchored::No, lane.sid, byte);
            lane.rest = tail;
            if dfa.is_special(lane.sid) {
                let len = msgs.get(lane.msg).map_or(0, |m| m.len());
                let end = len.saturating_sub(lane.rest.len());
                self.mark(dfa, lane.sid, lane.msg, end, c);
            }
            true
        } else if let Some(msg) = msgs.get(*next) {
            *lane = Lane {
                msg: *next,
                rest: msg,
                sid: start,
            };
            *next += 1;
            true
        } else {
            false
        }
    }

    /// Marks for message `m` the rules of every literal that ends in match state `s`, at `end`.
    fn mark(&self, dfa: &DFA, s: StateID, m: usize, end: usize, c: &mut Candidates) {
        if !dfa.is_match(s) {
            return;
        }
        for i in 0..dfa.match_len(s) {
            let p = dfa.match_pattern(s, i);
            if let Some(&(a, b)) = self.pattern_rules.get(p.as_usize())
                && let Some(rs) = self.targets.get(a as usize..b as usize)
            {
                for &r in rs {
                    c.set(m, r);
                    if self.anchored(r as usize) {
                        let start = end.saturating_sub(dfa.pattern_len(p));
                        c.starts.push((m, r as usize, start));
                    }
                }
            }
        }
    }

    /// The rules without literals (they run on every message), by index.
    pub(crate) fn always(&self) -> impl Iterator<Item = usize> + '_ {
        self.always.iter().map(|&i| i as usize)
    }

    /// For each rule, its literals (lowercased), or `None` when it runs on every message.
    #[cfg(test)]
    pub(crate) fn describe(&self) -> &[Option<Literals>] {
        &self.sets
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The literals found (as text) and whether they are prefixes of every match.
    fn lits(p: &str) -> Option<(Vec<String>, bool)> {
        literals_of(p).map(|l| {
            let set = l.set.into_iter();
            (
                set.map(|l| String::from_utf8_lossy(&l).into_owned())
                    .collect(),
                l.prefix,
            )
        })
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_required_literals_inside_patterns() {
        assert_eq!(lits("abcd"), Some((strings(&["abcd"]), true)));
        assert_eq!(
            lits(r"(?P<p>\S+) invoked oom-killer"),
            Some((strings(&[" invoked oom-killer"]), false))
        );
        assert_eq!(
            lits(r"(?:Foo bar|baz qux) (\d+)"),
            Some((strings(&["baz qux ", "foo bar "]), true))
        );
        assert_eq!(
            lits(r"\d+ (?:Foo bar|baz qux)"),
            Some((strings(&[" baz qux", " foo bar"]), false))
        );
        // Case variants fold into one literal.
        assert_eq!(lits(r"(?i)thermal"), Some((strings(&["thermal"]), true)));
        assert_eq!(lits(r"\b[Ll]ink is"), Some((strings(&["link is"]), true)));
        // A short prefix: the longer literal inside, unanchored.
        assert_eq!(
            lits(r"ab\d+ reboot: now"),
            Some((strings(&[" reboot: now"]), false))
        );
        // Nothing selective: runs always.
        assert_eq!(lits(r"\w+=\d+"), None);
        assert_eq!(lits(r"a|bcd"), None);
        assert_eq!(lits(r"(?:abc)?\d+"), None);
        assert_eq!(lits(""), None);
    }

    /// Random patterns: literals (some longer than the cut), classes, anchors, word
    /// boundaries, alternations, repetitions, `(?i)`, groups.
    pub(crate) fn pattern() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            proptest::sample::select(vec![
                "ab",
                "abc",
                "bca",
                "Link",
                "up",
                "ERR",
                "err:",
                "x",
                "(",
                "\u{e9}",
                "link is up, said the card",
            ])
            .prop_map(regex_syntax::escape),
            proptest::sample::select(vec![
                r"\d", r"\w", ".", r"\b", "^", "$", "[a-c]", r"\s", "[Ll]", "[^a]"
            ])
            .prop_map(str::to_owned),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
                proptest::collection::vec(inner.clone(), 2..4)
                    .prop_map(|v| format!("(?:{})", v.join("|"))),
                inner.clone().prop_map(|p| format!("(?:{p})?")),
                inner.clone().prop_map(|p| format!("(?:{p})*")),
                inner.clone().prop_map(|p| format!("(?:{p})+")),
                inner.clone().prop_map(|p| format!("(?:{p}){{2,3}}")),
                inner.clone().prop_map(|p| format!("(?i:{p})")),
                inner.prop_map(|p| format!("({p})")),
            ]
        })
    }

    /// Random messages made of pieces of [`pattern`]'s literals, in several cases.
    pub(crate) fn haystack() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            proptest::sample::select(vec![
                "ab",
                "c",
                "a",
                "b",
                "Link",
                "LINK",
                "lInK",
                "up",
                "UP",
                "err:",
                "ERR",
                "x",
                "(",
                "\u{e9}",
                " ",
                "1",
                "bca",
                "aBc",
                "\n",
                "link is up, said",
                " the card",
            ]),
            0..40,
        )
        .prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whenever a pattern matches, the prefilter names it.
        #[test]
        fn a_rule_that_matches_is_always_a_candidate(
            p in pattern(),
            hs in proptest::collection::vec(haystack(), 16),
        ) {
            let Ok(re) = regex::bytes::RegexBuilder::new(&p).unicode(false).build() else {
                return Ok(());
            };
            let pf = Prefilter::new([p.as_str()]);
            let mut c = pf.scratch();
            for h in hs {
                pf.candidates(&[&h], &mut c);
                let named = c.iter(0).any(|i| i == 0);
                prop_assert!(
                    named || !re.is_match(&h),
                    "{p:?} matches {:?} but literals {:?} do not",
                    String::from_utf8_lossy(&h),
                    pf.describe()
                );
            }
        }
    }
}
