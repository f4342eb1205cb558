//! One compaction at a time per store: a lease that every host sees, kept in the store itself.
//!
//! The lock is the highest-numbered object under `compact/lock/` (`<20 digits>.json`), which
//! says who took it and until when. To take it, a compactor lists them: if the highest is live
//! it stops with an error that names the holder; otherwise it creates the next number with a
//! create-only put (`If-None-Match: *` on S3, a hard link in a local directory), so of two
//! compactors racing for one number exactly one gets it and the other stops. Before each step
//! that deletes objects or switches readers, the holder checks that the highest number is still
//! its own ([`StoreLock::hold`]) and, once half its time has passed, extends the lease by
//! creating the next number itself; a compactor that finds a higher number (it stalled past its
//! lease and another took over) stops before it changes anything.
//!
//! A lease is live until its expiry (`--lock-ttl`), and a holder on this host (same host name
//! and PID namespace: containers may share a name) whose process is gone (a crash, a kill)
//! holds nothing: the next run goes ahead at once. Hosts' clocks must agree
//! to well within half the lease. An unreadable lock object is taken as expired (and said so).
use std::time::Duration;

use anyhow::{Context, bail};
use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::reader::{delete, get_opt};
use crate::store::Store;
use crate::timespec::{now_us, rfc3339};

/// Where the lock objects are.
pub const LOCKS: &str = "compact/lock/";

/// What a lock object holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockFile {
    /// Host name.
    pub host: String,
    /// The holder's PID namespace (`/proc/self/ns/pid`): containers can share a host name
    /// but not their process ids.
    #[serde(default)]
    pub pid_ns: String,
    /// Process id there.
    pub pid: u32,
    /// When the lease was taken or extended (µs since the epoch).
    pub since_us: i64,
    /// When it runs out (µs since the epoch).
    pub expires_us: i64,
}

impl LockFile {
    /// Does it still hold the store (not expired, and not a dead process of this host's
    /// PID namespace)?
    fn live(&self, me: &Me, now: i64) -> bool {
        if now >= self.expires_us {
            return false;
        }
        if self.host != me.host || self.pid_ns.is_empty() || self.pid_ns != me.pid_ns {
            return true;
        }
        // Signal 0 tests that the process exists; EPERM means it does (another user's).
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        pid.is_some_and(|p| {
            !matches!(
                rustix::process::test_kill_process(p),
                Err(rustix::io::Errno::SRCH)
            )
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} (pid {}), taken or extended at {}, until {}",
            self.host,
            self.pid,
            rfc3339(self.since_us),
            rfc3339(self.expires_us)
        )
    }
}

/// Who this process is, to tell its host's crashed holders apart: the host name (as the
/// kernel has it) and the PID namespace its process ids mean something in.
#[derive(Debug)]
struct Me {
    host: String,
    pid_ns: String,
}

impl Me {
    fn now() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".into());
        let pid_ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Self { host, pid_ns }
    }
}

fn lock_key(n: u64) -> String {
    format!("{LOCKS}{n:020}.json")
}

