//! The foundation's acceptance tests: real server and agent processes on loopback, a real
//! S3-compatible server (SeaweedFS) and the local-directory store.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use blackbox_tests::downstream::post;
use blackbox_tests::harness::{
    Agent, KmsgFile, Server, agent_with_100_lines_stored, http_text, list_store, metric,
    read_store, receiver_for_store_failures, seqs_by_device, wait_until,
};
use blackbox_tests::s3::Weed;
use blackbox_tests::tlsclient::chunk;

/// N unique lines come out of the store exactly once and in order, across an agent `kill -9`,
/// a server `kill -9` and a server that stays down for a while.
fn exactly_once_through_restarts(store: &str, env: Vec<(String, String)>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        store,
        env.clone(),
        &["--segment-max-age-ms", "200"],
        tmp.path(),
    );
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    let state = tmp.path().join("state");
    let mut agent = Agent::start(
        &server.url(),
        &state,
        &kmsg.path,
        "dev-a",
        &["--interval", "0.5", "--block-size", "8192"],
    );
    let stored = |n: usize| read_store(store, &env).len() >= n;

    kmsg.append(500, "app");
    assert!(
        wait_until(Duration::from_secs(30), || stored(1)),
        "nothing stored; agent log:\n{}",
        agent.log_text()
    );
    agent.kill9(); // agent restart mid-stream
    kmsg.append(500, "app");
    agent.restart();
    std::thread::sleep(Duration::from_millis(700));
    server.kill9(); // receiver killed mid-stream
    kmsg.append(500, "app");
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    kmsg.append(500, "app");
    std::thread::sleep(Duration::from_millis(700));
    server.kill9(); // and down for a while
    kmsg.append(500, "app");
    std::thread::sleep(Duration::from_secs(4));
    server.restart();

    let total = kmsg.next as usize;
    let ok = wait_until(Duration::from_secs(60), || stored(total));
    let lines = read_store(store, &env);
    let by_dev = seqs_by_device(&lines);
    let seqs = by_dev.get("dev-a").cloned().unwrap_or_default();
    assert!(
        ok,
        "only {} of {total} lines stored; agent log:\n{}",
        seqs.len(),
        agent.log_text()
    );
    let expected: Vec<u64> = (0..total as u64).collect();
    assert_eq!(seqs, expected, "every line exactly once, in order");
    assert!(
        lines
            .iter()
            .all(|l| l.msg == format!("app: line {}", l.seq))
    );
    assert!(
        lines
            .iter()
            .all(|l| l.boot == blackbox_tests::harness::BOOT)
    );
}

#[test]
fn exactly_once_through_restarts_local_dir() {
    let tmp = tempfile::tempdir().unwrap();
    exactly_once_through_restarts(
        &format!("file://{}", tmp.path().join("store").display()),
        vec![],
    );
}

#[test]
fn exactly_once_through_restarts_s3() {
    let weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    exactly_once_through_restarts(&weed.store_url("exactly-once"), weed.env());
}

/// The same chunk twice: stored once, both answers success; also when the receiver died
/// between writing the segment and answering (before and after writing the index).
#[test]
fn duplicate_chunk_stored_once_even_across_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let mut server = Server::start(&store, vec![], &["--segment-max-age-ms", "100"], tmp.path());
    let c1 = chunk("dev-d", 0, 10);
    assert_eq!(post(&server.url(), "dev-d", &c1), Ok(201));
    assert_eq!(post(&server.url(), "dev-d", &c1), Ok(200));

    for (i, fault) in ["after-segment-put", "after-index-put"]
        .into_iter()
        .enumerate()
    {
        let c = chunk("dev-d", 100 * (i as u64 + 1), 10);
        server.kill9();
        server.restart_with(&["--fault", fault]);
        let r = post(&server.url(), "dev-d", &c);
        assert!(
            r.is_err(),
            "the receiver should have died before answering, got {r:?}"
        );
        assert!(server.wait_exit(Duration::from_secs(10)));
        server.restart(); // no fault: recovers identities (re-indexing the orphan segment)
        assert_eq!(
            post(&server.url(), "dev-d", &c),
            Ok(200),
            "retry after {fault} recognised"
        );
        assert_eq!(post(&server.url(), "dev-d", &c), Ok(200));
    }
    let seqs = seqs_by_device(&read_store(&store, &[]))
        .remove("dev-d")
        .unwrap();
    let mut expected: Vec<u64> = (0..10).collect();
    expected.extend(100..110);
    expected.extend(200..210);
    assert_eq!(seqs, expected, "each chunk stored exactly once");
    let keys = list_store(&store, &[], "raw/");
    let segs = keys.iter().filter(|k| k.ends_with(".seg.gz")).count();
    let idxs = keys.iter().filter(|k| k.ends_with(".idx")).count();
    assert_eq!(
        segs, idxs,
        "every segment has its index (the orphan was re-indexed): {keys:?}"
    );
}

