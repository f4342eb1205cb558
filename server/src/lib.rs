//! # blackbox-server: receive, store, grind, narrative, grep, compact
//!
//! The receiving path, left to right:
//!
//! - [`accept`]: the accept loop (HTTPS with device certificates, or plain HTTP in development):
//!   a connection limit, the handshake and header timeouts, the graceful drain on SIGTERM.
//! - [`receive`]: the axum router. Load shedding first (draining, a fixed number of in-flight
//!   requests, a byte budget for bodies; over any, 503 + Retry-After at once), then the device
//!   identity (from the verified client certificate, [`tls`], checked against the [`allowlist`]
//!   and the [`devices`] seen), the body read with a size limit and a minimum rate, and
//!   [`blackbox_protocol::Chunk::decode`], the one checked parse. Its module doc lists what
//!   bounds the receiver's memory.
//! - [`segment`]: group commit. Valid chunks go to one committer task that appends them to the
//!   open segment and writes it as one object at 16 MiB or 1 s, then its index object, and only
//!   then acknowledges every chunk in it. It also recognises retries by chunk identity.
//! - [`store`]: the object store from a URL (`file://` default, `s3://`, `memory://`).
//! - [`metrics`]: the counters behind `GET /metrics` (Prometheus text) on the operator's port.
//!
//! Guarantee: a 2xx answer means the chunk is durably in the store. Anything else means it may
//! not be, and the agent keeps it and retries.
//!
//! Downstream (best effort, restartable; `server/DOWNSTREAM.md` for layouts and formats), all on
//! one reader layer:
//!
//! - [`reader`]: which objects hold a time range's lines (ingest hours, compaction manifests),
//!   which chunks to fetch (the index objects, ranged GETs), checked decoding that names
//!   damaged objects and goes on; [`scan`] reads a record line's fields without a JSON parser;
//!   [`dedup`] drops records seen before by (device, boot, sequence number); [`timespec`]
//!   parses `--since`/`--until`.
//! - [`narrative`]: some devices' exact lines in a range, merged by wall time.
//! - [`grep`]: time-bounded, device-filtered, parallel search with ordered output.
//! - [`grind`] with [`rules`] and [`reducer`]: regex rules (behind a literal prefilter, the
//!   private `prefilter` module) turn new lines into events objects, exactly once across
//!   restarts (checkpoint object), counted for Prometheus.
//! - [`compact`]: an hour's segments into one object per device, then a day's hours into one
//!   object per device for the day (`--auto` for cron), switched by manifests, streaming.
#![forbid(unsafe_code)]

pub mod accept;
pub mod allowlist;
pub mod compact;
pub mod dedup;
pub mod devices;
pub mod grep;
pub mod grind;
pub mod lease;
pub mod metrics;
pub mod narrative;
mod prefilter;
pub mod reader;
pub mod receive;
pub mod reducer;
pub mod rules;
pub mod scan;
pub mod segment;
pub mod store;
pub mod timespec;
pub mod tls;

pub use metrics::Metrics;
pub use receive::{AppState, Auth, ReceiveConfig, app, ops_app};
pub use segment::{Committer, SegmentConfig};
pub use store::Store;
