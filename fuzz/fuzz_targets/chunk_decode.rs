//! `Chunk::decode` on arbitrary bytes.
//!
//! The checks are in `src/chunk_decode.rs`, where the workspace's tests also run them
//! over the seeds (`tests/tests/fuzz_seeds.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blackbox_protocol_fuzz::chunk_decode::run(data));