/// 1,000 devices uploading once a second make about one segment a second, not 1,000 objects.
#[test]
fn object_writes_stay_flat_as_devices_grow() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let server = Server::start(
        &store,
        vec![],
        &["--max-inflight", "2048", "--max-connections", "2048"],
        tmp.path(),
    );
    let (devices, rounds) = (1000u64, 4u64);
    let t0 = Instant::now() + Duration::from_millis(500);
    let url = server.url();
    let handles: Vec<_> = (0..devices)
        .map(|d| {
            let url = url.clone();
            std::thread::Builder::new()
                .spawn(move || {
                    let dev = format!("sim-{d:04}");
                    let mut ok = 0;
                    for r in 0..rounds {
                        let at = t0 + Duration::from_secs(r) + Duration::from_micros(d * 500);
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        if post(&url, &dev, &chunk(&dev, r * 10, 10)) == Ok(201) {
                            ok += 1;
                        }
                    }
                    ok
                })
                .unwrap()
        })
        .collect();
    let stored: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = t0.elapsed().as_secs_f64();
    assert_eq!(stored, devices * rounds, "every upload acknowledged");
    let segs = list_store(&store, &[], "raw/")
        .iter()
        .filter(|k| k.ends_with(".seg.gz"))
        .count();
    println!(
        "{} chunks from {devices} devices in {elapsed:.1} s -> {segs} segments",
        devices * rounds
    );
    assert!(
        segs as f64 <= 2.0 * elapsed.ceil() + 2.0,
        "{segs} segments for {elapsed:.1} s: not group-committed"
    );
    assert_eq!(read_store(&store, &[]).len() as u64, devices * rounds * 10);
}

