//! Reading the log stream: `/dev/kmsg` itself (one record per `read()`, EPIPE when the kernel
//! overwrote records) or a file/FIFO holding the same format one record per line (tests,
//! replays), followed like `tail -f`.
//!
//! The reader resumes after a sequence number, drops anything at or before it, and turns every
//! discontinuity in sequence numbers into a [`Event::Gap`] with the exact range lost.
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use crate::kmsg::{self, KmsgRecord};

/// What the reader thread sends.
#[derive(Debug)]
pub enum Event {
    /// A record.
    Record(KmsgRecord),
    /// Records `first..=last` are gone (overwritten in the kernel's buffer, or gone before the
    /// agent started); `usec` is the timestamp of the record after them.
    Gap {
        /// First lost sequence number.
        first: u64,
        /// Last lost sequence number.
        last: u64,
        /// Monotonic time of the record that followed the gap.
        usec: u64,
    },
    /// Everything the kernel held when the agent started has been read (sent once).
    CaughtUp,
    /// The source failed for good.
    Failed(String),
}

/// Starts the reader thread.
pub fn spawn(
    path: PathBuf,
    resume_after: Option<u64>,
    tx: SyncSender<Event>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let file = File::open(&path)?;
    let is_dev = file.metadata()?.file_type().is_char_device();
    std::thread::Builder::new()
        .name("kmsg-reader".into())
        .spawn(move || {
            let mut filter = SeqFilter { last: resume_after };
            let res = if is_dev {
                read_device(file, &mut filter, &tx)
            } else {
                read_lines(file, &path, &mut filter, &tx)
            };
            if let Err(e) = res {
                let _ = tx.send(Event::Failed(format!("{}: {e}", path.display())));
            }
        })
}

struct SeqFilter {
    last: Option<u64>,
}

impl SeqFilter {
    /// Returns false if the receiver is gone.
    fn offer(&mut self, rec: KmsgRecord, tx: &SyncSender<Event>) -> bool {
        let expected = self.last.map_or(0, |l| l.saturating_add(1));
        if self.last.is_some_and(|l| rec.seq <= l) {
            return true; // already held (agent restart) — never twice
        }
        if rec.seq > expected
            && tx
                .send(Event::Gap {
                    first: expected,
                    last: rec.seq - 1,
                    usec: rec.usec,
                })
                .is_err()
        {
            return false;
        }
        self.last = Some(rec.seq);
        tx.send(Event::Record(rec)).is_ok()
    }
}

fn read_device(mut f: File, filter: &mut SeqFilter, tx: &SyncSender<Event>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut caught_up = false;
    loop {
        if !caught_up {
            let mut fds = [rustix::event::PollFd::new(&f, rustix::event::PollFlags::IN)];
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n == 0) {
                caught_up = true;
                if tx.send(Event::CaughtUp).is_err() {
                    return Ok(());
                }
            }
        }
        match f.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(100)),
            Ok(n) => match kmsg::parse(&buf[..n]) {
                Ok(rec) => {
                    if !filter.offer(rec, tx) {
                        return Ok(());
                    }
                }
                Err(e) => eprintln!("blackbox-agent: skipping unparsable kmsg record: {e}"),
            },
            // The kernel overwrote records we had not read: the next read returns the oldest
            // remaining one, and the sequence jump becomes a gap record.
            Err(e) if e.raw_os_error() == Some(32) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn read_lines(
    f: File,
    path: &Path,
    filter: &mut SeqFilter,
    tx: &SyncSender<Event>,
) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let mut line = Vec::new();
    let mut caught_up = false;
    loop {
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            if !caught_up {
                caught_up = true;
                if tx.send(Event::CaughtUp).is_err() {
                    return Ok(());
                }
            }
            // End of what was written so far (or a partial line): wait for more, like tail -f.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if line.first() != Some(&b' ') && line.len() > 1 {
            match kmsg::parse(&line) {
                Ok(rec) => {
                    if !filter.offer(rec, tx) {
                        return Ok(());
                    }
                }
                Err(e) => eprintln!(
                    "blackbox-agent: {}: skipping unparsable line: {e}",
                    path.display()
                ),
            }
        }
        line.clear();
    }
}
