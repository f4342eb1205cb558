//! The syslog listener, the real binary: `blackbox-agent syslog` (and `run`, which starts the
//! same listener) on sockets in a temporary directory, writing into a file that stands in for
//! /dev/kmsg. Senders are real: util-linux `logger`, busybox `logger` and Python's `syslog`
//! module (glibc's syslog(3)), plus raw datagrams in the exact formats glibc and musl send.
#![allow(missing_docs, clippy::unwrap_used)]

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::records;

const BIN: &str = env!("CARGO_BIN_EXE_blackbox-agent");

/// A running `blackbox-agent syslog`, stopped with SIGTERM when dropped.
struct Listener {
    child: Child,
    dir: tempfile::TempDir,
}

impl Listener {
    fn start(sockets: &[&str], config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kmsg"), b"").unwrap();
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        let mut c = Command::new(BIN);
        c.arg("syslog")
            .arg("--kmsg")
            .arg(dir.path().join("kmsg"))
            .arg("--config")
            .arg(dir.path().join("agent.toml"));
        for s in sockets {
            let (kind, name) = s.split_once(':').unwrap_or(("dgram", s));
            c.arg("--socket")
                .arg(format!("{kind}:{}", dir.path().join(name).display()));
        }
        let child = c.stderr(Stdio::piped()).spawn().unwrap();
        let l = Self { child, dir };
        for s in sockets {
            let name = s.split_once(':').map_or(*s, |(_, n)| n);
            wait_for(|| l.path(name).exists(), "the socket to appear");
        }
        l
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn send(&self, socket: &str, msg: &[u8]) {
        let s = UnixDatagram::unbound().unwrap();
        s.send_to(msg, self.path(socket)).unwrap();
    }

    /// The records written so far, as (PRI, text after the PRI).
    fn records(&self) -> Vec<(u8, String)> {
        records(&self.path("kmsg"))
    }

    /// Waits until `n` records are there; returns them.
    fn wait_records(&self, n: usize) -> Vec<(u8, String)> {
        wait_for(|| self.records().len() >= n, &format!("{n} records"));
        self.records()
    }

    /// Stops it with SIGTERM; returns its stderr.
    fn stop(mut self) -> String {
        Command::new("kill")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// facility * 8 + severity.
const fn pri(facility: u8, severity: u8) -> u8 {
    facility * 8 + severity
}

#[test]
fn logger_glibc_and_musl_messages_arrive_with_tag_pid_and_level() {
    let l = Listener::start(&["log", "stream:slog"], "");
    let sock = l.path("log");
    let sock = sock.to_str().unwrap();
    // util-linux logger: RFC 5424 by default, RFC 3164 on request, datagram and stream.
    let logger = |args: &[&str]| {
        let st = Command::new("logger").args(args).status().unwrap();
        assert!(st.success(), "logger {args:?}");
    };
    logger(&[
        "-u",
        sock,
        "-i",
        "-t",
        "hostapd",
        "-p",
        "daemon.warning",
        "wlan0: STA associated",
    ]);
    logger(&[
        "-u",
        sock,
        "--rfc3164",
        "-t",
        "dnsmasq",
        "-p",
        "local0.err",
        "no address range",
    ]);
    let slog = l.path("slog");
    logger(&[
        "-u",
        slog.to_str().unwrap(),
        "--tcp",
        "-t",
        "udhcpd",
        "-p",
        "user.info",
        "over a stream",
    ]);
    // glibc syslog(3) with LOG_PID, exactly as it sends it (no trailing newline).
    l.send("log", b"<30>Nov 21 10:00:01 ntpd[812]: time synchronised");
    // musl syslog(3): always a trailing newline; no openlog() gives an empty tag.
    l.send("log", b"<14>Nov 21 10:00:02 watchdogd: fed\n");
    l.send("log", b"<13>Nov 21 10:00:03 : untagged\n");
    // glibc over a stream socket ends each message with a NUL.
    let mut s = UnixStream::connect(l.path("slog")).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"<11>Nov 21 10:00:04 app[9]: one\0<11>app[9]: two\0",
    )
    .unwrap();
    drop(s);

    let recs = l.wait_records(8);
    let want = [
        (pri(3, 4), "hostapd"),
        (pri(16, 3), "dnsmasq"),
        (pri(1, 6), "udhcpd"),
        (pri(3, 6), "ntpd[812]: time synchronised"),
        (pri(1, 6), "watchdogd: fed"),
        (pri(1, 5), "syslog: untagged"),
        (pri(1, 3), "app[9]: one"),
        (pri(1, 3), "app[9]: two"),
    ];
    for (p, text) in want {
        assert!(
            recs.iter().any(|(rp, rt)| *rp == p && rt.starts_with(text)),
            "no record <{p}>{text}… in {recs:#?}"
        );
    }
    // util-linux logger adds its pid; the message text follows the tag.
    assert!(
        recs.iter()
            .any(|(_, t)| t.starts_with("hostapd[") && t.ends_with("]: wlan0: STA associated")),
        "{recs:#?}"
    );
    assert_eq!(recs.len(), 8, "{recs:#?}");
}

#[test]
fn busybox_logger_and_python_syslog_reach_dev_log() {
    // busybox `logger` and glibc's syslog(3) only ever write to /dev/log, so this test gives
    // them one of their own: a private mount namespace with a tmpfs on /dev (root only; CI
    // runs as root). The host's /dev is untouched.
    let dir = tempfile::tempdir().unwrap();
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, b"").unwrap();
    let busybox = which("busybox").expect(
        "busybox is not installed: `cargo xtask test` installs busybox-static; by hand: \
         apt-get install busybox-static",
    );
    let script = format!(
        r#"set -e
mount -t tmpfs tmpfs /dev
mknod -m 666 /dev/null c 1 3
"{bin}" syslog --socket /dev/log --kmsg "{kmsg}" --config /dev/null 2>"{dir}/agent.err" &
agent=$!
i=0; while [ ! -S /dev/log ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
"{busybox}" logger -t dvrd -p local3.crit "decoder stalled"
"{busybox}" logger "no tag given"
python3 -c 'import syslog; syslog.openlog("pyapp", syslog.LOG_PID, syslog.LOG_DAEMON); syslog.syslog(syslog.LOG_ERR, "from glibc syslog(3)")'
i=0; while [ $(wc -l < "{kmsg}") -lt 3 ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
kill $agent; wait $agent || true
"#,
        bin = BIN,
        kmsg = kmsg.display(),
        dir = dir.path().display(),
        busybox = busybox.display(),
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unshare failed (this test needs root for a private /dev): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&kmsg);
    assert!(
        recs.contains(&(pri(19, 2), "dvrd: decoder stalled".into())),
        "{recs:#?}"
    );
    // busybox logger without -t tags with the user's name.
    assert!(
        recs.iter()
            .any(|(p, t)| *p == pri(1, 5) && t.ends_with(": no tag given")),
        "{recs:#?}"
    );
    assert!(
        recs.iter().any(|(p, t)| *p == pri(3, 3)
            && t.starts_with("pyapp[")
            && t.ends_with("]: from glibc syslog(3)")),
        "{recs:#?}"
    );
    assert_eq!(recs.len(), 3, "{recs:#?}");
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

#[test]
fn a_flooding_tag_is_limited_while_a_quiet_one_loses_nothing() {
    // 2000 bytes of burst refilled over 1 s; a record costs its text's length.
    let l = Listener::start(
        &["log"],
        "[logos.app.flood]\nburst_bytes = 2000\nburst_secs = 1\n",
    );
    let line = |i: usize| format!("<14>flood: line {i:05} {}", "x".repeat(80));
    let sent_flood = 2000;
    for i in 0..sent_flood {
        l.send("log", line(i).as_bytes());
        if i % 100 == 0 {
            l.send(
                "log",
                format!("<14>quiet: still here {}", i / 100).as_bytes(),
            );
        }
    }
    // Let the burst bucket refill, then one more flood line brings the drop report.
    std::thread::sleep(Duration::from_millis(1200));
    l.send("log", b"<14>flood: after the storm");
    wait_for(
        || {
            l.records()
                .iter()
                .any(|(_, t)| t == "flood: after the storm")
        },
        "the last flood line",
    );
    let recs = l.records();
    let quiet: Vec<_> = recs
        .iter()
        .filter(|(_, t)| t.starts_with("quiet: "))
        .collect();
    assert_eq!(quiet.len(), 20, "the quiet app lost lines");
    let flood_kept = recs
        .iter()
        .filter(|(_, t)| t.starts_with("flood: line "))
        .count();
    assert!(
        flood_kept < sent_flood / 10,
        "{flood_kept} flood lines got through"
    );
    // Lines were admitted again now and then as the bucket refilled: each time, one report
    // counted the drops since the one before. Together they count every line not written.
    let text_len = line(0).len() - "<14>flood: ".len();
    let (mut lines, mut bytes) = (0, 0);
    for (p, t) in &recs {
        let Some(rest) = t.strip_prefix("flood: logos: dropped ") else {
            continue;
        };
        assert_eq!(*p, pri(1, 4), "a drop report is a warning: {t}");
        let (n, rest) = rest.split_once(" lines (").unwrap();
        let (b, _) = rest.split_once(" bytes)").unwrap();
        lines += n.parse::<usize>().unwrap();
        bytes += b.parse::<usize>().unwrap();
    }
    assert_eq!(lines, sent_flood - flood_kept);
    assert_eq!(bytes, lines * text_len);
    l.stop();
}

#[test]
fn kernel_lines_relayed_by_klogd_are_not_fed_back() {
    let l = Listener::start(&["log"], "");
    // busybox klogd: tag `kernel` (glibc replaces LOG_KERN by LOG_USER); sysklogd: facility 0.
    l.send(
        "log",
        b"<14>Nov 21 10:00:00 kernel: [   1.234] usb 1-1: new device",
    );
    l.send("log", b"<6>[   1.235] raw kernel facility");
    l.send("log", b"<14>app: after");
    let recs = l.wait_records(1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(recs, vec![(pri(1, 6), "app: after".into())]);
}

#[test]
fn a_running_syslogd_is_not_displaced_and_a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, b"").unwrap();
    let run = |path: &Path| {
        Command::new(BIN)
            .arg("syslog")
            .arg("--socket")
            .arg(path)
            .arg("--kmsg")
            .arg(&kmsg)
            .arg("--config")
            .arg("/dev/null")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // A live "syslogd" (datagram, then stream): the agent refuses and says why.
    for stream in [false, true] {
        let _ = std::fs::remove_file(&path);
        let _live: Box<dyn std::any::Any> = if stream {
            Box::new(std::os::unix::net::UnixListener::bind(&path).unwrap())
        } else {
            Box::new(UnixDatagram::bind(&path).unwrap())
        };
        let out = run(&path).wait_with_output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("already listens on"), "{err}");
        assert!(path.exists(), "the running daemon's socket was removed");
    }

    // A stale socket (its owner is gone): replaced.
    let _ = std::fs::remove_file(&path);
    drop(UnixDatagram::bind(&path).unwrap());
    assert!(path.exists());
    let mut child = run(&path);
    wait_for(
        || {
            UnixDatagram::unbound()
                .and_then(|s| s.send_to(b"<14>t: alive", &path))
                .is_ok()
                && !records(&kmsg).is_empty()
        },
        "the agent to take over the stale socket",
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // Something that is not a socket: left alone.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let out = run(&file).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

/// `blackbox-agent run` against a server that is not there, reading `kmsg` (a stand-in), with
/// its syslog listener on `sock`.
fn run_with_syslog(dir: &Path, kmsg: &Path, sock: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("run")
        .args(["--server", "http://127.0.0.1:9", "--device-id", "t"])
        .args(["--config", "/dev/null"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--kmsg")
        .arg(kmsg)
        .arg("--syslog-socket")
        .arg(sock);
    c
}

#[test]
fn run_listens_too() {
    let dir = tempfile::tempdir().unwrap();
    let (kmsg_in, kmsg_out) = (dir.path().join("kmsg-in"), dir.path().join("kmsg-out"));
    std::fs::write(&kmsg_in, b"6,1,1000,-;boot\n").unwrap();
    std::fs::write(&kmsg_out, b"").unwrap();
    let sock = dir.path().join("log");
    let mut child = run_with_syslog(dir.path(), &kmsg_in, &sock)
        .arg("--syslog-kmsg")
        .arg(&kmsg_out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        || {
            UnixDatagram::unbound()
                .and_then(|s| s.send_to(b"<27>Nov 21 10:00:00 app[3]: via run", &sock))
                .is_ok()
                && !records(&kmsg_out).is_empty()
        },
        "run's listener",
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(records(&kmsg_out)[0], (pri(3, 3), "app[3]: via run".into()));
}

#[test]
fn run_stops_when_the_socket_it_was_given_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("log");
    let _syslogd = UnixDatagram::bind(&sock).unwrap();
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, b"").unwrap();
    let out = run_with_syslog(dir.path(), &kmsg, &sock).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listens on"), "{err}");
}