/// Under an overloaded receiver (503 + Retry-After), agents back off within the cap
/// (never longer than their interval) and deliver everything exactly once.
#[test]
fn agents_back_off_under_503_and_deliver_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let server = Server::start(
        &store,
        vec![],
        &[
            "--max-inflight",
            "1",
            "--segment-max-age-ms",
            "150",
            "--retry-after",
            "1",
        ],
        tmp.path(),
    );
    // Agents send their backlog in a batch or two, each in flight only for a moment: a slow
    // client holds the only place for the agents' first attempts (within their 2 s interval)
    // until its body deadline (5 s grace plus its length at 4 KiB/s).
    let blocker = hold_a_request_open(server.port, Duration::from_secs(6));
    let interval_ms = 2000;
    let mut agents = Vec::new();
    let mut files = Vec::new();
    for i in 0..4 {
        let mut k = KmsgFile::new(tmp.path().join(format!("kmsg{i}")));
        k.append(600, "busy");
        let state = tmp.path().join(format!("state{i}"));
        agents.push(Agent::start(
            &server.url(),
            &state,
            &k.path,
            &format!("busy-{i}"),
            &["--interval", "2", "--block-size", "4096"],
        ));
        files.push(k);
    }
    let ok = wait_until(Duration::from_secs(120), || {
        read_store(&store, &[]).len() >= 2400
    });
    blocker.join().unwrap();
    let by_dev = seqs_by_device(&read_store(&store, &[]));
    let logs: Vec<String> = agents.iter().map(Agent::log_text).collect();
    assert!(
        ok,
        "not everything delivered: {:?}\n{}",
        by_dev.iter().map(|(d, s)| (d, s.len())).collect::<Vec<_>>(),
        logs.join("\n")
    );
    for i in 0..4 {
        assert_eq!(by_dev[&format!("busy-{i}")], (0..600).collect::<Vec<u64>>());
    }
    let all = logs.join("\n");
    assert!(
        all.contains("failed: 503"),
        "the receiver never shed load, so this test proved nothing:\n{all}"
    );
    let waits: Vec<u64> = all
        .lines()
        .filter_map(|l| {
            l.split("retrying in ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(!waits.is_empty());
    assert!(
        waits.iter().all(|w| *w <= interval_ms),
        "a backoff exceeded the interval: {waits:?}"
    );
}

/// A client that sends a request's headers and then its body a byte every 100 ms, for `hold`
/// (the server's in-flight place stays taken meanwhile), then hangs up.
fn hold_a_request_open(port: u16, hold: Duration) -> std::thread::JoinHandle<()> {
    use std::io::Write as _;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(
        b"POST /v1/chunks HTTP/1.1\r\nhost: x\r\nx-blackbox-device: slow\r\n\
          content-length: 8192\r\n\r\n",
    )
    .unwrap();
    let start = Instant::now();
    std::thread::spawn(move || {
        while start.elapsed() < hold && conn.write_all(b"x").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// A receiver on a fresh local-directory store under `tmp` (segments closed after 100 ms):
/// the store's directory, its URL and the server.
fn local_receiver(tmp: &std::path::Path) -> (std::path::PathBuf, String, Server) {
    let dir = tmp.join("store");
    let store = format!("file://{}", dir.display());
    let server = Server::start(&store, vec![], &["--segment-max-age-ms", "100"], tmp);
    (dir, store, server)
}

/// Waits (up to 30 s) until the store holds at least `n` lines.
fn wait_stored(store: &str, n: usize) -> bool {
    wait_until(Duration::from_secs(30), || {
        read_store(store, &[]).len() >= n
    })
}

/// Records the kernel overwrote before the agent read them (a sequence jump, as after EPIPE on
/// /dev/kmsg) arrive as one gap record saying exactly how many and which.
#[test]
fn lost_kernel_records_become_an_exact_gap_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, store, server) = local_receiver(tmp.path());
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    kmsg.append(100, "k");
    kmsg.next = 150; // 100..=149 never reach the agent
    kmsg.append(50, "k");
    let _agent = Agent::start(
        &server.url(),
        &tmp.path().join("state"),
        &kmsg.path,
        "gappy",
        &["--interval", "0.3"],
    );
    assert!(wait_stored(&store, 151));
    let lines = read_store(&store, &[]);
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    let mut expected: Vec<u64> = (0..=100).collect();
    expected.extend(150..200);
    assert_eq!(seqs, expected);
    let gap = lines.iter().find(|l| l.seq == 100).unwrap();
    assert!(
        gap.msg
            .starts_with("blackbox: 50 records lost (seq 100..149)"),
        "{}",
        gap.msg
    );
}

/// Stored segments are plain gzip of JSON lines: `zcat` and DuckDB read them without our code.
#[test]
fn stored_segments_read_with_zcat_and_duckdb() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, store, server) = local_receiver(tmp.path());
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    kmsg.append(300, "wifi \"ap\" é");
    let _agent = Agent::start(
        &server.url(),
        &tmp.path().join("state"),
        &kmsg.path,
        "std-tools",
        &["--interval", "0.3", "--block-size", "4096"],
    );
    assert!(wait_stored(&store, 300));

    let segs: Vec<String> = list_store(&store, &[], "raw/")
        .into_iter()
        .filter(|k| k.ends_with(".seg.gz"))
        .map(|k| dir.join(k).display().to_string())
        .collect();
    assert!(
        segs.len() > 1,
        "the test wants several segments, each of several chunks"
    );
    let out = std::process::Command::new("zcat")
        .args(&segs)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 300);
    assert!(
        text.lines()
            .all(|l| l.contains(r#""msg":"wifi \"ap\" é: line "#))
    );

    let got = blackbox_tests::harness::duckdb(&format!(
        "select count(*), count(distinct seq), min(seq), max(seq), count(distinct device), \
         min(typeof(ts)) from read_json('{}/raw/*/*/*.seg.gz')",
        dir.display()
    ));
    assert_eq!(got, "[(300, 300, 0, 299, 1, 'TIMESTAMP WITH TIME ZONE')]");
}

/// The agent marks its sync points NTP-synchronised while its `synced_flag` (set in the
/// configuration file here, as the board overlays set it) exists: the chunks stored before the
/// flag appears say unsynchronised, the chunks of lines logged after it say synchronised.
#[test]
fn chunks_say_whether_ntp_had_the_clock() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, store, server) = local_receiver(tmp.path());
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    let flag = tmp.path().join("run/blackbox.synced");
    let conf = tmp.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!("[run]\nsynced_flag = {:?}\n", flag.display().to_string()),
    )
    .unwrap();
    kmsg.append(20, "before ntp");
    let _agent = Agent::start(
        &server.url(),
        &tmp.path().join("state"),
        &kmsg.path,
        "ntp",
        &["--interval", "0.3", "--config", conf.to_str().unwrap()],
    );
    assert!(wait_stored(&store, 20));
    std::fs::create_dir_all(flag.parent().unwrap()).unwrap();
    std::fs::write(&flag, b"").unwrap();
    kmsg.append(20, "after ntp");
    assert!(wait_stored(&store, 40));
    // (first seq, last seq, synced) of every stored chunk, from the chunk headers.
    let mut chunks = Vec::new();
    for key in list_store(&store, &[], "raw/") {
        if !key.ends_with(".seg.gz") {
            continue;
        }
        let bytes = std::fs::read(dir.join(&key)).unwrap();
        for m in blackbox_protocol::chunk::walk_members(&bytes) {
            let (_, h) = m.unwrap();
            chunks.push((h.id.first_seq, h.id.last_seq, h.sync.synced));
        }
    }
    chunks.sort();
    assert!(
        chunks.iter().any(|c| c.1 < 20) && chunks.iter().any(|c| c.0 >= 20),
        "{chunks:?}"
    );
    for &(first, last, synced) in &chunks {
        if last < 20 {
            assert!(!synced, "a chunk stored before NTP: {chunks:?}");
        }
        if first >= 20 {
            assert!(synced, "a chunk logged after NTP: {chunks:?}");
        }
    }
}

