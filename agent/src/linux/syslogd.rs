//! The syslog listener: what programs send to `/dev/log` goes into the kernel log, so it
//! joins the kernel's lines (and the `logos` apps') in one ordered stream.
//!
//! - **Sockets.** A Unix datagram socket at `/dev/log` by default: glibc's and musl's
//!   `syslog(3)` and busybox `logger` all send datagrams. A stream socket can be added (or used
//!   instead) for senders that only speak stream (`stream:PATH`); a path is one socket, so one
//!   path cannot be both. Stream messages end with a NUL (glibc) or a newline, or are
//!   octet-counted (`LEN SP MSG`, RFC 6587). The socket file is made writable by everyone, as
//!   syslogd does.
//! - **Not fighting a syslogd.** If the path is a socket somebody answers on, the agent stops
//!   with an error saying so (it never steals a running daemon's socket); a socket nobody
//!   answers on is a stale leftover and is replaced; anything else at the path is left alone
//!   and is an error too.
//! - **Messages.** Parsed by [`crate::syslog::parse`] (RFC 3164, RFC 5424, bare text). The
//!   tag is the app's name (`syslog` when there is none), the pid is kept, facility and
//!   severity become the record's priority. A message with several lines becomes several
//!   records; long lines are split and marked as `logos` does.
//! - **Token buckets per tag**, with the limits of `[logos.app.TAG]` (or `[logos.default]`)
//!   from the agent's configuration: a flooding daemon loses its own lines, not others'. At
//!   most [`MAX_TAGS`] tags are tracked; the one unused longest makes room (its unreported
//!   drops are reported first).
//! - **No loops.** A klogd (busybox `klogd`, sysklogd) reads the kernel log and sends it to
//!   syslog: written back into kmsg every kernel line would come round again, forever. Messages
//!   with the kernel facility or the tag `kernel` are therefore dropped (and counted).
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};

use super::config::Config;
use super::logos::{KmsgWriter, REPORT_LEVEL, admit_and_write, mono_us, write_report};
use crate::bucket::AppLimiter;
use crate::logline::{KmsgHeader, LineSplitter, NAME_MAX, Piece};
use crate::syslog::{self, kmsg_level};

/// Where syslog(3) sends.
pub const DEFAULT_SOCKET: &str = "/dev/log";

/// The largest message kept whole; longer datagrams are cut by the kernel to this buffer and
/// longer stream frames are cut here (the rest starts a new message).
pub const MAX_MESSAGE: usize = 64 << 10;

/// Tags whose buckets are kept at once.
pub const MAX_TAGS: usize = 512;

/// Stream connections served at once; more are closed at once.
pub const MAX_STREAM_CONNECTIONS: usize = 64;

/// The name used for messages without a tag.
pub const UNTAGGED: &[u8] = b"syslog";

/// Facility 0: the kernel's. Userspace `syslog(3)` cannot send it (glibc and musl replace it by
/// the default facility), so a message that has it was forged by a klogd-like relay.
const LOG_KERN: u8 = 0;

/// One socket to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    /// A datagram socket at this path.
    Dgram(PathBuf),
    /// A stream socket at this path.
    Stream(PathBuf),
}

impl SocketSpec {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Dgram(p) | Self::Stream(p) => p,
        }
    }
}

impl std::str::FromStr for SocketSpec {
    type Err = String;

    /// `PATH` or `dgram:PATH` (datagram), `stream:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, path) = match s.split_once(':') {
            Some(("dgram", p)) => ("dgram", p),
            Some(("stream", p)) => ("stream", p),
            _ => ("dgram", s),
        };
        if path.is_empty() {
            return Err(format!("{s:?}: expected PATH, dgram:PATH or stream:PATH"));
        }
        Ok(match kind {
            "stream" => Self::Stream(path.into()),
            _ => Self::Dgram(path.into()),
        })
    }
}

impl std::fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dgram(p) => write!(f, "dgram:{}", p.display()),
            Self::Stream(p) => write!(f, "stream:{}", p.display()),
        }
    }
}

