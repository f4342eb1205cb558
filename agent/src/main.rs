//! `blackbox-agent`: the device side of blackbox.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use blackbox_agent::linux::{self, RunConfig, sys::RingSpec};
use blackbox_agent::ring::RingConfig;
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
    /// Read the log stream, keep it in the persistent ring, upload it.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// State directory (rejected chunks, the default file ring).
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
    /// Where the ring lives: `mem:ADDRESS:SIZE` (reserved physical memory through /dev/mem,
    /// e.g. mem:0x1e000000:1M) or `file:PATH:SIZE` (default: file:STATE_DIR/ring:16M).
    #[arg(long)]
    ring: Option<RingSpec>,
    /// Percent of the ring kept from the start of an outage when it overflows (the rest keeps
    /// the newest records; a gap record counts exactly what was dropped in between).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    keep_oldest: u8,
    /// Block size of a newly formatted ring, bytes (one block is one chunk; default: the ring
    /// size / 256, at least 4 KiB).
    #[arg(long)]
    block_size: Option<u32>,
    /// Where pstore is mounted.
    #[arg(long, default_value = "/sys/fs/pstore")]
    pstore_dir: PathBuf,
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
            let ring = a.ring.unwrap_or_else(|| RingSpec::File {
                path: a.state_dir.join("ring"),
                len: 16 << 20,
            });
            linux::run(RunConfig {
                server: a.server,
                ring,
                ring_cfg: RingConfig {
                    keep_oldest_pct: a.keep_oldest,
                    block_size: a.block_size,
                },
                pstore_dir: a.pstore_dir,
                level: a.level,
                state_dir: a.state_dir,
                kmsg: a.kmsg,
                interval,
                jitter: a.jitter.map_or(Ok(interval / 12), |j| secs(j, "jitter"))?,
                device,
                boot,
                synced_flag: a.synced_flag,
                timeout: secs(a.timeout, "timeout")?,
            })
        }
    }
}