/// SIGTERM (a shutdown, a service stop) makes the agent upload what is waiting, the open block
/// included, before it exits: the lines of the last minutes before a reboot reach the server
/// without waiting for the next boot.
#[test]
fn sigterm_uploads_what_is_waiting_then_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let _server = Server::start(&store, vec![], &["--segment-max-age-ms", "100"], tmp.path());
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    // The first upload comes at a random point of an interval of 11 days: not during this test.
    let mut agent = Agent::start(
        &_server.url(),
        &tmp.path().join("state"),
        &kmsg.path,
        "dev-t",
        &["--interval", "1000000"],
    );
    kmsg.append(300, "app");
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .log_text()
            .contains("reading")),
        "agent did not start:\n{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        read_store(&store, &[]).is_empty(),
        "uploaded before the stop"
    );
    let status = agent.terminate().unwrap();
    assert!(status.success(), "{status}; log:\n{}", agent.log_text());
    let seqs = seqs_by_device(&read_store(&store, &[]))
        .remove("dev-t")
        .unwrap_or_default();
    assert_eq!(
        seqs,
        (0..300).collect::<Vec<u64>>(),
        "log:\n{}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("stopping: uploading"));
}

/// A backlog of 20,000 lines in 4 KiB ring blocks (about 200 chunks), uploaded by one agent to a
/// server started with `server_args`: every line stored once, in order. Returns the agent's
/// log, the server's metrics text and the agent's state directory (in `tmp`).
fn upload_a_backlog(
    tmp: &std::path::Path,
    server_args: &[&str],
    device: &str,
) -> (String, String, std::path::PathBuf) {
    let store = format!("file://{}", tmp.join("store").display());
    let mport = blackbox_tests::harness::free_port();
    let metrics = format!("127.0.0.1:{mport}");
    let mut args = vec!["--metrics-listen", &metrics];
    args.extend(server_args);
    let server = Server::start(&store, vec![], &args, tmp);
    let mut kmsg = KmsgFile::new(tmp.join("kmsg"));
    let total = 20_000u64;
    kmsg.append(total, "app");
    let state = tmp.join("state");
    let agent = Agent::start(
        &server.url(),
        &state,
        &kmsg.path,
        device,
        &["--interval", "1", "--block-size", "4096"],
    );
    let log = all_stored_once_in_order(&store, device, total, &agent);
    let text = http_text(&format!("http://{metrics}/metrics"));
    (log, text, state)
}

