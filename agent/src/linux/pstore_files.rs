//! Collecting the pstore/ramoops files the kernel kept from the previous boot(s).
//!
//! [`collect`] reads `/sys/fs/pstore` (or any directory with the same names), parses each
//! ramoops file with [`crate::pstore`], and returns them in an order where concatenating
//! their lines reads forward in time within each file kind:
//!
//! - **dmesg** first. ramoops stores only `Part1` of a dump (`ramoops_pstore_write` refuses
//!   other parts), one dump per slot `dmesg-ramoops-<slot>`, and the slot counter restarts at
//!   0 every boot, so slot numbers do not order dumps across boots. The kernel sets each
//!   file's mtime to the wall-clock time ramoops stamped on the dump, so files are ordered by
//!   that time (to the second), then the dump counter (`Oops#1` before `Oops#2` of the same
//!   boot), then the part **descending** (Part2 holds the text just before Part1's, for
//!   backends that keep several parts), then the slot. Two dumps of one boot overlap (each
//!   holds the log tail up to its event); lines are not de-duplicated across files, since
//!   timestamps restart at every boot and equal lines of different boots are not duplicates.
//! - then **console** (the previous boot's console ring), then **pmsg**, each by id.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::pstore::{self, Dump, PstoreKind, PstoreName};

/// One parsed pstore file.
#[derive(Debug, Clone)]
pub struct PstoreFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The record type.
    pub kind: PstoreKind,
    /// The id in the name: the ramoops slot for dmesg, 0 for console and pmsg.
    pub id: u64,
    /// The file was `.enc.z` and was inflated here.
    pub compressed: bool,
    /// The file's mtime: for dmesg, when ramoops wrote the dump (wall clock of the crashed
    /// boot); for console and pmsg, only when pstore was mounted.
    pub mtime: Option<SystemTime>,
    /// The parsed content.
    pub dump: Dump,
}

/// What [`collect`] returns: the parsed files in reading order, and the entries left alone
/// with the reason.
pub type Collected = (Vec<PstoreFile>, Vec<(PathBuf, String)>);

/// Reads and parses every ramoops file in `dir`. A missing directory gives empty results.
///
/// Files over `max_bytes` (on disk, or once inflated), files that cannot be read or
/// inflated, and entries that are not ramoops dmesg/console/pmsg files are left alone and
/// listed with the reason in the second vector (sorted by path). Only failing to list the
/// directory is an error.
pub fn collect(dir: &Path, max_bytes: usize) -> std::io::Result<Collected> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().and_then(PstoreName::parse) else {
            skipped.push((path, "not a ramoops dmesg, console or pmsg file".to_owned()));
            continue;
        };
        match read_one(&path, name, max_bytes) {
            Ok(f) => files.push(f),
            Err(why) => skipped.push((path, why)),
        }
    }
    files.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    skipped.sort();
    Ok((files, skipped))
}

fn read_one(path: &Path, name: PstoreName, max_bytes: usize) -> Result<PstoreFile, String> {
    // lstat: a symlink is not something the kernel made.
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let limit = u64::try_from(max_bytes).unwrap_or(u64::MAX);
    if meta.len() > limit {
        return Err(format!(
            "{} bytes, over the limit of {max_bytes}",
            meta.len()
        ));
    }
    let mut content = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit.saturating_add(1)).read_to_end(&mut content))
        .map_err(|e| format!("read: {e}"))?;
    if content.len() > max_bytes {
        return Err(format!("grew over the limit of {max_bytes} bytes"));
    }
    let dump = pstore::parse_file(name.kind, name.compressed, &content, max_bytes)
        .map_err(|e| e.to_string())?;
    Ok(PstoreFile {
        path: path.to_owned(),
        kind: name.kind,
        id: name.id,
        compressed: name.compressed,
        mtime: mtime(path),
        dump,
    })
}

/// The file's mtime, through rustix (statx where the old `stat` has a 32-bit time, as on armv7
/// and MIPS): std's `modified()` reads it through the libc crate's 32-bit `time_t` on 32-bit
/// musl, which runs out in 2038.
fn mtime(path: &Path) -> Option<SystemTime> {
    let st = rustix::fs::lstat(path).ok()?;
    let secs = u64::try_from(st.st_mtime).ok()?;
    let nanos = u32::try_from(st.st_mtime_nsec).ok()?;
    UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
}

/// (kind, mtime in whole seconds, dump counter, part descending, id, path); see the module
/// docs. Only dmesg files use the time and header.
type OrderKey<'a> = (
    PstoreKind,
    Option<u64>,
    u32,
    std::cmp::Reverse<u32>,
    u64,
    &'a Path,
);

fn order_key(f: &PstoreFile) -> OrderKey<'_> {
    let (secs, count, part) = match (f.kind, f.dump.header()) {
        (PstoreKind::Dmesg, header) => (
            f.mtime
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            header.map_or(0, |h| h.count),
            header.map_or(0, |h| h.part),
        ),
        _ => (None, 0, 0),
    };
    (
        f.kind,
        secs,
        count,
        std::cmp::Reverse(part),
        f.id,
        f.path.as_path(),
    )
}