/// A bound socket.
#[derive(Debug)]
pub enum Bound {
    /// A datagram socket.
    Dgram(UnixDatagram, PathBuf),
    /// A listening stream socket.
    Stream(UnixListener, PathBuf),
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (removed). Errors if a
/// live socket (a running syslogd) or anything that is not a socket is there.
pub fn claim_path(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; it is left alone: remove it, or listen on another path \
             (--syslog-socket PATH, or `none`)",
            path.display()
        );
    }
    let live = |e: &io::Error| e.kind() != io::ErrorKind::ConnectionRefused;
    // A datagram "connect" succeeds if something is bound there; a stream socket at the path
    // answers EPROTOTYPE, so try a stream connection as well.
    let probe = UnixDatagram::unbound().and_then(|s| s.connect(path));
    let probe = match probe {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PROTOTYPE.raw_os_error()) => {
            UnixStream::connect(path).map(drop)
        }
        other => other,
    };
    match probe {
        Ok(()) => bail!(
            "a syslog daemon already listens on {} (syslogd, rsyslogd, systemd-journald?): stop \
             it, or listen on another path (--syslog-socket PATH, or `none` to leave syslog to it)",
            path.display()
        ),
        Err(e) if live(&e) => Err(e).with_context(|| {
            format!(
                "probing {} (a socket already there) for a running syslog daemon",
                path.display()
            )
        }),
        Err(_) => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display())),
    }
}

