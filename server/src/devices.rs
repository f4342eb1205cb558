//! The certificates this receiver has seen: pending devices, and which certificate holds which
//! device id.
//!
//! Every certificate that completes a TLS handshake (so its owner holds the private key) is
//! recorded with the device id it carries, when it was first and last seen, from where, and how
//! often. Those not on the allowlist are *pending*: `blackbox-server devices pending` lists them
//! and `devices allow FP` takes the device id from here.
//!
//! The record also keeps device ids unique: a certificate is refused if another certificate
//! that is still allowlisted has already written as the same device id (a device that makes a
//! new key must have its old certificate revoked first). The allowlist's names enforce the same
//! across receivers; this record covers lines without a name.
//!
//! The file (NDJSON, one certificate per line, rewritten atomically) lives beside the allowlist
//! by default. It is a cache of what was seen: losing it loses the pending list, not a device.
//! At most [`MAX_ENTRIES`] certificates are kept; the least recently seen go first.
use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use blackbox_protocol::{DeviceId, Fingerprint};
use serde::{Deserialize, Serialize};

use crate::allowlist::{Allowlist, write_atomically};

/// Most certificates remembered (a flood of unknown ones cannot grow the file without bound).
pub const MAX_ENTRIES: usize = 100_000;

/// `last_seen` is rewritten only when it moved by this much, so busy devices do not make the
/// file churn.
const TOUCH_SECS: u64 = 60;

/// One certificate seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// `sha256:…`.
    pub fingerprint: String,
    /// The certificate's subject CN, if it had a usable one.
    pub device: Option<String>,
    /// Unix seconds.
    pub first_seen: u64,
    /// Unix seconds.
    pub last_seen: u64,
    /// Peer address of the last connection.
    pub last_addr: String,
    /// Requests made (counted when first seen and whenever `last_seen` is rewritten).
    pub requests: u64,
}

/// The in-memory record, flushed to its file now and then.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Fingerprint, Seen>,
    /// Device id → the certificates that presented it (an index over `map`).
    by_device: HashMap<String, Vec<Fingerprint>>,
    dirty: bool,
}

impl Inner {
    fn unindex(&mut self, fp: &Fingerprint, device: Option<&str>) {
        if let Some(d) = device
            && let Some(v) = self.by_device.get_mut(d)
        {
            v.retain(|f| f != fp);
            if v.is_empty() {
                self.by_device.remove(d);
            }
        }
    }

    fn index(&mut self, fp: Fingerprint, device: Option<&str>) {
        if let Some(d) = device {
            self.by_device.entry(d.to_owned()).or_default().push(fp);
        }
    }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a registry file. A missing file is an empty record.
pub fn load(path: &Path) -> anyhow::Result<Vec<Seen>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: Seen = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        out.push(s);
    }
    Ok(out)
}

