//! # blackbox-agent: one ordered log stream, kept safe, uploaded
//!
//! The core (no `std`, only `alloc`) is pure logic a test can drive with fake clocks:
//! - [`kmsg`]: the `/dev/kmsg` record format (`prio,seq,usec,flags;text`, `\xNN` escapes).
//! - [`schedule`]: when to upload (interval ± jitter, backoff capped at the interval).
//! - [`ring`]: the persistent ring (no allocation at all): records in reserved memory that
//!   survive a panic and a warm reboot, CRC-checked recovery after torn writes, one sealed block
//!   per chunk, drop-from-the-middle with exact gap accounting when an outage outlasts it.
//! - [`buffer`]: the [`buffer::LogBuffer`] trait between reading and uploading: records are
//!   sealed into chunks with a fixed identity and leave only on the server's acknowledgement.
//! - [`pstore`]: parsing pstore/ramoops dumps (the panic itself, after the reboot).
//! - [`logline`]: an app's output cut into lines and formatted as `/dev/kmsg` writes.
//! - [`bucket`]: per-app rate limiting (burst and daily token buckets, counted drops).
//! - [`syslog`]: parsing one syslog message from `/dev/log` (RFC 3164, RFC 5424).
//!
//! The Linux layer (`linux`, behind the `std` feature) maps the ring (`linux::sys`, the only
//! `unsafe` code), reads kmsg, settles what the previous boot left (ring, PRINTK_PERSIST replay,
//! pstore), keeps the device's identity (`linux::identity`: a key pair and a self-signed
//! certificate whose CN is the device id), uploads over HTTPS with that certificate (mutual
//! TLS, `linux::upload`), and runs the loop. It also feeds the stream: `linux::logos` writes an
//! app's output into `/dev/kmsg`, `linux::syslogd` what programs send to `/dev/log`, both
//! through per-app token buckets.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

extern crate alloc;

pub mod bucket;
pub mod buffer;
pub mod kmsg;
pub mod logline;
pub mod pstore;
pub mod ring;
pub mod schedule;
pub mod syslog;

#[cfg(all(feature = "std", target_os = "linux"))]
pub mod linux;
