//! The HTTP face: `POST /v1/chunks`, `GET /healthz`, load shedding in front; and the operator's
//! router ([`ops_app`]: `GET /metrics`, `GET /healthz`) for the `--metrics-listen` port.
//!
//! A body is one chunk or several back to back (a batch, laid out as in a segment): each is
//! checked, all must pass (else 400 naming the bad one, nothing stored), each is stored once,
//! and one answer covers them all.
//!
//! | answer | meaning |
//! |---|---|
//! | 201 | stored now (durably, in a segment); for a batch, at least one chunk was new |
//! | 200 | already stored (a retry recognised by its identity) |
//! | 400 | invalid chunk, with the reason |
//! | 401 / 403 | no device identity / device not allowed, or chunk claims another device |
//! | 408 | body not received in time (too slow: see [`ReceiveConfig::min_body_rate`]) |
//! | 413 | body over `--max-body` (the answer's `max_body` says the limit), or a chunk's declared inflated size over its limit |
//! | 503 + Retry-After | shed at once: over the in-flight limit or the body budget, no decoder free within 5 s, shutting down; or the store failing, or not writing the chunk's segment within `--commit-timeout` (10 s) |
//!
//! Over `--max-connections` a connection is closed right after accept, before TLS (see
//! [`crate::accept`]): under a flood that is where most shedding happens.
//!
//! ## What bounds memory
//!
//! A request goes through three gates, each refusing at once (503 + Retry-After,
//! `connection: close`) rather than queueing:
//! 1. **draining**: after SIGTERM every new request is refused;
//! 2. **in flight**: at most [`ReceiveConfig::max_inflight`] requests are being received and
//!    checked; the permit is given back when the chunk is handed to the committer, so a chunk
//!    waiting up to `segment_max_age` for its segment costs only its connection;
//! 3. **body budget**: before a byte of the body is read, its declared length (or `max_body` if
//!    it declares none) is reserved from [`ReceiveConfig::body_budget`]; the reservation travels
//!    with the bytes and is released when they are copied into the open segment.
//!
//! Decoding (inflate and check every line) runs on at most [`ReceiveConfig::decoders`] blocking
//! threads at once (one per CPU), each needing about twice the chunk's declared inflated size
//! (`max_decompressed`, 8 MiB); a request that cannot get a decoder within
//! [`ReceiveConfig::decode_wait`] is answered 503. The accept loop ([`crate::accept`]) bounds
//! connections (the cheapest place to shed: before the TLS handshake) and the time to send
//! headers; the body must arrive at [`ReceiveConfig::min_body_rate`] or better.
//!
//! With the defaults (1,024 connections, as many requests in flight, 32 MiB of bodies, 16 MiB
//! segments) `cargo xtask flood` measures a peak RSS of about 172 MiB with 10,000 devices on a
//! fresh receiver, each sending its backlog in one batch as the agent does (158 MiB with one
//! chunk a request); a full window of recent identities (a million, 16 bytes each) adds about
//! 52 MiB, which still leaves the receiver under 256 MiB.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use blackbox_protocol::{Chunk, DecodeError, DeviceId, Limits};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::allowlist::AllowlistFile;
use crate::devices::Registry;
use crate::metrics::{Metrics, Shed};
use crate::segment::{Accepted, CommitError, Committer, Outcome};
use crate::tls::PeerCert;

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Largest accepted request body.
    pub max_body: usize,
    /// Chunk decode limits (record count, message length, inflated size).
    pub limits: Limits,
    /// Requests being received and checked at once; more are answered 503 at once.
    pub max_inflight: usize,
    /// Bytes of request bodies held in memory at once (reserved by declared length before
    /// reading); a request that does not fit is answered 503 at once.
    pub body_budget: usize,
    /// Chunks decoded at once (each on a blocking thread).
    pub decoders: usize,
    /// Longest wait for a decoder; a request that waits longer is answered 503 (the CPUs
    /// cannot keep up, and the client would time out anyway).
    pub decode_wait: Duration,
    /// Seconds the client is told to wait after a 503.
    pub retry_after_secs: u32,
    /// Longest time allowed to receive a whole body.
    pub body_timeout: Duration,
    /// Slowest acceptable body rate, bytes per second: a body of N declared bytes must arrive
    /// within `body_grace + N / min_body_rate` (and `body_timeout`).
    pub min_body_rate: u32,
    /// Time allowed on top of the rate (connection hiccups, the first round trips).
    pub body_grace: Duration,
    /// Longest wait, once a request is checked, for its chunks' segment to be written: a store
    /// that hangs gets the device a 503 + Retry-After before its own timeout (the agent's is
    /// 30 s) instead of a request held open. The write goes on; if it stores a chunk, its
    /// retry is answered "duplicate".
    pub commit_wait: Duration,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        Self {
            max_body: 2 << 20,
            limits: Limits::DEFAULT,
            max_inflight: 1024,
            body_budget: 32 << 20,
            decoders: default_decoders(),
            decode_wait: Duration::from_secs(5),
            retry_after_secs: 5,
            body_timeout: Duration::from_secs(30),
            min_body_rate: 4096,
            body_grace: Duration::from_secs(5),
            commit_wait: Duration::from_secs(10),
        }
    }
}

