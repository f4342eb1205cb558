//! End-to-end test harness: real `blackbox-server` and `blackbox-agent` processes on loopback,
//! a kmsg-format file as the log source, and readers that count what reached the store.
#![allow(missing_docs, clippy::unwrap_used)]

pub mod downstream;
pub mod flood;
pub mod harness;
pub mod nginx;
pub mod procstat;
pub mod s3;
pub mod scenario;
pub mod tlsclient;
