//! The accept loop, the same for HTTPS with device certificates and for development plain HTTP:
//! a connection limit, the TLS handshake under a timeout, HTTP/1.1 with a header timeout (which
//! is also how long an idle keep-alive connection is kept), and a graceful drain.
//!
//! Over `max_connections` a new connection is closed at once, before any TLS work: the device
//! sees a failed upload and backs off, as it would after a 503. Answering 503 would need the
//! handshake first, which is the expensive part of a connection.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::{Metrics, Shed};
use crate::tls;

/// Accept-loop settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Time allowed from TCP accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to send a request's headers, counted from the connection's start or the
    /// end of the previous response: an idle keep-alive connection is closed after it.
    pub header_timeout: Duration,
    /// Time allowed for in-flight requests after shutdown begins.
    pub drain_timeout: Duration,
    /// Connections open at once; more are closed right after accept.
    pub max_connections: usize,
    /// Largest read buffer of a connection (hyper's; at least 8 KiB). Bounds what one
    /// connection holds beyond its body.
    pub max_buf: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_buf: 32 << 10,
        }
    }
}

/// Called once per connection after its handshake (the allowlist checks its file's metadata).
pub type OnConnect = Arc<dyn Fn() + Send + Sync>;

/// Serves `router` on `listener` (over TLS when `tls` is given, attaching each connection's
/// [`tls::PeerCert`] to its requests) until `shutdown` completes, then lets in-flight requests
/// finish, up to the drain timeout. Idle connections are closed at once when the drain begins.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    cfg: ServeConfig,
    on_connect: OnConnect,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.shed(Shed::Connections);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let on_connect = on_connect.clone();
        let metrics = metrics.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _open = metrics.connection();
            let Some(acceptor) = acceptor else {
                return serve_http(tcp, router, &cfg, watcher, addr).await;
            };
            let timeout = cfg.handshake_timeout;
            let tls = match tokio::time::timeout(timeout, tls::handshake(acceptor, tcp)).await {
                Ok(Ok(Some(s))) => s,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    if tls::is_certificate_error(&e) {
                        tracing::info!(%addr, error = %e, "client certificate refused in the handshake");
                    } else {
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let Some(peer) = tls::peer_cert(&tls, addr) else {
                return;
            };
            on_connect();
            let svc = router.map_request(move |mut req: axum::http::Request<_>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            serve_http(tls, svc, &cfg, watcher, addr).await;
        });
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "draining open connections");
    if tokio::time::timeout(cfg.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
    Ok(())
}

/// HTTP/1.1 on one connection until it closes (or the drain closes it).
async fn serve_http<I, S>(
    io: I,
    svc: S,
    cfg: &ServeConfig,
    watcher: Watcher,
    addr: std::net::SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_buf.max(8192))
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%addr, error = %e, "connection ended with an error");
    }
}