/// One decoder per CPU: decoding is CPU-bound, more at once would only hold more memory.
pub fn default_decoders() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Shared state of the HTTP handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The group committer.
    pub committer: Committer,
    /// Settings.
    pub cfg: Arc<ReceiveConfig>,
    /// Counters (shared with the committer and the accept loop).
    pub metrics: Arc<Metrics>,
    inflight: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    decoders: Arc<Semaphore>,
    draining: Arc<AtomicBool>,
    auth: Auth,
}

/// How a request's device is known.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Development mode (`serve --insecure-http`, loopback only): the device the
    /// `x-blackbox-device` header names. Anybody who can connect can write as anybody.
    Header,
    /// The connection's verified client certificate, on the allowlist: the device id is the
    /// certificate's subject CN (and the allowlist line's name, when it has one).
    Certificate {
        /// The allowlist, re-read on change.
        allowlist: Arc<AllowlistFile>,
        /// Certificates seen: pending devices and who holds which device id.
        registry: Arc<Registry>,
    },
}

impl AppState {
    /// State over a running committer (counting into the committer's metrics).
    pub fn new(committer: Committer, cfg: ReceiveConfig) -> Self {
        Self {
            metrics: committer.metrics().clone(),
            committer,
            inflight: Arc::new(Semaphore::new(cfg.max_inflight)),
            budget: Arc::new(Semaphore::new(cfg.body_budget.min(Semaphore::MAX_PERMITS))),
            decoders: Arc::new(Semaphore::new(cfg.decoders.max(1))),
            cfg: Arc::new(cfg),
            draining: Arc::default(),
            auth: Auth::Header,
        }
    }

    /// The same state, deciding device identity with `auth`.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Shutdown has begun: from now on every new request is answered 503 (and `/healthz` too,
    /// so a load balancer stops sending traffic here). Requests already past the gate finish.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The metrics text, with the gauges read from the gates.
    pub fn render_metrics(&self) -> String {
        let used = |total: usize, sem: &Semaphore| total.saturating_sub(sem.available_permits());
        self.metrics.render(&[
            (
                "blackbox_requests_in_flight",
                "Requests being received and checked (limited by --max-inflight).",
                used(self.cfg.max_inflight, &self.inflight),
            ),
            (
                "blackbox_body_bytes_reserved",
                "Bytes of the body budget in use (limited by --body-budget).",
                used(
                    self.cfg.body_budget.min(Semaphore::MAX_PERMITS),
                    &self.budget,
                ),
            ),
            (
                "blackbox_decoders_busy",
                "Chunks being decoded (limited by --decoders).",
                used(self.cfg.decoders.max(1), &self.decoders),
            ),
        ])
    }
}

