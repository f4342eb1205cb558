//! The HTTP face: `POST /v1/chunks`, `GET /healthz`, load shedding in front.
//!
//! | answer | meaning |
//! |---|---|
//! | 201 | stored now (durably, in a segment) |
//! | 200 | already stored (a retry recognised by its identity) |
//! | 400 | invalid chunk, with the reason |
//! | 401 / 403 | no device identity / device not allowed, or chunk claims another device |
//! | 408 | body not received in time |
//! | 413 | body or declared inflated size over the limit |
//! | 503 + Retry-After | over the concurrency limit (shed at once, never queued) or store failing |
use std::sync::Arc;
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
use tokio::sync::Semaphore;

use crate::allowlist::AllowlistFile;
use crate::devices::Registry;
use crate::segment::{CommitError, Committer, Outcome};
use crate::tls::PeerCert;

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Largest accepted request body.
    pub max_body: usize,
    /// Chunk decode limits (record count, message length, inflated size).
    pub limits: Limits,
    /// Requests handled at once; more are answered 503 at once.
    pub max_inflight: usize,
    /// Seconds the client is told to wait after a 503.
    pub retry_after_secs: u32,
    /// Time allowed to receive a whole body.
    pub body_timeout: Duration,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        Self {
            max_body: 2 << 20,
            limits: Limits::DEFAULT,
            max_inflight: 1024,
            retry_after_secs: 5,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The group committer.
    pub committer: Committer,
    /// Settings.
    pub cfg: Arc<ReceiveConfig>,
    inflight: Arc<Semaphore>,
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
    /// State over a running committer.
    pub fn new(committer: Committer, cfg: ReceiveConfig) -> Self {
        let inflight = Arc::new(Semaphore::new(cfg.max_inflight));
        Self {
            committer,
            cfg: Arc::new(cfg),
            inflight,
            auth: Auth::Header,
        }
    }

    /// The same state, deciding device identity with `auth`.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }
}

/// The router, without sockets: tests drive it with `tower::ServiceExt::oneshot`.
pub fn app(state: AppState) -> Router {
    let chunks = Router::new()
        .route("/v1/chunks", post(post_chunk))
        .layer(middleware::from_fn_with_state(state.clone(), shed))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(chunks)
        .with_state(state)
}

/// Everything a request can fail with, turned into a response in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The chunk failed the checked parse.
    #[error("invalid chunk: {0}")]
    Invalid(DecodeError),
    /// Over a size limit.
    #[error("too large: {0}")]
    TooLarge(String),
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
    /// Overloaded: shed.
    #[error("overloaded, retry later")]
    Overloaded(u32),
    /// The store failed; nothing was acknowledged.
    #[error("{0}")]
    Commit(CommitError, u32),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, retry) = match &self {
            Self::Invalid(DecodeError::LimitExceeded { .. }) | Self::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, None)
            }
            Self::Invalid(_) | Self::Body(_) => (StatusCode::BAD_REQUEST, None),
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, None),
            Self::WrongDevice { .. } | Self::NotAllowed(_) => (StatusCode::FORBIDDEN, None),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, None),
            Self::Overloaded(s) | Self::Commit(_, s) => (StatusCode::SERVICE_UNAVAILABLE, Some(*s)),
        };
        let body = serde_json::json!({ "error": self.to_string() });
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(s) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// Load shedding: a fixed number of permits; no permit, no queue: 503 + Retry-After at once.
async fn shed(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match st.inflight.clone().try_acquire_owned() {
        Ok(permit) => {
            let resp = next.run(req).await;
            drop(permit);
            resp
        }
        Err(_) => ApiError::Overloaded(st.cfg.retry_after_secs).into_response(),
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
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let device = authenticate(&st.auth, &headers, peer.as_ref().map(|p| &p.0))?;
    let max = st.cfg.max_body;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(ApiError::TooLarge(format!(
                "body of {len} bytes, limit {max}"
            )));
        }
    }
    let limited = http_body_util::Limited::new(body, max);
    let collected = tokio::time::timeout(st.cfg.body_timeout, limited.collect())
        .await
        .map_err(|_| ApiError::Timeout(st.cfg.body_timeout))?;
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::TooLarge(format!(
                "body over the limit of {max} bytes"
            )));
        }
        Err(e) => return Err(ApiError::Body(e.to_string())),
    };
    let limits = st.cfg.limits;
    let b2 = bytes.clone();
    let chunk = tokio::task::spawn_blocking(move || Chunk::decode(&b2, &limits))
        .await
        .map_err(|e| ApiError::Body(format!("decoder failed: {e}")))?
        .map_err(ApiError::Invalid)?;
    if chunk.id.device != device {
        return Err(ApiError::WrongDevice {
            claimed: chunk.id.device.to_string(),
            actual: device.to_string(),
        });
    }
    let id = chunk.id.to_string();
    let records = chunk.records.len();
    match st.committer.submit(chunk, bytes).await {
        Ok(Outcome::Stored { segment }) => Ok((
            StatusCode::CREATED,
            axum::Json(serde_json::json!({"status": "stored", "chunk": id, "records": records, "segment": segment})),
        )
            .into_response()),
        Ok(Outcome::Duplicate) => {
            Ok((StatusCode::OK, axum::Json(serde_json::json!({"status": "duplicate", "chunk": id}))).into_response())
        }
        Err(e) => Err(ApiError::Commit(e, st.cfg.retry_after_secs)),
    }
}