/// The lock objects' numbers, lowest first (other objects there are ignored).
async fn numbers(store: &Store) -> anyhow::Result<Vec<u64>> {
    let mut out: Vec<u64> = store
        .list(LOCKS)
        .await
        .context("listing the compaction lock")?
        .iter()
        .filter_map(|k| k.strip_prefix(LOCKS)?.strip_suffix(".json")?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// The lock object `n`: `None` when it is gone; `Some(None)` when it does not parse.
async fn read(store: &Store, n: u64) -> anyhow::Result<Option<Option<LockFile>>> {
    let key = lock_key(n);
    let bytes = get_opt(store, &key)
        .await
        .with_context(|| format!("reading {key}"))?;
    Ok(bytes.map(|b| serde_json::from_slice(&b).ok()))
}

/// The store's compaction lock, held.
#[derive(Debug)]
pub struct StoreLock {
    me: Me,
    ttl_us: i64,
    held: tokio::sync::Mutex<Held>,
}

#[derive(Debug)]
struct Held {
    n: u64,
    expires_us: i64,
}

impl StoreLock {
    /// Takes the store's compaction lock for `ttl`, or says who holds it.
    pub async fn acquire(store: &Store, ttl: Duration) -> anyhow::Result<Self> {
        let lock = Self {
            me: Me::now(),
            ttl_us: i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX).max(1),
            held: tokio::sync::Mutex::new(Held {
                n: 0,
                expires_us: 0,
            }),
        };
        let now = now_us();
        let next = match numbers(store).await?.last() {
            None => 0,
            Some(&n) => {
                match read(store, n).await? {
                    Some(Some(f)) if f.live(&lock.me, now) => bail!(
                        "another compaction holds this store's lock: {}; it runs out by itself \
                         if that compaction is gone ({}{})",
                        f.describe(),
                        store.url(),
                        lock_key(n)
                    ),
                    Some(None) => {
                        tracing::warn!(key = %lock_key(n), "compaction lock object unreadable; taking it as expired")
                    }
                    _ => {}
                }
                n + 1
            }
        };
        let expires_us = lock.create(store, next, now).await?;
        *lock.held.lock().await = Held {
            n: next,
            expires_us,
        };
        lock.forget_before(store, next).await;
        tracing::info!(key = %lock_key(next), until = %rfc3339(expires_us), "compaction lock taken");
        Ok(lock)
    }

    /// Creates lock object `n` for this process, if no one has: returns its expiry.
    async fn create(&self, store: &Store, n: u64, now: i64) -> anyhow::Result<i64> {
        let file = LockFile {
            host: self.me.host.clone(),
            pid_ns: self.me.pid_ns.clone(),
            pid: std::process::id(),
            since_us: now,
            expires_us: now.saturating_add(self.ttl_us),
        };
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let body = PutPayload::from(serde_json::to_vec(&file)?);
        let key = lock_key(n);
        match store
            .object_store()
            .put_opts(&Path::from(key.as_str()), body, opts)
            .await
        {
            Ok(_) => Ok(file.expires_us),
            Err(object_store::Error::AlreadyExists { .. }) => bail!(
                "another compaction took this store's lock at the same moment ({}{key})",
                store.url()
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "creating the compaction lock {key} (the store must support create-only puts)"
                )
            }),
        }
    }

    /// Deletes lock objects numbered below `n` (they hold nothing); failures only cost a
    /// listing entry.
    async fn forget_before(&self, store: &Store, n: u64) {
        if let Ok(old) = numbers(store).await {
            for o in old.into_iter().filter(|&o| o < n) {
                let _ = delete(store, &lock_key(o)).await;
            }
        }
    }

    /// Checks that this process still holds the lock (call it before deleting objects or
    /// switching readers) and extends the lease once half of it has passed.
    pub async fn hold(&self, store: &Store) -> anyhow::Result<()> {
        let mut held = self.held.lock().await;
        let top = numbers(store).await?.last().copied();
        if top != Some(held.n) {
            bail!(
                "this compaction lost the store's lock (its lease ran out and another compaction \
                 took it, or it was deleted): stopping before changing anything"
            );
        }
        let now = now_us();
        if now >= held.expires_us.saturating_sub(self.ttl_us / 2) {
            let next = held.n + 1;
            held.expires_us = self
                .create(store, next, now)
                .await
                .context("extending the compaction lock: stopping before changing anything")?;
            held.n = next;
            drop(held);
            self.forget_before(store, next).await;
        }
        Ok(())
    }

    /// Gives the lock up (best effort: a lock left behind runs out, or is known dead).
    pub async fn release(&self, store: &Store) {
        let held = self.held.lock().await;
        if let Err(e) = delete(store, &lock_key(held.n)).await {
            tracing::warn!(error = %e, "could not delete the compaction lock; it runs out by itself");
        }
    }
}
