//! `blackbox-server`: the receiver (and later the downstream tools) as subcommands.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use blackbox_server::{AppState, Committer, ReceiveConfig, SegmentConfig, Store, app};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blackbox-server",
    version,
    about = "Receives device logs and stores them in object storage"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive chunks over HTTP and group-commit them into segments.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Store URL: file:///path, s3://bucket/prefix (AWS_* variables) or memory://.
    #[arg(long, default_value = "./blackbox-data")]
    store: String,
    /// This receiver's name, part of every object key.
    #[arg(long, default_value = "r0")]
    receiver_id: String,
    /// Requests handled at once; more are answered 503 + Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    max_body: usize,
    /// Largest inflated chunk in bytes (decompression-bomb guard).
    #[arg(long, default_value_t = 8 << 20)]
    max_decompressed: u32,
    /// Seconds a shed client is told to wait.
    #[arg(long, default_value_t = 5)]
    retry_after: u32,
    /// Write a segment once it holds this many bytes.
    #[arg(long, default_value_t = 16 << 20)]
    segment_max_bytes: usize,
    /// Write a segment once its first chunk is this many milliseconds old.
    #[arg(long, default_value_t = 1000)]
    segment_max_age_ms: u64,
    /// Hours of index objects read back at start-up to recognise retries.
    #[arg(long, default_value_t = 2)]
    recover_hours: u32,
    /// Test hook: abort at a named point of the commit (after-segment-put, after-index-put).
    #[arg(long, hide = true)]
    fault: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve(a) => rt.block_on(serve(a)),
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let store = Store::open(&a.store)?;
    let seg_cfg = SegmentConfig {
        receiver: a.receiver_id,
        max_bytes: a.segment_max_bytes,
        max_age: Duration::from_millis(a.segment_max_age_ms),
        recover_hours: a.recover_hours,
        fault: a.fault,
        ..SegmentConfig::default()
    };
    let (committer, task) = Committer::start(store.clone(), seg_cfg)
        .await
        .context("recovering from the store")?;
    let limits = blackbox_protocol::Limits {
        max_decompressed: a.max_decompressed,
        ..Default::default()
    };
    let rcfg = ReceiveConfig {
        max_body: a.max_body,
        max_inflight: a.max_inflight,
        retry_after_secs: a.retry_after,
        limits,
        ..ReceiveConfig::default()
    };
    let router = app(AppState::new(committer, rcfg));
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    tracing::info!(listen = %listener.local_addr()?, store = store.url(), "blackbox-server receiving");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // The router (and its committer handles) are dropped: the committer writes the last segment.
    task.await?;
    tracing::info!("stopped; last segment written");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight uploads");
}