/// The router, without sockets: tests drive it with `tower::ServiceExt::oneshot`.
pub fn app(state: AppState) -> Router {
    let chunks = Router::new()
        .route("/v1/chunks", post(post_chunk))
        .layer(middleware::from_fn_with_state(state.clone(), shed))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/healthz", get(healthz))
        .merge(chunks)
        .layer(middleware::from_fn_with_state(state.metrics.clone(), count))
        .with_state(state)
}

/// The operator's router (`--metrics-listen`): `GET /metrics` (Prometheus text) and
/// `GET /healthz` (503 once shutdown has begun), without client certificates.
pub fn ops_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz(State(st): State<AppState>) -> Response {
    if st.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.render_metrics(),
    )
        .into_response()
}

/// Counts every answer of the device-facing router by status.
async fn count(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    m.request(resp.status().as_u16());
    resp
}

/// Everything a request can fail with, turned into a response in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The chunk failed the checked parse.
    #[error("invalid chunk: {0}")]
    Invalid(DecodeError),
    /// One chunk of a request carrying several failed the checked parse; none was stored.
    #[error("invalid chunk {index} of {count} in the request (none stored): {error}")]
    InvalidIn {
        /// Its place in the body, from 1.
        index: usize,
        /// Well-framed chunks in the body.
        count: usize,
        /// What was wrong.
        error: DecodeError,
    },
    /// The body is over `--max-body` (the limit goes into the answer as `max_body`, so a client
    /// sending several chunks in one request knows how much to send instead).
    #[error("too large: {0}")]
    TooLarge(String, usize),
    /// No usable device identity on the request.
    #[error("no device identity: {0}")]
    Unauthenticated(&'static str),
    /// A certificate that may not write (not on the allowlist, or its device id is taken).
    #[error("{0}")]
    NotAllowed(String),
    /// The chunk names a device other than the authenticated one.
    #[error("chunk is for device {claimed}, but this connection is device {actual}")]
    WrongDevice {
        /// Device named in the chunk.
        claimed: String,
        /// Authenticated device.
        actual: String,
    },
    /// The body did not arrive completely.
    #[error("body not received: {0}")]
    Body(String),
    /// The body did not arrive in time.
    #[error("body not received within {0:?}")]
    Timeout(Duration),
    /// Shed at once: retry later.
    #[error("{}, retry later", shed_reason(*.0))]
    Overloaded(Shed, u32),
    /// The store failed, or the committer is shutting down; nothing was acknowledged.
    #[error("{0}")]
    Commit(CommitError, u32),
}

