//! One holder at a time: a lease that every host sees, kept in the store itself. Compaction
//! takes one per store (one `blackbox-server compact` at a time), the grinder one per
//! checkpoint (one `blackbox-server grind` writing a checkpoint and counting its events; the
//! others wait as standbys).
//!
//! The lock is the highest-numbered object under its prefix (`compact/lock/`, or the
//! checkpoint's key with `.lock/` for `.json`: `grind/checkpoint.lock/`), named
//! `<20 digits>.json`, which says who took it and until when. To take it, a process lists
//! them: if the highest is live it stops (or waits) and names the holder; otherwise it creates
//! the next number with a create-only put (`If-None-Match: *` on S3, a hard link in a local
//! directory), so of two processes racing for one number exactly one gets it. Before each step
//! that deletes objects, switches readers or writes the checkpoint, the holder checks that the
//! highest number is still its own ([`StoreLock::hold`]) and, once half its time has passed,
//! extends the lease by creating the next number itself; a holder that finds a higher number
//! (it stalled past its lease and another took over) stops before it changes anything.
//!
//! A lease is live until its expiry (`--lock-ttl`), and a holder on this host (same host name
//! and PID namespace: containers may share a name) whose process is gone (a crash, a kill)
//! holds nothing: the next run goes ahead at once. Hosts' clocks must agree
//! to well within half the lease. An unreadable lock object is taken as expired (and said so).
use std::time::Duration;

use anyhow::Context;
use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::reader::{delete, get_opt};

/// Another process holds the lock now (its lease ran out and it was taken, or the lock object
/// was deleted): the holder that gets this must stop before changing anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LockLost(String);

impl LockLost {
    /// Is `e` (or what it wraps) a lost lock, rather than a store error?
    pub fn is(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<Self>())
    }
}
use crate::store::Store;
use crate::timespec::{now_us, rfc3339};

/// Where the compaction lock's objects are.
pub const LOCKS: &str = "compact/lock/";

/// What a lock guards: where its objects are, and how messages name its holders.
#[derive(Debug, Clone)]
pub struct Scope {
    prefix: String,
    /// "compaction", "grinder".
    what: &'static str,
    /// "this store's lock", "the lock of grind/checkpoint.json".
    of: String,
}

impl Scope {
    /// One compaction at a time per store.
    pub fn compaction() -> Self {
        Self {
            prefix: LOCKS.into(),
            what: "compaction",
            of: "this store's lock".into(),
        }
    }

    /// One grinder at a time per checkpoint: `<checkpoint without .json>.lock/`.
    pub fn grinder(checkpoint_key: &str) -> Self {
        let base = checkpoint_key
            .strip_suffix(".json")
            .unwrap_or(checkpoint_key);
        Self {
            prefix: format!("{base}.lock/"),
            what: "grinder",
            of: format!("the lock of {checkpoint_key}"),
        }
    }

