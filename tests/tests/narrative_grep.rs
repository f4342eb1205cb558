//! `narrative` and `grep` against stores filled by real receivers: the local directory store and
//! a real S3 server (SeaweedFS).
#![allow(clippy::unwrap_used)]

use blackbox_protocol::SyncPoint;
use blackbox_server::timespec::{now_us, rfc3339};
use blackbox_tests::downstream::{
    Rec, corpus_lines, encode, line_chunks, local_segments, post, server_ok, zcat_grep,
};
use blackbox_tests::harness::Server;
use blackbox_tests::s3::Weed;

const S: u64 = 1_000_000;

struct Upload {
    device: &'static str,
    body: Vec<u8>,
}

/// Three devices whose monotonic clocks have nothing in common (booted three days, five
/// seconds and a hundred seconds ago; the third's wall clock is corrected between its chunks),
/// their chunks arriving out of order, twice, and overlapping. Returns the uploads and every
/// (wall µs, device, seq) the devices logged.
fn skewed_devices(w0: i64) -> (Vec<Upload>, Vec<(i64, String, u64)>) {
    let mut truth = Vec::new();
    let mut chunk = |device: &'static str,
                     sync: SyncPoint,
                     seqs: std::ops::Range<u64>,
                     mono: &dyn Fn(u64) -> u64| {
        let recs: Vec<Rec> = seqs
            .map(|s| (s, mono(s), format!("{device} says {s}")))
            .collect();
        for (s, m, _) in &recs {
            truth.push((sync.wall_of(*m), device.to_owned(), *s));
        }
        Upload {
            device,
            body: encode(device, 1, sync, &recs),
        }
    };
    // alpha: up three days; line k at w0 + k s.
    let a_sync = SyncPoint {
        mono_us: 259_200 * S,
        wall_us: w0,
        synced: true,
    };
    let a_mono = |s: u64| 259_200 * S + s * S;
    // bravo: up five seconds; line k at w0 + k s + 0.3 s.
    let b_sync = SyncPoint {
        mono_us: 5 * S,
        wall_us: w0 + 300_000,
        synced: true,
    };
    let b_mono = |s: u64| 5 * S + s * S;
    // charlie: up 100 s; its clock is 0.1 s slow until NTP corrects it after line 14.
    let c_sync1 = SyncPoint {
        mono_us: 100 * S,
        wall_us: w0 + 500_000,
        synced: false,
    };
    let c_sync2 = SyncPoint {
        mono_us: 100 * S,
        wall_us: w0 + 600_000,
        synced: true,
    };
    let c_mono = |s: u64| 100 * S + s * S;
    let a0 = chunk("alpha", a_sync, 0..10, &a_mono);
    let a1 = chunk("alpha", a_sync, 10..20, &a_mono);
    let a2 = chunk("alpha", a_sync, 20..30, &a_mono);
    let b0 = chunk("bravo", b_sync, 0..30, &b_mono);
    let c0 = chunk("charlie", c_sync1, 0..15, &c_mono);
    let c1 = chunk("charlie", c_sync2, 15..30, &c_mono);
    let d0 = chunk("delta", b_sync, 0..30, &b_mono);
    let mut truth_only = std::mem::take(&mut truth);
    truth_only.retain(|(_, d, _)| d != "delta");
    // A chunk rebuilt after an agent crash: overlaps a0 and a1 with the same records.
    let recs: Vec<Rec> = (5..15)
        .map(|s| (s, a_mono(s), format!("alpha says {s}")))
        .collect();
    let overlap = Upload {
        device: "alpha",
        body: encode("alpha", 1, a_sync, &recs),
    };
    let a0_again = Upload {
        device: "alpha",
        body: a0.body.clone(),
    };
    (
        vec![c1, a1, d0, b0, overlap, a2, c0, a0, a0_again],
        truth_only,
    )
}