impl Registry {
    /// Opens the record at `path`. A file that does not parse is moved aside (`.corrupt`) and
    /// the record starts empty: it only caches what was seen.
    pub fn open(path: &Path) -> anyhow::Result<Arc<Self>> {
        let entries = match load(path) {
            Ok(e) => e,
            Err(e) => {
                let aside = path.with_extension("corrupt");
                tracing::warn!(error = %format!("{e:#}"), aside = %aside.display(),
                    "the record of seen devices does not parse; starting a new one");
                fs::rename(path, &aside)
                    .with_context(|| format!("moving {} aside", path.display()))?;
                Vec::new()
            }
        };
        let mut inner = Inner::default();
        for s in entries {
            if let Ok(fp) = s.fingerprint.parse::<Fingerprint>() {
                let device = s.device.clone();
                if let Some(old) = inner.map.insert(fp, s) {
                    inner.unindex(&fp, old.device.as_deref());
                }
                inner.index(fp, device.as_deref());
            }
        }
        Ok(Arc::new(Self {
            path: path.to_owned(),
            inner: Mutex::new(inner),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a request from a certificate (after its handshake succeeded).
    pub fn seen(&self, fp: &Fingerprint, device: Option<&str>, addr: SocketAddr) {
        let now = now_secs();
        let mut g = self.lock();
        let inner = &mut *g;
        match inner.map.get_mut(fp) {
            Some(s) => {
                if now.saturating_sub(s.last_seen) >= TOUCH_SECS || s.device.as_deref() != device {
                    let old = std::mem::replace(&mut s.device, device.map(str::to_owned));
                    s.last_seen = now;
                    s.last_addr = addr.to_string();
                    s.requests += 1;
                    inner.dirty = true;
                    if old.as_deref() != device {
                        inner.unindex(fp, old.as_deref());
                        inner.index(*fp, device);
                    }
                }
            }
            None => {
                if inner.map.len() >= MAX_ENTRIES
                    && let Some(oldest) = inner
                        .map
                        .iter()
                        .min_by_key(|(_, s)| s.last_seen)
                        .map(|(k, _)| *k)
                    && let Some(old) = inner.map.remove(&oldest)
                {
                    inner.unindex(&oldest, old.device.as_deref());
                }
                inner.index(*fp, device);
                inner.map.insert(
                    *fp,
                    Seen {
                        fingerprint: fp.to_string(),
                        device: device.map(str::to_owned),
                        first_seen: now,
                        last_seen: now,
                        last_addr: addr.to_string(),
                        requests: 1,
                    },
                );
                inner.dirty = true;
            }
        }
    }

    /// Another certificate, still on `allow`, that has already written as `device`.
    pub fn holder_of(
        &self,
        device: &DeviceId,
        fp: &Fingerprint,
        allow: &Allowlist,
    ) -> Option<Fingerprint> {
        let g = self.lock();
        g.by_device
            .get(device.as_str())?
            .iter()
            .find(|k| *k != fp && allow.get(k).is_some())
            .copied()
    }

    /// The device id a certificate last presented, if seen.
    pub fn device_of(&self, fp: &Fingerprint) -> Option<String> {
        self.lock().map.get(fp).and_then(|s| s.device.clone())
    }

    /// Writes the record if it changed.
    pub fn flush(&self) -> anyhow::Result<()> {
        let text = {
            let mut g = self.lock();
            if !g.dirty {
                return Ok(());
            }
            g.dirty = false;
            let mut all: Vec<&Seen> = g.map.values().collect();
            all.sort_by(|a, b| {
                a.first_seen
                    .cmp(&b.first_seen)
                    .then(a.fingerprint.cmp(&b.fingerprint))
            });
            let mut text = String::with_capacity(all.len() * 200);
            for s in all {
                if let Ok(line) = serde_json::to_string(s) {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            text
        };
        let r = write_atomically(&self.path, text.as_bytes());
        if r.is_err() {
            self.lock().dirty = true;
        }
        r
    }

    /// Flushes every `period` until the registry is dropped.
    pub fn flush_every(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut failing = false;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                match tokio::task::spawn_blocking(move || me.flush()).await {
                    Ok(Ok(())) => failing = false,
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!(error = %format!("{e:#}"), "cannot write the record of seen devices");
                    }
                    _ => {}
                }
            }
        })
    }
}

/// Unix seconds as RFC 3339 (UTC, whole seconds).
pub fn rfc3339(secs: u64) -> String {
    let mut s = String::new();
    let us = i64::try_from(secs).unwrap_or(i64::MAX / 1_000_000) * 1_000_000;
    let _ = blackbox_protocol::time::write_rfc3339(&mut s, us);
    // write_rfc3339 prints microseconds; whole seconds read better here.
    match s.find('.') {
        Some(dot) => format!("{}Z", &s[..dot]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_persists_and_bounds_nothing_lost_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.ndjson");
        let reg = Registry::open(&path).unwrap();
        let addr: SocketAddr = "127.0.0.1:1234".parse().unwrap();
        reg.seen(&Fingerprint([1; 32]), Some("dev-a"), addr);
        reg.seen(&Fingerprint([2; 32]), None, addr);
        reg.flush().unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].device.as_deref(), Some("dev-a"));
        let reg2 = Registry::open(&path).unwrap();
        assert_eq!(
            reg2.device_of(&Fingerprint([1; 32])).as_deref(),
            Some("dev-a")
        );
        let (allow, _) = Allowlist::parse(&format!("{}\n", Fingerprint([1; 32])));
        let dev = DeviceId::new("dev-a").unwrap();
        assert_eq!(
            reg2.holder_of(&dev, &Fingerprint([3; 32]), &allow),
            Some(Fingerprint([1; 32]))
        );
        assert_eq!(reg2.holder_of(&dev, &Fingerprint([1; 32]), &allow), None);
        let (none, _) = Allowlist::parse("");
        assert_eq!(reg2.holder_of(&dev, &Fingerprint([3; 32]), &none), None);
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.ndjson");
        fs::write(&path, "{not json\n").unwrap();
        let reg = Registry::open(&path).unwrap();
        assert!(reg.device_of(&Fingerprint([1; 32])).is_none());
        assert!(dir.path().join("devices.corrupt").exists());
    }

    #[test]
    fn rfc3339_whole_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
