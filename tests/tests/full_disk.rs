//! A full disk under the store, a following grinder or the agent's ring: a small tmpfs that a
//! ballast file fills to the last byte (mounting it needs root; CI runs as root). What the
//! brief asks of every bad input: a clear error, and nothing lost.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blackbox_protocol::SyncPoint;
use blackbox_server::timespec::now_us;
use blackbox_tests::downstream::{corpus_lines, events, grind_args, line_chunks, post, server_cmd};
use blackbox_tests::harness::{
    BOOT, KmsgFile, Server, agent_with_100_lines_stored, bin, free_port, http_text, metric,
    read_store, receiver_for_store_failures, seqs_by_device, wait_until,
};

/// A tmpfs of a few MiB mounted for one test (unmounted when dropped), standing in for a disk.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount failed (this test needs root to mount a small tmpfs as a disk it can fill; \
             CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir: dir.to_owned(),
        }
    }

    fn ballast(&self) -> PathBuf {
        self.dir.join("ballast")
    }

    /// Fills the disk to its last byte: writes until the filesystem says it is full (ENOSPC).
    fn fill(&self) {
        let mut f = std::fs::File::create(self.ballast()).unwrap();
        for block in [64 << 10, 4 << 10, 1] {
            let buf = vec![0u8; block];
            loop {
                match f.write(&buf) {
                    Ok(n) if n == buf.len() => {}
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                    Err(e) => panic!("filling the disk: {e}"),
                }
            }
        }
        let free = Command::new("df")
            .arg("--output=avail")
            .arg(&self.dir)
            .output();
        let free = String::from_utf8_lossy(&free.unwrap().stdout).into_owned();
        assert!(
            free.lines().nth(1).is_some_and(|l| l.trim() == "0"),
            "not full: {free}"
        );
    }

    fn free(&self) {
        std::fs::remove_file(self.ballast()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The store's disk fills while an agent uploads: the receiver answers 503 (its log says the
/// disk is full, `blackbox_store_errors_total` counts the failed segments), acknowledges
/// nothing it could not store and leaves no partial object; the agent keeps its lines and
/// retries as it does when the network is down. When space returns, every line arrives once,
/// in order, and the receiver never stopped serving.
#[test]
fn a_full_disk_refuses_uploads_with_503_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "8m");
    let store = format!("file://{}", disk.dir.join("store").display());
    let (server, metrics) = receiver_for_store_failures(&store, vec![], &[], tmp.path());
    let (mut kmsg, agent) = agent_with_100_lines_stored(
        &server,
        tmp.path(),
        &tmp.path().join("state"),
        "full-disk",
        &[],
    );
    let stored = |n: usize| read_store(&store, &[]).len() == n;

    disk.fill();
    kmsg.append(100, "while the disk is full");
    let refused = wait_until(Duration::from_secs(30), || {
        server.log_text().contains("segment write failed")
            && agent.log_text().contains("failed: 503")
    });
    assert!(
        refused,
        "server:\n{}\nagent:\n{}",
        server.log_text(),
        agent.log_text()
    );
    // A few more attempts while full: nothing new is stored, nothing half-written is left.
    std::thread::sleep(Duration::from_secs(3));
    let server_log = server.log_text();
    assert!(
        server_log.contains("No space left on device"),
        "the error does not say the disk is full:\n{server_log}"
    );
    assert_eq!(read_store(&store, &[]).len(), 100);
    let leftovers: Vec<String> = walk(&disk.dir.join("store"))
        .into_iter()
        .filter(|p| !(p.ends_with(".seg.gz") || p.ends_with(".idx")))
        .collect();
    assert!(leftovers.is_empty(), "partial objects left: {leftovers:?}");
    let m = http_text(&format!("http://{metrics}/metrics"));
    assert!(
        metric(&m, "blackbox_store_errors_total").is_some_and(|n| n > 0),
        "{m}"
    );

    disk.free();
    assert!(
        wait_until(Duration::from_secs(30), || stored(200)),
        "not everything arrived after space returned:\n{}",
        agent.log_text()
    );
    let by_dev = seqs_by_device(&read_store(&store, &[]));
    assert_eq!(by_dev["full-disk"], (0..200).collect::<Vec<u64>>());
    assert_eq!(http_text(&format!("{}/healthz", server.url())), "ok\n");
}

