//! The allowlist: which device certificates may write, by SHA-256 fingerprint. No CA.
//!
//! The file is plain text, one device per line:
//!
//! ```text
//! # kitchen routers
//! sha256:3f1c…e07a  router-kitchen-1
//! sha256:91aa…0b12                     # a line without a name
//! ```
//!
//! A fingerprint (any form [`Fingerprint`] parses), then optionally the device's name. If the
//! name is given it must be the device id the certificate carries (its subject CN): a
//! certificate allowlisted as `router-kitchen-1` cannot write as anybody else. `#` starts a
//! comment. A line that does not parse is reported with its number and skipped; the rest of the
//! file still counts.
//!
//! The server re-reads the file when it changes ([`AllowlistFile::refresh`]: the contents are
//! compared every 250 ms, and the file's metadata on every new connection), and every request is
//! checked against the current list, so removing a line revokes that device at once, even on a
//! connection it already has open. If the file cannot be read the last good list stays in force
//! and the error is logged; an empty file is a valid list that allows nobody.
//!
//! `blackbox-server devices allow|revoke` edit the file with [`allow`] and [`revoke`]: they write a
//! new file beside it and rename it over the old one, so the server never reads half a file.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use blackbox_protocol::{DeviceId, Fingerprint};

/// One allowlisted certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The device id the certificate must carry, when the line names one.
    pub name: Option<DeviceId>,
    /// Line number in the file (1-based), for messages.
    pub line: usize,
}

/// A parsed allowlist.
#[derive(Debug, Default, Clone)]
pub struct Allowlist {
    by_fp: HashMap<Fingerprint, Entry>,
    by_name: HashMap<DeviceId, Fingerprint>,
}

/// A line of the file that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Line number (1-based).
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl Allowlist {
    /// Parses the file's text. Bad lines are returned beside the list, not fatal.
    pub fn parse(text: &str) -> (Self, Vec<LineError>) {
        let mut list = Self::default();
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let mut words = content.split_whitespace();
            let (Some(fp_text), name, rest) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            let fp = match fp_text.parse::<Fingerprint>() {
                Ok(fp) => fp,
                Err(e) => {
                    errors.push(LineError {
                        line,
                        reason: format!("{fp_text:?}: {e}"),
                    });
                    continue;
                }
            };
            if rest.is_some() {
                errors.push(LineError {
                    line,
                    reason: "more than a fingerprint and a name (start a comment with #)".into(),
                });
                continue;
            }
            let name = match name.map(DeviceId::new).transpose() {
                Ok(n) => n,
                Err(e) => {
                    errors.push(LineError {
                        line,
                        reason: format!("the name is not a device id: {e}"),
                    });
                    continue;
                }
            };
            if let Some(prev) = list.by_fp.get(&fp) {
                errors.push(LineError {
                    line,
                    reason: format!("{fp} is already on line {}", prev.line),
                });
                continue;
            }
            if let Some(n) = &name {
                if let Some(other) = list.by_name.get(n) {
                    let other_line = list.by_fp.get(other).map_or(0, |e| e.line);
                    errors.push(LineError {
                        line,
                        reason: format!(
                            "device id {n} is already given to {other} on line {other_line}; \
                             one device id, one certificate"
                        ),
                    });
                    continue;
                }
                list.by_name.insert(n.clone(), fp);
            }
            list.by_fp.insert(fp, Entry { name, line });
        }
        (list, errors)
    }

    /// The entry of a fingerprint, if allowed.
    pub fn get(&self, fp: &Fingerprint) -> Option<&Entry> {
        self.by_fp.get(fp)
    }

    /// The certificate a line names as this device id, if any.
    pub fn named(&self, device: &DeviceId) -> Option<&Fingerprint> {
        self.by_name.get(device)
    }

    /// Number of allowed certificates.
    pub fn len(&self) -> usize {
        self.by_fp.len()
    }

    /// True when nobody is allowed.
    pub fn is_empty(&self) -> bool {
        self.by_fp.is_empty()
    }
}

/// The allowlist file as the server sees it: the current list, re-read on change.
#[derive(Debug)]
pub struct AllowlistFile {
    path: PathBuf,
    current: RwLock<Arc<Allowlist>>,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// (inode, size, mtime ns, ctime ns) of the last read.
    meta: Option<(u64, u64, i128, i128)>,
    /// The contents last parsed (`None` before the first read).
    text: Option<Vec<u8>>,
    failing: bool,
}

