//! The Linux layer: read the log stream, keep it in the spool, upload on schedule.
//!
//! One reader thread follows kmsg and sends records over a bounded channel; the main thread
//! appends them to the spool, seals chunks when enough is pending or an upload is due, and
//! uploads the oldest unacknowledged chunk first until the outbox is empty or a send fails.
pub mod source;
pub mod spool;
pub mod upload;

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;
use blackbox_protocol::{BootId, DeviceId, Origin, Record, SyncPoint};

use crate::buffer::LogBuffer;
use crate::schedule::Schedule;
use source::Event;
use spool::{Spool, SpoolConfig};
use upload::{Answer, Uploader};

/// Everything `blackbox-agent run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Server base URL.
    pub server: String,
    /// State directory (spool, cursor).
    pub state_dir: PathBuf,
    /// The log stream: /dev/kmsg or a file/FIFO in the same format.
    pub kmsg: PathBuf,
    /// Upload interval.
    pub interval: Duration,
    /// Random spread around the interval.
    pub jitter: Duration,
    /// This device's id.
    pub device: DeviceId,
    /// This boot's id.
    pub boot: BootId,
    /// File whose existence means the wall clock is NTP-synchronised.
    pub synced_flag: PathBuf,
    /// Spool settings.
    pub spool: SpoolConfig,
    /// Request timeout.
    pub timeout: Duration,
}

/// The machine's boot id.
pub fn boot_id() -> anyhow::Result<BootId> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("reading /proc/sys/kernel/random/boot_id")?;
    BootId::parse(&s).context("boot_id is not a UUID")
}

/// A device id from the host name (characters outside `[A-Za-z0-9._:-]` become `-`).
pub fn default_device_id() -> DeviceId {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(DeviceId::MAX_LEN)
        .collect();
    DeviceId::new(&clean)
        .unwrap_or_else(|_| DeviceId::new("unnamed").unwrap_or_else(|_| unreachable!()))
}

fn sync_point(flag: &std::path::Path) -> SyncPoint {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mono_us = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    let wall_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    SyncPoint {
        mono_us,
        wall_us,
        synced: flag.exists(),
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    match rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()) {
        Ok(_) => u32::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    }
}

/// Runs the agent until the log source fails.
pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let mut spool = Spool::open(
        &cfg.state_dir,
        cfg.device.clone(),
        cfg.boot,
        cfg.spool.clone(),
    )?;
    let resume = spool.resume_after(&cfg.boot);
    eprintln!(
        "blackbox-agent: device {} boot {}; reading {} after seq {}; {} chunk(s) waiting; uploading to {}",
        cfg.device,
        cfg.boot,
        cfg.kmsg.display(),
        resume.map_or("(start)".into(), |s| s.to_string()),
        spool.unacked_chunks(),
        cfg.server
    );
    let (tx, rx) = mpsc::sync_channel(65_536);
    let _reader = source::spawn(cfg.kmsg.clone(), resume, tx)
        .with_context(|| format!("opening {}", cfg.kmsg.display()))?;
    let uploader = Uploader::new(&cfg.server, cfg.device.as_str(), cfg.timeout);
    let interval_ms = cfg.interval.as_millis().max(1) as u64;
    let min_backoff = (interval_ms / 16).clamp(1, 1_000);
    let mut sched = Schedule::new(interval_ms, cfg.jitter.as_millis() as u64, min_backoff);
    let mut next_upload = Instant::now() + Duration::from_millis(sched.first_delay(random_u32()));
    loop {
        let wait = next_upload.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(ev) => {
                handle(&mut spool, ev)?;
                // Drain what is already queued without waiting.
                while let Ok(ev) = rx.try_recv() {
                    handle(&mut spool, ev)?;
                    if spool.pending_bytes() >= cfg.spool.chunk_max_bytes {
                        break;
                    }
                }
                if spool.pending_bytes() >= cfg.spool.chunk_max_bytes {
                    spool.seal(sync_point(&cfg.synced_flag))?;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("log reader stopped"),
        }
        if Instant::now() >= next_upload {
            spool.seal(sync_point(&cfg.synced_flag))?;
            let delay = match upload_all(&mut spool, &uploader)? {
                None => sched.after_success(random_u32()),
                Some(after) => {
                    let d = sched.after_failure(after.map(|a| a.as_millis() as u64), random_u32());
                    eprintln!(
                        "blackbox-agent: retrying in {d} ms ({} chunk(s) waiting)",
                        spool.unacked_chunks()
                    );
                    d
                }
            };
            next_upload = Instant::now() + Duration::from_millis(delay);
        }
    }
}

fn handle(spool: &mut Spool, ev: Event) -> anyhow::Result<()> {
    match ev {
        Event::Record(r) => spool.append(Record {
            seq: r.seq,
            mono_us: r.usec,
            level: r.level,
            facility: r.facility,
            origin: Origin::Kmsg,
            msg: r.msg,
        })?,
        Event::Gap { first, last, usec } => {
            eprintln!(
                "blackbox-agent: records {first}..{last} were lost before they could be read"
            );
            spool.append(Record::gap(
                first,
                last,
                last - first + 1,
                usec,
                "overwritten in the kernel log before it was read",
            ))?;
        }
        Event::Failed(e) => anyhow::bail!("log source failed: {e}"),
    }
    Ok(())
}

/// Uploads until the outbox is empty (`Ok(None)`) or a send fails (`Ok(Some(retry_after))`).
fn upload_all(spool: &mut Spool, up: &Uploader) -> anyhow::Result<Option<Option<Duration>>> {
    while let Some(chunk) = spool.next_unacked()? {
        match up.send(&chunk.bytes) {
            Answer::Acked { duplicate } => {
                spool.ack(&chunk.id)?;
                if duplicate {
                    eprintln!("blackbox-agent: chunk {} was already stored", chunk.id);
                }
            }
            Answer::Retry { after, why } => {
                eprintln!("blackbox-agent: upload of {} failed: {why}", chunk.id);
                return Ok(Some(after));
            }
            Answer::Rejected { why } => spool.reject(&chunk.id, &why)?,
        }
    }
    Ok(None)
}