/// A store on a small disk (8 MiB) with a receiver writing to it, and the default rules.
struct GrindSetup {
    tmp: tempfile::TempDir,
    disk: SmallDisk,
    server: Server,
    store: String,
    rules: String,
}

impl GrindSetup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let disk = SmallDisk::mount(&tmp.path().join("disk"), "8m");
        let store = format!("file://{}", disk.dir.join("store").display());
        let server = Server::start(&store, vec![], &["--segment-max-age-ms", "30"], tmp.path());
        let rules = tmp.path().join("rules.toml");
        std::fs::write(&rules, blackbox_server::rules::DEFAULT_RULES).unwrap();
        let rules = rules.to_str().unwrap().to_owned();
        Self {
            tmp,
            disk,
            server,
            store,
            rules,
        }
    }

    /// `grind` arguments from an hour back, events and checkpoint under `prefix`.
    fn args(&self, prefix: &str, extra: &[&str]) -> Vec<String> {
        grind_args(
            &self.store,
            &self.rules,
            prefix,
            &[&["--from", "-2h"], extra].concat(),
        )
    }

    /// Starts a following grinder (events under `prefix`) serving `/metrics`; its log goes to
    /// `grinder.log`.
    fn follower(&self, prefix: &str) -> Follower {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = self.tmp.path().join("grinder.log");
        let child = Command::new(bin("blackbox-server"))
            .args(self.args(prefix, &["--metrics-listen", &metrics]))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Follower {
            child,
            metrics,
            log,
        }
    }

    /// Uploads two devices' corpus logs (an hour old), and returns the events a grinder that
    /// never saw the disk full makes of them (a `--once` run under `ref/`).
    fn upload_and_grind_reference(&self) -> Vec<blackbox_server::grind::Event> {
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: now_us() - 3_600_000_000,
            synced: true,
        };
        for (device, file) in [("dev-linux", "Linux_2k.log"), ("dev-ssh", "OpenSSH_2k.log")] {
            for body in line_chunks(device, 3, sync, &corpus_lines(file), 100) {
                assert_eq!(post(&self.server.url(), device, &body), Ok(201));
            }
        }
        let args = self.args("ref/", &["--once"]);
        let reference = server_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        assert!(reference.status.success(), "{reference:?}");
        let reference = events(&self.store, "ref/events/");
        assert!(reference.len() > 100, "{} events", reference.len());
        reference
    }

    /// Frees the disk, waits for the follower's events under `prefix` to catch up with
    /// `reference` and checks they are equal; stops the follower and returns its log.
    fn catch_up(
        &self,
        mut f: Follower,
        prefix: &str,
        reference: &[blackbox_server::grind::Event],
    ) -> String {
        self.disk.free();
        let events_dir = format!("{prefix}events/");
        let caught_up = wait_until(Duration::from_secs(60), || {
            events(&self.store, &events_dir).len() >= reference.len()
        });
        let text = f.log();
        let _ = f.child.kill();
        let _ = f.child.wait();
        assert!(caught_up, "{text}");
        assert!(
            events(&self.store, &events_dir) == reference,
            "events differ from a run that never saw the disk full"
        );
        text
    }
}

/// A grinder started by [`GrindSetup::follower`].
struct Follower {
    child: std::process::Child,
    metrics: String,
    log: PathBuf,
}

impl Follower {
    fn metrics(&self) -> String {
        http_text(&format!("http://{}/metrics", self.metrics))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it has counted two store errors; checks it is still running and its log
    /// says the disk is full.
    fn rides_out_errors(&mut self, says: &str) {
        let failed_twice = wait_until(Duration::from_secs(20), || {
            metric(&self.metrics(), "blackbox_grind_errors_total").is_some_and(|n| n >= 2)
        });
        let text = self.log();
        assert!(failed_twice, "{}\n{text}", self.metrics());
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the grinder exited:\n{text}"
        );
        assert!(
            text.contains(says) && text.contains("No space left on device"),
            "{text}"
        );
    }
}