fn narrative_case(store: &str, env: Vec<(String, String)>) {
    let tmp = tempfile::tempdir().unwrap();
    // Two receivers on one store: the same chunk sent to both is stored twice.
    let r0 = Server::start(
        store,
        env.clone(),
        &["--segment-max-age-ms", "50"],
        tmp.path(),
    );
    let r1 = Server::start(
        store,
        env.clone(),
        &["--segment-max-age-ms", "50", "--receiver-id", "r1"],
        tmp.path(),
    );
    let w0 = (now_us() / 1_000_000 - 7200) * 1_000_000; // two hours ago: an outage
    let (uploads, truth) = skewed_devices(w0);
    let n = uploads.len();
    for (i, u) in uploads.iter().enumerate() {
        let url = if i + 1 == n { r1.url() } else { r0.url() };
        assert_eq!(post(&url, u.device, &u.body), Ok(201), "upload {i}");
    }
    let (since, until) = (w0 + 2_500_000, w0 + 25_500_000);
    let out = server_ok(
        &[
            "narrative",
            "--store",
            store,
            "--device",
            "alpha",
            "--device",
            "bravo",
            "--device",
            "charlie",
            "--since",
            &rfc3339(since),
            "--until",
            &rfc3339(until),
        ],
        &env,
    );
    let got: Vec<(String, u64)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["device"].as_str().unwrap().to_owned(),
                v["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut want: Vec<(i64, String, u64)> = truth
        .into_iter()
        .filter(|(w, _, _)| *w >= since && *w < until)
        .collect();
    want.sort();
    let want: Vec<(String, u64)> = want.into_iter().map(|(_, d, s)| (d, s)).collect();
    assert_eq!(got, want, "narrative order");
    assert_eq!(got.len(), 69, "23 s of three devices, each line once");

    // The stored lines exactly, and a readable form.
    assert!(out.lines().next().unwrap().starts_with("{\"ts\":\""));
    let text = server_ok(
        &[
            "narrative",
            "--store",
            store,
            "--device",
            "charlie",
            "--since",
            &rfc3339(w0),
            "--until",
            &rfc3339(w0 + 2 * S as i64),
            "--text",
        ],
        &env,
    );
    assert_eq!(
        text,
        format!(
            "{} charlie <6> charlie says 0\n{} charlie <6> charlie says 1\n",
            rfc3339(w0 + 500_000),
            rfc3339(w0 + 1_500_000)
        )
    );
}

#[test]
fn narrative_of_three_skewed_devices_local_dir() {
    let tmp = tempfile::tempdir().unwrap();
    narrative_case(
        &format!("file://{}", tmp.path().join("store").display()),
        vec![],
    );
}

#[test]
fn narrative_of_three_skewed_devices_s3() {
    let weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    narrative_case(&weed.store_url("narrative"), weed.env());
}

/// Corpus lines as three devices' logs, uploaded in small chunks so they land in many
/// segments.
fn upload_corpus(url: &str, base: i64) -> usize {
    let mut total = 0;
    for (d, file) in ["Linux_2k.log", "OpenSSH_2k.log", "Apache_2k.log"]
        .iter()
        .enumerate()
    {
        let lines = corpus_lines(file);
        let device = ["dev-linux", "dev-ssh", "dev-apache"][d];
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: base,
            synced: true,
        };
        for body in line_chunks(device, 2, sync, &lines, 250) {
            assert_eq!(post(url, device, &body), Ok(201));
        }
        total += lines.len();
    }
    total
}

/// grep gives what `zcat | grep -E` gives on the same objects, line for line and in order;
/// `--count` what `grep -c` gives; `--device` narrows to that device's lines.
#[test]
fn grep_equals_zcat_grep() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = format!("file://{}", dir.display());
    let _server = Server::start(&store, vec![], &["--segment-max-age-ms", "20"], tmp.path());
    let base = now_us() - 600 * S as i64;
    let total = upload_corpus(&_server.url(), base);
    let segs = local_segments(&dir);
    assert!(segs.len() > 10, "{} segments", segs.len());
    let range = ["--since", "-30d", "--until", "2100-01-01"];
    for pattern in [
        "authentication failure",
        "Failed password for (invalid user )?[a-z]+",
        "error|ERROR",
        r#"\[client 1[0-9]{2}\.[0-9.]+\]"#,
        "^\\{\"ts\"",
        "jk2_init\\(\\) Found child [0-9]+$",
        "no line has this",
    ] {
        let mut args = vec!["grep", pattern, "--store", &store, "--parallel", "4"];
        args.extend(&range);
        let ours = server_ok(&args, &[]);
        let theirs = zcat_grep(&segs, pattern, &[]);
        assert_eq!(ours, theirs, "pattern {pattern:?}");
        args.push("--count");
        let count = server_ok(&args, &[]);
        let theirs_count = zcat_grep(&segs, pattern, &["-c"]);
        assert_eq!(count, theirs_count, "count of {pattern:?}");
        if pattern.starts_with('^') {
            assert_eq!(count.trim(), total.to_string());
        }
    }
    let mut args = vec![
        "grep",
        "sshd",
        "--store",
        &store,
        "--device",
        "dev-ssh",
        "--since",
        "-30d",
        "--until",
        "2100-01-01",
    ];
    let ours = server_ok(&args, &[]);
    let theirs: String = zcat_grep(&segs, "sshd", &[])
        .lines()
        .filter(|l| l.contains("\"device\":\"dev-ssh\""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(ours, theirs);
    assert_eq!(ours.lines().count(), 2000);
    // A time range cuts by wall time: the corpus lines are 1 ms apart from 600 s ago.
    args.truncate(6);
    let since = base + 1000 * 1000; // skips each device's first 1000 lines
    let since = rfc3339(since);
    args.extend(["--since", &since]);
    let ours = server_ok(&[&args[..], &["--until", "now", "--count"]].concat(), &[]);
    assert_eq!(ours.trim(), "1000");
}
