//! `blackbox-agent logos NAME [-- CMD ARGS…]`: an app's output into the kernel log.
//!
//! With a command, it runs it with stdout and stderr captured (stdin and the terminal's signals
//! pass through) and exits with its exit status (128 + the signal number if a signal killed
//! it, as shells report it). Without one, it reads its own stdin. Every line becomes one
//! `write()` to `/dev/kmsg` as `NAME[PID]: text` (`NAME: text` for stdin), so the app's lines
//! join the kernel's in one ordered stream; see [`crate::logline`] for line ends, long lines,
//! escaping and the optional leading `<N>` level (default: info, for stdout and stderr alike,
//! as systemd does).
//!
//! Each app has two token buckets ([`crate::bucket`]; limits from the agent's configuration,
//! [`super::config`]). Lines the buckets refuse are dropped and counted; the next line admitted
//! is preceded by one warning `NAME[PID]: logos: dropped N lines (B bytes) since T s (…)`, and
//! drops not yet reported when the app ends are reported then. Nothing is buffered beyond the
//! line being read.
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::bucket::{Admit, AppLimiter, DropReport, Limits};
use crate::logline::{
    KMSG_MAX, KmsgHeader, LOG_USER, LineSplitter, Piece, parse_level, write_kmsg_lines,
};

/// Level of lines without a `<N>` prefix: info.
pub const DEFAULT_LEVEL: u8 = 6;
/// Level of drop reports: warning.
pub const REPORT_LEVEL: u8 = 4;

/// Monotonic µs (the clock kmsg timestamps use).
pub fn mono_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0) / 1000)
}

/// Where the kernel says whether it rate-limits writes to /dev/kmsg.
pub const DEVKMSG_SYSCTL: &str = "/proc/sys/kernel/printk_devkmsg";

/// By default (`printk.devkmsg=ratelimit`) the kernel lets each writer of /dev/kmsg put 10
/// records per 5 s and drops the rest (it logs how many it suppressed). Apps' lines must all
/// get through, so this sets `kernel.printk_devkmsg=on` when it is `ratelimit` (the board
/// profiles also put `printk.devkmsg=on` on the kernel command line). Returns what to tell the
/// operator, if anything. `off` (writes refused) is left alone: someone chose it.
pub fn lift_devkmsg_ratelimit(sysctl: &Path) -> Option<String> {
    let now = std::fs::read_to_string(sysctl).ok()?;
    if now.trim() != "ratelimit" {
        return None;
    }
    Some(match std::fs::write(sysctl, "on\n") {
        Ok(()) => format!(
            "set {} to `on` (it was `ratelimit`: the kernel kept 10 lines per 5 s of each writer)",
            sysctl.display()
        ),
        Err(e) => format!(
            "the kernel rate-limits writes to /dev/kmsg ({} is `ratelimit`) and it could not be \
             changed ({e}): apps' lines beyond 10 per 5 s are dropped by the kernel (it logs how \
             many); boot with printk.devkmsg=on",
            sysctl.display()
        ),
    })
}

/// The kernel log (or a stand-in file or FIFO), written one record per `write()`.
#[derive(Debug)]
pub struct KmsgWriter {
    file: File,
    buf: Box<[u8; KMSG_MAX]>,
}

impl KmsgWriter {
    /// Opens `path` for writing (appending, for a regular file). For /dev/kmsg itself the
    /// kernel's rate limit on writers is lifted first ([`lift_devkmsg_ratelimit`]).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if path == Path::new("/dev/kmsg")
            && let Some(msg) = lift_devkmsg_ratelimit(Path::new(DEVKMSG_SYSCTL))
        {
            eprintln!("blackbox-agent: {msg}");
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {} for writing", path.display()))?;
        Ok(Self {
            file,
            buf: Box::new([0; KMSG_MAX]),
        })
    }

    /// Writes one piece of a line (one record, or more if escaping made it longer).
    pub fn write_line(
        &mut self,
        header: &KmsgHeader<'_>,
        piece: Piece,
        text: &[u8],
    ) -> io::Result<()> {
        let file = &mut self.file;
        write_kmsg_lines(header, piece, text, &mut self.buf, |rec| {
            let n = file.write(rec)?;
            if n == rec.len() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("kmsg took {n} of {} bytes", rec.len()),
                ))
            }
        })
    }
}

/// One app: its limiter and where its lines go. Shared by the stdout and stderr readers.
#[derive(Debug)]
pub struct App {
    name: String,
    pid: Option<u32>,
    limiter: AppLimiter,
    out: KmsgWriter,
}

impl App {
    /// An app `name` (with `pid`, if it is a process of ours) writing to `out`.
    pub fn new(name: &str, pid: Option<u32>, limits: Limits, out: KmsgWriter) -> Self {
        Self {
            name: name.to_owned(),
            pid,
            limiter: AppLimiter::new(limits, mono_us()),
            out,
        }
    }

    /// Admits (or drops and counts) one piece of a line and writes it.
    pub fn line(&mut self, level: u8, piece: Piece, text: &[u8]) -> io::Result<()> {
        let header = KmsgHeader {
            level,
            facility: LOG_USER,
            name: self.name.as_bytes(),
            pid: self.pid,
        };
        admit_and_write(&mut self.limiter, &mut self.out, &header, piece, text)
    }

