//! `blackbox-agent logos`, the real binary, writing into a file that stands in for /dev/kmsg
//! (O_APPEND: every record is one `write()`, as /dev/kmsg takes them).
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::records;

const BIN: &str = env!("CARGO_BIN_EXE_blackbox-agent");

fn logos(
    kmsg: &Path,
    config: Option<&Path>,
    name: &str,
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> Output {
    let mut c = Command::new(BIN);
    c.arg("logos").arg(name).arg("--kmsg").arg(kmsg);
    match config {
        Some(p) => c.arg("--config").arg(p),
        // Not the machine's /etc/blackbox/agent.toml.
        None => c.arg("--config").arg("/dev/null"),
    };
    if !cmd.is_empty() {
        c.arg("--").args(cmd);
    }
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn new_kmsg(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("kmsg");
    std::fs::write(&p, b"").unwrap();
    p
}

#[test]
fn wrapped_command_lines_and_exit_status() {
    let tmp = tempfile::tempdir().unwrap();
    let k = new_kmsg(tmp.path());
    let out = logos(
        &k,
        None,
        "app",
        &[
            "sh",
            "-c",
            "echo out; echo '<3>bad' >&2; printf 'no newline'; exit 7",
        ],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&k);
    assert_eq!(recs.len(), 3, "{recs:?}");
    let pid = recs[0]
        .1
        .strip_prefix("app[")
        .unwrap()
        .split_once(']')
        .unwrap()
        .0
        .to_owned();
    assert!(pid.parse::<u32>().is_ok());
    // Stdout and stderr are read concurrently: compare as a set, with PRI = user*8 + level.
    let mut got: Vec<(u8, String)> = recs;
    got.sort();
    let mut want = vec![
        (14, format!("app[{pid}]: out")),
        (11, format!("app[{pid}]: bad")),
        (14, format!("app[{pid}]: no newline")),
    ];
    want.sort();
    assert_eq!(got, want);

    // Killed by a signal: 128 + its number, as a shell reports it.
    let out = logos(&k, None, "app", &["sh", "-c", "kill -TERM $$"], None);
    assert_eq!(out.status.code(), Some(143));
    // A command that cannot start is an error, not a silent success.
    let out = logos(&k, None, "app", &["/nonexistent/cmd"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cmd"));
}

#[test]
fn stdin_line_ends_control_bytes_and_long_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let k = new_kmsg(tmp.path());
    let mut input = b"a\r\nb\rc\nbell\x07 and \xff\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 2000));
    input.push(b'\n');
    let out = logos(&k, None, "in", &[], Some(&input));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&k);
    let texts: Vec<&str> = recs
        .iter()
        .map(|(_, t)| t.strip_prefix("in: ").unwrap())
        .collect();
    assert_eq!(&texts[..4], &["a", "b", "c", "bell\\x07 and \\xff"]);
    // The 2000-byte line is split into marked pieces that join back to it.
    let pieces = &texts[4..];
    assert!(pieces.len() >= 3, "{pieces:?}");
    assert!(pieces[0].ends_with(" [cont]") && pieces[pieces.len() - 1].starts_with("[cont] "));
    let joined: String = pieces
        .iter()
        .map(|p| p.trim_start_matches("[cont] ").trim_end_matches(" [cont]"))
        .collect();
    assert_eq!(joined, "x".repeat(2000));
    assert!(recs.iter().all(|(_, t)| t.len() + 5 <= 992));
}

#[test]
fn corpus_crlf_file_comes_out_line_for_line() {
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/loghub/Linux_2k.log");
    let Ok(input) = std::fs::read(&corpus) else {
        eprintln!("skipped: no corpus at {}", corpus.display());
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let k = new_kmsg(tmp.path());
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[logos.default]\nburst_bytes = 100000000\ndaily_bytes = 100000000\n",
    )
    .unwrap();
    let out = logos(&k, Some(&cfg), "syslogd", &[], Some(&input));
    assert!(out.status.success());
    let want: Vec<String> = String::from_utf8_lossy(&input)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let got: Vec<String> = records(&k)
        .into_iter()
        .map(|(pri, t)| {
            assert_eq!(pri, 14);
            t.strip_prefix("syslogd: ").unwrap().to_owned()
        })
        .collect();
    assert_eq!(got.len(), 2000);
    assert_eq!(got, want);
}

/// Parses `dropped N lines (B bytes)` out of the report records of `name`.
fn reported_drops(recs: &[(u8, String)], prefix: &str) -> (u64, u64) {
    let mut lines = 0;
    let mut bytes = 0;
    for (pri, t) in recs {
        let Some(rest) = t
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("logos: dropped "))
        else {
            continue;
        };
        assert_eq!(*pri, 12, "a drop report is a warning");
        let mut w = rest.split_whitespace();
        lines += w.next().unwrap().parse::<u64>().unwrap();
        assert_eq!(w.next(), Some("lines"));
        bytes += w
            .next()
            .unwrap()
            .trim_start_matches('(')
            .parse::<u64>()
            .unwrap();
    }
    (lines, bytes)
}

#[test]
fn a_flooding_app_is_limited_while_a_quiet_one_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let k = new_kmsg(tmp.path());
    let cfg = tmp.path().join("agent.toml");
    // Small buckets refilled slowly: the flood overruns them at once.
    std::fs::write(
        &cfg,
        "[logos.default]\nburst_bytes = 40000\nburst_secs = 3600\n[logos.app.quiet]\nburst_bytes = 1000000\n",
    )
    .unwrap();
    const FLOOD: u64 = 100_000;
    const LINE: &str = "flood-line-0123456789"; // 21 bytes
    let k2 = k.clone();
    let cfg2 = cfg.clone();
    let flood = std::thread::spawn(move || {
        logos(
            &k2,
            Some(&cfg2),
            "flood",
            &["sh", "-c", &format!("yes {LINE} | head -n {FLOOD}")],
            None,
        )
    });
    let quiet = logos(
        &k,
        Some(&cfg),
        "quiet",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 200 ]; do echo quiet $i; i=$((i+1)); done",
        ],
        None,
    );
    let flood = flood.join().unwrap();
    assert!(quiet.status.success() && flood.status.success());
    let recs = records(&k);

    let quiet_lines: Vec<String> = recs
        .iter()
        .filter_map(|(_, t)| {
            t.split_once("]: ")
                .filter(|(n, _)| n.starts_with("quiet["))
                .map(|(_, m)| m.to_owned())
        })
        .collect();
    let want: Vec<String> = (0..200).map(|i| format!("quiet {i}")).collect();
    assert_eq!(quiet_lines, want, "the quiet app lost or reordered lines");

    let flood_pid = recs
        .iter()
        .find_map(|(_, t)| {
            t.strip_prefix("flood[")
                .map(|r| r.split_once(']').unwrap().0.to_owned())
        })
        .unwrap();
    let prefix = format!("flood[{flood_pid}]: ");
    let admitted = recs
        .iter()
        .filter(|(_, t)| t.strip_prefix(&prefix) == Some(LINE))
        .count() as u64;
    let (dropped, dropped_bytes) = reported_drops(&recs, &prefix);
    assert!(dropped > 0, "the flood was not limited");
    // Half of the 40000-byte burst bucket, plus whatever trickled in during the test.
    assert!(admitted * 21 < 40_000, "admitted {admitted} lines");
    // Exact accounting: every line was either written or counted in a report.
    assert_eq!(admitted + dropped, FLOOD);
    assert_eq!(dropped_bytes, dropped * LINE.len() as u64);
}

