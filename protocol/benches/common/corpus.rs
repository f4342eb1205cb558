//! The benchmark corpus: the loghub samples in `shared/corpus/loghub/` beside the workspace
//! (Loghub, <https://github.com/logpai/loghub>; Jieming Zhu, Shilin He, Pinjia He, Jinyang Liu,
//! Michael R. Lyu: "Loghub: A Large Collection of System Log Datasets for AI-driven Log
//! Analytics", ISSRE 2023). Included by the benches of several crates with `#[path]`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Criterion with short runs (the project's benches take about a minute each on two cores);
/// command-line options (`--sample-size`, `--measurement-time`, ...) still override these.
pub(crate) fn short_criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

pub(crate) fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/loghub")
}

/// The `*.log` files of the corpus, sorted; panics with a clear message when there are none.
pub(crate) fn corpus_files() -> Vec<PathBuf> {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "benchmark corpus missing: cannot read {} ({e}); the loghub samples are expected in \
             shared/corpus/loghub/ next to the workspace",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "benchmark corpus empty: no *.log file in {}",
        dir.display()
    );
    files
}

/// Splits on `\n`, `\r\n` and lone `\r`. A final line terminator does not start an empty line.
pub(crate) fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push(&bytes[start..i]);
                start = i + 1;
            }
            b'\r' => {
                lines.push(&bytes[start..i]);
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < bytes.len() {
        lines.push(&bytes[start..]);
    }
    lines
}

/// Every line of every corpus file, files sorted by name.
pub(crate) fn corpus_lines() -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    for f in corpus_files() {
        let bytes = std::fs::read(&f)
            .unwrap_or_else(|e| panic!("cannot read corpus file {}: {e}", f.display()));
        lines.extend(split_lines(&bytes).into_iter().map(<[u8]>::to_vec));
    }
    lines
}
