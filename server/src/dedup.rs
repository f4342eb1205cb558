//! Dropping duplicate records by identity: (device, boot, sequence number).
//!
//! Duplicates reach storage (two receivers behind a load balancer each store a retried chunk;
//! an agent rebuilding chunks after a crash can overlap earlier ones), so every reader keeps a
//! [`Seen`]: per (device, boot), the sequence numbers already passed on, as sorted disjoint
//! runs. A device's records arrive mostly in order, so a boot is usually one run and the set
//! stays small whatever the volume.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Disjoint inclusive runs of sequence numbers, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct Runs(BTreeMap<u64, u64>);

impl From<Vec<(u64, u64)>> for Runs {
    fn from(v: Vec<(u64, u64)>) -> Self {
        let mut r = Self::default();
        for (a, b) in v {
            if a <= b {
                r.insert_run(a, b);
            }
        }
        r
    }
}

impl From<Runs> for Vec<(u64, u64)> {
    fn from(r: Runs) -> Self {
        r.0.into_iter().collect()
    }
}

/// How much of a range is already in a [`Runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Nothing of it.
    None,
    /// All of it.
    All,
    /// Some of it: check record by record.
    Some,
}

impl Runs {
    /// Does the set hold `seq`?
    pub fn contains(&self, seq: u64) -> bool {
        self.0
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &e)| e >= seq)
    }

    /// How much of `a..=b` the set holds.
    pub fn overlap(&self, a: u64, b: u64) -> Overlap {
        if let Some((&s, &e)) = self.0.range(..=a).next_back()
            && e >= a
        {
            return if e >= b && s <= a {
                Overlap::All
            } else {
                Overlap::Some
            };
        }
        match self.0.range(a..=b).next() {
            Some(_) => Overlap::Some,
            None => Overlap::None,
        }
    }

    /// Adds `a..=b`, merging with touching runs.
    pub fn insert_run(&mut self, a: u64, b: u64) {
        let (mut a, mut b) = (a, b);
        if let Some((&s, &e)) = self.0.range(..=a).next_back()
            && e.saturating_add(1) >= a
        {
            a = s;
            b = b.max(e);
        }
        let after: Vec<(u64, u64)> = self
            .0
            .range(a..=b.saturating_add(1))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in after {
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
    }

    /// Adds `seq`; false if it was there already.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        self.insert_run(seq, seq);
        true
    }

    /// Adds every run of `other`.
    pub fn absorb(&mut self, other: &Runs) {
        for (&a, &b) in &other.0 {
            self.insert_run(a, b);
        }
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No runs?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The identities passed on so far, per (device, boot).
#[derive(Debug, Clone, Default)]
pub struct Seen {
    map: HashMap<(String, String), Runs>,
}

impl Seen {
    /// The runs of one (device, boot). Called once per chunk, not per record.
    pub fn runs(&mut self, device: &str, boot: &str) -> &mut Runs {
        self.map
            .entry((device.to_owned(), boot.to_owned()))
            .or_default()
    }

    /// The runs of one (device, boot), if any were seen.
    pub fn get(&self, device: &str, boot: &str) -> Option<&Runs> {
        self.map.get(&(device.to_owned(), boot.to_owned()))
    }

    /// Adds everything `other` saw.
    pub fn absorb(&mut self, other: Seen) {
        for ((device, boot), runs) in other.map {
            match self.map.get_mut(&(device.clone(), boot.clone())) {
                Some(mine) => mine.absorb(&runs),
                None => {
                    self.map.insert((device, boot), runs);
                }
            }
        }
    }

    /// Every (device, boot) and its runs.
    pub fn iter(&self) -> impl Iterator<Item = (&(String, String), &Runs)> {
        self.map.iter()
    }

    /// Keeps only the (device, boot) pairs `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&(String, String)) -> bool) {
        self.map.retain(|k, _| keep(k));
    }

    /// Puts back a (device, boot)'s runs (from a checkpoint).
    pub fn restore(&mut self, device: String, boot: String, runs: Runs) {
        self.map.insert((device, boot), runs);
    }

    /// Number of (device, boot) pairs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Nothing seen?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_answer_overlaps() {
        let mut r = Runs::default();
        r.insert_run(10, 19);
        r.insert_run(30, 39);
        assert_eq!(r.overlap(0, 9), Overlap::None);
        assert_eq!(r.overlap(20, 29), Overlap::None);
        assert_eq!(r.overlap(12, 15), Overlap::All);
        assert_eq!(r.overlap(5, 10), Overlap::Some);
        assert_eq!(r.overlap(19, 30), Overlap::Some);
        assert_eq!(r.overlap(0, 100), Overlap::Some);
        r.insert_run(20, 29);
        assert_eq!(r.len(), 1);
        assert_eq!(r.overlap(10, 39), Overlap::All);
        assert!(r.insert(40));
        assert!(!r.insert(40));
        assert!(r.insert(u64::MAX));
        assert!(!r.insert(u64::MAX));
        assert_eq!(
            Vec::<(u64, u64)>::from(r.clone()),
            vec![(10, 40), (u64::MAX, u64::MAX)]
        );
        assert_eq!(Runs::from(Vec::<(u64, u64)>::from(r.clone())), r);
    }

    #[test]
    fn seen_absorbs_another_seen_run_by_run() {
        let mut a = Seen::default();
        a.runs("d1", "b").insert_run(0, 9);
        a.runs("d1", "b").insert_run(20, 29);
        let mut b = Seen::default();
        b.runs("d1", "b").insert_run(10, 14);
        b.runs("d1", "b").insert_run(30, 30);
        b.runs("d2", "b").insert_run(5, 5);
        a.absorb(b);
        assert_eq!(
            a.get("d1", "b").map(|r| Vec::<(u64, u64)>::from(r.clone())),
            Some(vec![(0, 14), (20, 30)])
        );
        assert!(a.get("d2", "b").is_some_and(|r| r.contains(5)));
        assert!(a.get("d3", "b").is_none());
    }

    #[test]
    fn runs_agree_with_a_plain_set() {
        let mut r = Runs::default();
        let mut set = std::collections::BTreeSet::new();
        let mut x: u64 = 12345;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = (x >> 33) % 300;
            let b = a + (x >> 50) % 5;
            let want = if (a..=b).all(|s| set.contains(&s)) {
                Overlap::All
            } else if (a..=b).any(|s| set.contains(&s)) {
                Overlap::Some
            } else {
                Overlap::None
            };
            assert_eq!(r.overlap(a, b), want, "{a}..={b}");
            r.insert_run(a, b);
            set.extend(a..=b);
        }
    }
}