/// A backlog of many ring blocks goes up many chunks to a request: with the server's default
/// one-second group commit, one chunk per request would take minutes for this backlog (and cap
/// a device at a block a second). Every line still arrives exactly once, in order.
#[test]
fn a_backlog_goes_up_in_batches_of_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, text, _) = upload_a_backlog(tmp.path(), &[], "dev-b");
    let chunks = metric(&text, "blackbox_chunks_stored_total").unwrap_or(0);
    let requests = metric(&text, "blackbox_http_requests_total{status=\"201\"}").unwrap_or(0);
    assert!(chunks >= 200, "{chunks} chunks: the blocks were not small");
    assert!(
        requests * 8 <= chunks,
        "{chunks} chunks took {requests} requests: not batched\n{text}"
    );
}

/// A batch the server refuses (one chunk in it is over the server's inflated-size limit) is sent
/// again one chunk at a time: the bad chunks are set aside in `STATE/rejected/` with the
/// reason, every other chunk is stored, and no line is lost without a trace: each is stored or
/// in a rejected file, never both.
#[test]
fn a_refused_batch_is_resent_one_by_one_and_only_bad_chunks_are_set_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    // Few long lines make a small chunk; many short lines (the per-line JSON fields) a big one.
    let server = Server::start(
        &store,
        vec![],
        &["--segment-max-age-ms", "100", "--max-decompressed", "20000"],
        tmp.path(),
    );
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    let long = "L".repeat(900);
    kmsg.append(200, &long);
    kmsg.append(2000, "s");
    kmsg.append(200, &long);
    let total = kmsg.next;
    let state = tmp.path().join("state");
    let agent = Agent::start(
        &server.url(),
        &state,
        &kmsg.path,
        "dev-r",
        &["--interval", "1", "--block-size", "8192"],
    );
    let rejected_seqs = || -> Vec<u64> {
        let Ok(dir) = std::fs::read_dir(state.join("rejected")) else {
            return Vec::new();
        };
        let big = blackbox_protocol::Limits {
            max_decompressed: 64 << 20,
            ..blackbox_protocol::Limits::DEFAULT
        };
        let mut seqs = Vec::new();
        for e in dir {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "gz") {
                let c =
                    blackbox_protocol::Chunk::decode(&std::fs::read(&p).unwrap(), &big).unwrap();
                seqs.extend(c.records.iter().map(|r| r.seq));
                let why = std::fs::read_to_string(p.with_extension("why")).unwrap();
                assert!(why.contains("exceeds limit"), "{why}");
            }
        }
        seqs
    };
    let stored = || {
        seqs_by_device(&read_store(&store, &[]))
            .remove("dev-r")
            .unwrap_or_default()
    };
    let done = wait_until(Duration::from_secs(60), || {
        (stored().len() + rejected_seqs().len()) as u64 >= total
    });
    let (ok, bad) = (stored(), rejected_seqs());
    assert!(
        done,
        "{} stored + {} rejected of {total}; agent log:\n{}",
        ok.len(),
        bad.len(),
        agent.log_text()
    );
    let mut all: Vec<u64> = ok.iter().chain(&bad).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..total).collect::<Vec<u64>>(),
        "each line stored or set aside, once"
    );
    assert!(!bad.is_empty(), "no chunk was over the limit");
    // A block holds about eight long lines; the two that also hold short lines may be big.
    assert!(
        (0..190).chain(2210..2400).all(|s| ok.contains(&s)),
        "a small chunk was set aside: stored {ok:?}"
    );
    assert!(
        agent.log_text().contains("one at a time"),
        "{}",
        agent.log_text()
    );
}

