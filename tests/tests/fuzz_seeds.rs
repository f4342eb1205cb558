//! The fuzz targets' checks (`fuzz/src/`) on stable, in CI: over every committed seed and crash
//! artifact (`fuzz/corpus/<target>/`, `fuzz/artifacts/<target>/`), and over a few hundred
//! deterministic mutations of each seed (bytes flipped, cut, repeated, dropped).
//!
//! This is a regression net, not fuzzing: a crash input once found stays fixed, and the checks
//! themselves keep compiling against the code they check. Coverage-guided fuzzing is
//! `fuzz/smoke.sh` (nightly, cargo-fuzz).
#![allow(clippy::unwrap_used)]

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/chunk_decode.rs"]
mod chunk_decode;
#[allow(unreachable_pub)]
#[path = "../../fuzz/src/ring_recover.rs"]
mod ring_recover;
#[allow(unreachable_pub)]
#[path = "../../fuzz/src/syslog_parse.rs"]
mod syslog_parse;

use std::path::{Path, PathBuf};

/// Mutations tried per seed.
const MUTANTS: usize = 200;

/// The committed inputs of `target`: seeds, then crash artifacts (sorted, for a stable order).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.ends_with(".gitkeep"))
            .collect();
        paths.sort();
        out.extend(paths.into_iter().map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        }));
    }
    out
}

/// xorshift64*: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(b.len());
        match rng.below(5) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = rng.next() as u8,
            2 => b.truncate(at),
            3 if !b.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                let part = b[at..end].to_vec();
                b.splice(at..at, part);
            }
            _ if !b.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            _ => b.push(rng.next() as u8),
        }
    }
    b
}

/// Runs `check` on every committed input of `target` and on its mutations; a panic names the
/// input (and the mutation, to replay it).
fn replay(target: &str, check: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(!inputs.is_empty(), "no seeds for {target} in fuzz/corpus");
    for (path, bytes) in &inputs {
        let r = std::panic::catch_unwind(|| check(bytes));
        assert!(r.is_ok(), "{target}: {} fails its checks", path.display());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ bytes.len() as u64);
        for k in 0..MUTANTS {
            let m = mutate(bytes, &mut rng);
            let r = std::panic::catch_unwind(|| check(&m));
            assert!(
                r.is_ok(),
                "{target}: mutation {k} of {} fails its checks; as bytes: {m:?}",
                path.display()
            );
        }
    }
}

#[test]
fn chunk_decode_seeds_and_their_mutations_pass_the_fuzz_checks() {
    replay("chunk_decode", chunk_decode::run);
}

#[test]
fn ring_recover_seeds_and_their_mutations_pass_the_fuzz_checks() {
    replay("ring_recover", ring_recover::run);
}

#[test]
fn syslog_parse_seeds_and_their_mutations_pass_the_fuzz_checks() {
    replay("syslog_parse", syslog_parse::run);
}
