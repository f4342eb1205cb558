//! `Ring::open` (recovery of the persistent RAM ring) on arbitrary region contents.
//!
//! The checks are in `src/ring_recover.rs`, where the workspace's tests also run them
//! over the seeds (`tests/tests/fuzz_seeds.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blackbox_protocol_fuzz::ring_recover::run(data));
