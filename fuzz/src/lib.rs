//! The fuzz targets' checks, one module per target (`fuzz_targets/` only hands them libFuzzer's
//! inputs). The workspace's `tests/tests/fuzz_seeds.rs` includes these modules to run them over
//! the committed seeds and crash artifacts on stable, in CI.
pub mod chunk_decode;
pub mod ring_recover;
pub mod syslog_parse;
