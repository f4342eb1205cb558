//! The store's compaction lock: one `blackbox-server compact` at a time per store, across hosts,
//! on a local directory and on a real S3 server (SeaweedFS). A compaction killed at any step
//! leaves a lock that the next run on the same host goes past at once: the fault tests in
//! `compact.rs` run compaction again right after each kill.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use blackbox_server::Store;
use blackbox_server::compact::lock::{LOCKS, LockFile, StoreLock};
use blackbox_server::timespec::now_us;
use blackbox_tests::downstream::{server_cmd, server_ok};
use blackbox_tests::s3::Weed;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn lock_keys(store: &Store) -> Vec<String> {
    let mut k = store.list(LOCKS).await.unwrap();
    k.sort();
    k
}

/// `compact --auto` on `url`: its exit status and stderr.
fn compact(url: &str, env: &[(String, String)]) -> (bool, String) {
    let out = server_cmd(&["compact", "--store", url, "--auto"], env);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_compaction_at_a_time(url: &str, env: &[(String, String)]) {
    let rt = rt();
    let store = Store::open_with(url, env).unwrap();
    let ttl = Duration::from_secs(60);

    // Eight at once: exactly one gets the lock; the others say why not.
    let results: Vec<Result<StoreLock, String>> = rt.block_on(async {
        let mut tries = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let store = store.clone();
            tries.spawn(async move {
                StoreLock::acquire(&store, ttl)
                    .await
                    .map_err(|e| format!("{e:#}"))
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tries.join_next().await {
            out.push(r.unwrap());
        }
        out
    });
    let (held, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(held.len(), 1, "{refused:?}");
    for r in &refused {
        let e = r.as_ref().err().unwrap();
        assert!(e.contains("another compaction"), "{e}");
    }
    let held = held.into_iter().next().unwrap().unwrap();

    // While this (live) process holds it, a compaction stops with the holder's name and leaves
    // the lock alone; once released, compaction runs.
    let (ok, err) = compact(url, env);
    assert!(!ok);
    assert!(
        err.contains("another compaction holds this store's lock"),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    rt.block_on(held.release(&store));
    assert!(rt.block_on(lock_keys(&store)).is_empty());
    server_ok(&["compact", "--store", url, "--auto"], env);
    assert!(
        rt.block_on(lock_keys(&store)).is_empty(),
        "a finished compaction gives the lock up"
    );

    // A lock of another host: live until it expires, whether or not that host is still there.
    let put_lock = |n: u64, host: &str, pid_ns: &str, pid: u32, expires_us: i64| {
        let f = LockFile {
            host: host.into(),
            pid_ns: pid_ns.into(),
            pid,
            since_us: now_us(),
            expires_us,
        };
        rt.block_on(store.put(
            &format!("{LOCKS}{n:020}.json"),
            serde_json::to_vec(&f).unwrap(),
        ))
        .unwrap();
    };
    let soon = now_us() + 60_000_000;
    put_lock(7, "compactor-on-another-host", "", 1, soon);
    let (ok, err) = compact(url, env);
    assert!(!ok);
    assert!(err.contains("compactor-on-another-host"), "{err}");
    put_lock(8, "compactor-on-another-host", "", 1, now_us() - 1);
    server_ok(&["compact", "--store", url, "--auto"], env);
    assert!(rt.block_on(lock_keys(&store)).is_empty());

    // This host's name: a process that is gone holds nothing if it was in this PID namespace,
    // and holds until expiry if it was in another (a container with the same host name).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let gone = child.id();
    put_lock(9, host.trim(), "pid:[1]", gone, soon);
    let (ok, err) = compact(url, env);
    assert!(!ok, "a process id of another namespace says nothing here");
    assert!(err.contains(&format!("pid {gone}")), "{err}");
    put_lock(10, host.trim(), &ns.display().to_string(), gone, soon);
    server_ok(&["compact", "--store", url, "--auto"], env);
    assert!(rt.block_on(lock_keys(&store)).is_empty());

    // A garbage lock object is taken as expired.
    rt.block_on(store.put(&format!("{LOCKS}{:020}.json", 3), b"not json".to_vec()))
        .unwrap();
    server_ok(&["compact", "--store", url, "--auto"], env);

    // A holder whose lease ran out while it stalled and that another took over stops before
    // changing anything; the new holder goes on, and extends its lease past half of it.
    rt.block_on(async {
        let stalled = StoreLock::acquire(&store, Duration::from_millis(300))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let taker = StoreLock::acquire(&store, Duration::from_secs(1))
            .await
            .unwrap();
        let e = format!("{:#}", stalled.hold(&store).await.unwrap_err());
        assert!(e.contains("lost this store's lock"), "{e}");
        taker.hold(&store).await.unwrap();
        let before = lock_keys(&store).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        taker.hold(&store).await.unwrap();
        let after = lock_keys(&store).await;
        assert_eq!((before.len(), after.len()), (1, 1), "{before:?} {after:?}");
        assert!(after[0] > before[0], "extended: {before:?} -> {after:?}");
        taker.release(&store).await;
        assert!(lock_keys(&store).await.is_empty());
    });
}

#[test]
fn one_compaction_at_a_time_local_dir() {
    let tmp = tempfile::tempdir().unwrap();
    one_compaction_at_a_time(&format!("file://{}", tmp.path().display()), &[]);
}

#[test]
fn one_compaction_at_a_time_s3() {
    let weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    one_compaction_at_a_time(&weed.store_url("lock"), &weed.env());
}

/// The grinder's lock is its checkpoint's: independent of the compaction lock and of other
/// checkpoints' locks. A second grinder is told who holds it. `keep` (before every write of
/// the grinder) trusts the lease for a quarter of it without asking the store, then asks:
/// a lock another process took is noticed then.
#[test]
fn a_grinders_lock_is_its_checkpoints() {
    use blackbox_server::lease::Scope;
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().display());
    let store = Store::open(&url).unwrap();
    let scope = Scope::grinder("grind/checkpoint.json");
    assert_eq!(scope.prefix(), "grind/checkpoint.lock/");
    rt().block_on(async {
        let ttl = Duration::from_millis(800);
        let g = StoreLock::acquire_in(&store, scope.clone(), ttl)
            .await
            .unwrap();
        let other = StoreLock::acquire_in(&store, Scope::grinder("regrind/ckpt.json"), ttl)
            .await
            .unwrap();
        let compaction = StoreLock::acquire(&store, ttl).await.unwrap();
        let busy = StoreLock::try_acquire_in(&store, scope.clone(), ttl)
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            busy.contains("another grinder holds the lock of grind/checkpoint.json"),
            "{busy}"
        );

        // Another host takes it (as if this one had stalled past its lease).
        let keys = store.list("grind/checkpoint.lock/").await.unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let n: u64 = keys[0]["grind/checkpoint.lock/".len()..]
            .trim_end_matches(".json")
            .parse()
            .unwrap();
        let file = LockFile {
            host: "elsewhere".into(),
            pid_ns: String::new(),
            pid: 1,
            since_us: now_us(),
            expires_us: now_us() + 60_000_000,
        };
        store
            .put(
                &format!("grind/checkpoint.lock/{:020}.json", n + 1),
                serde_json::to_vec(&file).unwrap(),
            )
            .await
            .unwrap();
        g.keep(&store)
            .await
            .expect("trusted within a quarter of the lease");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let e = g.keep(&store).await.unwrap_err();
        assert!(blackbox_server::lease::LockLost::is(&e), "{e:#}");
        let e = format!("{e:#}");
        assert!(
            e.contains("this grinder lost the lock of grind/checkpoint.json"),
            "{e}"
        );
        other.hold(&store).await.unwrap();
        compaction.hold(&store).await.unwrap();
    });
}