    /// Reports drops not reported yet (at the end of the app's output).
    pub fn finish(&mut self) -> io::Result<()> {
        let Some(r) = self.limiter.take_pending_report() else {
            return Ok(());
        };
        let header = KmsgHeader {
            level: REPORT_LEVEL,
            facility: LOG_USER,
            name: self.name.as_bytes(),
            pid: self.pid,
        };
        write_report(&mut self.out, &header, &r)
    }
}

/// Admits one piece of a line through `limiter` and writes it to `out` with `header`; a due
/// drop report goes first. A refused piece is dropped (and counted by the limiter).
pub fn admit_and_write(
    limiter: &mut AppLimiter,
    out: &mut KmsgWriter,
    header: &KmsgHeader<'_>,
    piece: Piece,
    text: &[u8],
) -> io::Result<()> {
    match limiter.admit(mono_us(), text.len()) {
        Admit::Drop => Ok(()),
        Admit::Admit => out.write_line(header, piece, text),
        Admit::AdmitAfterDrops(report) => {
            let report_header = KmsgHeader {
                level: REPORT_LEVEL,
                ..*header
            };
            write_report(out, &report_header, &report)?;
            out.write_line(header, piece, text)
        }
    }
}

/// Writes a drop report as one line with `header`.
pub fn write_report(
    out: &mut KmsgWriter,
    header: &KmsgHeader<'_>,
    r: &DropReport,
) -> io::Result<()> {
    let mut text = String::new();
    let _ = r.format(&mut text);
    out.write_line(header, Piece::Whole, text.as_bytes())
}

/// Reads `input` to its end, splitting lines and handing them to the shared app.
pub fn pump(mut input: impl Read, app: &Mutex<App>) -> io::Result<()> {
    let mut splitter: LineSplitter = LineSplitter::new();
    let mut buf = vec![0u8; 16 << 10];
    // The level of a split line's later pieces is the first piece's.
    let mut level = DEFAULT_LEVEL;
    let mut err = Ok(());
    let mut emit = |line: &[u8], piece: Piece| {
        if err.is_err() {
            return;
        }
        let text = if piece.continued() {
            line
        } else {
            let (l, rest) = parse_level(line);
            level = l.unwrap_or(DEFAULT_LEVEL);
            rest
        };
        let mut a = app.lock().unwrap_or_else(|p| p.into_inner());
        err = a.line(level, piece, text);
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        splitter.feed(buf.get(..n).unwrap_or_default(), &mut emit);
    }
    splitter.finish(&mut emit);
    err
}

/// Passes SIGTERM and SIGHUP on to the command (so `kill logos`, as an init system stops a
/// service, stops the command, and logos still writes its last lines and passes its exit
/// status on). SIGINT is caught and not passed on: a terminal's Ctrl-C reaches the command
/// directly, and logos stays to write what the command prints on its way out.
fn forward_signals(pid: u32) -> anyhow::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGHUP, SIGINT])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .context("the command's pid is out of range")?;
    std::thread::Builder::new()
        .name("logos-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let sig = match sig {
                    SIGTERM => rustix::process::Signal::TERM,
                    SIGHUP => rustix::process::Signal::HUP,
                    _ => continue,
                };
                // The command may have exited already: nothing to do then.
                let _ = rustix::process::kill_process(pid, sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(handle)
}

/// Runs `logos`: returns the exit code to leave with.
pub fn run(name: &str, kmsg: &Path, limits: Limits, cmd: &[OsString]) -> anyhow::Result<i32> {
    let out = KmsgWriter::open(kmsg)?;
    let Some((prog, args)) = cmd.split_first() else {
        let app = Mutex::new(App::new(name, None, limits, out));
        pump(io::stdin().lock(), &app).context("reading stdin")?;
        app.lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish()
            .context("writing to the kernel log")?;
        return Ok(0);
    };
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", prog.to_string_lossy()))?;
    let forwarder = forward_signals(child.id())?;
    let app = Arc::new(Mutex::new(App::new(name, Some(child.id()), limits, out)));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let a2 = Arc::clone(&app);
    let err_thread = std::thread::spawn(move || match stderr {
        Some(s) => pump(s, &a2),
        None => Ok(()),
    });
    let r1 = match stdout {
        Some(s) => pump(s, &app),
        None => Ok(()),
    };
    let r2 = err_thread
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("stderr reader panicked")));
    // Stop forwarding before the child is reaped: until then its pid cannot be reused.
    forwarder.close();
    let status = child.wait().context("waiting for the command")?;
    let r3 = app.lock().unwrap_or_else(|p| p.into_inner()).finish();
    // The command's status is what the caller asked for, even if writing its lines failed:
    // say so, and still pass it on.
    for r in [r1, r2, r3] {
        if let Err(e) = r {
            eprintln!(
                "blackbox-agent logos {name}: writing to {}: {e}",
                kmsg.display()
            );
        }
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    })
}
