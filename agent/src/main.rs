//! `blackbox-agent`: the device side of blackbox.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use blackbox_agent::linux::config::Config;
use blackbox_agent::linux::identity::{self, Identity, Obtained};
use blackbox_agent::linux::syslogd::{self, SocketSpec};
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
    Run(Box<RunArgs>),
    /// Print this device's allowlist line (`<fingerprint>  <device id>`), making the identity
    /// (key and self-signed certificate in STATE_DIR/identity) if there is none yet.
    Identity(IdentityArgs),
    /// Run CMD (or read stdin) and write each line of its output into the kernel log as
    /// `NAME[PID]: line`, rate-limited per app; exits with CMD's exit status.
    Logos(LogosArgs),
    /// Listen for syslog messages (what `run` does besides its main work) and write them into
    /// the kernel log, rate-limited per tag; until killed.
    Syslog(SyslogArgs),
}

#[derive(clap::Args)]
struct SyslogArgs {
    /// Socket to listen on: PATH or dgram:PATH (datagram), stream:PATH; repeatable.
    #[arg(long = "socket", default_value = "/dev/log")]
    sockets: Vec<SocketSpec>,
    /// Where the messages go: /dev/kmsg, or a file or FIFO standing in for it.
    #[arg(long, default_value = "/dev/kmsg")]
    kmsg: PathBuf,
    /// The agent's configuration (per-tag limits) [default: /etc/blackbox/agent.toml, if present].
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LogosArgs {
    /// The app's name in the log (and in the configuration's [logos.app.NAME]).
    name: String,
    /// Where the lines go: /dev/kmsg, or a file or FIFO standing in for it.
    #[arg(long, default_value = "/dev/kmsg")]
    kmsg: PathBuf,
    /// The agent's configuration (per-app limits) [default: /etc/blackbox/agent.toml, if present].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The command and its arguments (after `--`); without one, stdin is read.
    #[arg(last = true)]
    cmd: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct IdentityArgs {
    /// State directory (the identity is in STATE_DIR/identity).
    #[arg(long, default_value = "/var/lib/blackbox")]
    state_dir: PathBuf,
    /// Device id for a new identity (default: the host name); an existing identity must have
    /// this id.
    #[arg(long)]
    device_id: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The agent's configuration: its [run] table gives defaults for the flags below, its
    /// [logos] tables the per-tag syslog limits [default: /etc/blackbox/agent.toml, if present].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Server base URL: https://HOST[:PORT] (mutual TLS with the device identity), or
    /// http://127.0.0.1:PORT for development (the server must run with --insecure-http).
    /// Required here or as [run] server.
    #[arg(long)]
    server: Option<String>,
    /// PEM file with the CA certificate(s) the server's certificate must chain to (default:
    /// the built-in web PKI roots). https:// only.
    #[arg(long)]
    server_ca: Option<PathBuf>,
    /// State directory (device identity, rejected chunks, the default file ring).
    /// [default: /var/lib/blackbox]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The log stream: /dev/kmsg, or a file/FIFO in kmsg format.
    #[arg(long, default_value = "/dev/kmsg")]
    kmsg: PathBuf,
    /// Seconds between uploads [default: 60].
    #[arg(long)]
    interval: Option<f64>,
    /// Random spread around the interval, in seconds (default: a twelfth of the interval).
    #[arg(long)]
    jitter: Option<f64>,
    /// Device id (default: the host name). With https:// the device id is the identity's:
    /// this names a new identity, or must match the existing one.
    #[arg(long)]
    device_id: Option<String>,
    /// Boot id (default: /proc/sys/kernel/random/boot_id).
    #[arg(long)]
    boot_id: Option<String>,
    /// A file whose existence means the clock is NTP-synchronised
    /// [default: /run/systemd/timesync/synchronized].
    #[arg(long)]
    synced_flag: Option<PathBuf>,
    /// Where the ring lives: `mem:ADDRESS:SIZE` (reserved physical memory through /dev/mem,
    /// e.g. mem:0x1e000000:1M) or `file:PATH:SIZE` (default: the --board's region, else
    /// file:STATE_DIR/ring:16M).
    #[arg(long)]
    ring: Option<RingSpec>,
    /// The board (see board-support/): its reserved region holds the ring. One of
    /// qemu-x86_64, qemu-aarch64-virt, qemu-armv7-virt, qemu-mipsel-malta.
    #[arg(long)]
    board: Option<String>,
    /// Syslog socket to listen on: PATH or dgram:PATH (datagram, what syslog(3) and busybox
    /// logger use), stream:PATH; repeatable; `none` for no listener. Default: /dev/log when
    /// --kmsg is /dev/kmsg, else none.
    #[arg(long = "syslog-socket")]
    syslog_sockets: Vec<String>,
    /// Where syslog messages are written: /dev/kmsg, or a stand-in file or FIFO.
    #[arg(long, default_value = "/dev/kmsg")]
    syslog_kmsg: PathBuf,
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

fn parse_board(name: &str) -> Result<&'static blackbox_board::Board, String> {
    blackbox_board::board(name).ok_or_else(|| {
        let known: Vec<&str> = blackbox_board::BOARDS.iter().map(|b| b.name).collect();
        format!("unknown board {name:?}; known boards: {}", known.join(", "))
    })
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

fn device_arg(d: Option<&str>) -> anyhow::Result<Option<DeviceId>> {
    d.map(|d| DeviceId::new(d).map_err(|e| anyhow::anyhow!("--device-id {d:?}: {e}")))
        .transpose()
}

/// The configuration at `path`, or the default file's if it exists.
fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p, true),
        None => Config::load(std::path::Path::new(linux::config::DEFAULT_PATH), false),
    }
}