fn meta_key(m: &fs::Metadata) -> (u64, u64, i128, i128) {
    (
        m.ino(),
        m.size(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    )
}

impl AllowlistFile {
    /// Reads the file; it must exist (an empty file allows nobody).
    pub fn open(path: &Path) -> anyhow::Result<Arc<Self>> {
        let me = Arc::new(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(Allowlist::default())),
            seen: Mutex::new(Seen::default()),
        });
        me.reload(true)
            .with_context(|| format!("reading the allowlist {}", path.display()))?;
        Ok(me)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The list in force now.
    pub fn current(&self) -> Arc<Allowlist> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the file if its metadata changed (cheap: one `stat`; called per connection).
    pub fn refresh(&self) {
        if let Err(e) = self.reload(false) {
            self.report_failure(&e);
        }
    }

    /// Re-reads the file and compares the contents (called by the watcher).
    pub fn refresh_contents(&self) {
        if let Err(e) = self.reload(true) {
            self.report_failure(&e);
        }
    }

    fn report_failure(&self, e: &anyhow::Error) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.failing {
            tracing::error!(path = %self.path.display(), error = %format!("{e:#}"),
                "cannot read the allowlist; the last list read stays in force");
            seen.failing = true;
        }
    }

    /// Returns whether the list changed.
    fn reload(&self, read_contents: bool) -> anyhow::Result<bool> {
        let meta = fs::metadata(&self.path)?;
        let key = meta_key(&meta);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !read_contents && seen.meta == Some(key) {
            return Ok(false);
        }
        let text = fs::read(&self.path)?;
        seen.meta = Some(key);
        if seen.failing {
            tracing::info!(path = %self.path.display(), "the allowlist is readable again");
            seen.failing = false;
        }
        if seen.text.as_ref() == Some(&text) {
            return Ok(false);
        }
        let Ok(s) = std::str::from_utf8(&text) else {
            bail!("the allowlist is not UTF-8 text");
        };
        let (list, errors) = Allowlist::parse(s);
        for e in &errors {
            tracing::warn!(path = %self.path.display(), line = e.line, "allowlist line skipped: {}", e.reason);
        }
        let first = seen.text.is_none();
        seen.text = Some(text);
        drop(seen);
        if !first {
            tracing::info!(path = %self.path.display(), devices = list.len(), "allowlist re-read");
        }
        let new = Arc::new(list);
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(true)
    }

    /// Watches the file: compares its contents every `period` until the handle is dropped.
    pub fn watch(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                // A local file read of a few hundred KiB at most; off the reactor all the same.
                let _ = tokio::task::spawn_blocking(move || me.refresh_contents()).await;
            }
        })
    }
}

/// Writes `text` to `path` atomically: a new file beside it, fsync'd, renamed over it.
/// The new file keeps the old one's permissions.
pub fn write_atomically(path: &Path, text: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text)?;
    if let Ok(m) = fs::metadata(path) {
        f.set_permissions(m.permissions())?;
    }
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("renaming over {}", path.display()))?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Adds a line `FP NAME` to the allowlist file (created if missing). Fails if the fingerprint,
/// or the name, is already allowed.
pub fn allow(path: &Path, fp: &Fingerprint, name: Option<&DeviceId>) -> anyhow::Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (list, _) = Allowlist::parse(&text);
    if let Some(e) = list.get(fp) {
        bail!("{fp} is already allowed (line {})", e.line);
    }
    if let Some(n) = name
        && let Some(other) = list.named(n)
    {
        bail!(
            "device id {n} is already allowed for {other}; revoke that one first \
                 (one device id, one certificate)"
        );
    }
    let mut out = text;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    match name {
        Some(n) => out.push_str(&format!("{fp}  {n}\n")),
        None => out.push_str(&format!("{fp}\n")),
    }
    write_atomically(path, out.as_bytes())
}

/// Removes the lines of `fp` from the allowlist file, leaving a comment saying when. Returns the
/// number of lines removed (an error if none).
pub fn revoke(path: &Path, fp: &Fingerprint, when: &str) -> anyhow::Result<usize> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::with_capacity(text.len() + 64);
    let mut removed = 0;
    for line in text.lines() {
        let content = line.split('#').next().unwrap_or("");
        let hit = content
            .split_whitespace()
            .next()
            .and_then(|w| w.parse::<Fingerprint>().ok())
            == Some(*fp);
        if hit {
            removed += 1;
            out.push_str(&format!("# revoked {when}: {}\n", line.trim()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if removed == 0 {
        bail!("{fp} is not on the allowlist {}", path.display());
    }
    write_atomically(path, out.as_bytes())?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }

    #[test]
    fn parse_lines_comments_and_errors() {
        let text = format!(
            "# header\n\n{}  dev-a   # kitchen\n{}\nnot-a-fingerprint x\n{} dev-a\n{} a b\n{} bad/name\n{}\n",
            fp(1),
            fp(2),
            fp(3),
            fp(4),
            fp(5),
            fp(1)
        );
        let (list, errors) = Allowlist::parse(&text);
        assert_eq!(list.len(), 2);
        assert_eq!(
            list.get(&fp(1)).unwrap().name.as_ref().unwrap().as_str(),
            "dev-a"
        );
        assert_eq!(list.get(&fp(2)).unwrap().name, None);
        assert_eq!(list.named(&DeviceId::new("dev-a").unwrap()), Some(&fp(1)));
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![5, 6, 7, 8, 9], "{errors:?}");
        assert!(errors[1].reason.contains("already given"));
    }

    #[test]
    fn allow_and_revoke_edit_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist");
        let a = DeviceId::new("dev-a").unwrap();
        allow(&path, &fp(1), Some(&a)).unwrap();
        allow(&path, &fp(2), None).unwrap();
        assert!(allow(&path, &fp(1), None).is_err());
        assert!(allow(&path, &fp(3), Some(&a)).is_err());
        let file = AllowlistFile::open(&path).unwrap();
        assert_eq!(file.current().len(), 2);
        assert_eq!(revoke(&path, &fp(1), "2026-11-21T00:00:00Z").unwrap(), 1);
        assert!(revoke(&path, &fp(1), "now").is_err());
        file.refresh();
        assert_eq!(file.current().len(), 1);
        assert!(file.current().get(&fp(1)).is_none());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("# revoked 2026-11-21T00:00:00Z: {}  dev-a", fp(1))));
    }

    #[test]
    fn unreadable_file_keeps_the_last_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist");
        fs::write(&path, format!("{}\n", fp(1))).unwrap();
        let file = AllowlistFile::open(&path).unwrap();
        fs::remove_file(&path).unwrap();
        file.refresh_contents();
        assert!(file.current().get(&fp(1)).is_some());
        fs::write(&path, "").unwrap();
        file.refresh_contents();
        assert!(file.current().is_empty());
    }
}
