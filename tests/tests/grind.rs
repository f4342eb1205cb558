//! `blackbox-server grind` as a process against stores filled by a real receiver.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blackbox_protocol::SyncPoint;
use blackbox_server::grind::Event;
use blackbox_server::timespec::now_us;
use blackbox_tests::downstream::{
    Rec, corpus_lines, encode, events, grind_args, line_chunks, post, server_cmd, server_ok,
};
use blackbox_tests::harness::{Server, bin, duckdb, http_text, wait_until};

const S: i64 = 1_000_000;

/// The corpus files as four devices, 100 lines a chunk, each chunk to one of two receivers
/// (and every fifth chunk to both: stored twice). Returns the device → lines map.
fn fill(r0: &Server, r1: &Server) -> BTreeMap<String, Vec<String>> {
    let base = now_us() - 3600 * S;
    let mut all = BTreeMap::new();
    for (device, file) in [
        ("dev-linux", "Linux_2k.log"),
        ("dev-ssh", "OpenSSH_2k.log"),
        ("dev-apache", "Apache_2k.log"),
        ("dev-android", "Android_2k.log"),
    ] {
        let lines = corpus_lines(file);
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: base,
            synced: true,
        };
        for (c, body) in line_chunks(device, 3, sync, &lines, 100)
            .into_iter()
            .enumerate()
        {
            let (url, other) = if c % 2 == 0 {
                (r0.url(), r1.url())
            } else {
                (r1.url(), r0.url())
            };
            assert_eq!(post(&url, device, &body), Ok(201));
            if c % 5 == 0 {
                assert_eq!(
                    post(&other, device, &body),
                    Ok(201),
                    "the second receiver stores it again"
                );
            }
        }
        all.insert(device.to_owned(), lines);
    }
    all
}

fn receivers(store: &str, dir: &std::path::Path) -> (Server, Server) {
    let r0 = Server::start(store, vec![], &["--segment-max-age-ms", "30"], dir);
    let r1 = Server::start(
        store,
        vec![],
        &["--segment-max-age-ms", "30", "--receiver-id", "r1"],
        dir,
    );
    (r0, r1)
}

const EXTRA_RULES: &str = r#"
[[rule]]
name = "apache_error"
regex = '^\[[^\]]+\] \[error\] '

[[rule]]
name = "session_opened"
regex = 'session opened for user (?P<user>\S+)'
metric_labels = ["user"]
"#;

