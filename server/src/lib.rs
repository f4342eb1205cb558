//! # blackbox-server: receive, store, and (later) grind, index and grep
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
#![forbid(unsafe_code)]

pub mod accept;
pub mod allowlist;
pub mod devices;
pub mod metrics;
pub mod receive;
pub mod segment;
pub mod store;
pub mod tls;

pub use metrics::Metrics;
pub use receive::{AppState, Auth, ReceiveConfig, app, ops_app};
pub use segment::{Committer, SegmentConfig};
pub use store::Store;
