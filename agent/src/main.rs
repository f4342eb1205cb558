//! `blackbox-agent`: the device side of blackbox.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use blackbox_agent::linux::{self, RunConfig, spool::SpoolConfig};
use blackbox_protocol::{BootId, DeviceId};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blackbox-agent",
    version,
    about = "Keeps the device's log stream safe and uploads it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read the log stream, spool it, upload it.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// State directory (spool and cursor).
    #[arg(long, default_value = "/var/lib/blackbox")]
    state_dir: PathBuf,
    /// The log stream: /dev/kmsg, or a file/FIFO in kmsg format.
    #[arg(long, default_value = "/dev/kmsg")]
    kmsg: PathBuf,
    /// Seconds between uploads.
    #[arg(long, default_value_t = 60.0)]
    interval: f64,
    /// Random spread around the interval, in seconds (default: a twelfth of the interval).
    #[arg(long)]
    jitter: Option<f64>,
    /// Device id (default: the host name).
    #[arg(long)]
    device_id: Option<String>,
    /// Boot id (default: /proc/sys/kernel/random/boot_id).
    #[arg(long)]
    boot_id: Option<String>,
    /// A file whose existence means the clock is NTP-synchronised.
    #[arg(long, default_value = "/run/systemd/timesync/synchronized")]
    synced_flag: PathBuf,
    /// Largest inflated chunk, bytes.
    #[arg(long, default_value_t = 256 << 10)]
    chunk_max_bytes: usize,
    /// Spool cap in bytes; past it, chunks from the middle of an outage are dropped (with a
    /// gap record saying exactly what was lost).
    #[arg(long, default_value_t = 16 << 20)]
    spool_max_bytes: u64,
    /// Deflate level 0-10.
    #[arg(long, default_value_t = 6)]
    level: u8,
    /// Request timeout, seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => {
            let device = match a.device_id {
                Some(d) => DeviceId::new(&d).map_err(|e| anyhow::anyhow!("--device-id: {e}"))?,
                None => linux::default_device_id(),
            };
            let boot = match a.boot_id {
                Some(b) => BootId::parse(&b).context("--boot-id is not a UUID")?,
                None => linux::boot_id()?,
            };
            let interval = secs(a.interval, "interval")?;
            linux::run(RunConfig {
                server: a.server,
                state_dir: a.state_dir,
                kmsg: a.kmsg,
                interval,
                jitter: a.jitter.map_or(Ok(interval / 12), |j| secs(j, "jitter"))?,
                device,
                boot,
                synced_flag: a.synced_flag,
                spool: SpoolConfig {
                    chunk_max_bytes: a.chunk_max_bytes,
                    max_bytes: a.spool_max_bytes,
                    level: a.level,
                    ..SpoolConfig::default()
                },
                timeout: secs(a.timeout, "timeout")?,
            })
        }
    }
}