/// The rules applied to the corpus give the counts computed here with plain string functions.
#[test]
fn rules_on_the_corpus_give_independent_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let (r0, r1) = receivers(&store, tmp.path());
    let corpus = fill(&r0, &r1);
    let rules = tmp.path().join("rules.toml");
    std::fs::write(
        &rules,
        format!("{}\n{EXTRA_RULES}", blackbox_server::rules::DEFAULT_RULES),
    )
    .unwrap();
    server_ok(
        &[
            "grind",
            "--store",
            &store,
            "--once",
            "--from",
            "-2h",
            "--rules",
            rules.to_str().unwrap(),
        ],
        &[],
    );
    let got = events(&store, "events/");
    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &got {
        *by_name.entry(&e.name).or_default() += 1;
    }
    println!("events by name: {by_name:?}");
    // DuckDB reads the events objects without our code: the same events, `ts` a timestamp.
    let duck = duckdb(&format!(
        "select name, count(*), min(typeof(ts)), min(typeof(wall_us)) \
         from read_json('{}/events/*/*/*.ndjson.gz') group by name order by name",
        tmp.path().join("store").display()
    ));
    let want: Vec<String> = by_name
        .iter()
        .map(|(n, c)| format!("('{n}', {c}, 'TIMESTAMP WITH TIME ZONE', 'BIGINT')"))
        .collect();
    assert_eq!(duck, format!("[{}]", want.join(", ")));

    // Independent counts.
    let lines = |d: &str| corpus[d].iter().map(String::as_str);
    let all = || corpus.values().flatten().map(String::as_str);
    let auth = all()
        .filter(|l| {
            l.contains("Failed password for ")
                || (l.contains("authentication failure;") && l.contains("rhost="))
        })
        .count();
    let apache_errors = lines("dev-apache")
        .filter(|l| {
            l.starts_with('[')
                && l.find("] ")
                    .is_some_and(|i| l[i + 2..].starts_with("[error] "))
        })
        .count();
    let mut sessions: BTreeMap<String, usize> = BTreeMap::new();
    for l in all() {
        if let Some((_, rest)) = l.split_once("session opened for user ") {
            let user = rest.split_whitespace().next().unwrap_or("");
            *sessions.entry(user.to_owned()).or_default() += 1;
        }
    }
    let mut failed_users: BTreeMap<String, usize> = BTreeMap::new();
    for l in all() {
        if let Some((_, rest)) = l.split_once("Failed password for ") {
            let rest = rest.strip_prefix("invalid user ").unwrap_or(rest);
            let user = rest.split(" from ").next().unwrap();
            *failed_users.entry(user.to_owned()).or_default() += 1;
        }
    }
    assert!(
        auth > 100 && apache_errors > 100 && !sessions.is_empty(),
        "{auth} {apache_errors} {sessions:?}"
    );
    assert_eq!(by_name.get("auth_failure").copied().unwrap_or(0), auth);
    assert_eq!(
        by_name.get("apache_error").copied().unwrap_or(0),
        apache_errors
    );
    let mut got_sessions: BTreeMap<String, usize> = BTreeMap::new();
    let mut got_users: BTreeMap<String, usize> = BTreeMap::new();
    for e in &got {
        if e.name == "session_opened" {
            *got_sessions.entry(e.labels["user"].clone()).or_default() += 1;
        }
        if e.name == "auth_failure"
            && let Some(u) = e.labels.get("user")
        {
            *got_users.entry(u.clone()).or_default() += 1;
        }
    }
    assert_eq!(got_sessions, sessions);
    assert_eq!(got_users, failed_users);
    // Each event once, with its line's identity and time.
    let mut ids: Vec<(&str, &str, u64)> = got
        .iter()
        .map(|e| (e.name.as_str(), e.device.as_str(), e.seq))
        .collect();
    ids.dedup();
    assert_eq!(
        ids.len(),
        got.len(),
        "no event twice (duplicates in storage dropped)"
    );
    for e in &got {
        assert_eq!(corpus[&e.device][e.seq as usize], e.msg);
    }
}