/// Waits (up to two minutes) until the store holds `total` lines, then checks that `device`'s
/// are seqs `0..total`, each once, in order. Returns the agent's log.
fn all_stored_once_in_order(store: &str, device: &str, total: u64, agent: &Agent) -> String {
    let stored = || read_store(store, &[]).len() as u64 >= total;
    let ok = wait_until(Duration::from_secs(120), stored);
    let seqs = seqs_by_device(&read_store(store, &[]))
        .remove(device)
        .unwrap_or_default();
    let log = agent.log_text();
    assert!(
        ok,
        "{} of {total} lines stored; agent log:\n{log}",
        seqs.len()
    );
    assert_eq!(
        seqs,
        (0..total).collect::<Vec<u64>>(),
        "exactly once, in order"
    );
    log
}

/// A start-up backlog that keeps coming (here a log file longer than any kernel's buffer, read
/// before the agent ever catches up) is held only up to 8 MiB, then settled: the agent says so,
/// does not wait for the end, and every line is still stored exactly once, in order.
#[test]
fn an_endless_start_up_backlog_is_settled_at_8_mib_and_every_line_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let server = Server::start(&store, vec![], &[], tmp.path());
    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    let total = 10_000u64;
    let pad = "x".repeat(1000);
    let mut raw = Vec::new();
    for s in 0..total {
        raw.extend(format!("14,{s},{},-;app: line {s} {pad}\n", 1_000_000 + s * 100).as_bytes());
    }
    kmsg.append_raw(&raw);
    assert!(
        raw.len() > 9 << 20,
        "the backlog is longer than the 8 MiB held"
    );
    let agent = Agent::start(
        &server.url(),
        &tmp.path().join("state"),
        &kmsg.path,
        "dev-h",
        &[
            "--interval",
            "1",
            "--ring",
            &format!("file:{}:32M", tmp.path().join("ring").display()),
        ],
    );
    let log = all_stored_once_in_order(&store, "dev-h", total, &agent);
    assert!(
        log.contains("start-up backlog passed 8 MiB"),
        "the agent says it settled early:\n{log}"
    );
}

/// A server whose `--max-body` is below the agent's batch size answers the first batch 413 with
/// its limit; the agent then sends batches within it (not one chunk at a time, not a 413 per
/// batch), and every line arrives exactly once, in order, none set aside as rejected.
#[test]
fn a_batch_over_the_servers_body_limit_makes_the_agent_send_smaller_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, text, state) = upload_a_backlog(tmp.path(), &["--max-body", "65536"], "dev-m");
    assert!(
        log.contains("its limit is 65536"),
        "the agent read the limit from the 413:\n{log}"
    );
    assert!(
        !state.join("rejected").exists(),
        "nothing set aside:\n{log}"
    );
    let chunks = metric(&text, "blackbox_chunks_stored_total").unwrap_or(0);
    let requests = metric(&text, "blackbox_http_requests_total{status=\"201\"}").unwrap_or(0);
    let too_large = metric(&text, "blackbox_http_requests_total{status=\"413\"}").unwrap_or(0);
    assert_eq!(
        too_large, 1,
        "one 413, then batches within the limit\n{text}"
    );
    assert!(
        requests * 4 <= chunks,
        "{chunks} chunks took {requests} requests: not batched\n{text}"
    );
}