fn shed_reason(s: Shed) -> &'static str {
    match s {
        Shed::Inflight => "overloaded (too many requests in flight)",
        Shed::Memory => "overloaded (body budget in use)",
        Shed::Decoders => "overloaded (no decoder free in time)",
        Shed::Draining | Shed::Connections => "shutting down",
        Shed::Store => "the store is slow (the chunk was not written in time)",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, retry) = match &self {
            Self::Invalid(DecodeError::LimitExceeded { .. })
            | Self::InvalidIn {
                error: DecodeError::LimitExceeded { .. },
                ..
            }
            | Self::TooLarge(..) => (StatusCode::PAYLOAD_TOO_LARGE, None),
            Self::Invalid(_) | Self::InvalidIn { .. } | Self::Body(_) => {
                (StatusCode::BAD_REQUEST, None)
            }
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, None),
            Self::WrongDevice { .. } | Self::NotAllowed(_) => (StatusCode::FORBIDDEN, None),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, None),
            Self::Overloaded(_, s) | Self::Commit(_, s) => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(*s))
            }
        };
        let body = match &self {
            Self::TooLarge(_, max) => {
                serde_json::json!({ "error": self.to_string(), "max_body": max })
            }
            // The store's error names its endpoint, bucket and keys: that stays in the
            // receiver's log ("segment write failed"), not in answers to devices.
            Self::Commit(CommitError::Store(_), _) => {
                serde_json::json!({ "error": "the store is unavailable, retry later" })
            }
            _ => serde_json::json!({ "error": self.to_string() }),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(s) = retry {
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
            // The client waits anyway: free its connection (and its place under
            // --max-connections) for a device that can be served now.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The in-flight permit of a request, which the handler gives back early (when the chunk is
/// handed to the committer).
#[derive(Clone, Debug)]
struct InflightSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl InflightSlot {
    fn release(&self) {
        if let Ok(mut p) = self.0.lock() {
            p.take();
        }
    }
}

/// Load shedding in front of the chunk route: draining, then a fixed number of permits; no
/// permit, no queue: 503 + Retry-After at once.
async fn shed(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let retry = st.cfg.retry_after_secs;
    let refuse = |why: Shed| {
        st.metrics.shed(why);
        ApiError::Overloaded(why, retry).into_response()
    };
    if st.is_draining() {
        return refuse(Shed::Draining);
    }
    match st.inflight.clone().try_acquire_owned() {
        Ok(permit) => {
            let slot = InflightSlot(Arc::new(Mutex::new(Some(permit))));
            req.extensions_mut().insert(slot.clone());
            let resp = next.run(req).await;
            slot.release();
            resp
        }
        Err(_) => refuse(Shed::Inflight),
    }
}

/// Header naming the device, in development mode only (`serve --insecure-http`).
pub const DEVICE_HEADER: &str = "x-blackbox-device";

/// **The one place** a request's device identity is decided.
///
/// With certificates: the certificate must be on the allowlist (checked on every request, so a
/// revocation applies to open connections too), carry a device id as its subject CN, match the
/// allowlist line's name if it has one, and not take a device id that another allowlisted
/// certificate holds. Headers, URL and body are never consulted. A refused certificate is
/// recorded, so `blackbox-server devices pending` lists it.
fn authenticate(
    auth: &Auth,
    headers: &HeaderMap,
    peer: Option<&PeerCert>,
) -> Result<DeviceId, ApiError> {
    let (allowlist, registry) = match auth {
        Auth::Header => {
            let v = headers.get(DEVICE_HEADER).ok_or(ApiError::Unauthenticated(
                "missing x-blackbox-device header",
            ))?;
            let s = v
                .to_str()
                .map_err(|_| ApiError::Unauthenticated("device header is not text"))?;
            return DeviceId::new(s)
                .map_err(|_| ApiError::Unauthenticated("device header is not a valid device id"));
        }
        Auth::Certificate {
            allowlist,
            registry,
        } => (allowlist, registry),
    };
    let peer = peer.ok_or(ApiError::Unauthenticated("no client certificate"))?;
    let fp = &peer.fingerprint;
    let cn = peer.common_name.as_deref();
    registry.seen(fp, cn, peer.addr);
    let list = allowlist.current();
    let refuse = |why: String| {
        tracing::info!(peer = %peer, "refused: {why}");
        Err(ApiError::NotAllowed(why))
    };
    let Some(entry) = list.get(fp) else {
        return refuse(format!(
            "device certificate {fp} (CN {}) is not on the allowlist; the operator lists it \
             with `blackbox-server devices pending` and allows it with \
             `blackbox-server devices allow {fp}`",
            cn.unwrap_or("-")
        ));
    };
    let Some(device) = cn.and_then(|c| DeviceId::new(c).ok()) else {
        return refuse(format!(
            "certificate {fp} has no subject CN usable as a device id (1-64 of [A-Za-z0-9._:-])"
        ));
    };
    if let Some(name) = &entry.name {
        if *name != device {
            return refuse(format!(
                "certificate {fp} is allowlisted as device {name}, but it names itself {device}"
            ));
        }
    } else if let Some(other) = list.named(&device) {
        return refuse(format!(
            "device id {device} is allowlisted for another certificate ({other})"
        ));
    }
    if let Some(other) = registry.holder_of(&device, fp, &list) {
        return refuse(format!(
            "device id {device} is already written by the allowlisted certificate {other}; \
             revoke that one first if this device has a new key"
        ));
    }
    Ok(device)
}

async fn post_chunk(
    State(st): State<AppState>,
    peer: Option<Extension<PeerCert>>,
    slot: Option<Extension<InflightSlot>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let device = authenticate(&st.auth, &headers, peer.as_ref().map(|p| &p.0))?;
    let max = st.cfg.max_body;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared
        && len > max as u64
    {
        return Err(ApiError::TooLarge(
            format!("body of {len} bytes, limit {max}"),
            max,
        ));
    }
    // Within max_body, so it fits in usize and u32 (max_body is at most a few MiB).
    let reserve = declared.map_or(max, |l| l as usize).max(1);
    let budget = u32::try_from(reserve)
        .ok()
        .and_then(|n| st.budget.clone().try_acquire_many_owned(n).ok())
        .ok_or_else(|| {
            st.metrics.shed(Shed::Memory);
            ApiError::Overloaded(Shed::Memory, st.cfg.retry_after_secs)
        })?;
    let bytes = read_body(body, declared, &st.cfg).await?;
    st.metrics.body_bytes(bytes.len());
    let members = {
        let _decoder = tokio::time::timeout(st.cfg.decode_wait, st.decoders.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                st.metrics.shed(Shed::Decoders);
                ApiError::Overloaded(Shed::Decoders, st.cfg.retry_after_secs)
            })?;
        let limits = st.cfg.limits;
        let b2 = bytes.clone();
        // Only the summaries leave the blocking thread: the decoded records are freed there.
        tokio::task::spawn_blocking(move || decode_body(&b2, &limits))
            .await
            .map_err(|e| ApiError::Body(format!("decoder failed: {e}")))??
    };
    if let Some(m) = members.iter().find(|m| m.accepted.id.device != device) {
        return Err(ApiError::WrongDevice {
            claimed: m.accepted.id.device.to_string(),
            actual: device.to_string(),
        });
    }
    let retry = st.cfg.retry_after_secs;
    let commit_by = tokio::time::Instant::now() + st.cfg.commit_wait;
    let too_slow = || {
        st.metrics.shed(Shed::Store);
        ApiError::Overloaded(Shed::Store, retry)
    };
    let single = members.len() == 1;
    let mut budget = Some(budget);
    let mut waiting = Vec::with_capacity(members.len());
    let count = members.len();
    for (k, m) in members.into_iter().enumerate() {
        // Each chunk carries its share of the reservation into the segment; the last the rest.
        let share = if k + 1 == count {
            budget.take()
        } else {
            budget.as_mut().and_then(|b| b.split(m.range.len()))
        };
        let id = m.accepted.id.to_string();
        let records = m.accepted.records;
        let enqueued = st
            .committer
            .enqueue(m.accepted, bytes.slice(m.range), share);
        let pending = tokio::time::timeout_at(commit_by, enqueued)
            .await
            .map_err(|_| too_slow())?
            .map_err(|e| ApiError::Commit(e, retry))?;
        waiting.push((id, records, pending));
    }
    // Received and checked: the chunks now only wait for their segment.
    if let Some(Extension(slot)) = slot {
        slot.release();
    }
    let _waiting = st.metrics.awaiting_commit();
    let mut answers = Vec::with_capacity(waiting.len());
    let mut stored = false;
    for (id, records, pending) in waiting {
        let outcome = tokio::time::timeout_at(commit_by, pending.outcome())
            .await
            .map_err(|_| too_slow())?;
        answers.push(match outcome {
            Ok(Outcome::Stored { segment }) => {
                stored = true;
                serde_json::json!({"status": "stored", "chunk": id, "records": records, "segment": segment})
            }
            Ok(Outcome::Duplicate) => serde_json::json!({"status": "duplicate", "chunk": id}),
            Err(e) => return Err(ApiError::Commit(e, retry)),
        });
    }
    let status = if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = match answers.pop() {
        Some(one) if single => one,
        last => {
            answers.extend(last);
            let word = if stored { "stored" } else { "duplicate" };
            serde_json::json!({"status": word, "chunks": answers})
        }
    };
    Ok((status, axum::Json(body)).into_response())
}

/// One chunk of a request body.
struct Member {
    /// Where it lies in the body.
    range: std::ops::Range<usize>,
    /// What it holds.
    accepted: Accepted,
}

/// The chunks of a body: one, or several back to back (an agent sends its backlog in batches,
/// laid out as in a segment). Every chunk gets the full checked parse; one bad chunk refuses
/// the whole request, naming it, so the client can find it by sending one at a time.
fn decode_body(bytes: &[u8], limits: &Limits) -> Result<Vec<Member>, ApiError> {
    let mut members = Vec::new();
    let mut walked = 0;
    let mut failed = None;
    let mut walk = blackbox_protocol::chunk::walk_members(bytes).enumerate();
    for (k, m) in walk.by_ref() {
        walked = k + 1;
        match m {
            Ok((at, header)) => {
                let range = usize::try_from(at)
                    .ok()
                    .zip(usize::try_from(header.member_len()).ok())
                    .and_then(|(at, len)| Some(at..at.checked_add(len)?));
                let Some(range) = range else {
                    failed = Some((k, DecodeError::Truncated { what: "member" }));
                    break;
                };
                match bytes.get(range.clone()).map(|b| Chunk::decode(b, limits)) {
                    Some(Ok(c)) => members.push(Member {
                        range,
                        accepted: Accepted::of(&c),
                    }),
                    Some(Err(e)) => {
                        failed = Some((k, e));
                        // Count the well-framed chunks behind it, for the message.
                        walked += walk.by_ref().take_while(|(_, m)| m.is_ok()).count();
                        break;
                    }
                    None => {
                        failed = Some((k, DecodeError::Truncated { what: "member" }));
                        break;
                    }
                }
            }
            Err(e) => {
                failed = Some((k, e));
                break;
            }
        }
    }
    match failed {
        // The first (perhaps only) chunk: the error as for a single chunk.
        Some((0, error)) => Err(ApiError::Invalid(error)),
        None if members.is_empty() => Err(ApiError::Invalid(DecodeError::Truncated {
            what: "chunk header",
        })),
        Some((k, error)) => Err(ApiError::InvalidIn {
            index: k + 1,
            count: walked.max(k + 1),
            error,
        }),
        None => Ok(members),
    }
}

/// Reads a body of at most `max_body` bytes into one buffer, in time: the deadline is
/// `body_grace + declared / min_body_rate`, capped at `body_timeout` (a body of unknown length
/// gets `body_timeout`). A client trickling bytes (slowloris) is cut off at the deadline.
async fn read_body(
    mut body: Body,
    declared: Option<u64>,
    cfg: &ReceiveConfig,
) -> Result<bytes::Bytes, ApiError> {
    let max = cfg.max_body;
    let allowed = match declared {
        Some(len) => {
            let rate = f64::from(cfg.min_body_rate.max(1));
            (cfg.body_grace + Duration::from_secs_f64(len as f64 / rate)).min(cfg.body_timeout)
        }
        None => cfg.body_timeout,
    };
    let deadline = Instant::now() + allowed;
    let mut buf = Vec::with_capacity(declared.map_or(0, |l| l as usize).min(max));
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| ApiError::Timeout(allowed))?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ApiError::Body(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(ApiError::TooLarge(
                    format!("body over the limit of {max} bytes"),
                    max,
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(bytes::Bytes::from(buf))
}
