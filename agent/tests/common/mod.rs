//! Helpers shared by the tests that write into a file standing in for /dev/kmsg.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

/// The records in the stand-in, as (PRI, text after the PRI).
pub(crate) fn records(kmsg: &Path) -> Vec<(u8, String)> {
    let text = std::fs::read_to_string(kmsg).unwrap();
    text.lines()
        .map(|l| {
            let (pri, rest) = l.strip_prefix('<').unwrap().split_once('>').unwrap();
            (pri.parse().unwrap(), rest.to_owned())
        })
        .collect()
}