/// The store's disk fills under a following grinder: writing its events fails, and it says so
/// (the disk is full), counts the failures in `blackbox_grind_errors_total`, writes no events
/// object, does not move its checkpoint on, and keeps trying (waits doubling from 1 s) instead of exiting.
/// When space returns it catches up: its events are exactly those of a run that never saw
/// the disk full.
#[test]
fn a_full_disk_holds_a_grinder_back_and_it_catches_up_when_space_returns() {
    let setup = GrindSetup::new();
    // The follower starts on an empty store, takes its lock and idles; it is stopped (SIGSTOP)
    // while the logs arrive and the disk fills, so that its first write meets a full disk.
    let mut follower = setup.follower("full/");
    assert!(
        wait_until(Duration::from_secs(20), || {
            follower.metrics().contains("blackbox_grind_active 1")
        }),
        "{}",
        follower.log()
    );
    let pid = follower.child.id().to_string();
    signal("-STOP", &pid);
    let reference = setup.upload_and_grind_reference();

    let checkpoint = setup.disk.dir.join("store/full/checkpoint.json");
    let checkpoint_before = std::fs::read(&checkpoint).ok();
    setup.disk.fill();
    signal("-CONT", &pid);
    follower.rides_out_errors("grinding failed; trying again");
    assert!(events(&setup.store, "full/events/").is_empty());
    assert_eq!(
        std::fs::read(&checkpoint).ok(),
        checkpoint_before,
        "the checkpoint moved on without the events"
    );

    let text = setup.catch_up(follower, "full/", &reference);
    assert!(text.contains("grinding again after store errors"), "{text}");
}

/// A following grinder started while its store's disk is full cannot take its checkpoint's
/// lock (that writes an object): it says so, counts the failures, stays a standby
/// (`blackbox_grind_active 0`) and keeps trying instead of exiting. When space returns it
/// takes the lock and grinds everything, as a grinder started then would.
#[test]
fn a_grinder_started_on_a_full_disk_waits_for_room() {
    let setup = GrindSetup::new();
    let reference = setup.upload_and_grind_reference();
    setup.disk.fill();
    let mut follower = setup.follower("late/");
    follower.rides_out_errors("cannot take the checkpoint's lock; trying again");
    assert!(
        follower.metrics().contains("blackbox_grind_active 0"),
        "{}",
        follower.metrics()
    );

    let text = setup.catch_up(follower, "late/", &reference);
    assert!(text.contains("the store answers again"), "{text}");
}

/// A receiver that died between writing a segment and its index, restarted on a full disk:
/// it rebuilds the index in memory, says it cannot write it, and serves (a retry of the chunk
/// in that segment is recognised and acknowledged without a write). Once space returns, the
/// next start writes the index.
#[test]
fn a_receiver_restarted_on_a_full_disk_recovers_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "4m");
    let store = format!("file://{}", disk.dir.join("store").display());
    let mut server = Server::start(
        &store,
        vec![],
        &["--segment-max-age-ms", "30", "--fault", "after-segment-put"],
        tmp.path(),
    );
    let sync = SyncPoint {
        mono_us: 0,
        wall_us: now_us(),
        synced: true,
    };
    let lines: Vec<String> = (0..10).map(|i| format!("line {i}")).collect();
    let chunk = line_chunks("dev-orphan", 1, sync, &lines, 10).remove(0);
    let r = post(&server.url(), "dev-orphan", &chunk);
    assert!(r.is_err(), "the receiver should have died first, got {r:?}");
    assert!(server.wait_exit(Duration::from_secs(10)));
    let kinds = |suffix: &str| {
        walk(&disk.dir.join("store"))
            .iter()
            .filter(|k| k.ends_with(suffix))
            .count()
    };
    assert_eq!((kinds(".seg.gz"), kinds(".idx")), (1, 0));

    disk.fill();
    server.restart();
    assert_eq!(post(&server.url(), "dev-orphan", &chunk), Ok(200));
    let log = server.log_text();
    assert!(
        log.contains("cannot write a rebuilt index") && log.contains("No space left on device"),
        "{log}"
    );
    assert_eq!(kinds(".idx"), 0);

    disk.free();
    server.kill9();
    server.restart();
    assert_eq!(kinds(".idx"), 1, "{}", server.log_text());
    assert_eq!(post(&server.url(), "dev-orphan", &chunk), Ok(200));
    assert_eq!(
        seqs_by_device(&read_store(&store, &[]))["dev-orphan"],
        (0..10).collect::<Vec<u64>>()
    );
}