    /// Where its objects are.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, n: u64) -> String {
        format!("{}{n:020}.json", self.prefix)
    }

    /// The lock objects' numbers, lowest first (other objects there are ignored).
    async fn numbers(&self, store: &Store) -> anyhow::Result<Vec<u64>> {
        let mut out: Vec<u64> = store
            .list(&self.prefix)
            .await
            .with_context(|| format!("listing the {} lock", self.what))?
            .iter()
            .filter_map(|k| {
                k.strip_prefix(self.prefix.as_str())?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The lock object `n`: `None` when it is gone; `Some(None)` when it does not parse.
    async fn read(&self, store: &Store, n: u64) -> anyhow::Result<Option<Option<LockFile>>> {
        let key = self.key(n);
        let bytes = get_opt(store, &key)
            .await
            .with_context(|| format!("reading {key}"))?;
        Ok(bytes.map(|b| serde_json::from_slice(&b).ok()))
    }
}

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

/// A lock in the store, held.
#[derive(Debug)]
pub struct StoreLock {
    scope: Scope,
    me: Me,
    ttl_us: i64,
    held: tokio::sync::Mutex<Held>,
}

#[derive(Debug)]
struct Held {
    n: u64,
    expires_us: i64,
    /// When this process last saw the lock was its own (and had at least half its time).
    checked: std::time::Instant,
}

impl StoreLock {
    /// Takes the store's compaction lock for `ttl`, or says who holds it.
    pub async fn acquire(store: &Store, ttl: Duration) -> anyhow::Result<Self> {
        Self::acquire_in(store, Scope::compaction(), ttl).await
    }

    /// Takes the lock of `scope` for `ttl`, or says who holds it.
    pub async fn acquire_in(store: &Store, scope: Scope, ttl: Duration) -> anyhow::Result<Self> {
        match Self::try_acquire_in(store, scope, ttl).await? {
            Ok(lock) => Ok(lock),
            Err(busy) => Err(anyhow::anyhow!(busy)),
        }
    }

    /// Takes the lock of `scope` for `ttl`: `Ok(Err(why))` when another live process holds it
    /// (or took it at the same moment), naming it; `Err` when the store fails.
    pub async fn try_acquire_in(
        store: &Store,
        scope: Scope,
        ttl: Duration,
    ) -> anyhow::Result<Result<Self, String>> {
        let lock = Self {
            scope,
            me: Me::now(),
            ttl_us: i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX).max(1),
            held: tokio::sync::Mutex::new(Held {
                n: 0,
                expires_us: 0,
                checked: std::time::Instant::now(),
            }),
        };
        let (what, of) = (lock.scope.what, &lock.scope.of);
        let now = now_us();
        let next = match lock.scope.numbers(store).await?.last() {
            None => 0,
            Some(&n) => {
                match lock.scope.read(store, n).await? {
                    Some(Some(f)) if f.live(&lock.me, now) => {
                        return Ok(Err(format!(
                            "another {what} holds {of}: {}; it runs out by itself if that \
                             {what} is gone ({}{})",
                            f.describe(),
                            store.url(),
                            lock.scope.key(n)
                        )));
                    }
                    Some(None) => {
                        tracing::warn!(key = %lock.scope.key(n), "{what} lock object unreadable; taking it as expired")
                    }
                    _ => {}
                }
                n + 1
            }
        };
        let expires_us = match lock.create(store, next, now).await? {
            Some(e) => e,
            None => {
                return Ok(Err(format!(
                    "another {what} took {of} at the same moment ({}{})",
                    store.url(),
                    lock.scope.key(next)
                )));
            }
        };
        *lock.held.lock().await = Held {
            n: next,
            expires_us,
            checked: std::time::Instant::now(),
        };
        lock.forget_before(store, next).await;
        tracing::info!(key = %lock.scope.key(next), until = %rfc3339(expires_us), "{what} lock taken");
        Ok(Ok(lock))
    }

    /// Creates lock object `n` for this process: its expiry, or `None` when another process
    /// created it first.
    async fn create(&self, store: &Store, n: u64, now: i64) -> anyhow::Result<Option<i64>> {
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
        let key = self.scope.key(n);
        match store
            .object_store()
            .put_opts(&Path::from(key.as_str()), body, opts)
            .await
        {
            Ok(_) => Ok(Some(file.expires_us)),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "creating the {} lock {key} (the store must support create-only puts)",
                    self.scope.what
                )
            }),
        }
    }

    /// Deletes lock objects numbered below `n` (they hold nothing); failures only cost a
    /// listing entry.
    async fn forget_before(&self, store: &Store, n: u64) {
        if let Ok(old) = self.scope.numbers(store).await {
            for o in old.into_iter().filter(|&o| o < n) {
                let _ = delete(store, &self.scope.key(o)).await;
            }
        }
    }

    /// Checks that this process still holds the lock (call it before deleting objects or
    /// switching readers) and extends the lease once half of it has passed.
    ///
    /// Fails with [`LockLost`] when another process holds the lock now (the caller must stop);
    /// any other error is the store's (the lock may still be this process's: try again).
    pub async fn hold(&self, store: &Store) -> anyhow::Result<()> {
        let (what, of) = (self.scope.what, &self.scope.of);
        let mut held = self.held.lock().await;
        let top = self.scope.numbers(store).await?.last().copied();
        if top != Some(held.n) {
            return Err(LockLost(format!(
                "this {what} lost {of} (its lease ran out and another {what} took it, or it \
                 was deleted): stopping before changing anything"
            ))
            .into());
        }
        let checked = std::time::Instant::now();
        let now = now_us();
        if now >= held.expires_us.saturating_sub(self.ttl_us / 2) {
            let next = held.n + 1;
            let Some(expires_us) = self.create(store, next, now).await.with_context(|| {
                format!("extending the {what} lock: stopping before changing anything")
            })?
            else {
                return Err(LockLost(format!(
                    "this {what} lost {of} while extending it (another {what} took the next \
                     number): stopping before changing anything"
                ))
                .into());
            };
            held.expires_us = expires_us;
            held.n = next;
            held.checked = checked;
            drop(held);
            self.forget_before(store, next).await;
        } else {
            // Only now, with at least half the lease left (or a new one), may `keep` skip
            // the store for a quarter of it: not after an extension that failed.
            held.checked = checked;
        }
        Ok(())
    }

    /// [`hold`](Self::hold), but without asking the store when this process saw the lock was
    /// its own less than a quarter of the lease ago (by its own monotonic clock): then at
    /// least a quarter of the lease is left, and no one else can have taken it. For holders
    /// that write often (the grinder, before every events object and checkpoint).
    pub async fn keep(&self, store: &Store) -> anyhow::Result<()> {
        let quarter = Duration::from_micros(u64::try_from(self.ttl_us / 4).unwrap_or(0));
        if self.held.lock().await.checked.elapsed() < quarter {
            return Ok(());
        }
        self.hold(store).await
    }

    /// Gives the lock up (best effort: a lock left behind runs out, or is known dead).
    pub async fn release(&self, store: &Store) {
        let held = self.held.lock().await;
        if let Err(e) = delete(store, &self.scope.key(held.n)).await {
            tracing::warn!(error = %e, "could not delete the {} lock; it runs out by itself", self.scope.what);
        }
    }
}