/// The S3 server goes away while an agent uploads (its port refuses connections): the
/// receiver's segment writes fail after the store client's retries, it answers 503 +
/// Retry-After without the store's details (they are in its log and
/// `blackbox_store_errors_total`), acknowledges nothing, and the agent keeps its lines and
/// retries. When S3 is back every line is stored once, in order.
#[test]
fn an_s3_outage_holds_uploads_back_and_loses_nothing() {
    let mut weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    let store = weed.store_url("outage");
    let env = weed.env();
    let tmp = tempfile::tempdir().unwrap();
    let (server, metrics) = receiver_for_store_failures(&store, env.clone(), &[], tmp.path());
    let (mut kmsg, agent) = agent_with_100_lines_stored(
        &server,
        tmp.path(),
        &tmp.path().join("state"),
        "dev-s3",
        &[],
    );
    let stored = |n: usize| read_store(&store, &env).len() == n;

    weed.stop();
    kmsg.append(100, "during");
    let refused = wait_until(Duration::from_secs(120), || {
        agent.log_text().matches("failed: 503").count() >= 2
    });
    let (agent_log, server_log) = (agent.log_text(), server.log_text());
    assert!(refused, "server:\n{server_log}\nagent:\n{agent_log}");
    assert!(
        agent_log.contains("the store is unavailable, retry later"),
        "{agent_log}"
    );
    let endpoint = weed.endpoint.trim_start_matches("http://");
    assert!(
        !agent_log.contains(endpoint),
        "the answer names the store: {agent_log}"
    );
    assert!(
        server_log.contains("segment write failed") && server_log.contains(endpoint),
        "{server_log}"
    );
    let m = http_text(&format!("http://{metrics}/metrics"));
    assert!(
        metric(&m, "blackbox_store_errors_total").is_some_and(|n| n >= 2),
        "{m}"
    );
    weed.start_again().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || stored(200)),
        "{}",
        agent.log_text()
    );
    let by_dev = seqs_by_device(&read_store(&store, &env));
    assert_eq!(by_dev["dev-s3"], (0..200).collect::<Vec<u64>>());
}

/// The S3 server hangs (SIGSTOP: connections are accepted, nothing is answered) while an agent
/// uploads with a 60 s request timeout: the receiver answers 503 + Retry-After once a chunk's
/// segment is not written within `--commit-timeout` (2 s here) instead of holding the request
/// until the agent gives up, and counts it in `blackbox_shed_total{reason="store"}`. The write
/// goes on; when S3 wakes, every line is stored once, in order (the retries of chunks that
/// write stored are recognised).
#[test]
fn a_hanging_s3_gets_devices_a_503_instead_of_a_held_request() {
    let weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    let store = weed.store_url("hang");
    let env = weed.env();
    let tmp = tempfile::tempdir().unwrap();
    let (server, metrics) =
        receiver_for_store_failures(&store, env.clone(), &["--commit-timeout", "2"], tmp.path());
    let (mut kmsg, agent) = agent_with_100_lines_stored(
        &server,
        tmp.path(),
        &tmp.path().join("state"),
        "dev-hang",
        &["--timeout", "60"],
    );
    let stored = |n: usize| read_store(&store, &env).len() == n;

    weed.pause();
    kmsg.append(100, "during");
    // Well before the agent's own 60 s timeout.
    let answered = wait_until(Duration::from_secs(20), || {
        agent.log_text().contains("the store is slow")
    });
    let m = http_text(&format!("http://{metrics}/metrics"));
    weed.resume();
    assert!(
        answered,
        "agent:\n{}\nserver:\n{}",
        agent.log_text(),
        server.log_text()
    );
    assert!(
        metric(&m, "blackbox_shed_total{reason=\"store\"}").is_some_and(|n| n >= 1),
        "{m}"
    );
    assert!(
        wait_until(Duration::from_secs(90), || stored(200)),
        "{}",
        agent.log_text()
    );
    let by_dev = seqs_by_device(&read_store(&store, &env));
    assert_eq!(by_dev["dev-hang"], (0..200).collect::<Vec<u64>>());
}