/// Binds every socket (see [`claim_path`]); world-writable like syslogd's.
pub fn bind(specs: &[SocketSpec]) -> anyhow::Result<Vec<Bound>> {
    let mut bound = Vec::with_capacity(specs.len());
    for spec in specs {
        let path = spec.path();
        claim_path(path)?;
        let b = match spec {
            SocketSpec::Dgram(p) => UnixDatagram::bind(p).map(|s| Bound::Dgram(s, p.clone())),
            SocketSpec::Stream(p) => UnixListener::bind(p).map(|s| Bound::Stream(s, p.clone())),
        }
        .with_context(|| format!("binding the syslog socket {spec}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("making {} writable for every user", path.display()))?;
        bound.push(b);
    }
    Ok(bound)
}

/// Counters of what the listener did, shared with whoever wants to report them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received.
    pub messages: AtomicU64,
    /// Messages dropped because they came from the kernel log (klogd); see the module docs.
    pub kernel_echoes: AtomicU64,
    /// Records the token buckets refused.
    pub rate_limited: AtomicU64,
    /// Messages that could not be written to the kernel log.
    pub write_errors: AtomicU64,
}

struct Tag {
    limiter: AppLimiter,
    last_used: u64,
}

/// Where messages go: the kernel log, through one token-bucket pair per tag.
pub struct Sink {
    out: KmsgWriter,
    config: Config,
    tags: HashMap<Vec<u8>, Tag>,
    stats: Arc<Stats>,
    tick: u64,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("tags", &self.tags.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// A sink writing to `out` with the per-tag limits of `config`.
    pub fn new(out: KmsgWriter, config: Config) -> Self {
        Self {
            out,
            config,
            tags: HashMap::new(),
            stats: Arc::default(),
            tick: 0,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Handles one message (a datagram or one stream frame).
    pub fn message(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let m = syslog::parse(bytes);
        let name = m.tag.unwrap_or(UNTAGGED);
        if m.facility == LOG_KERN || name == b"kernel" {
            self.stats.kernel_echoes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // The name as kmsg shows it is cut at NAME_MAX; buckets go by that name too.
        let name = name.get(..NAME_MAX).unwrap_or(name);
        self.tick += 1;
        self.ensure_tag(name)?;
        let Some(tag) = self.tags.get_mut(name) else {
            return Ok(());
        };
        tag.last_used = self.tick;
        let header = KmsgHeader {
            level: kmsg_level(m.severity),
            facility: m.facility,
            name,
            pid: m.pid,
        };
        let (out, stats) = (&mut self.out, &self.stats);
        let mut result = Ok(());
        let mut emit = |text: &[u8], piece: Piece| {
            if result.is_err() || (piece == Piece::Whole && text.is_empty()) {
                return;
            }
            let before = tag.limiter.totals().dropped_lines;
            result = admit_and_write(&mut tag.limiter, out, &header, piece, text);
            if tag.limiter.totals().dropped_lines != before {
                stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
        };
        let mut lines: LineSplitter = LineSplitter::new();
        lines.feed(m.msg, &mut emit);
        lines.finish(&mut emit);
        if result.is_err() {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Makes the state of tag `name` (and room for it) if it is new.
    fn ensure_tag(&mut self, name: &[u8]) -> io::Result<()> {
        if self.tags.contains_key(name) {
            return Ok(());
        }
        if self.tags.len() >= MAX_TAGS {
            self.evict_oldest()?;
        }
        let limits = self.config.limits_for(&String::from_utf8_lossy(name));
        self.tags.insert(
            name.to_vec(),
            Tag {
                limiter: AppLimiter::new(limits, mono_us()),
                last_used: 0,
            },
        );
        Ok(())
    }

    fn evict_oldest(&mut self) -> io::Result<()> {
        let Some(oldest) = self
            .tags
            .iter()
            .min_by_key(|(_, t)| t.last_used)
            .map(|(k, _)| k.clone())
        else {
            return Ok(());
        };
        if let Some(mut t) = self.tags.remove(&oldest)
            && let Some(r) = t.limiter.take_pending_report()
        {
            write_report(&mut self.out, &report_header(&oldest), &r)?;
        }
        Ok(())
    }

    /// Reports every tag's drops not reported yet (at shutdown).
    pub fn finish(&mut self) -> io::Result<()> {
        for (name, t) in &mut self.tags {
            if let Some(r) = t.limiter.take_pending_report() {
                write_report(&mut self.out, &report_header(name), &r)?;
            }
        }
        Ok(())
    }
}

fn report_header(name: &[u8]) -> KmsgHeader<'_> {
    KmsgHeader {
        level: REPORT_LEVEL,
        facility: syslog::DEFAULT_FACILITY,
        name,
        pid: None,
    }
}

/// Cuts a syslog byte stream into messages: each ends at a NUL or a newline, or is
/// octet-counted (`LEN SP MSG`, RFC 6587) when a frame starts with digits, a space and `<`.
/// A frame longer than [`MAX_MESSAGE`] is cut there.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    /// Bytes still owed to an octet-counted frame being read.
    counted: Option<usize>,
}

impl StreamFramer {
    /// Feeds bytes; `emit` gets every complete message.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !data.is_empty() {
            if let Some(want) = self.counted {
                let take = want.saturating_sub(self.buf.len()).min(data.len());
                let (now, rest) = data.split_at(take);
                self.buf.extend_from_slice(now);
                data = rest;
                if self.buf.len() >= want {
                    emit(&self.buf);
                    self.buf.clear();
                    self.counted = None;
                }
                continue;
            }
            if self.buf.is_empty()
                && let Some((len, header)) = octet_count(data)
            {
                self.counted = Some(len.min(MAX_MESSAGE));
                data = data.get(header..).unwrap_or_default();
                continue;
            }
            match data.iter().position(|&b| b == 0 || b == b'\n') {
                Some(end) => {
                    let (msg, rest) = data.split_at(end);
                    self.push(msg, emit);
                    if !self.buf.is_empty() {
                        emit(&self.buf);
                    }
                    self.buf.clear();
                    data = rest.get(1..).unwrap_or_default();
                }
                None => {
                    self.push(data, emit);
                    data = &[];
                }
            }
        }
    }

    fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8])) {
        while self.buf.len() + bytes.len() > MAX_MESSAGE {
            let room = MAX_MESSAGE - self.buf.len();
            let (now, rest) = bytes.split_at(room);
            self.buf.extend_from_slice(now);
            emit(&self.buf);
            self.buf.clear();
            bytes = rest;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The connection closed: emits an unterminated last message.
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            emit(&self.buf);
        }
        self.buf.clear();
        self.counted = None;
    }
}

/// `LEN SP <` at the start of `data`: the length and the header's size. Needs the `<` to be
/// there already (a frame whose first bytes arrive alone is read as delimited).
fn octet_count(data: &[u8]) -> Option<(usize, usize)> {
    let digits = data
        .iter()
        .take(6)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || data.get(digits) != Some(&b' ') || data.get(digits + 1) != Some(&b'<') {
        return None;
    }
    let len: usize = std::str::from_utf8(data.get(..digits)?)
        .ok()?
        .parse()
        .ok()?;
    (len > 0).then_some((len, digits + 1))
}

/// A running listener; its threads live as long as the process.
#[derive(Debug)]
pub struct Listener {
    /// The counters.
    pub stats: Arc<Stats>,
    /// The sink (to report pending drops at shutdown).
    pub sink: Arc<Mutex<Sink>>,
}

fn deliver(sink: &Mutex<Sink>, msg: &[u8]) {
    let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = s.message(msg) {
        // Say it once per power of two, not for every message.
        let n = s.stats.write_errors.load(Ordering::Relaxed);
        if n.is_power_of_two() {
            eprintln!("blackbox-agent: syslog: writing to the kernel log: {e} ({n} failed so far)");
        }
    }
}

/// Starts one thread per socket (and one per stream connection).
pub fn start(sockets: Vec<Bound>, sink: Sink) -> anyhow::Result<Listener> {
    let stats = sink.stats();
    let sink = Arc::new(Mutex::new(sink));
    for b in sockets {
        let sink = Arc::clone(&sink);
        match b {
            Bound::Dgram(sock, path) => std::thread::Builder::new()
                .name("syslog-dgram".into())
                .spawn(move || serve_dgram(&sock, &path, &sink)),
            Bound::Stream(sock, path) => std::thread::Builder::new()
                .name("syslog-stream".into())
                .spawn(move || serve_stream(&sock, &path, sink)),
        }
        .context("starting a syslog thread")?;
    }
    Ok(Listener { stats, sink })
}

fn serve_dgram(sock: &UnixDatagram, path: &Path, sink: &Mutex<Sink>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => deliver(sink, buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!(
                    "blackbox-agent: syslog: receiving on {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_stream(listener: &UnixListener, path: &Path, sink: Arc<Mutex<Sink>>) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "blackbox-agent: syslog: accepting on {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_STREAM_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            continue; // dropping `conn` closes it; the sender retries or falls back
        }
        let (sink, open) = (Arc::clone(&sink), Arc::clone(&open));
        let spawned = std::thread::Builder::new()
            .name("syslog-conn".into())
            .spawn(move || {
                read_stream(conn, &sink);
                open.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("blackbox-agent: syslog: no thread for a connection: {e}");
        }
    }
}

fn read_stream(mut conn: UnixStream, sink: &Mutex<Sink>) {
    let mut framer = StreamFramer::default();
    let mut buf = vec![0u8; 16 << 10];
    let mut emit = |msg: &[u8]| deliver(sink, msg);
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => framer.feed(buf.get(..n).unwrap_or_default(), &mut emit),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    framer.finish(&mut emit);
}

/// Binds `specs`, writes to `kmsg` and starts the listener threads.
pub fn listen(specs: &[SocketSpec], kmsg: &Path, config: Config) -> anyhow::Result<Listener> {
    let bound = bind(specs)?;
    let out = KmsgWriter::open(kmsg)?;
    start(bound, Sink::new(out, config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut f = StreamFramer::default();
        let mut out = Vec::new();
        let mut emit = |m: &[u8]| out.push(m.to_vec());
        for c in chunks {
            f.feed(c, &mut emit);
        }
        f.finish(&mut emit);
        out
    }

    #[test]
    fn stream_frames_end_at_nul_or_newline_across_reads() {
        assert_eq!(
            frames(&[b"<13>a\0<13>b", b"c\n<14>d"]),
            vec![b"<13>a".to_vec(), b"<13>bc".to_vec(), b"<14>d".to_vec()]
        );
        // Empty frames (a NUL after a newline) are not messages.
        assert_eq!(frames(&[b"<13>a\n\0\n"]), vec![b"<13>a".to_vec()]);
    }

    #[test]
    fn octet_counted_frames_may_hold_newlines() {
        assert_eq!(
            frames(&[b"9 <13>a\nbc", b"d6 <13>ef"]),
            vec![b"<13>a\nbcd".to_vec(), b"<13>ef".to_vec()]
        );
    }

    #[test]
    fn an_endless_frame_is_cut_at_the_limit() {
        let big = vec![b'x'; MAX_MESSAGE * 2 + 10];
        let out = frames(&[&big]);
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_MESSAGE, MAX_MESSAGE, 10]
        );
    }

    #[test]
    fn socket_specs_parse() {
        assert_eq!("/dev/log".parse(), Ok(SocketSpec::Dgram("/dev/log".into())));
        assert_eq!(
            "stream:/run/log".parse(),
            Ok(SocketSpec::Stream("/run/log".into()))
        );
        assert!("stream:".parse::<SocketSpec>().is_err());
    }
}