/// Deletes the files (which frees their pstore slots). Files already gone count as deleted;
/// returns the ones that could not be deleted.
pub fn unlink(files: &[PstoreFile]) -> Vec<(PathBuf, std::io::Error)> {
    files
        .iter()
        .filter_map(|f| match std::fs::remove_file(&f.path) {
            Ok(()) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some((f.path.clone(), e)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, content: &[u8], mtime_secs: Option<u64>) {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        if let Some(s) = mtime_secs {
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(s)).unwrap();
        }
    }

    fn texts(f: &PstoreFile) -> Vec<String> {
        f.dump
            .lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.text).into_owned())
            .collect()
    }

    #[test]
    fn missing_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (files, skipped) = collect(&dir.path().join("nope"), 1 << 20).unwrap();
        assert!(files.is_empty() && skipped.is_empty());
    }

    #[test]
    fn collects_sorts_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Slot 0 was overwritten by the newer boot's panic; slot 1 is an older boot's oops.
        write(
            d,
            "dmesg-ramoops-0",
            b"Panic#1 Part1\n<0>[    9.000000] Kernel panic - not syncing: new\n\nECC: No errors detected\n",
            Some(1_700_000_500),
        );
        write(
            d,
            "dmesg-ramoops-1",
            b"Oops#1 Part1\n<1>[   50.000000] Unable to handle kernel paging request\n",
            Some(1_700_000_000),
        );
        // Two dumps of one boot in the same second: by counter.
        let third = format!(
            "Oops#3 Part1\n<4>[   51.000000] third{}\n",
            " .".repeat(300)
        );
        let mut z = miniz_oxide::deflate::compress_to_vec(third.as_bytes(), 6);
        assert!(z.len() < 100);
        z.extend_from_slice(b"\nECC: No errors detected\n");
        write(d, "dmesg-ramoops-3.enc.z", &z, Some(1_700_000_000));
        write(
            d,
            "dmesg-ramoops-2",
            b"Oops#2 Part1\n<4>[   50.500000] second\n",
            Some(1_700_000_000),
        );
        write(
            d,
            "console-ramoops-0",
            b"rtial\n[    0.000000] Booting Linux on physical CPU 0x0\n[    9.000001] reboot\n",
            None,
        );
        write(d, "pmsg-ramoops-0", b"app: hello\napp: bye\n", None);
        write(d, "ftrace-ramoops-0", b"CPU:0 ts:1 ...\n", None);
        write(d, "dmesg-ramoops-9", &[b'x'; 2000], None);
        write(d, "dmesg-ramoops-8.enc.z", b"not deflate at all", None);
        std::fs::create_dir(d.join("console-ramoops-7")).unwrap();

        let (files, skipped) = collect(d, 1000).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "dmesg-ramoops-1",
                "dmesg-ramoops-2",
                "dmesg-ramoops-3.enc.z",
                "dmesg-ramoops-0",
                "console-ramoops-0",
                "pmsg-ramoops-0",
            ]
        );
        assert_eq!(texts(&files[0]), ["Unable to handle kernel paging request"]);
        assert!(files[2].compressed && files[2].kind == PstoreKind::Dmesg);
        assert_eq!(texts(&files[2]), [third[31..third.len() - 1].to_owned()]);
        assert_eq!(
            files[2].dump.ecc.as_deref(),
            Some("ECC: No errors detected")
        );
        assert_eq!(files[3].dump.reason.as_deref(), Some("Panic#1 Part1"));
        assert_eq!(
            files[3].mtime,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_500))
        );
        assert_eq!(files[4].dump.partial_dropped, 1);
        assert_eq!(
            texts(&files[4]),
            ["Booting Linux on physical CPU 0x0", "reboot"]
        );
        assert_eq!(texts(&files[5]), ["app: hello", "app: bye"]);

        let why: Vec<_> = skipped
            .iter()
            .map(|(p, w)| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    w.as_str(),
                )
            })
            .collect();
        assert_eq!(why.len(), 4, "{why:?}");
        assert_eq!(why[0].0, "console-ramoops-7");
        assert_eq!(why[0].1, "not a regular file");
        assert_eq!(why[1].0, "dmesg-ramoops-8.enc.z");
        assert!(why[1].1.contains("deflate"), "{}", why[1].1);
        assert_eq!(why[2].0, "dmesg-ramoops-9");
        assert!(why[2].1.contains("over the limit"), "{}", why[2].1);
        assert_eq!(why[3].0, "ftrace-ramoops-0");

        // An inflated size over the limit is skipped too.
        let (files, skipped) = collect(d, 200).unwrap();
        assert!(files.iter().all(|f| !f.compressed));
        assert!(
            skipped
                .iter()
                .any(|(p, w)| p.ends_with("dmesg-ramoops-3.enc.z") && w.contains("more than 200"))
        );

        let (files, _) = collect(d, 1000).unwrap();
        assert!(unlink(&files).is_empty());
        // Already gone: not an error.
        assert!(unlink(&files).is_empty());
        let (files, skipped) = collect(d, 1000).unwrap();
        assert!(files.is_empty());
        assert_eq!(skipped.len(), 4);
    }

    #[test]
    fn parts_of_one_dump_read_forward() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            "dmesg-ramoops-0",
            b"Panic#1 Part1\n<0>[    2.000000] newest\n",
            Some(1_700_000_000),
        );
        write(
            d,
            "dmesg-ramoops-1",
            b"Panic#1 Part2\n<6>[    1.000000] older\n",
            Some(1_700_000_000),
        );
        let (files, _) = collect(d, 1 << 20).unwrap();
        let lines: Vec<String> = files.iter().flat_map(texts).collect();
        assert_eq!(lines, ["older", "newest"]);
    }
}