#[test]
fn kernel_rate_limit_on_writers_is_lifted() {
    use blackbox_agent::linux::logos::lift_devkmsg_ratelimit;
    let tmp = tempfile::tempdir().unwrap();
    let sysctl = tmp.path().join("printk_devkmsg");
    std::fs::write(&sysctl, "ratelimit\n").unwrap();
    let msg = lift_devkmsg_ratelimit(&sysctl).unwrap();
    assert!(msg.contains("was `ratelimit`"), "{msg}");
    assert_eq!(std::fs::read_to_string(&sysctl).unwrap(), "on\n");
    assert_eq!(lift_devkmsg_ratelimit(&sysctl), None);
    // `off` was somebody's choice.
    std::fs::write(&sysctl, "off\n").unwrap();
    assert_eq!(lift_devkmsg_ratelimit(&sysctl), None);
    assert_eq!(std::fs::read_to_string(&sysctl).unwrap(), "off\n");
}

#[test]
fn sigterm_is_passed_on_and_the_last_lines_still_written() {
    let tmp = tempfile::tempdir().unwrap();
    let k = new_kmsg(tmp.path());
    let mut child = Command::new(BIN)
        .arg("logos")
        .arg("svc")
        .arg("--kmsg")
        .arg(&k)
        .args(["--config", "/dev/null", "--"])
        .args([
            "sh",
            "-c",
            "trap 'echo stopping on TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&k).unwrap().contains("ready") {
        assert!(std::time::Instant::now() < deadline, "no `ready` line");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SIGTERM to logos only, as an init system stops a service.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "the command's own exit status");
    let texts: Vec<String> = records(&k).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[1].ends_with("]: stopping on TERM"), "{texts:?}");
}
