//! What a program sends to `/dev/log`, through the agent's syslog path up to the kmsg records.
//!
//! The checks are in `src/syslog_parse.rs`, where the workspace's tests also run them
//! over the seeds (`tests/tests/fuzz_seeds.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blackbox_protocol_fuzz::syslog_parse::run(data));