/// The syslog sockets: the flags, else the configuration's, else /dev/log for the real kmsg.
/// The second value says whether they were asked for (flags or configuration) rather than
/// the default: only then is a socket that cannot be had an error that stops the agent.
fn syslog_sockets(
    flags: &[String],
    config: Option<&[String]>,
    kmsg: &std::path::Path,
) -> anyhow::Result<(Vec<SocketSpec>, bool)> {
    let default = [syslogd::DEFAULT_SOCKET.to_owned()];
    let (specs, asked): (&[String], bool) = if !flags.is_empty() {
        (flags, true)
    } else if let Some(c) = config {
        (c, true)
    } else if kmsg == std::path::Path::new("/dev/kmsg") {
        (&default, false)
    } else {
        (&[], false)
    };
    let specs = specs
        .iter()
        .filter(|s| s.as_str() != "none")
        .map(|s| {
            s.parse()
                .map_err(|e: String| anyhow::anyhow!("--syslog-socket {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((specs, asked))
}

/// Blocks until SIGTERM or SIGINT arrives.
fn wait_for_termination() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing the SIGTERM handler")?;
    signals.forever().next();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Syslog(a) => {
            let cfg = load_config(a.config.as_deref())?;
            let l = syslogd::listen(&a.sockets, &a.kmsg, cfg)?;
            let socks: Vec<String> = a.sockets.iter().map(|s| s.to_string()).collect();
            eprintln!(
                "blackbox-agent: syslog: listening on {}, writing to {}",
                socks.join(", "),
                a.kmsg.display()
            );
            // The listener's threads do the work; this one waits for SIGTERM or SIGINT and
            // reports drops not reported yet before leaving.
            wait_for_termination()?;
            l.sink
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .finish()
                .context("writing the last drop reports")?;
            Ok(())
        }
        Cmd::Logos(a) => {
            let cfg = load_config(a.config.as_deref())?;
            let code = linux::logos::run(&a.name, &a.kmsg, cfg.limits_for(&a.name), &a.cmd)
                .with_context(|| format!("logos {}", a.name))?;
            std::process::exit(code);
        }
        Cmd::Identity(a) => {
            let wanted = device_arg(a.device_id.as_deref())?;
            let (id, obtained) = Identity::load_or_create(&a.state_dir, wanted.as_ref())?;
            let files = format!(
                "{} ({}, {}, {})",
                id.dir.display(),
                identity::DEVICE_FILE,
                identity::KEY_FILE,
                identity::CERT_FILE
            );
            match obtained {
                Obtained::Created => eprintln!(
                    "blackbox-agent: created a new identity for device {} in {files}; add the \
                     line below to the server's allowlist",
                    id.device
                ),
                Obtained::NewCertificate => eprintln!(
                    "blackbox-agent: made a new certificate for the existing key of device {} \
                     in {files}; add the line below to the server's allowlist",
                    id.device
                ),
                Obtained::Loaded => eprintln!(
                    "blackbox-agent: the identity of device {} already existed in {files}",
                    id.device
                ),
            }
            println!("{}", id.allowlist_line());
            Ok(())
        }
        Cmd::Run(a) => {
            let a = *a;
            let config = load_config(a.config.as_deref())?;
            let r = &config.run;
            let server = a.server.or_else(|| r.server.clone()).context(
                "no server: give --server URL, or set `server` in the [run] table of the \
                 configuration",
            )?;
            let state_dir = a
                .state_dir
                .or_else(|| r.state_dir.clone())
                .unwrap_or_else(|| "/var/lib/blackbox".into());
            let server_ca = a.server_ca.or_else(|| r.server_ca.clone());
            let board = a
                .board
                .or_else(|| r.board.clone())
                .map(|b| parse_board(&b).map_err(anyhow::Error::msg))
                .transpose()?;
            let device_id = a.device_id.or_else(|| r.device_id.clone());
            let (syslog, syslog_required) =
                syslog_sockets(&a.syslog_sockets, r.syslog.as_deref(), &a.kmsg)?;
            let wanted = device_arg(device_id.as_deref())?;
            let (device, link) = linux::link_for(&server, &state_dir, wanted.as_ref(), server_ca)?;
            let boot = match a.boot_id {
                Some(b) => BootId::parse(&b).context("--boot-id is not a UUID")?,
                None => linux::boot_id()?,
            };
            let interval = secs(a.interval.or(r.interval).unwrap_or(60.0), "interval")?;
            let ring = match (a.ring, board) {
                (Some(ring), _) => ring,
                (None, Some(b)) => RingSpec::Mem {
                    addr: b.ring.addr,
                    len: usize::try_from(b.ring.size).context("the board's ring is too large")?,
                },
                (None, None) => RingSpec::File {
                    path: state_dir.join("ring"),
                    len: 16 << 20,
                },
            };
            linux::run(RunConfig {
                server,
                link,
                ring,
                ring_cfg: RingConfig {
                    keep_oldest_pct: a.keep_oldest,
                    block_size: a.block_size,
                },
                pstore_dir: a.pstore_dir,
                level: a.level,
                state_dir,
                kmsg: a.kmsg,
                interval,
                jitter: a.jitter.map_or(Ok(interval / 12), |j| secs(j, "jitter"))?,
                device,
                boot,
                synced_flag: a
                    .synced_flag
                    .or_else(|| r.synced_flag.clone())
                    .unwrap_or_else(|| "/run/systemd/timesync/synchronized".into()),
                timeout: secs(a.timeout, "timeout")?,
                syslog,
                syslog_required,
                syslog_kmsg: a.syslog_kmsg,
                config,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    #[test]
    fn syslog_sockets_flags_then_config_then_the_default_for_the_real_kmsg() {
        let kmsg = Path::new("/dev/kmsg");
        let (s, asked) = syslog_sockets(&[], None, kmsg).unwrap();
        assert_eq!(
            (s, asked),
            (vec![SocketSpec::Dgram("/dev/log".into())], false)
        );
        let (s, asked) = syslog_sockets(&[], None, Path::new("/tmp/kmsg")).unwrap();
        assert!(s.is_empty() && !asked);
        let cfg = ["stream:/run/log".to_owned()];
        let (s, asked) = syslog_sockets(&[], Some(&cfg), kmsg).unwrap();
        assert_eq!(
            (s, asked),
            (vec![SocketSpec::Stream("/run/log".into())], true)
        );
        let (s, asked) = syslog_sockets(&["none".into()], Some(&cfg), kmsg).unwrap();
        assert!(s.is_empty() && asked);
        assert!(syslog_sockets(&["stream:".into()], None, kmsg).is_err());
    }
}