/// A grinder killed at every kind of point and restarted writes exactly the events of one
/// uninterrupted run.
#[test]
fn killed_grinder_restarts_without_losing_or_doubling() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let (r0, r1) = receivers(&store, tmp.path());
    fill(&r0, &r1);
    let rules = tmp.path().join("rules.toml");
    std::fs::write(
        &rules,
        format!("{}\n{EXTRA_RULES}", blackbox_server::rules::DEFAULT_RULES),
    )
    .unwrap();
    let rules = rules.to_str().unwrap();
    let args = |prefix: &str, extra: &[&str]| {
        let more = [&["--parallel", "2", "--checkpoint-every-ms", "0"], extra].concat();
        grind_args(&store, rules, prefix, &more)
    };
    let grind = |prefix: &str, extra: &[&str]| {
        let a = args(prefix, extra);
        server_cmd(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    assert!(grind("ref/", &["--once", "--from", "-2h"]).status.success());
    let reference = events(&store, "ref/events/");
    assert!(reference.len() > 500, "{} events", reference.len());

    // Killed right after writing events (before the checkpoint says so), after a checkpoint,
    // then by SIGKILL at an arbitrary moment, then allowed to finish. This grinder reads each
    // object in pieces of about 1 KB (a chunk or a few): the events are still those of
    // the reference, which read each object whole.
    let pieces = ["--piece-bytes", "1000"];
    let largest = blackbox_tests::downstream::local_segments(&tmp.path().join("store"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .max()
        .unwrap_or(0);
    assert!(largest > 3 * 1000, "segments of {largest} bytes: no pieces");
    let with_pieces = |extra: &[&'static str]| [extra, &pieces[..]].concat();
    let first = grind(
        "crash/",
        &with_pieces(&["--once", "--from", "-2h", "--fault", "after-events-put:3"]),
    );
    assert!(!first.status.success(), "the fault should have aborted it");
    let second = grind(
        "crash/",
        &with_pieces(&["--once", "--fault", "after-checkpoint:4"]),
    );
    assert!(!second.status.success());
    let third = grind(
        "crash/",
        &with_pieces(&["--once", "--fault", "after-events-put:7"]),
    );
    assert!(!third.status.success());
    let mut child = Command::new(bin("blackbox-server"))
        .args(args(
            "crash/",
            &with_pieces(&["--checkpoint-every-ms", "1000"]),
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(grind("crash/", &with_pieces(&["--once"])).status.success());
    let after = events(&store, "crash/events/");
    assert_eq!(after.len(), reference.len());
    assert!(
        after == reference,
        "events differ from the uninterrupted run"
    );
}

/// New chunks become events within about a second; a changed rules file applies to what comes
/// next; `--metrics-listen` serves the counts; `--from` grinds history again with new rules.
#[test]
fn follows_reloads_counts_and_regrinds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let server = Server::start(&store, vec![], &["--segment-max-age-ms", "50"], tmp.path());
    let rules = tmp.path().join("rules.toml");
    std::fs::write(&rules, blackbox_server::rules::DEFAULT_RULES).unwrap();
    let port = blackbox_tests::harness::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let log = tmp.path().join("grind.log");
    let follower = || {
        Command::new(bin("blackbox-server"))
            .args([
                "grind",
                "--store",
                &store,
                "--rules",
                rules.to_str().unwrap(),
            ])
            .args(["--metrics-listen", &metrics])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut grinder = follower();
    std::thread::sleep(Duration::from_millis(1500));
    let sync = SyncPoint {
        mono_us: 0,
        wall_us: now_us(),
        synced: true,
    };
    let msgs = [
        "Out of memory: Killed process 812 (dnsmasq) total-vm:12345kB",
        "eth0: Link is Down",
        "custom thing happened: 42",
    ];
    let recs: Vec<Rec> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (i as u64, i as u64 * 1000, m.to_string()))
        .collect();
    let sent = Instant::now();
    assert_eq!(
        post(&server.url(), "dev-f", &encode("dev-f", 4, sync, &recs)),
        Ok(201)
    );
    assert!(
        wait_until(Duration::from_secs(20), || events(&store, "events/").len()
            == 2),
        "events did not appear; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    println!(
        "events written {:.2} s after the chunk was acknowledged",
        sent.elapsed().as_secs_f64()
    );

    // A new rule applies to the next chunk.
    let mut text = blackbox_server::rules::DEFAULT_RULES.to_owned();
    text.push_str("\n[[rule]]\nname = \"custom\"\nregex = 'custom thing happened: (?P<n>\\d+)'\nmetric_labels = [\"n\"]\n");
    std::fs::write(&rules, &text).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let recs2: Vec<Rec> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (10 + i as u64, 10_000 + i as u64, m.to_string()))
        .collect();
    assert_eq!(
        post(&server.url(), "dev-f", &encode("dev-f", 4, sync, &recs2)),
        Ok(201)
    );
    assert!(wait_until(Duration::from_secs(20), || events(
        &store, "events/"
    )
    .len()
        == 5));
    let ev = events(&store, "events/");
    let names: Vec<(&str, u64)> = ev.iter().map(|e| (e.name.as_str(), e.seq)).collect();
    assert!(
        names.contains(&("custom", 12)) && !names.contains(&("custom", 2)),
        "{names:?}"
    );

    let body = http_text(&format!("http://{metrics}/metrics"));
    for want in [
        "blackbox_events_total{name=\"oom_kill\",process=\"dnsmasq\"} 2",
        "blackbox_events_total{name=\"link_down\",iface=\"eth0\"} 2",
        "blackbox_events_total{name=\"custom\",n=\"42\"} 1",
        "blackbox_events_window{name=\"oom_kill\",process=\"dnsmasq\",window=\"5m\"} 2",
        "blackbox_grind_objects_total 2",
    ] {
        assert!(body.contains(want), "{want} missing from\n{body}");
    }
    grinder.kill().unwrap();
    grinder.wait().unwrap();

    // Grinding history again with the new rules: the first chunk's custom line becomes an
    // event too, and nothing is doubled.
    server_ok(
        &[
            "grind",
            "--store",
            &store,
            "--rules",
            rules.to_str().unwrap(),
            "--once",
            "--from",
            "-1h",
        ],
        &[],
    );
    let ev = events(&store, "events/");
    let names: Vec<(&str, u64)> = ev.iter().map(|e| (e.name.as_str(), e.seq)).collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.contains(&("custom", 2)) && names.contains(&("custom", 12)));

    // A restarted grinder's windows count what was ground before it started.
    let mut again = follower();
    let want = "blackbox_events_window{name=\"oom_kill\",process=\"dnsmasq\",window=\"1h\"} 2";
    let served = wait_until(Duration::from_secs(20), || {
        http_text(&format!("http://{metrics}/metrics")).contains(want)
    });
    again.kill().unwrap();
    again.wait().unwrap();
    assert!(served, "{want} not served after a restart");
}

/// Two grinders on one checkpoint: one grinds and counts; the other waits as a standby
/// (serving `blackbox_grind_active 0` and no counts, so a dashboard sees nothing twice), and a
/// `--once` run says who holds the lock. When the grinding one is killed, the standby takes
/// over from the checkpoint: what comes next is ground, nothing twice. A stopped grinder gives
/// the lock up.
#[test]
fn a_second_grinder_stands_by_and_takes_over() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let server = Server::start(&store, vec![], &["--segment-max-age-ms", "50"], tmp.path());
    let sync = SyncPoint {
        mono_us: 0,
        wall_us: now_us(),
        synced: true,
    };
    let send = |seq: u64| {
        let recs: Vec<Rec> = vec![(
            seq,
            seq * 1000,
            format!("Out of memory: Killed process {seq} (dnsmasq) total-vm:12345kB"),
        )];
        assert_eq!(
            post(&server.url(), "dev-h", &encode("dev-h", 5, sync, &recs)),
            Ok(201)
        );
    };
    let ooms = || {
        let mut seqs: Vec<u64> = events(&store, "events/")
            .iter()
            .filter(|e| e.name == "oom_kill")
            .map(|e| e.seq)
            .collect();
        seqs.sort_unstable();
        seqs
    };
    let grinder = |name: &str| {
        let port = blackbox_tests::harness::free_port();
        let log = tmp.path().join(format!("{name}.log"));
        let child = Command::new(bin("blackbox-server"))
            .args(["grind", "--store", &store, "--checkpoint-every-ms", "0"])
            // A short lease (a standby looks every 2.5 s), long enough that a busy machine
            // does not make the grinding one miss extending it.
            .args(["--lock-ttl", "10"])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, port, log)
    };
    let metrics = |port: u16| http_text(&format!("http://127.0.0.1:{port}/metrics"));
    let log = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();

    send(1);
    let (mut a, a_port, a_log) = grinder("a");
    assert!(
        wait_until(Duration::from_secs(20), || ooms() == [1]
            && metrics(a_port).contains("blackbox_grind_active 1")),
        "the first grinder did not grind; log:\n{}",
        log(&a_log)
    );
    let (mut b, b_port, b_log) = grinder("b");
    assert!(
        wait_until(Duration::from_secs(20), || log(&b_log)
            .contains("waiting as a standby")
            && metrics(b_port).contains("blackbox_grind_active 0")),
        "the second grinder is not a standby; log:\n{}",
        log(&b_log)
    );
    let once = server_cmd(&["grind", "--store", &store, "--once"], &[]);
    let err = String::from_utf8_lossy(&once.stderr);
    assert!(
        !once.status.success()
            && err.contains("another grinder holds the lock of grind/checkpoint.json"),
        "{err}"
    );

    send(2);
    assert!(wait_until(Duration::from_secs(20), || ooms() == [1, 2]));
    let standby = metrics(b_port);
    assert!(
        standby.contains("blackbox_grind_active 0") && !standby.contains("blackbox_events_total{"),
        "a standby counts nothing:\n{standby}"
    );

    // The grinding one dies (SIGKILL: its lock is left behind, held by a dead process).
    a.kill().unwrap();
    a.wait().unwrap();
    send(3);
    assert!(
        wait_until(Duration::from_secs(20), || ooms() == [1, 2, 3]),
        "the standby did not take over: {:?}; log:\n{}",
        ooms(),
        log(&b_log)
    );
    let active = metrics(b_port);
    assert!(
        active.contains("blackbox_grind_active 1")
            && active.contains("blackbox_events_total{name=\"oom_kill\",process=\"dnsmasq\"} 1"),
        "the new grinder counts what it ground, once:\n{active}"
    );
    assert!(log(&b_log).contains("this standby grinds now"));

    // Stopped gracefully, it gives the lock up.
    let st = Command::new("kill")
        .args(["-TERM", &b.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(b.wait().unwrap().success(), "log:\n{}", log(&b_log));
    let locks: Vec<_> = std::fs::read_dir(tmp.path().join("store/grind/checkpoint.lock"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(locks.is_empty(), "{locks:?}");
    assert_eq!(ooms(), [1, 2, 3]);
}

/// Grinders sharded by device (`--shard K/N`), run at the same time: each grinds the devices
/// its shard owns, with its own checkpoint and lock, into objects named for it; together their
/// events are exactly those of one unsharded grinder. Grinding one shard again (`--from`)
/// leaves the others' events alone, and a shard refuses another shard's checkpoint.
#[test]
fn shards_split_the_devices_and_together_grind_everything_once() {
    use blackbox_server::reader::Shard;
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let (r0, r1) = receivers(&store, tmp.path());
    let devices: Vec<String> = fill(&r0, &r1).into_keys().collect();
    let grind = |extra: &[&str]| {
        let mut args = vec!["grind", "--store", &store, "--once", "--from", "-2h"];
        args.extend_from_slice(extra);
        server_cmd(&args, &[])
    };
    let succeeded = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    succeeded(grind(&[
        "--events-prefix",
        "ref/events/",
        "--checkpoint",
        "ref/checkpoint.json",
    ]));
    let reference = events(&store, "ref/events/");
    assert!(reference.len() > 500, "{} events", reference.len());

    // The fewest shards that split the four devices (some shards may own none of them).
    let owners = |n: u32| -> Vec<u32> {
        (0..n)
            .filter(|&k| devices.iter().any(|d| Shard { index: k, count: n }.owns(d)))
            .collect()
    };
    let n = (2..=8u32)
        .find(|&n| owners(n).len() >= 2)
        .expect("four devices split over 2 to 8 shards");
    let shard_args: Vec<String> = (0..n).map(|k| format!("{k}/{n}")).collect();
    let children: Vec<_> = shard_args
        .iter()
        .map(|s| {
            Command::new(bin("blackbox-server"))
                .args(["grind", "--store", &store, "--once", "--from", "-2h"])
                .args(["--events-prefix", "sh/events/", "--shard", s])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        succeeded(c.wait_with_output().unwrap());
    }
    assert!(
        events(&store, "sh/events/") == reference,
        "the shards' events differ from one grinder's"
    );
    let events_dir = tmp.path().join("store/sh/events");
    let files = blackbox_tests::downstream::files_under(&events_dir, ".ndjson.gz");
    for k in 0..n {
        let shard = Shard { index: k, count: n };
        let mine: Vec<_> = files
            .iter()
            .filter(|p| {
                p.to_string_lossy()
                    .ends_with(&format!(".shard-{k}-of-{n}.ndjson.gz"))
            })
            .collect();
        assert_eq!(
            !mine.is_empty(),
            owners(n).contains(&k),
            "shard {shard} wrote events if and only if it owns a device"
        );
        for p in mine {
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(std::fs::File::open(p).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            for l in text.lines() {
                let e: Event = serde_json::from_str(l).unwrap();
                assert!(
                    shard.owns(&e.device),
                    "{} in shard {shard}'s {}",
                    e.device,
                    p.display()
                );
            }
        }
    }

    // One shard again from scratch: the others' events stay, nothing doubles.
    succeeded(grind(&[
        "--events-prefix",
        "sh/events/",
        "--shard",
        &shard_args[0],
    ]));
    assert!(
        events(&store, "sh/events/") == reference,
        "re-grinding one shard changed the whole"
    );

    // A shard refuses another's checkpoint.
    let other = format!("grind/checkpoint.shard-0-of-{n}.json");
    let out = server_cmd(
        &[
            "grind",
            "--store",
            &store,
            "--once",
            "--shard",
            &shard_args[1],
            "--checkpoint",
            &other,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("covers shard 0/{n}")),
        "{err}"
    );
}