/// A lock whose lease could not be extended (the disk full) is a store error, not a lost lock:
/// the holder may try again. And until an extension succeeds, `keep` asks the store every time
/// instead of trusting the last check for a quarter of the lease: that check found the lock
/// this process's, but its lease may be running out. Once space returns it is extended.
#[test]
fn a_lock_that_cannot_be_extended_is_not_trusted_until_it_is() {
    use blackbox_server::lease::{LockLost, Scope, StoreLock};
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "1m");
    let store =
        blackbox_server::Store::open(&format!("file://{}", disk.dir.join("store").display()))
            .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ttl = Duration::from_secs(4);
        let lock = StoreLock::acquire_in(&store, Scope::grinder("g/checkpoint.json"), ttl)
            .await
            .unwrap();
        // Past half the lease, the next check extends it: on a full disk that fails.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        disk.fill();
        let e = lock.hold(&store).await.unwrap_err();
        assert!(!LockLost::is(&e), "{e:#}");
        assert!(
            format!("{e:#}").contains("No space left on device"),
            "{e:#}"
        );
        let e = lock
            .keep(&store)
            .await
            .expect_err("keep trusted a check whose extension failed");
        assert!(!LockLost::is(&e), "{e:#}");
        disk.free();
        lock.keep(&store).await.unwrap();
        let keys = store.list("g/checkpoint.lock/").await.unwrap();
        assert!(
            keys.last()
                .is_some_and(|k| k.ends_with("00000000000000000001.json")),
            "not extended: {keys:?}"
        );
    });
}

/// The agent's file ring is reserved in full when it starts: a sparse file's holes are only
/// allocated when the ring first writes into them, and on a full disk that write would kill the
/// agent (SIGBUS). Here its disk fills after it started, and it goes on recording and uploading
/// thousands of lines into ring pages it had not touched yet.
#[test]
fn a_disk_that_fills_under_the_agents_ring_does_not_stop_it() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "20m");
    let store = format!("file://{}", tmp.path().join("store").display());
    let server = Server::start(&store, vec![], &["--segment-max-age-ms", "100"], tmp.path());
    let (mut kmsg, agent) = agent_with_100_lines_stored(
        &server,
        tmp.path(),
        &disk.dir.join("state"),
        "ring-on-a-full-disk",
        &[],
    );
    let stored = |n: usize| read_store(&store, &[]).len() == n;
    disk.fill();
    // About 1.5 MiB of records: far more ring pages than the first hundred lines touched.
    kmsg.append(
        20_000,
        "after the disk filled, a line long enough to fill ring pages fast",
    );
    assert!(
        wait_until(Duration::from_secs(60), || stored(20_100)),
        "{} of 20100 lines stored; agent:\n{}",
        read_store(&store, &[]).len(),
        agent.log_text()
    );
    let by_dev = seqs_by_device(&read_store(&store, &[]));
    assert_eq!(
        by_dev["ring-on-a-full-disk"],
        (0..20_100).collect::<Vec<u64>>()
    );
}

/// No room on the disk for the ring: the agent stops at once and says why (the ring file, its
/// size, the disk full), instead of starting on a sparse file it could not write into.
#[test]
fn no_room_for_the_agents_ring_is_a_clear_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "4m");
    let kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    let state = disk.dir.join("state");
    let mut child = Command::new(bin("blackbox-agent"))
        .args(["run", "--server", "http://127.0.0.1:9", "--state-dir"])
        .arg(&state)
        .arg("--kmsg")
        .arg(&kmsg.path)
        .args(["--device-id", "no-room", "--boot-id", BOOT, "--pstore-dir"])
        .arg(tmp.path().join("pstore"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited, "the agent did not stop:\n{err}");
    assert!(!out.status.success());
    let ring = state.join("ring");
    for want in [
        format!(
            "reserving 16777216 bytes for the ring file {}",
            ring.display()
        ),
        "No space left on device".to_owned(),
    ] {
        assert!(err.contains(&want), "{want:?} not in:\n{err}");
    }
}

/// An agent for `server` with its state in `state`, reading a kmsg file in `dir` (not on the
/// disk that fills) that holds 100 lines, once those are stored.
fn signal(sig: &str, pid: &str) {
    let st = Command::new("kill").args([sig, pid]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Every file under `dir` (its path as a string).
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
